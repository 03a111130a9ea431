"""HiPrune (arXiv 2508.00553): anchors from a middle ViT layer's attention, their grid neighbours as
buffers, and registers from a deep layer's attention (vision stage, text-agnostic)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import (ImageTokens, Method, PruneConfig, Selection, VisionSignal, as_grid, check_real, frame_grid, is_grid,
                   ranking)
from .registry import register


def _top(scores: torch.Tensor, k: int, exclude: torch.Tensor | None = None) -> torch.Tensor:
    """Indices of the k largest scores (ties: lowest index), skipping `exclude` (BoolTensor)."""
    s = scores.float()
    if exclude is not None:
        s = s.masked_fill(exclude, float("-inf"))
    return ranking(s)[:k]


def n_anchors(keep: int, alpha: float) -> int:
    """round(keep * alpha / 5) with Python rounding (half to even), as the paper's code."""
    return round(keep * alpha / 5)


def anchors_and_buffers(anchors: torch.Tensor, grid: tuple[int, int], n: int) -> torch.Tensor:
    """BoolTensor[n]: the anchors and their in-grid left/right/up/down neighbours."""
    h, w = grid
    out = torch.zeros(n, dtype=torch.bool, device=anchors.device)
    if anchors.numel() == 0:
        return out
    r, c = anchors // w, anchors % w
    out[anchors] = True
    for dr, dc in ((0, -1), (0, 1), (-1, 0), (1, 0)):
        rr, cc = r + dr, c + dc
        ok = (rr >= 0) & (rr < h) & (cc >= 0) & (cc < w)
        out[(rr * w + cc)[ok]] = True
    return out


def select(object_scores: torch.Tensor, deep_scores: torch.Tensor, grid: tuple[int, int], keep: int,
           alpha: float = 0.1) -> torch.Tensor:
    """LongTensor[B, keep], ascending.

    object_scores, deep_scores: [B, N] attention received per token at the object and deep layers;
    grid (H, W) with H*W = N, row-major. Anchors = the top round(keep*alpha/5) object scores; buffers =
    their 4 in-grid neighbours (out-of-grid ones are dropped, never wrapped); registers = the top
    deep scores among the rest, filling up to exactly `keep`. If anchors plus buffers would exceed
    `keep` (only for alpha near 1 and tiny budgets), the number of anchors is reduced until they fit.
    """
    if object_scores.shape != deep_scores.shape or object_scores.dim() != 2:
        raise ValueError(f"scores must both be [B, N]; got {tuple(object_scores.shape)} and {tuple(deep_scores.shape)}")
    b, n = object_scores.shape
    if not is_grid(grid, 2):
        raise ValueError(f"grid must be two ints (H, W) >= 1, got {grid!r}")
    h, w = grid = as_grid(grid)
    if h * w != n:
        raise ValueError(f"grid {h}x{w} does not cover {n} tokens")
    if isinstance(keep, bool) or not isinstance(keep, int) or not 1 <= keep <= n:
        raise ValueError(f"keep must be an int in [1, {n}], got {keep!r}")
    alpha = check_real("alpha", alpha, 0.0, 1.0)
    out = torch.empty(b, keep, dtype=torch.long, device=object_scores.device)
    for i in range(b):
        na = n_anchors(keep, alpha)
        while True:
            fixed = anchors_and_buffers(_top(object_scores[i], na), grid, n)
            if int(fixed.sum()) <= keep:
                break
            na -= 1
        registers = _top(deep_scores[i], keep - int(fixed.sum()), exclude=fixed)
        fixed[registers] = True
        out[i] = fixed.nonzero().squeeze(1)
    return out


@dataclass
class HiPruneConfig(PruneConfig):
    alpha: float = 0.1  # share of the budget spent on anchors and their buffers (anchors = round(keep*alpha/5))
    object_layer: int | None = None  # 0-based ViT layer of the object scores; None = the adapter's default
    # (CLIP-L/336: layer 9 of 24, 1-indexed; Qwen-VL: the middle block, 16 of 32)
    deep_layer: int | str = "feature"  # the layer feeding the projector (Qwen-VL: the last block)

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0 <= self.alpha <= 1:
            raise ValueError(f"alpha must be a float in [0, 1], got {self.alpha!r}")
        if self.object_layer is not None and (isinstance(self.object_layer, bool) or not isinstance(self.object_layer, int)):
            raise TypeError(f"object_layer must be an int or None, got {self.object_layer!r}")
        if self.deep_layer != "feature" and (isinstance(self.deep_layer, bool) or not isinstance(self.deep_layer, int)):
            raise TypeError(f"deep_layer must be an int or 'feature', got {self.deep_layer!r}")


@register("hiprune")
class HiPrune(Method):
    """Hierarchical ViT attention: object anchors + buffers from a middle layer, registers from a deep one."""

    stage = "vision"
    Config = HiPruneConfig
    per_grid = "select"
    paper = "HiPrune: Training-Free Visual Token Pruning via Hierarchical Attention (arXiv 2508.00553)"

    def vision_signals(self):
        obj = "object" if self.config.object_layer is None else self.config.object_layer
        return {"object": VisionSignal(obj, "mean", option="object_layer"),
                "deep": VisionSignal(self.config.deep_layer, "mean", option="deep_layer")}

    def select(self, image: ImageTokens) -> Selection:
        h, w = frame_grid(image, "hiprune")
        s = image.signals
        idx = select(s["object"][None], s["deep"][None], (h, w), image.keep, self.config.alpha)[0]
        return Selection(idx.to(image.features.device))
