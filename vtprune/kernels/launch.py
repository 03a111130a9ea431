"""What every Triton launch in vtprune shares (imported only where Triton is)."""
from __future__ import annotations

import torch

# Passed to every launch. Fused multiply-add stays on, the default of every Triton up to 3.9 and how the
# kernels were checked: Triton 3.9 warns when it is left to the default, which it says 3.10 turns off.
OPTIONS = dict(enable_fp_fusion=True)


def compiled(t: torch.Tensor) -> bool:
    """Whether the kernels run compiled for a GPU (else Triton's CPU interpreter runs them)."""
    return t.is_cuda


def kernel_dtype(t: torch.Tensor) -> torch.Tensor:
    """bf16/fp16/float32 as they are; float64 (or any other dtype) as float32, which the arithmetic is
    anyway, as in the torch references (a float64 tile made the kernels' float32 accumulators float64 in
    the loop, which Triton refuses to compile)."""
    return t if t.dtype in (torch.bfloat16, torch.float16, torch.float32) else t.float()
