"""Selection and signal kernels. Each public function dispatches to a Triton kernel on CUDA where one
exists and otherwise to the plain-torch reference beside it, which has the same signature."""
from .attention_scores_torch import attention_scores_torch
from .greedy_torch import greedy_select_torch


def attention_scores(q, k, scale, query_index=None, *, causal=False, key_mask=None):
    """softmax(q k^T * scale) averaged over heads and selected query rows, per key -> float32 [B, Nk].

    See `attention_scores_torch` for shapes. The fused Triton kernel is not written yet, so every
    device uses the torch reference for now.
    """
    return attention_scores_torch(q, k, scale, query_index, causal=causal, key_mask=key_mask)


def greedy_select(features, keep, first=None, rule="maxmin"):
    """Greedy max-min / max-sum diverse subset per row set -> LongTensor[B, keep], ascending.

    See `greedy_select_torch`. Triton kernel pending (every device uses the reference for now)."""
    return greedy_select_torch(features, keep, first, rule)


__all__ = ["attention_scores", "attention_scores_torch", "greedy_select", "greedy_select_torch"]
