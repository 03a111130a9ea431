"""Float32 arithmetic inside a caller's autocast region."""
from __future__ import annotations

import contextlib

import torch


def float32_math(t: torch.Tensor):
    """A context in which matmuls on `t`'s device run in the dtype of their inputs: the selection and
    signal references promise float32 arithmetic, but under the user's `torch.autocast` a float32 matmul
    would run in bf16/fp16 (and flip selections)."""
    device = t.device.type
    try:
        enabled = torch.is_autocast_enabled(device)
    except RuntimeError:  # a device type autocast does not know (e.g. meta)
        return contextlib.nullcontext()
    return torch.autocast(device, enabled=False) if enabled else contextlib.nullcontext()
