"""VFlowOpt (ICCV 2025, arXiv 2508.05211): an importance map from the vision encoder's attention,
prune-and-recycle before the LLM, then two progressive drops inside it by the same importance.
Its hyperparameters are tuned per model by `vtprune tune --method vflowopt` (see vtprune.tune)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .base import (
    CLIP_MEAN, CLIP_STD, ImageTokens, LayerTokens, Method, PruneConfig, Selection, VisionSignal, check_real, frame_grid,
    ranking, top_per_image,
)
from .registry import register

# Released presets for LLaVA-OV-7B by the paper's layer-averaged "retain" percentage (alpha = 0 in all).
PRESETS = {
    10: dict(ratio=0.1166, r2=1.0, r3=0.6011, t=39.26, a=17.39),
    25: dict(ratio=0.2651, r2=0.9833, r3=0.8773, t=34.76, a=15.58),
    50: dict(ratio=0.7233, r2=0.7487, r3=0.487, t=28.68, a=11.76),
}


def patch_entropy(pixels: torch.Tensor, bins: int = 256) -> torch.Tensor:
    """Shannon entropy (bits) of each row of grey levels. pixels: integer [N, P] in [0, bins)."""
    if pixels.dtype.is_floating_point:
        raise TypeError("patch_entropy expects integer grey levels (0..255)")
    n, p = pixels.shape
    counts = torch.zeros(n, bins, dtype=torch.float32, device=pixels.device)
    counts.scatter_add_(1, pixels.long().clamp(0, bins - 1), torch.ones(n, p, device=pixels.device))
    prob = counts / p
    return -(prob * torch.log2(prob.clamp_min(1e-30))).sum(1)


def importance(attention: torch.Tensor, entropy: torch.Tensor | None = None, alpha: float = 0.0) -> torch.Tensor:
    """I = att + alpha * softmax(H) over the image's tokens (float32 [N])."""
    out = attention.float()
    if alpha:
        if entropy is None:
            raise ValueError("alpha != 0 needs the patch entropy (the entropy signal)")
        out = out + alpha * torch.softmax(entropy.float(), dim=0)
    return out


def cells(grid: tuple[int, int], a: float, device=None) -> torch.Tensor:
    """LongTensor[h*w]: the cell of each token when the grid is covered by cells of side `a` tokens
    (row floor(r / a), column floor(c / a); the last row/column of cells may be partial)."""
    h, w = grid
    r = torch.arange(h, device=device)[:, None].expand(h, w)
    c = torch.arange(w, device=device)[None, :].expand(h, w)
    per_row = math.ceil(w / a)
    return (torch.floor(r / a).long() * per_row + torch.floor(c / a).long()).reshape(-1)


def prune_recycle(features: torch.Tensor, scores: torch.Tensor, grid: tuple[int, int], keep: int, a: float
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep the most important tokens and merge the pruned ones of each cell into one recycled token,
    exactly `keep` tokens in all.

    The number kept outright is the smallest k with k + (cells holding a pruned token) = keep. A
    recycled token is the importance-weighted mean of its cell's pruned tokens (uniform if their
    weights sum to 0), placed at the slot of the most important of them, carrying its importance.
    If keep is below the number of cells, no recycling: the top `keep` tokens.
    Returns (indices ascending [keep], tokens [keep, D] in the input dtype, importance [keep])."""
    n = features.shape[0]
    h, w = grid
    if h * w != n or scores.shape != (n,):
        raise ValueError(f"grid {h}x{w}, features {tuple(features.shape)} and scores {tuple(scores.shape)} disagree")
    if isinstance(keep, bool) or not isinstance(keep, int) or not 1 <= keep <= n:
        raise ValueError(f"keep must be an int in [1, {n}], got {keep!r}")
    if not a > 0:
        raise ValueError(f"cell side a must be > 0, got {a}")
    s = scores.float()
    order = ranking(s)
    rank = torch.empty(n, dtype=torch.long, device=s.device)
    rank[order] = torch.arange(n, device=s.device)
    cell = cells(grid, a, s.device)
    n_cells = int(cell.max()) + 1
    worst = torch.full((n_cells,), -1, dtype=torch.long, device=s.device).scatter_reduce(0, cell, rank, "amax")
    worst = worst[worst >= 0]
    # f(k) = k + #cells whose worst-ranked token is pruned (rank >= k): nondecreasing in steps of 0 or 1
    ks = torch.arange(n + 1, device=s.device)
    f = ks + (worst[None, :] >= ks[:, None]).sum(1)
    hit = (f == keep).nonzero()
    if hit.numel() == 0:  # keep < number of cells
        idx = order[:keep].sort().values
        return idx, features[idx], s[idx]
    k = int(hit[0])
    kept = torch.zeros(n, dtype=torch.bool, device=s.device)
    kept[order[:k]] = True
    x = features.float()
    slots, tokens, imp = [order[:k]], [x[order[:k]]], [s[order[:k]]]
    for c in torch.unique(cell[~kept]).tolist():
        members = ((cell == c) & ~kept).nonzero().squeeze(1)
        wts = s[members].clamp_min(0)
        wts = wts / wts.sum() if float(wts.detach().sum()) > 0 else torch.full_like(wts, 1.0 / members.numel())
        best = members[ranking(s[members])[0]]
        slots.append(best[None])
        tokens.append((wts[:, None] * x[members]).sum(0, keepdim=True))
        imp.append(s[best][None])
    slots, tokens, imp = torch.cat(slots), torch.cat(tokens), torch.cat(imp)
    perm = torch.argsort(slots)
    return slots[perm], tokens[perm].to(features.dtype), imp[perm]


def llm_layers(num_layers: int) -> list[int]:
    """0-based layers after which the in-LLM drops happen: before layers round(9L/28) and round(18L/28)."""
    out = []
    for frac in (9 / 28, 18 / 28):
        p = min(num_layers - 2, max(0, round(num_layers * frac) - 1))
        if p not in out:
            out.append(p)
    return out


@dataclass
class VFlowOptConfig(PruneConfig):
    """keep/ratio = the tokens entering the LLM (R1). Defaults: the released 25 % LLaVA-OV-7B preset."""

    r2: float = 0.9833  # fraction of visual tokens kept at the first in-LLM drop
    r3: float = 0.8773  # fraction kept at the second
    t: float = 34.76  # context (sink) threshold: tokens receiving > t x the mean attention
    a: float = 15.58  # recycling cell side, in tokens
    alpha: float = 0.0  # weight of the patch-entropy term (0 in every released preset)
    pixel_mean: tuple = CLIP_MEAN  # the processor's normalisation, undone for the entropy's 0-255 pixels
    pixel_std: tuple = CLIP_STD

    def __post_init__(self):
        super().__post_init__()
        for name in ("r2", "r3"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1:
                raise ValueError(f"{name} must be a float in (0, 1], got {v!r}")
        check_real("t", self.t, 0.0)
        check_real("a", self.a, 0.0, low_open=True)
        check_real("alpha", self.alpha)  # any finite weight; the tuner searches [-1, 1]
        for name in ("pixel_mean", "pixel_std"):
            v = getattr(self, name)
            if not isinstance(v, (tuple, list)) or len(v) != 3:
                raise ValueError(f"{name} must be 3 numbers (R, G, B), got {v!r}")
            setattr(self, name, tuple(check_real(f"{name}[{i}]", x, 0.0 if name == "pixel_std" else None,
                                                 low_open=True) for i, x in enumerate(v)))


@register("vflowopt")
class VFlowOpt(Method):
    """Attention importance map, prune + recycle before the LLM, two progressive in-LLM drops."""

    stage = "vision"
    Config = VFlowOptConfig
    per_grid = "select"
    paper = "Yang et al., VFlowOpt: A Token Pruning Framework for LMMs with Visual Information Flow-Guided Optimization, ICCV 2025 (arXiv 2508.05211)"

    def vision_signals(self):
        signals = {"context": VisionSignal("feature", "context", threshold=float(self.config.t))}
        if self.config.alpha:
            signals["entropy"] = VisionSignal("feature", "entropy", pixel_mean=tuple(self.config.pixel_mean),
                                              pixel_std=tuple(self.config.pixel_std))
        return signals

    def select(self, image: ImageTokens) -> Selection:
        h, w = frame_grid(image, "vflowopt")
        imp = importance(image.signals["context"], image.signals.get("entropy"), self.config.alpha)
        idx, tokens, kept_imp = prune_recycle(image.features, imp.to(image.features.device), (h, w), image.keep,
                                              float(self.config.a))
        return Selection(idx, tokens=tokens, importance=kept_imp)

    def drop_layers(self, num_layers):
        return llm_layers(num_layers)

    def select_in_llm(self, tokens: LayerTokens) -> list[torch.Tensor]:
        layers = llm_layers(tokens.num_layers)
        frac = self.config.r2 if tokens.layer == layers[0] and len(layers) > 1 else self.config.r3
        if len(layers) == 1:  # a 2-layer decoder: both drops at once
            frac = self.config.r2 * self.config.r3
        scores = tokens.state.get("importance")
        if scores is None:  # nothing was pruned before the LLM
            return [torch.arange(int(n), device=tokens.visual.device) for n in tokens.visual.sum(1).tolist()]
        # the authors' count, per image: drop round(n * (1 - R)) of the n present; keep >= N prunes nothing
        return top_per_image(scores, tokens, lambda present, keep, before: present - round(present * (1 - frac)))
