"""token_shuffle: training-free window merging after Token-Shuffle (arXiv 2504.17789), projector stage.

Each s x s window of an image's projected token grid becomes one token, the mean of its members,
rescaled to their mean norm (averaging dissimilar tokens shrinks the norm). With a keep/ratio budget
instead of s, adaptive average pooling to the largest grid that fits, aspect ratio kept."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..kernels.precision import float32_math
from .base import ImageTokens, Method, PruneConfig, Selection, check_bool, frame_grid
from .pool import pooled_grid
from .registry import register


def windows(size: int, out: int, s: int | None) -> list[tuple[int, int]]:
    """[start, end) of each window along one side: fixed windows of s (the last may be shorter), or
    the windows of adaptive pooling to `out` (F.adaptive_avg_pool2d's: floor(i*n/out), ceil((i+1)*n/out))."""
    if s is not None:
        return [(i, min(i + s, size)) for i in range(0, size, s)]
    return [((i * size) // out, -((-(i + 1) * size) // out)) for i in range(out)]


def merge(features: torch.Tensor, grid: tuple[int, int], *, s: int | None = None, keep: int | None = None,
          rescale: bool = True) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
    """Merge a row-major [h*w, D] token grid window by window.

    Exactly one of `s` (window side) and `keep` (largest aspect-kept grid with h'*w' <= keep).
    Returns (tokens [h'*w', D] in the input dtype, the top-left slot of each window ascending, (h', w')).
    Means in float32; with `rescale`, each merged token is scaled to the mean L2 norm of its members.
    """
    h, w = grid
    if features.shape[0] != h * w:
        raise ValueError(f"features have {features.shape[0]} tokens, grid {h}x{w} needs {h * w}")
    if (s is None) == (keep is None):
        raise ValueError("give exactly one of s and keep")
    if s is not None:
        hp, wp = math.ceil(h / s), math.ceil(w / s)
    else:
        hp, wp = pooled_grid(h, w, keep)
    rows, cols = windows(h, hp, s), windows(w, wp, s)
    weights = torch.zeros(hp * wp, h * w, dtype=torch.float32, device=features.device)
    for i, (r0, r1) in enumerate(rows):
        for j, (c0, c1) in enumerate(cols):
            cell = weights[i * wp + j].view(h, w)
            cell[r0:r1, c0:c1] = 1.0 / ((r1 - r0) * (c1 - c0))
    x = features.float()
    with float32_math(x):
        merged = weights @ x
        if rescale:
            target = weights @ x.norm(dim=-1)
            merged = merged * (target / merged.norm(dim=-1).clamp_min(1e-12))[:, None]
    starts = torch.tensor([r0 * w + c0 for r0, _ in rows for c0, _ in cols], dtype=torch.long, device=features.device)
    return merged.to(features.dtype), starts, (hp, wp)


@dataclass
class TokenShuffleConfig(PruneConfig):
    s: int | None = None  # window side; None with no keep/ratio means s=2 (4x fewer tokens)
    rescale: bool = True  # scale each merged token to the mean norm of its members
    positions: str = "grid"  # M-RoPE: "grid" = a contiguous coarse grid, "topleft" = each window's first position
    budget_fields: ClassVar[tuple[str, ...]] = ("keep", "ratio", "s")

    def __post_init__(self):
        self._check_flags()
        if self.keep is None and self.ratio is None:
            if self.s is None:
                self.s = 2
        elif self.s is not None:
            raise ValueError("give either s= (window side) or a keep=/ratio= budget, not both")
        if self.s is not None:
            if isinstance(self.s, bool) or not isinstance(self.s, int) or self.s < 1:
                raise ValueError(f"s must be an int >= 1, got {self.s!r}")
        else:
            super().__post_init__()
        check_bool("rescale", self.rescale)
        if self.positions not in ("grid", "topleft"):
            raise ValueError(f"positions must be 'grid' or 'topleft', got {self.positions!r}")

    def budget(self, n: int) -> int:
        if self.s is not None:
            raise ValueError("token_shuffle with s= needs the image grid to count its tokens")
        return super().budget(n)


@register("token_shuffle")
class TokenShuffle(Method):
    """Training-free s x s window merge of projected tokens (mean, norm-rescaled), coarse-grid positions."""

    stage = "projector"
    Config = TokenShuffleConfig
    paper = "after Ma et al., Token-Shuffle (arXiv 2504.17789); training-free window-mean variant"
    per_grid = "merge"

    def merged_grid(self, h, w, keep):
        s = self.config.s
        return (math.ceil(h / s), math.ceil(w / s)) if s is not None else pooled_grid(h, w, keep)

    def budget(self, n, grid):
        s = self.config.s
        if s is None:
            return self.config.budget(n)
        if grid is None or grid[0] != 1:
            raise ValueError("token_shuffle needs each image's (1, h, w) token grid, which this adapter could not determine")
        hp, wp = self.merged_grid(grid[1], grid[2], n)
        return min(n, hp * wp)

    def select(self, image: ImageTokens) -> Selection:
        h, w = frame_grid(image, "token_shuffle")
        if self.config.s is not None:
            tokens, idx, (hp, wp) = merge(image.features, (h, w), s=self.config.s, rescale=self.config.rescale)
        else:
            tokens, idx, (hp, wp) = merge(image.features, (h, w), keep=image.keep, rescale=self.config.rescale)
        grid = (1, hp, wp) if self.config.positions == "grid" else None
        return Selection(idx, tokens=tokens, grid=grid)
