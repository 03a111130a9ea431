"""Plain-torch reference for `attention_scores`: the spec, the CPU path and the test oracle."""
from __future__ import annotations

import torch

from .precision import float32_math

# Query rows processed per step: bounds the [B, H, rows, Nk] block held in memory.
_ROW_CHUNK = 256


def row_weights(query_index, batch: int, n_q: int, device) -> torch.Tensor:
    """Per-row averaging weights [B, Nq] (each selected row 1/count, others 0)."""
    if query_index is not None and not isinstance(query_index, torch.Tensor):
        query_index = torch.as_tensor(query_index)  # (a list of row indices)
        if query_index.numel() == 0 and query_index.is_floating_point():
            query_index = query_index.long()  # ([] comes out float32: no rows, as an empty LongTensor)
    if query_index is not None and (query_index.is_floating_point() or query_index.is_complex()):
        raise TypeError(f"query_index must hold integer row indices or be a bool mask, got dtype {query_index.dtype}")
    if query_index is None:
        sel = torch.ones(batch, n_q, dtype=torch.bool, device=device)
    elif query_index.dtype == torch.bool:
        if query_index.shape != (batch, n_q):
            raise ValueError(f"boolean query_index must have shape {(batch, n_q)}, got {tuple(query_index.shape)}")
        sel = query_index.to(device)
    else:
        idx = query_index.to(device=device, dtype=torch.long)
        if idx.dim() == 1:
            idx = idx.unsqueeze(0).expand(batch, -1)
        if idx.dim() != 2 or idx.shape[0] != batch:
            raise ValueError(f"integer query_index must be [R] or [B, R], got {tuple(query_index.shape)}")
        sel = torch.zeros(batch, n_q, dtype=torch.bool, device=device)
        sel.scatter_(1, idx, True)
    count = sel.sum(1, keepdim=True).clamp(min=1)
    return sel.float() / count


def check_attention_args(q: torch.Tensor, k: torch.Tensor) -> tuple[int, int, int, int, int, int]:
    """Validate q [B, Hq, Nq, d] and k [B, Hk, Nk, d] (Hq a multiple of Hk) -> (B, Hq, Nq, d, Hk, Nk)."""
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q and k must be [B, H, N, d], got {tuple(q.shape)} and {tuple(k.shape)}")
    b, hq, n_q, d = q.shape
    bk, hk, n_k, dk = k.shape
    if bk != b or dk != d or hq % hk:
        raise ValueError(f"incompatible q {tuple(q.shape)} and k {tuple(k.shape)}")
    return b, hq, n_q, d, hk, n_k


def window_of(window, causal: bool) -> int:
    """Validate a sliding window (None: none) -> an int, 0 for none."""
    if window is None:
        return 0
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be an int >= 1 or None, got {window!r}")
    if not causal:
        raise ValueError("window (a sliding-window layer's) needs causal=True")
    return window


def key_mask_of(key_mask, batch: int, n_k: int, device) -> torch.Tensor | None:
    """Validate a key mask (shared by every backend) -> BoolTensor [B, Nk] on `device`, or None.
    A bool or integer tensor or array broadcastable to [B, Nk] ([Nk] or [1, Nk] for every image) is
    accepted, an integer one read as nonzero = attend (a Hugging Face attention_mask); float masks are
    refused (0.5 as a "mask" has no single reading)."""
    if key_mask is None:
        return None
    if not isinstance(key_mask, torch.Tensor):
        try:
            key_mask = torch.as_tensor(key_mask)
        except (TypeError, RuntimeError, ValueError):
            raise TypeError(f"key_mask must be a bool (or 0/1 integer) tensor [B, Nk], got "
                            f"{type(key_mask).__name__}") from None
    if key_mask.is_floating_point() or key_mask.is_complex():
        raise TypeError(f"key_mask must be a bool (or 0/1 integer) tensor [B, Nk], got {key_mask.dtype}")
    if key_mask.dtype != torch.bool:
        key_mask = key_mask != 0
    try:
        fits = key_mask.dim() <= 2 and torch.broadcast_shapes(key_mask.shape, (batch, n_k)) == (batch, n_k)
    except RuntimeError:
        fits = False
    if not fits:
        raise ValueError(f"key_mask must be [B, Nk] = [{batch}, {n_k}] (or broadcast to it), got {tuple(key_mask.shape)}")
    return key_mask.to(device).expand(batch, n_k)


def attention_scores_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: float,
    query_index: torch.Tensor | None = None,
    *,
    causal: bool = False,
    key_mask: torch.Tensor | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """Attention each key receives: softmax(q k^T * scale), averaged over heads and selected query rows.

    q: [B, Hq, Nq, d]; k: [B, Hk, Nk, d] with Hq a multiple of Hk (grouped-query attention).
    query_index: None (all rows), LongTensor [R] or [B, R] of row indices (or a list), or BoolTensor [B, Nq];
      a sample with no row selected gets all-zero scores.
    causal: query row i sees keys j <= i + (Nk - Nq) (the queries are the last Nq positions).
    key_mask: BoolTensor [B, Nk] (or broadcast to it; 0/1 integers accepted), False for keys nobody may
      attend to (padding).
    window: with causal, a sliding-window layer's: the row at position i sees keys j > i - window only
      (transformers' sliding_window_overlay).
    Returns float32 [B, Nk]. Arithmetic is float32 whatever the input dtype.
    """
    b, hq, n_q, d, hk, n_k = check_attention_args(q, k)
    key_mask = key_mask_of(key_mask, b, n_k, q.device)
    window = window_of(window, causal)
    group = hq // hk
    qf = q.float().reshape(b, hk, group, n_q, d)
    kf = k.float()
    weights = row_weights(query_index, b, n_q, q.device)
    out = torch.zeros(b, n_k, dtype=torch.float32, device=q.device)
    key_pos = torch.arange(n_k, device=q.device)
    with float32_math(q):  # the einsums stay float32 inside a caller's autocast
        for start in range(0, n_q, _ROW_CHUNK):
            stop = min(start + _ROW_CHUNK, n_q)
            w = weights[:, start:stop]
            if not bool((w > 0).any()):
                continue
            logits = torch.einsum("bhgqd,bhkd->bhgqk", qf[:, :, :, start:stop], kf) * scale
            allowed = torch.ones(b, stop - start, n_k, dtype=torch.bool, device=q.device)
            if causal:
                row_pos = torch.arange(start, stop, device=q.device) + (n_k - n_q)
                allowed = allowed & (key_pos[None, None, :] <= row_pos[None, :, None])
                if window:
                    allowed = allowed & (key_pos[None, None, :] > row_pos[None, :, None] - window)
            if key_mask is not None:
                allowed = allowed & key_mask[:, None, :]
            logits = logits.masked_fill(~allowed[:, None, None], float("-inf"))
            probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # rows with no allowed key -> 0
            out += torch.einsum("bhgqk,bq->bk", probs, w)
    return out / hq
