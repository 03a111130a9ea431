"""Selection and signal kernels. Each public function dispatches to its Triton kernel for CUDA
tensors (when Triton is installed) and otherwise to the plain-torch reference beside it, which has
the same signature and is the test oracle: indices are identical, scores agree to float32 rounding.

The Triton modules are imported lazily, so the package works where Triton is missing (CPU-only
installs, macOS); tests run the kernels on the CPU under TRITON_INTERPRET=1.
"""
from __future__ import annotations

import importlib.util

import torch

from .attention_scores_torch import attention_scores_torch
from .greedy_torch import check_greedy_args, greedy_select_torch


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def _use_triton(t: torch.Tensor) -> bool:
    return t.is_cuda and triton_available()


def attention_scores(q, k, scale, query_index=None, *, causal=False, key_mask=None, window=None):
    """softmax(q k^T * scale) averaged over heads and selected query rows, per key -> float32 [B, Nk].

    See `attention_scores_torch` for shapes. On CUDA: the two-pass Triton kernel (no Nq x Nk map)."""
    if _use_triton(q):
        from .attention_triton import attention_scores_triton

        with torch.cuda.device(q.device):  # Triton launches on the current device (a model over several GPUs)
            return attention_scores_triton(q, k, scale, query_index, causal=causal, key_mask=key_mask, window=window)
    return attention_scores_torch(q, k, scale, query_index, causal=causal, key_mask=key_mask, window=window)


# The float32 Gram matrices of one call to a greedy backend stay within this many bytes: a batch whose
# B x N x N would exceed it is selected in consecutive slices (each image's picks do not depend on the
# others'). One image larger than this still gets its whole Gram (the greedy steps need every row).
GRAM_BYTES = 1 << 30


def greedy_select(features, keep, first=None, rule="maxmin"):
    """Greedy max-min / max-sum diverse subset per row set -> LongTensor[B, keep], ascending.

    See `greedy_select_torch`. On CUDA: fused Gram + all greedy steps in one launch (Triton). A batch
    whose Gram matrices together would pass GRAM_BYTES (a batch of long clips) goes in slices."""
    if _use_triton(features):
        from .greedy_triton import greedy_select_triton

        def backend(x, f):
            with torch.cuda.device(x.device):  # Triton launches on the current device (a model over several GPUs)
                return greedy_select_triton(x, keep, f, rule)
    else:
        def backend(x, f):
            return greedy_select_torch(x, keep, f, rule)

    b, n = features.shape[:2] if features.dim() == 3 else (1, 1)  # (a wrong shape: the backend says so)
    per = max(1, GRAM_BYTES // (4 * max(n, 1) ** 2))
    if b <= per:
        return backend(features, first)
    first = check_greedy_args(features, keep, rule, first)  # (a tensor on the features' device, to slice)
    return torch.cat([backend(features[i:i + per], None if first is None else first[i:i + per])
                      for i in range(0, b, per)])


__all__ = ["attention_scores", "attention_scores_torch", "greedy_select", "greedy_select_torch", "triton_available"]
