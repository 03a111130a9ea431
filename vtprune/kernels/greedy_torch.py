"""Plain-torch reference for greedy diversity selection (DivPrune max-min, ToDRE max-min / max-sum).

One Gram matrix of L2-normalised rows in float32, then `keep` sequential steps. Selected tokens are
excluded with an explicit mask (never through a self-distance of zero); ties go to the lowest index
(torch.argmax / argmin return the first extreme).
"""
from __future__ import annotations

import torch

from .precision import float32_math

RULES = ("maxmin", "maxsum")
# Similarities within SAME of 1 count as exactly 1. The float32 self-similarity of a token comes out
# 1 +- a few ulp, differently for each vector and each backend, so without this the choice between two
# duplicate tokens (LLaVA-NeXT's newline tokens, repeated patches) is decided by rounding, not by the
# lowest index. 1e-5 covers float32 accumulation over D = 4096; cosines that close are duplicates.
SAME = 1e-5


def cosine_gram(features: torch.Tensor) -> torch.Tensor:
    """[B, N, D] -> float32 [B, N, N] cosine similarities (rows normalised; a row whose norm is below
    1e-12, a float32 overflow of the squared norm, or a NaN or inf entry makes the row count as zero, as
    in the Triton kernel); values within SAME of 1 are set to exactly 1, and within SAME of -1 to exactly
    -1 (opposite tokens tie too). Exact copies of a token then take the first copy's row and column bit for bit (a BLAS can
    round one column of a matrix product differently from an identical one, which broke ties between
    copies by rounding instead of by index; the Triton kernel computes every entry alike). Near-duplicates
    that are not copies keep their own rows, as in the kernel."""
    with float32_math(features):
        x = features.float()
        x = x.masked_fill(~torch.isfinite(x).all(dim=-1, keepdim=True), 0.0)
        norm = x.norm(dim=-1, keepdim=True)
        x = (x / norm.clamp_min(1e-12)).masked_fill(norm < 1e-12, 0.0)
        sim = x @ x.transpose(1, 2)
    sim = sim.masked_fill(sim >= 1.0 - SAME, 1.0).masked_fill(sim <= SAME - 1.0, -1.0)
    b, n = sim.shape[:2]
    own = torch.arange(n, device=sim.device)
    first = torch.empty(b, n, dtype=torch.long, device=sim.device)
    for i, xb in enumerate(x):  # exact row equality (a sort; one host sync per image, for unique's size)
        _, group = torch.unique(xb, dim=0, return_inverse=True)
        lowest = torch.full((n,), n, dtype=torch.long, device=sim.device).scatter_reduce(0, group, own, "amin")
        first[i] = lowest[group]
    sim = sim.gather(1, first[..., None].expand(-1, -1, n))
    return sim.gather(2, first[:, None, :].expand(-1, n, -1))


def most_isolated(sim: torch.Tensor) -> torch.Tensor:
    """[B, N, N] similarities -> LongTensor[B]: the token whose nearest other token is farthest
    (largest min over i != j of 1 - sim[i, j]); a lone token is its own answer."""
    dist = 1.0 - sim
    eye = torch.eye(sim.shape[-1], dtype=torch.bool, device=sim.device)
    nearest = dist.masked_fill(eye, float("inf")).amin(dim=1)
    return nearest.argmax(dim=1)


def check_greedy_args(features: torch.Tensor, keep: int, rule: str, first=None):
    """Validate greedy_select's arguments (shared by every backend); returns `first` as a LongTensor[B]
    on the features' device (None stays None)."""
    if features.dim() != 3:
        raise ValueError(f"features must be [B, N, D], got {tuple(features.shape)}")
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    b, n, _ = features.shape
    if isinstance(keep, bool) or not isinstance(keep, int) or not 1 <= keep <= n:
        raise ValueError(f"keep must be an int in [1, {n}], got {keep!r}")
    if first is None:
        return None
    first = torch.as_tensor(first, device=features.device)
    if first.dtype == torch.bool or first.is_floating_point() or first.is_complex():
        raise TypeError(f"first/pivot must hold integer indices, got dtype {first.dtype}")
    first = first.long().reshape(-1)
    if first.shape != (b,) or bool((first < 0).any()) or bool((first >= n).any()):
        raise ValueError(f"first/pivot must be a LongTensor[{b}] of indices in [0, {n})")
    return first


def greedy_from_gram_torch(sim: torch.Tensor, keep: int, first: torch.Tensor, rule: str = "maxmin") -> torch.Tensor:
    """The greedy steps on a float32 Gram matrix [B, N, N] -> picks in selection order, LongTensor[B, keep]."""
    b, n, _ = sim.shape
    rows = torch.arange(b, device=sim.device)
    picks = torch.empty(b, keep, dtype=torch.long, device=sim.device)
    picks[:, 0] = first
    chosen = torch.zeros(b, n, dtype=torch.bool, device=sim.device)
    chosen[rows, first] = True
    if rule == "maxmin":
        score = 1.0 - sim[rows, first]  # distance to the nearest selected token
    else:
        score = sim[rows, first].clone()  # summed similarity to the selected tokens
    for step in range(1, keep):
        if rule == "maxmin":
            pick = score.masked_fill(chosen, float("-inf")).argmax(dim=1)
            score = torch.minimum(score, 1.0 - sim[rows, pick])
        else:
            pick = score.masked_fill(chosen, float("inf")).argmin(dim=1)
            score = score + sim[rows, pick]
        picks[:, step] = pick
        chosen[rows, pick] = True
    return picks


def greedy_select_torch(features: torch.Tensor, keep: int, first: torch.Tensor | None = None,
                        rule: str = "maxmin") -> torch.Tensor:
    """Greedy diverse subset of each row set. features [B, N, D]; first LongTensor[B] seeds the
    selection (None: the most isolated token, DivPrune's rule). rule "maxmin": add the token whose
    cosine distance to its nearest selected token is largest; "maxsum": add the token whose summed
    cosine similarity to the selected tokens is smallest. Returns LongTensor[B, keep], ascending."""
    given = check_greedy_args(features, keep, rule, first)
    sim = cosine_gram(features)
    first = most_isolated(sim) if given is None else given
    return greedy_from_gram_torch(sim, keep, first, rule).sort(dim=1).values
