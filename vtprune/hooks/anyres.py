"""Per-grid strategies on LLaVA-NeXT / OneVision anyres images.

An anyres image is one run of tokens: the base tile's side x side grid, then (with crops) the
unpadded, possibly downsampled crop grid of ch rows x cw columns, each row followed by one newline
token; a single-tile image is its base grid plus one closing newline. `Layout` records that from
the model's own `pack_image_features` (so it is right by construction).

A strategy that works per grid (`Method.per_grid`) is run on each grid separately, and the
image's budget is shared so that everything kept adds up to at most the image's `keep`:
- "select" strategies (HiPrune, VFlowOpt) run on the base grid and on each crop tile's part of the
  crop grid (their specs handle each crop separately: HiPrune's neighbours and VFlowOpt's recycling
  cells stay within a crop); where the crop grid was downsampled across tiles (OneVision's
  anyres_max) the tiles are gone and the whole crop grid is one part. They never drop newline
  tokens (VFlowOpt's spec): the newlines are taken out of the budget first, the rest is split over
  the parts in proportion to their sizes (largest remainder, at least one token each), exactly
  `keep` in all; newlines and parts kept whole carry an infinite importance, so in-LLM drops by
  importance take them last;
- "merge" strategies (pool, token_shuffle) merge each grid separately and keep one newline per
  merged crop row (token_shuffle's spec); the crop grid's share of the budget pays for its rows'
  newlines, so the count may fall short of `keep` as a merged grid does.
Budgets with `keep` below (newlines + grids) are refused with a clear error.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..methods.base import ImageTokens, Method, Selection
from .checks import checked


@dataclass
class Layout:
    """Where an anyres image's grids and newlines sit among its N tokens (indices into the image's tokens)."""

    n: int
    parts: list[tuple[torch.Tensor, tuple[int, int]]]  # (indices, (h, w)) of the base grid, then the crop grid
    newlines: torch.Tensor  # indices of the newline tokens, ascending (one per crop row, or the closing one)
    crop_rows: torch.Tensor | None = None  # [ch]: the newline index closing each crop-grid row
    tiles: list | None = None  # (indices, (h, w)) of each crop tile's rectangle of the crop grid, when known

    def with_tiles(self, packed: torch.Tensor) -> "Layout":
        """Record each crop tile's part of the crop grid from the image's packed map of tile numbers
        (tile t's patches all t, newlines 0). None where the map is not whole numbers in rectangles
        (a crop grid downsampled across tiles)."""
        self.tiles = None
        if len(self.parts) < 2:
            return self
        idx, (ch, cw) = self.parts[1]
        values = packed[idx]
        if not bool((values == values.round()).all()):
            return self
        base = int(self.parts[0][0].numel())
        rows, cols = (idx - base) // (cw + 1), (idx - base) % (cw + 1)
        tiles = []
        for t in torch.unique(values).tolist():
            member = values == t
            r, c = rows[member], cols[member]
            h, w = int(r.max() - r.min()) + 1, int(c.max() - c.min()) + 1
            if h * w != int(member.sum()):
                return self
            tiles.append((idx[member], (h, w)))
        self.tiles = tiles
        return self

    def grids(self, mode: str) -> list:
        """The parts a per-grid strategy runs on: the base grid, then the crop grid ("merge") or each
        crop tile's part of it when known ("select")."""
        if mode == "select" and self.tiles:
            return [self.parts[0], *self.tiles]
        return self.parts

    @classmethod
    def from_map(cls, packed: torch.Tensor, base: int) -> "Layout":
        """From an image's packed map (pack_image_features over all-ones tiles with a zero newline):
        [N], 0 where a newline sits. base = side * side tokens of the base tile."""
        newline = packed == 0
        n = packed.numel()
        idx = torch.arange(n)
        nl = idx[newline]
        side = int(round(base ** 0.5))
        if n == base + 1 and nl.tolist() == [base]:  # one tile: the base grid and a closing newline
            return cls(n, [(idx[:base], (side, side))], nl)
        rest = n - base
        ch = int(newline[base:].sum())
        if side * side != base or bool(newline[:base].any()) or ch == 0 or rest % ch:
            raise ValueError(f"unexpected anyres layout: {n} tokens, base {base}, {ch} newlines")
        cw = rest // ch - 1
        crop = torch.arange(base, n).view(ch, cw + 1)
        if not bool(newline[crop[:, -1]].all()) or bool(newline[crop[:, :-1]].any()):
            raise ValueError("unexpected anyres layout: newlines are not at the end of each crop row")
        return cls(n, [(idx[:base], (side, side)), (crop[:, :-1].reshape(-1), (ch, cw))], nl, crop[:, -1])


def shares(total: int, sizes: list[int]) -> list[int]:
    """Split `total` over parts in proportion to `sizes` by largest remainder (ties: the earlier part),
    each part at least 1 and at most its size (a part raised to 1 takes it from the part with the most to
    spare; ties: the earlier part gives). Needs len(sizes) <= total <= sum(sizes)."""
    if not len(sizes) <= total <= sum(sizes):
        raise ValueError(f"cannot split {total} over parts of sizes {sizes}")
    whole = sum(sizes)
    exact = [total * s / whole for s in sizes]
    out = [int(e) for e in exact]
    for i in sorted(range(len(sizes)), key=lambda i: (-(exact[i] - out[i]), i))[: total - sum(out)]:
        out[i] += 1
    for i in range(len(out)):  # at least one each
        while out[i] < 1:
            j = max(range(len(out)), key=lambda j: (out[j] - 1, -j))
            out[j] -= 1
            out[i] += 1
    return out


def _too_small(method: Method, keep: int, least: int, where: str = "", most: int | None = None) -> ValueError:
    batch = f" (the most any image of this batch needs: {most})" if most is not None and most > least else ""
    return ValueError(f"{method.name} works per grid on anyres images and keeps their newline tokens: a budget of "
                      f"{keep} is below the {least} that {where or 'this image'} needs{batch}; give a larger keep/ratio")


def least(method: Method, layout: Layout) -> int:
    """The smallest budget a per-grid `method` can split over an anyres image's grids: one token per
    grid plus the kept newlines ("select"), or the smallest whose crop-grid share holds a merged token
    and its row's newline ("merge"); 0 for grid-determined budgets."""
    if _fixed(method):
        return 0
    sizes = [idx.numel() for idx, _ in layout.grids(method.per_grid)]
    if method.per_grid == "select" or len(layout.parts) == 1:
        return len(layout.newlines) + len(sizes)
    for keep in range(1 + 2, layout.n + 1):  # a merged base token, a merged crop token and its row's newline
        first = shares(keep, [sizes[0], sizes[1] + len(layout.newlines)])
        if _crop_keep(method, layout.parts[1][1], first[1]) >= 1:
            return keep
    return layout.n + 1


def check_budgets(method: Method, images: list[tuple[int, Layout, int]]) -> None:
    """Every anyres image of a batch, as (keep, layout, sample), against its least budget, before any is
    selected: the error names the sample short by the most and the least that works for the whole batch
    (checking one image at a time named the first short image's, which the next image could exceed)."""
    needs = [(least(method, layout), keep, sample) for keep, layout, sample in images]
    short = [n for n in needs if n[1] < n[0]]
    if short:
        need, keep, sample = max(short, key=lambda n: (n[0] - n[1], -n[2]))
        raise _too_small(method, keep, need, f"sample {sample}'s image", max(n[0] for n in needs))


def _fixed(method: Method) -> bool:
    """A budget given by the grid itself (token_shuffle with s=): no keep and no ratio."""
    return method.config.keep is None and method.config.ratio is None


def budget(method: Method, layout: Layout) -> int:
    """Tokens `method` keeps of an anyres image (what `Method.budget` says for the whole image, or, for
    grid-determined budgets, the merged grids and their rows' newlines)."""
    if not _fixed(method):
        return method.budget(layout.n, None)
    total = 0
    for k, (idx, (h, w)) in enumerate(layout.parts):
        hp, wp = method.merged_grid(h, w, method.budget(idx.numel(), (1, h, w)))
        total += hp * wp + (hp if k == 1 else 0)
    return total + (len(layout.newlines) if len(layout.parts) == 1 else 0)


def _crop_keep(method: Method, grid: tuple[int, int], share: int) -> int:
    """The largest per-grid budget whose merged grid plus one newline per merged row fits in `share`."""
    h, w = grid
    for k in range(min(share, h * w), 0, -1):
        hp, wp = method.merged_grid(h, w, k)
        if hp * (wp + 1) <= share:
            return k
    return 0


def select(method: Method, image: ImageTokens, layout: Layout) -> Selection:
    """Run a per-grid `method` on each grid of an anyres image; one Selection for the whole image."""
    mode = method.per_grid
    grids = layout.grids(mode)
    sizes = [idx.numel() for idx, _ in grids]
    single = len(layout.parts) == 1
    need = least(method, layout)  # (the runtime checked the whole batch already: check_budgets)
    if image.keep < need:
        raise _too_small(method, image.keep, need)
    if _fixed(method):
        part_keep = [method.budget(s, (1, h, w)) for s, (_, (h, w)) in zip(sizes, layout.parts)]
    elif mode == "select" or single:
        part_keep = shares(image.keep - len(layout.newlines), sizes)
    else:  # merge: the crop grid's share pays for its merged rows' newlines
        first = shares(image.keep, [sizes[0], sizes[1] + len(layout.newlines)])
        part_keep = [first[0], _crop_keep(method, layout.parts[1][1], first[1])]
    slots, tokens, importance = [], [], []
    merged = scored = False
    for (idx, (h, w)), k in zip(grids, part_keep):
        idx = idx.to(image.features.device)
        if k >= idx.numel():  # the grid stays whole
            slots.append(idx)
            tokens.append(image.features[idx])
            importance.append(torch.full((idx.numel(),), float("inf"), device=idx.device))
            continue
        part = ImageTokens(image.features[idx], (1, h, w), k, {n: s[idx.to(s.device)] for n, s in image.signals.items()})
        what = f"{method.name}.select"
        sel = checked(method.select(part), idx.numel(), k, image.features.shape[-1], what)
        chosen = sel.indices.to(idx.device)
        slots.append(idx[chosen])
        tokens.append(sel.tokens if sel.tokens is not None else part.features[chosen])
        merged = merged or sel.tokens is not None
        scored = scored or sel.importance is not None
        importance.append(sel.importance.float().to(idx.device) if sel.importance is not None
                          else torch.full((chosen.numel(),), float("inf"), device=idx.device))
    newlines = layout.newlines.to(image.features.device)
    if mode == "merge" and not single:  # one newline per crop row that still holds a (merged) token
        crop, cw = slots[1], layout.parts[1][1][1]
        rows = torch.unique((crop - layout.parts[1][0][0].to(crop.device)) // (cw + 1))
        newlines = layout.crop_rows.to(crop.device)[rows]
    slots.append(newlines)
    tokens.append(image.features[newlines])
    importance.append(torch.full((newlines.numel(),), float("inf"), device=newlines.device))  # never dropped
    slots = torch.cat(slots)
    order = torch.argsort(slots)
    return Selection(slots[order], tokens=torch.cat(tokens)[order] if merged else None,
                     importance=torch.cat(importance)[order] if scored else None)
