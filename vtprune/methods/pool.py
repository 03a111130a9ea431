"""`pool` baseline: average-pool each image's token grid to a smaller grid (projector stage)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base import ImageTokens, Method, PruneConfig, Selection, frame_grid
from .registry import register


def pooled_grid(h: int, w: int, keep: int) -> tuple[int, int]:
    """The largest (h', w') with h'*w' <= keep that keeps the aspect ratio: floor(h*s), floor(w*s)
    with s = sqrt(keep / (h*w)), each at least 1 and at most the original side."""
    s = math.sqrt(keep / (h * w))
    hp = min(h, max(1, math.floor(h * s + 1e-9)))
    wp = min(w, max(1, math.floor(w * s + 1e-9)))
    while hp * wp > keep:  # only when a side was clamped up to 1
        if wp >= hp and wp > 1:
            wp -= 1
        else:
            hp -= 1
    return hp, wp


def window_starts(size: int, out: int) -> torch.Tensor:
    """First index of each adaptive-pooling window (the same windows as F.adaptive_avg_pool2d)."""
    return torch.tensor([(i * size) // out for i in range(out)], dtype=torch.long)


def pool(features: torch.Tensor, grid: tuple[int, int], keep: int) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
    """Average-pool `features` [h*w, D] (row-major grid) to h'*w' <= keep tokens.

    Returns (tokens [h'*w', D] in the input dtype, indices LongTensor[h'*w'] of each window's
    top-left token, ascending, and (h', w')). Means are computed in float32.
    """
    h, w = grid
    if features.shape[0] != h * w:
        raise ValueError(f"features have {features.shape[0]} tokens, grid {h}x{w} needs {h * w}")
    hp, wp = pooled_grid(h, w, keep)
    x = features.float().T.reshape(1, -1, h, w)
    pooled = F.adaptive_avg_pool2d(x, (hp, wp)).reshape(-1, hp * wp).T.to(features.dtype)
    rows, cols = window_starts(h, hp), window_starts(w, wp)
    indices = (rows[:, None] * w + cols[None, :]).reshape(-1).to(features.device)
    return pooled, indices, (hp, wp)


@dataclass
class PoolConfig(PruneConfig):
    # M-RoPE models: "grid" gives merged tokens a contiguous coarse grid (text after the image and the
    # decode positions shift accordingly); "topleft" keeps each window's top-left original position.
    positions: str = "grid"

    def __post_init__(self):
        super().__post_init__()
        if self.positions not in ("grid", "topleft"):
            raise ValueError(f"positions must be 'grid' or 'topleft', got {self.positions!r}")


@register("pool")
class Pool(Method):
    """Spatial average pooling of each image's token grid to <= keep tokens, aspect kept (baseline)."""

    stage = "projector"
    Config = PoolConfig
    per_grid = "merge"

    def merged_grid(self, h, w, keep):
        return pooled_grid(h, w, keep)

    def select(self, image: ImageTokens) -> Selection:
        h, w = frame_grid(image, "pool")
        tokens, indices, (hp, wp) = pool(image.features, (h, w), image.keep)
        grid = (1, hp, wp) if self.config.positions == "grid" else None
        return Selection(indices, tokens=tokens, grid=grid)
