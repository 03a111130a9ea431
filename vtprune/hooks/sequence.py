"""Pure tensor functions that shorten a padded batch of sequences. No model objects here.

Layout convention: every row is right-aligned (left-padded) after compaction, so `logits[:, -1]`
stays each row's last real token and `generate()` keeps working.
"""
from __future__ import annotations

import torch


def compact_index(keep: torch.Tensor) -> torch.Tensor:
    """For BoolTensor keep [B, L]: LongTensor [B, Lp] of source slots, right-aligned, -1 for new pads.

    Lp = max over rows of keep.sum(); kept slots stay in their original order.
    """
    b, l = keep.shape
    n = keep.sum(1)
    lp = int(n.max()) if b else 0
    dst = keep.long().cumsum(1) - 1 + (lp - n)[:, None]
    dst = torch.where(keep, dst, torch.full_like(dst, lp))  # dropped slots go to a spare column
    index = torch.full((b, lp + 1), -1, dtype=torch.long, device=keep.device)
    src = torch.arange(l, device=keep.device).expand(b, l)
    index.scatter_(1, dst, src)
    return index[:, :lp]


def take(x: torch.Tensor, index: torch.Tensor, dim: int, fill=0) -> torch.Tensor:
    """Gather the sequence dim `dim` of `x` by index [B, Lp]; slots with index -1 get `fill`.

    The batch is at dim `dim - 1`. Leading dims before the batch (the 3 M-RoPE rows) and trailing
    dims (hidden size) are carried along.
    """
    bdim = dim - 1
    shape = [1] * x.dim()
    shape[bdim], shape[dim] = index.shape
    idx = index.clamp(min=0).view(shape)
    expand = list(x.shape)
    expand[dim] = index.shape[1]
    out = torch.gather(x, dim, idx.expand(expand))
    pad = (index < 0).view(shape).expand(expand)
    return out.masked_fill(pad, fill)


def dropped_before(keep: torch.Tensor) -> torch.Tensor:
    """LongTensor [B, L]: number of dropped slots strictly before each slot."""
    dropped = (~keep).long()
    return dropped.cumsum(1) - dropped


def runs(mask: torch.Tensor) -> list[list[torch.Tensor]]:
    """Per sample, the maximal runs of consecutive True slots of a [B, L] mask (LongTensors of slots),
    found for the whole batch at once: three host syncs, not two per sample."""
    out: list[list[torch.Tensor]] = [[] for _ in range(mask.shape[0])]
    rows, slots = mask.nonzero().unbind(1)
    if slots.numel() == 0:
        return out
    start = torch.ones_like(slots, dtype=torch.bool)  # a run starts at a new row or after a gap
    start[1:] = (rows[1:] != rows[:-1]) | (slots[1:] != slots[:-1] + 1)
    first = start.nonzero().squeeze(1)
    firsts, owners = torch.stack([first, rows[first]]).tolist()
    for b, run in zip(owners, slots.tensor_split(firsts[1:])):
        out[b].append(run)
    return out


def row_slots(mask: torch.Tensor) -> list[torch.Tensor]:
    """Per sample, the True slots of a [B, L] mask (LongTensor, ascending), with one host sync for the batch
    (its counts; `nonzero_static`, sized by them, reads nothing back)."""
    counts = mask.sum(1).tolist()
    return list(torch.nonzero_static(mask, size=sum(counts))[:, 1].split(counts))


def compact_text_positions(mask: torch.Tensor) -> torch.Tensor:
    """Contiguous positions over real slots (pads get 0), as `generate()` builds them from a mask."""
    pos = mask.long().cumsum(-1) - 1
    return pos.masked_fill(mask == 0, 0)
