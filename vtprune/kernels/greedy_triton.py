"""Triton path of `greedy_select`: the whole DivPrune / ToDRE selection in three launches.

1. `_gram_kernel`: cosine similarity of every pair of rows, normalisation fused in (squared norms
   accumulated in the same pass over D), upper-triangle tiles only, each mirrored. bf16/fp16 tiles go
   through tensor cores with float32 accumulation (their products are exact in float32); float32
   inputs use IEEE float32 dots (so do all inputs in the CPU interpreter). Cosines within SAME of +-1
   become exactly +-1, as in the reference (duplicate and opposite tokens tie exactly); a row of norm
   below 1e-12 counts as zero.
2. `_isolated_kernel`: for DivPrune's seed, each token's distance to its nearest other token
   (1 - similarity, min over rows, the diagonal excluded) -- the same arithmetic as the reference.
3. `_greedy_kernel`: all `keep` max-min / max-sum steps in ONE launch, one program per image; the
   running score and the selected mask stay in registers, each step reads one Gram row. The update
   arithmetic is the reference's, so the indices are identical given the same Gram matrix.

Each function takes and returns what its torch counterpart in greedy_torch.py does.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import launch
from .greedy_torch import SAME as _SAME, check_greedy_args

SAME = tl.constexpr(_SAME)


@triton.jit
def _gram_kernel(x_ptr, g_ptr, n, d, sxb, sxn, sxd, sgb, sgn,
                 BM: tl.constexpr, BK: tl.constexpr, IEEE: tl.constexpr):
    # Only tiles on or above the diagonal are computed; each is stored at (i, j) and transposed at
    # (j, i), so the matrix is exactly symmetric and half the dot products are saved.
    pid_m, pid_n, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    if pid_n >= pid_m:
        rows = pid_m * BM + tl.arange(0, BM)
        cols = pid_n * BM + tl.arange(0, BM)
        ks = tl.arange(0, BK)
        base = x_ptr + b.to(tl.int64) * sxb
        acc = tl.zeros((BM, BM), dtype=tl.float32)
        sq_r = tl.zeros((BM,), dtype=tl.float32)
        sq_c = tl.zeros((BM,), dtype=tl.float32)
        for k0 in range(0, d, BK):
            kk = k0 + ks
            a = tl.load(base + rows[:, None] * sxn + kk[None, :] * sxd, mask=(rows[:, None] < n) & (kk[None, :] < d),
                        other=0.0)
            c = tl.load(base + cols[:, None] * sxn + kk[None, :] * sxd, mask=(cols[:, None] < n) & (kk[None, :] < d),
                        other=0.0)
            af, cf = a.to(tl.float32), c.to(tl.float32)
            sq_r += tl.sum(af * af, axis=1)
            sq_c += tl.sum(cf * cf, axis=1)
            if IEEE:
                acc += tl.dot(af, tl.trans(cf), input_precision="ieee")
            else:
                acc += tl.dot(a, tl.trans(c))
        norm_r, norm_c = tl.sqrt(sq_r), tl.sqrt(sq_c)
        inv_r = tl.where(norm_r < 1e-12, 0.0, 1.0 / tl.maximum(norm_r, 1e-12))  # a (near-)zero row counts as zero
        inv_c = tl.where(norm_c < 1e-12, 0.0, 1.0 / tl.maximum(norm_c, 1e-12))
        # one product of the two norms' inverses, whichever token is the row: (acc*inv_r)*inv_c and
        # (acc*inv_c)*inv_r differ by an ulp, which broke exact ties between identical tokens in other tiles
        g = acc * (inv_r[:, None] * inv_c[None, :])
        g = tl.where(g == g, g, 0.0)  # a squared norm that overflowed float32 (inf * 0): the row counts as zero
        g = tl.where(g >= 1.0 - SAME, 1.0, g)  # duplicates tie exactly (greedy_torch.SAME)
        g = tl.where(g <= SAME - 1.0, -1.0, g)  # and so do opposite tokens
        ok = (rows[:, None] < n) & (cols[None, :] < n)
        gb = g_ptr + b.to(tl.int64) * sgb
        tl.store(gb + rows[:, None] * sgn + cols[None, :], g, mask=ok)
        if pid_n > pid_m:
            tl.store(gb + cols[None, :] * sgn + rows[:, None], g, mask=ok)


@triton.jit
def _isolated_kernel(g_ptr, out_ptr, n, sgb, sgn, BR: tl.constexpr, BC: tl.constexpr):
    pid_c, b = tl.program_id(0), tl.program_id(1)
    cols = pid_c * BC + tl.arange(0, BC)
    base = g_ptr + b.to(tl.int64) * sgb
    nearest = tl.full((BC,), float("inf"), dtype=tl.float32)
    for r0 in range(0, n, BR):
        rows = r0 + tl.arange(0, BR)
        ok = (rows[:, None] < n) & (cols[None, :] < n) & (rows[:, None] != cols[None, :])
        g = tl.load(base + rows[:, None] * sgn + cols[None, :], mask=ok, other=0.0)
        dist = tl.where(ok, 1.0 - g, float("inf"))
        nearest = tl.minimum(nearest, tl.min(dist, axis=0))
    tl.store(out_ptr + b * n + cols, nearest, mask=cols < n)


@triton.jit
def _greedy_kernel(g_ptr, first_ptr, out_ptr, n, keep, sgb, sgn,
                   MAXMIN: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    valid = offs < n
    base = g_ptr + b.to(tl.int64) * sgb
    pick = tl.load(first_ptr + b)
    tl.store(out_ptr + b * keep, pick)
    row = tl.load(base + pick * sgn + offs, mask=valid, other=0.0)
    if MAXMIN:
        score = 1.0 - row  # distance to the nearest selected token
    else:
        score = row  # summed similarity to the selected tokens
    blocked = (offs == pick) | (offs >= n)  # selected (or padding) tokens are never candidates
    for step in range(1, keep):
        if MAXMIN:
            pick = tl.argmax(tl.where(blocked, float("-inf"), score), axis=0, tie_break_left=True)
        else:
            pick = tl.argmin(tl.where(blocked, float("inf"), score), axis=0, tie_break_left=True)
        tl.store(out_ptr + b * keep + step, pick)
        blocked = blocked | (offs == pick)
        row = tl.load(base + pick * sgn + offs, mask=valid, other=0.0)
        if MAXMIN:
            score = tl.minimum(score, 1.0 - row)
        else:
            score = score + row


def cosine_gram_triton(features: torch.Tensor) -> torch.Tensor:
    """[B, N, D] -> float32 [B, N, N] cosine similarities in one launch (see module docstring)."""
    b, n, d = features.shape
    g = torch.empty(b, n, n, dtype=torch.float32, device=features.device)
    # bf16/fp16 through tensor cores on the GPU; Triton's CPU interpreter gets low-precision dots
    # wrong, so there the tiles are upcast (the same products: bf16 x bf16 is exact in float32)
    features = launch.kernel_dtype(features)
    ieee = features.dtype == torch.float32 or not launch.compiled(features)
    # 64 x 64 output tiles over 8 warps; float32 dots (CUDA cores) take narrower K steps. With these, ptxas
    # reports no spills on sm_90 or sm_80, where BK=64 over 4 warps spilled 328 B on sm_90
    # (benchmarks/kernel_resources.py)
    bm, bk = 64, 16 if features.dtype == torch.float32 else 32
    tiles = triton.cdiv(n, bm)
    _gram_kernel[(tiles, tiles, b)](features, g, n, d, *features.stride(), g.stride(0), g.stride(1),
                                    BM=bm, BK=bk, IEEE=ieee, num_warps=8, **launch.OPTIONS)
    return g


def most_isolated_triton(sim: torch.Tensor) -> torch.Tensor:
    """Triton twin of greedy_torch.most_isolated: [B, N, N] -> LongTensor[B]."""
    b, n, _ = sim.shape
    if n == 1:
        return torch.zeros(b, dtype=torch.long, device=sim.device)
    nearest = torch.empty(b, n, dtype=torch.float32, device=sim.device)
    _isolated_kernel[(triton.cdiv(n, 64), b)](sim, nearest, n, sim.stride(0), sim.stride(1), BR=64, BC=64, num_warps=4,
                                              **launch.OPTIONS)
    return nearest.argmax(dim=1)


def greedy_from_gram_triton(sim: torch.Tensor, keep: int, first: torch.Tensor, rule: str = "maxmin") -> torch.Tensor:
    """All greedy steps on a float32 Gram matrix [B, N, N] (unit row stride) in one launch -> the
    picks in selection order, LongTensor[B, keep]."""
    b, n, _ = sim.shape
    sim = sim if sim.stride(2) == 1 else sim.contiguous()
    out = torch.empty(b, keep, dtype=torch.int32, device=sim.device)
    block = triton.next_power_of_2(n)
    warps = 4 if block <= 1024 else 8 if block <= 4096 else 16
    _greedy_kernel[(b,)](sim, first.to(torch.int32).contiguous(), out, n, keep, sim.stride(0), sim.stride(1),
                         MAXMIN=rule == "maxmin", BLOCK=block, num_warps=warps, **launch.OPTIONS)
    return out.long()


def greedy_select_triton(features: torch.Tensor, keep: int, first: torch.Tensor | None = None,
                         rule: str = "maxmin") -> torch.Tensor:
    """Same contract as greedy_select_torch (LongTensor[B, keep], ascending)."""
    given = check_greedy_args(features, keep, rule, first)  # a caller's seeds (their range check syncs once)
    sim = cosine_gram_triton(features)
    first = most_isolated_triton(sim) if given is None else given  # (its own seeds need no check: no host sync)
    return greedy_from_gram_triton(sim, keep, first, rule).sort(dim=1).values
