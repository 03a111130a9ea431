"""Triton path of `attention_scores`: the attention each key receives, flash-style, never holding
the [Nq, Nk] map in memory.

Pass 1 (`_row_stats_kernel`, one program per query block and head): each selected query row's
running max and sum of exp over the allowed keys (online log-sum-exp).
Pass 2 (`_column_kernel`, one program per key block, head and image): recompute the logits of that
key block for every selected query block, turn them into probabilities with pass 1's statistics,
weigh each row by its averaging weight and sum down the columns into a [B, H, Nk] buffer, which is
then averaged over heads. A program per head rather than a loop over heads: at batch 1 a CLIP-L layer
gives 19 x 16 programs, not 19, for an H100's 132 SMs. No atomics, so the result is deterministic.
Query blocks whose rows all have weight 0 are skipped in both passes.
Same contract as attention_scores_torch; agrees with it to float32 rounding (~1e-6 relative).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import launch
from .attention_scores_torch import check_attention_args, key_mask_of, row_weights, window_of


@triton.jit
def _logits(q, k_ptr, kbase, keys, offs_d, d, skn, skd, n_k, scale, rows, n_q, km_ptr, kmbase, window,
            CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, IEEE: tl.constexpr, WINDOW: tl.constexpr):
    """[BQ, BK] scaled logits of query tile `q` against key block `keys`, and which are allowed."""
    k = tl.load(k_ptr + kbase + keys[:, None] * skn + offs_d[None, :] * skd,
                mask=(keys[:, None] < n_k) & (offs_d[None, :] < d), other=0.0)
    if IEEE:
        s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    s = s * scale
    ok = (keys < n_k)[None, :] & (rows < n_q)[:, None]
    if CAUSAL:  # query row i is position i + (Nk - Nq)
        ok = ok & (keys[None, :] <= (rows + (n_k - n_q))[:, None])
        if WINDOW:  # a sliding-window layer: keys j > i - window
            ok = ok & (keys[None, :] > (rows + (n_k - n_q) - window)[:, None])
    if HAS_MASK:
        km = tl.load(km_ptr + kmbase + keys, mask=keys < n_k, other=0)
        ok = ok & (km != 0)[None, :]
    return s, ok


@triton.jit
def _row_stats_kernel(q_ptr, k_ptr, w_ptr, km_ptr, m_ptr, l_ptr, n_q, n_k, d, group, scale,
                      sqb, sqh, sqn, sqd, skb, skh, skn, skd, hq, window,
                      CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, IEEE: tl.constexpr, WINDOW: tl.constexpr,
                      BQ: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr):
    pid_q, h, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = pid_q * BQ + tl.arange(0, BQ)
    w = tl.load(w_ptr + b * n_q + rows, mask=rows < n_q, other=0.0)
    if tl.max(w, axis=0) > 0:
        offs_d = tl.arange(0, BD)
        q = tl.load(q_ptr + b.to(tl.int64) * sqb + h * sqh + rows[:, None] * sqn + offs_d[None, :] * sqd,
                    mask=(rows[:, None] < n_q) & (offs_d[None, :] < d), other=0.0)
        kbase = b.to(tl.int64) * skb + (h // group) * skh
        m = tl.full((BQ,), float("-inf"), dtype=tl.float32)
        l = tl.zeros((BQ,), dtype=tl.float32)
        for k0 in range(0, n_k, BK):
            keys = k0 + tl.arange(0, BK)
            s, ok = _logits(q, k_ptr, kbase, keys, offs_d, d, skn, skd, n_k, scale, rows, n_q, km_ptr, b * n_k,
                            window, CAUSAL, HAS_MASK, IEEE, WINDOW)
            s = tl.where(ok, s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing allowed yet
            l = l * tl.exp(m - safe) + tl.sum(tl.exp(s - safe[:, None]), axis=1)
            m = m_new
        out = (b * hq + h) * n_q + rows
        tl.store(m_ptr + out, m, mask=rows < n_q)
        tl.store(l_ptr + out, l, mask=rows < n_q)


@triton.jit
def _column_kernel(q_ptr, k_ptr, w_ptr, km_ptr, m_ptr, l_ptr, out_ptr, n_q, n_k, d, group, scale,
                   sqb, sqh, sqn, sqd, skb, skh, skn, skd, hq, window,
                   CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, IEEE: tl.constexpr, WINDOW: tl.constexpr,
                   BQ: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr):
    pid_k, h, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    keys = pid_k * BK + tl.arange(0, BK)
    offs_d = tl.arange(0, BD)
    acc = tl.zeros((BK,), dtype=tl.float32)
    kbase = b.to(tl.int64) * skb + (h // group) * skh
    for q0 in range(0, n_q, BQ):
        rows = q0 + tl.arange(0, BQ)
        w = tl.load(w_ptr + b * n_q + rows, mask=rows < n_q, other=0.0)
        if tl.max(w, axis=0) > 0:
            q = tl.load(q_ptr + b.to(tl.int64) * sqb + h * sqh + rows[:, None] * sqn + offs_d[None, :] * sqd,
                        mask=(rows[:, None] < n_q) & (offs_d[None, :] < d), other=0.0)
            s, ok = _logits(q, k_ptr, kbase, keys, offs_d, d, skn, skd, n_k, scale, rows, n_q, km_ptr, b * n_k,
                            window, CAUSAL, HAS_MASK, IEEE, WINDOW)
            stat = (b * hq + h) * n_q + rows
            m = tl.load(m_ptr + stat, mask=rows < n_q, other=0.0)
            l = tl.load(l_ptr + stat, mask=rows < n_q, other=0.0)
            ok = ok & (l > 0)[:, None]
            p = tl.exp(s - tl.where(l > 0, m, 0.0)[:, None]) / tl.where(l > 0, l, 1.0)[:, None]
            p = tl.where(ok, p, 0.0)
            acc += tl.sum(p * w[:, None], axis=0)
    tl.store(out_ptr + (b * hq + h).to(tl.int64) * n_k + keys, acc, mask=keys < n_k)


def tiles(fp32: bool) -> tuple[int, int, int]:
    """(BQ, BK, num_warps). bf16/fp16 tiles go through tensor cores; float32 dots (IEEE) run on CUDA cores
    and hold more of each tile in registers, so they take smaller tiles. With these, ptxas reports no
    spills on sm_90 and sm_80 for head dims up to 128 and 256 (compiled as Triton's launcher specialises them,
    lengths that are multiples of 16 included), where 64 x 64 tiles over 4 warps spilled up to 0.7 KB
    (bf16, Triton 3.6) and 23 KB (float32) per thread, and float32 16 x 32 tiles up to 16 B on sm_90
    (benchmarks/kernel_resources.py, tests/kernels/test_kernel_resources.py)."""
    return (16, 16, 8) if fp32 else (64, 32, 8)


def attention_scores_triton(q: torch.Tensor, k: torch.Tensor, scale: float, query_index=None, *,
                            causal: bool = False, key_mask: torch.Tensor | None = None,
                            window: int | None = None) -> torch.Tensor:
    """Same contract as attention_scores_torch: float32 [B, Nk]."""
    b, hq, n_q, d, hk, n_k = check_attention_args(q, k)
    q, k = launch.kernel_dtype(q), launch.kernel_dtype(k)
    w = row_weights(query_index, b, n_q, q.device).contiguous()
    m = torch.empty(b, hq, n_q, dtype=torch.float32, device=q.device)
    l = torch.zeros(b, hq, n_q, dtype=torch.float32, device=q.device)
    per_head = torch.empty(b, hq, n_k, dtype=torch.float32, device=q.device)
    key_mask = key_mask_of(key_mask, b, n_k, q.device)
    window = window_of(window, causal)
    km = key_mask.to(torch.int8).contiguous() if key_mask is not None else per_head
    fp32 = q.dtype == torch.float32 or k.dtype != q.dtype
    ieee = fp32 or not launch.compiled(q)  # (the interpreter: see greedy_triton)
    bd = max(16, triton.next_power_of_2(d))
    bq, bk, warps = tiles(fp32)
    args = (q, k, w, km, m, l)
    tail = (n_q, n_k, d, hq // hk, float(scale), *q.stride(), *k.stride(), hq, window)
    flags = dict(CAUSAL=bool(causal), HAS_MASK=key_mask is not None, IEEE=ieee, WINDOW=window > 0, BQ=bq, BK=bk,
                 BD=bd, num_warps=warps, **launch.OPTIONS)
    _row_stats_kernel[(triton.cdiv(n_q, bq), hq, b)](*args, *tail, **flags)
    _column_kernel[(triton.cdiv(n_k, bk), hq, b)](*args, per_head, *tail, **flags)
    return per_head.mean(dim=1)
