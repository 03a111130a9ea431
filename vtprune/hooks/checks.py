"""Checks on what a strategy returns (built-in or registered by a user), shared by the VLM runtime, the
anyres split and patch_vit: a bad selection fails naming the method, never runs silently wrong."""
from __future__ import annotations

import torch

from ..methods.base import Selection, as_grid, is_grid


def check_selection(sel, what: str) -> Selection:
    """`sel` must be a vtprune.Selection (a bare tensor's .indices is a torch method, not indices)."""
    if not isinstance(sel, Selection):
        raise TypeError(f"{what} must return a vtprune.Selection, got {type(sel).__name__}")
    return sel


def as_indices(sel, what: str) -> torch.Tensor:
    """Indices as a LongTensor, integer dtypes only (2.7 would be read as 2, a bool mask as 0s and 1s)."""
    try:
        sel = torch.as_tensor(sel)
    except (TypeError, RuntimeError, ValueError):
        raise TypeError(f"{what}: indices must be an integer tensor, got {type(sel).__name__}") from None
    if sel.numel() == 0:  # [] reads as float32: an empty selection has no dtype to get wrong
        return sel.long()
    if sel.dtype == torch.bool or sel.is_floating_point() or sel.is_complex():
        raise TypeError(f"{what}: indices must be an integer tensor, got dtype {sel.dtype}")
    return sel.long()


def check_indices(sel, n: int, budget: int, what: str, least: int = 1, rows: bool = False) -> torch.Tensor:
    """A method's selection as a LongTensor: [k] indices (rows=True: [B, k], each row one image's) with
    least <= k <= budget, in [0, n), unique and ascending; one host sync for all the checks."""
    return check_indices_all([(sel, n, budget, what, least, rows)])[0]


def check_indices_all(items) -> list[torch.Tensor]:
    """`check_indices` of several selections, items (sel, n, budget, what, least, rows), with one host sync
    for all their value checks; the first that fails raises what `check_indices` would have raised."""
    out, flags, named = [], [], []

    def raise_first():
        if not flags:
            return
        values = torch.stack([f.to(flags[0].device) for f in flags]).tolist()
        for (out_of_range, unordered), (what, n) in zip(values, named):
            if out_of_range:
                raise RuntimeError(f"{what}: indices out of range [0, {n})")
            if unordered:
                raise RuntimeError(f"{what}: indices must be unique and ascending")

    for sel, n, budget, what, least, rows in items:
        try:
            sel = as_indices(sel, what)
            if sel.dim() != (2 if rows else 1) or not least <= sel.shape[-1] <= budget:
                raise RuntimeError(f"{what}: expected {least}..{budget} indices, got shape {tuple(sel.shape)}")
        except (TypeError, RuntimeError):
            raise_first()  # (an earlier selection's error comes first)
            raise
        out.append(sel)
        flags.append(torch.stack([(sel < 0).any() | (sel >= n).any(), (sel[..., 1:] <= sel[..., :-1]).any()]))
        named.append((what, n))
    raise_first()
    return out


def checked(sel, n: int, budget: int, dim: int, what: str) -> Selection:
    """One image's selection checked whole (`check_selection`, `check_indices`, `check_parts`); its
    indices become the checked LongTensor."""
    return checked_all([(sel, n, budget, dim, what)])[0]


def checked_all(items) -> list[Selection]:
    """`checked` of several images' selections, items (sel, n, budget, dim, what), with one host sync for
    all their index checks."""
    sels = [check_selection(sel, what) for sel, _, _, _, what in items]
    rows = check_indices_all([(s.indices, n, budget, what, 1, False) for s, (_, n, budget, _, what) in zip(sels, items)])
    for s, row, (_, _, _, dim, what) in zip(sels, rows, items):
        s.indices = row
        check_parts(s, row.numel(), dim, what)
    return sels


def checked_batch(sels, count: int, n: int, budget: int, dim: int, what: str) -> list:
    """`select_batch`'s answer for `count` images of n tokens each: every selection checked whole, as by
    `checked`, with one host sync for all the index checks (stacked where every image keeps as many
    tokens; a strategy may keep fewer than the budget, differently per image)."""
    if len(sels) != count:
        raise RuntimeError(f"{what}_batch: {len(sels)} selections for {count} images")
    rows = [as_indices(check_selection(s, f"{what}_batch").indices, what) for s in sels]
    if len({tuple(r.shape) for r in rows}) == 1:
        rows = check_indices(torch.stack(rows), n, budget, what, rows=True)
    else:
        rows = check_indices_all([(r, n, budget, what, 1, False) for r in rows])
    for s, row in zip(sels, rows):
        s.indices = row
        check_parts(s, row.numel(), dim, what)
    return sels


def check_parts(sel: Selection, k: int, dim: int, what: str) -> Selection:
    """A selection's optional parts against its k checked indices: tokens a float [k, dim] tensor,
    importance a real [k] tensor, grid (t, h, w) ints >= 1 whose product is k."""
    if sel.tokens is not None:
        t = sel.tokens
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or tuple(t.shape) != (k, dim):
            got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise RuntimeError(f"{what}: tokens must be a float tensor [{k}, {dim}] (one per kept index), got {got}")
    if sel.importance is not None:
        s = sel.importance
        if not isinstance(s, torch.Tensor) or s.dtype == torch.bool or s.is_complex() or tuple(s.shape) != (k,):
            got = f"{s.dtype} {tuple(s.shape)}" if isinstance(s, torch.Tensor) else type(s).__name__
            raise RuntimeError(f"{what}: importance must be a real tensor [{k}] (one per kept index), got {got}")
    if sel.grid is not None:
        g = sel.grid
        if not is_grid(g, 3):
            raise RuntimeError(f"{what}: grid must be 3 ints >= 1 (t, h, w), got {g!r}")
        sel.grid = g = as_grid(g)  # Python ints (numpy or 0-dim tensor integers are accepted)
        if g[0] * g[1] * g[2] != k:
            raise RuntimeError(f"{what}: merged grid {g} does not match {k} tokens")
    return sel
