"""`shapes`: a deterministic synthetic visual-question benchmark for tiny vision-language models.

A scene is a 3x3 grid of cells holding 2-5 coloured shapes (about a third "small", roughly one
16-px patch, so that dropping visual tokens loses information) and 0-2 digits in empty cells. Every
question has a one-word answer; `sample(split, index)` is a pure function of its arguments.

Patch-label rule: a patch takes the class of whatever covers its centre pixel (row * patch +
patch // 2, col * patch + patch // 2): for shapes the filled shape itself (exactly the pixels
`render` paints in the object's colour), for digits the glyph box (strokes are thin). A small
object may fall between patch centres and then appears in no label map."""
from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import dataclass
from types import MappingProxyType
from typing import Callable, Iterable

import torch
from PIL import Image, ImageDraw, ImageFont

SHAPES = ("circle", "square", "triangle", "star", "cross")
COLOURS = ("red", "green", "blue", "yellow", "purple", "white")
COLOUR_RGB = MappingProxyType({
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 90, 230),
    "yellow": (235, 210, 40), "purple": (150, 60, 200), "white": (250, 250, 250)})
BACKGROUND = (40, 40, 40)
DIGIT_RGB = (205, 205, 205)
POSITIONS = (("top left", "top", "top right"), ("left", "centre", "right"),
             ("bottom left", "bottom", "bottom right"))  # POSITIONS[row][col]
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
RELATIONS = ("left of", "right of", "above", "below")
KINDS = ("colour", "shape", "count", "relation", "digit", "exist")
SPLITS = ("train", "eval")
SMALL_P = 0.35  # probability that an object is small
_TEMPLATE_WORDS = "what colour is the shape at how many shapes are there a digit in yes no ?"
VOCAB = tuple(sorted(set(" ".join(
    [_TEMPLATE_WORDS, *SHAPES, *COLOURS, *NUMBERS, *RELATIONS, *(p for row in POSITIONS for p in row)]).split())))


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    size: str                           # "small" | "large"
    cell: tuple[int, int]               # (row, col) in the 3x3 grid
    box: tuple[int, int, int, int]      # (x0, y0, x1, y1), inclusive: the square the shape is drawn in


@dataclass(frozen=True)
class Digit:
    value: int
    cell: tuple[int, int]
    box: tuple[int, int, int, int]      # inclusive glyph box
    size: int                           # font size in pixels (the glyph box is ~0.7 of it tall)


@dataclass
class Scene:
    width: int
    height: int
    objects: list[Obj]
    digits: list[Digit]


@dataclass(frozen=True)
class Question:
    kind: str
    text: str
    answer: str
    refs: tuple[int, ...] = ()  # the items it is about, numbered as in `patch_ids` (for training signals)


# Scenes -----------------------------------------------------------------------------------------

def _cell_bounds(width: int, height: int, cell: tuple[int, int]) -> tuple[int, int, int, int]:
    r, c = cell  # exclusive right/bottom
    return c * width // 3, r * height // 3, (c + 1) * width // 3, (r + 1) * height // 3


def _place(rng: random.Random, bounds, w: int, h: int, jitter: int) -> tuple[int, int, int, int]:
    """A w x h box centred in `bounds` with up to `jitter` px of random offset, kept inside it."""
    x0, y0, x1, y1 = bounds
    jx, jy = (rng.random() * 2 - 1, rng.random() * 2 - 1)  # always two draws: scene content is size-free
    jx = max(0, min(jitter, (x1 - x0 - w) // 2 - 1)) * jx
    jy = max(0, min(jitter, (y1 - y0 - h) // 2 - 1)) * jy
    bx = min(max(round((x0 + x1 - w) / 2 + jx), x0), x1 - w)
    by = min(max(round((y0 + y1 - h) / 2 + jy), y0), y1 - h)
    return bx, by, bx + w - 1, by + h - 1


def _font(size: int):
    """The default TrueType font at `size`, or None where this Pillow cannot scale it."""
    try:
        font = ImageFont.load_default(size=size)
    except (TypeError, OSError):
        return None
    return font if isinstance(font, ImageFont.FreeTypeFont) else None


def _digit_extent(size: int) -> tuple[int, int]:
    font = _font(size)
    if font is None:  # seven-segment fallback, 0.7 x size tall
        h = round(size * 0.7)
        return max(7, round(h * 0.6)), h
    l, t, r, b = font.getbbox("0", anchor="lt")  # the default font's digits share one box
    return r - l, b - t


def make_scene(rng: random.Random, width: int = 224, height: int = 224) -> Scene:
    """A random scene. Only size-free draws are taken from `rng`, so the content (and the questions
    drawn after it from the same `rng`) is the same at every width x height."""
    n_obj, n_dig = rng.randint(2, 5), rng.randint(0, 2)
    cells = [divmod(i, 3) for i in rng.sample(range(9), n_obj + n_dig)]
    objects = []
    for cell in cells[:n_obj]:
        shape, colour = rng.choice(SHAPES), rng.choice(COLOURS)
        small, u = rng.random() < SMALL_P, rng.random()
        bounds = _cell_bounds(width, height, cell)
        side = min(bounds[2] - bounds[0], bounds[3] - bounds[1])
        s = 14 + round(6 * u) if small else round(side * (0.60 + 0.15 * u))
        box = _place(rng, bounds, s, s, jitter=6)
        objects.append(Obj(shape, colour, "small" if small else "large", cell, box))
    digits = []
    for cell in cells[n_obj:]:
        value, size = rng.randrange(10), 20 + int(rng.random() * 7)  # glyphs 14-18 px tall
        w, h = _digit_extent(size)
        digits.append(Digit(value, cell, _place(rng, _cell_bounds(width, height, cell), w, h, 4), size))
    return Scene(width, height, objects, digits)


def _draw_shape(draw: ImageDraw.ImageDraw, obj: Obj, fill) -> None:
    x0, y0, x1, y1 = obj.box
    cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
    if obj.shape == "circle":
        draw.ellipse(obj.box, fill=fill)
    elif obj.shape == "square":
        draw.rectangle(obj.box, fill=fill)
    elif obj.shape == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=fill)
    elif obj.shape == "star":
        rad = [r * (0.45 if k % 2 else 1.0) for k in range(10)]  # five points, inner radius 0.45
        draw.polygon([(cx + q * math.sin(k * math.pi / 5), cy - q * math.cos(k * math.pi / 5))
                      for k, q in enumerate(rad)], fill=fill)
    elif obj.shape == "cross":
        t = (x1 - x0 + 1) / 3
        draw.rectangle((x0, round(cy - t / 2), x1, round(cy + t / 2)), fill=fill)
        draw.rectangle((round(cx - t / 2), y0, round(cx + t / 2), y1), fill=fill)
    else:
        raise ValueError(f"unknown shape {obj.shape!r}")


_SEGMENTS = ("abcdef", "bc", "abdeg", "abcdg", "bcfg", "acdfg", "acdefg", "abc", "abcdefg", "abcdfg")


def _seven_segment(draw: ImageDraw.ImageDraw, box, value: int, fill) -> None:
    x0, y0, x1, y1 = box
    t = max(2, (y1 - y0 + 1) // 6)
    m = y0 + (y1 - y0 + 1 - t) // 2
    seg = {"a": (x0, y0, x1, y0 + t - 1), "d": (x0, y1 - t + 1, x1, y1), "g": (x0, m, x1, m + t - 1),
           "f": (x0, y0, x0 + t - 1, m + t - 1), "b": (x1 - t + 1, y0, x1, m + t - 1),
           "e": (x0, m, x0 + t - 1, y1), "c": (x1 - t + 1, m, x1, y1)}
    for s in _SEGMENTS[value]:
        draw.rectangle(seg[s], fill=fill)


def render(scene: Scene) -> Image.Image:
    """The scene as an RGB image; shapes and digits are drawn without anti-aliasing."""
    img = Image.new("RGB", (scene.width, scene.height), BACKGROUND)
    draw = ImageDraw.Draw(img)
    draw.fontmode = "1"
    for obj in scene.objects:
        _draw_shape(draw, obj, COLOUR_RGB[obj.colour])
    for d in scene.digits:
        font = _font(d.size)
        if font is None:
            _seven_segment(draw, d.box, d.value, DIGIT_RGB)
        else:
            l, t, _, _ = font.getbbox(str(d.value), anchor="lt")
            draw.text((d.box[0] - l, d.box[1] - t), str(d.value), fill=DIGIT_RGB, font=font, anchor="lt")
    return img


def _item_map(scene: Scene) -> torch.Tensor:
    """[height, width] uint8: per pixel the item painted there (object i -> i + 1, digit j -> 100 + j, its
    glyph box), 0 = background."""
    ids = Image.new("L", (scene.width, scene.height), 0)
    draw = ImageDraw.Draw(ids)
    for i, obj in enumerate(scene.objects):
        _draw_shape(draw, obj, i + 1)
    for j, d in enumerate(scene.digits):
        draw.rectangle(d.box, fill=100 + j)
    return torch.frombuffer(bytearray(ids.tobytes()), dtype=torch.uint8).view(scene.height, scene.width)


def patch_ids(scene: Scene, patch: int, every_item: bool = False) -> torch.Tensor:
    """Per-patch item under the centre-pixel rule ([height // patch, width // patch] int64): object i ->
    i + 1, digit j -> 100 + j (its glyph box), 0 = background. every_item=True also marks an item that
    covers no patch centre (a small object between centres) on the patch holding its box's centre."""
    grid = _item_map(scene)
    gh, gw = scene.height // patch, scene.width // patch
    centre = grid[patch // 2: gh * patch: patch, patch // 2: gw * patch: patch].long().clone()
    if every_item:
        items = [(i + 1, o.box) for i, o in enumerate(scene.objects)] + [(100 + j, d.box) for j, d in enumerate(scene.digits)]
        for key, (x0, y0, x1, y1) in items:
            if not bool((centre == key).any()):
                centre[min(gh - 1, (y0 + y1) // 2 // patch), min(gw - 1, (x0 + x1) // 2 // patch)] = key
    return centre


def patch_counts(scene: Scene, patch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The scene's item numbers (as in `patch_ids`: objects, then digits) and, per patch, how many of its
    pixels each item covers ([height // patch, width // patch, items] int64)."""
    gh, gw = scene.height // patch, scene.width // patch
    grid = _item_map(scene)[: gh * patch, : gw * patch].long()
    blocks = grid.view(gh, patch, gw, patch).permute(0, 2, 1, 3).reshape(gh, gw, patch * patch)
    keys = torch.tensor([i + 1 for i in range(len(scene.objects))] + [100 + j for j in range(len(scene.digits))],
                        dtype=torch.long)
    return keys, (blocks[..., None] == keys).sum(2)


def patch_cover(scene: Scene, patch: int, min_fraction: float = 0.125) -> torch.Tensor:
    """Per-patch item under the coverage rule ([height // patch, width // patch] int64, numbered as in
    `patch_ids`): the item covering most of the patch's pixels (ties: the lower number) where it covers
    at least `min_fraction` of them, else 0. Every item is marked at least on the patch it covers most
    (first in raster order on ties), so a small object straddling patch centres is never lost."""
    keys, counts = patch_counts(scene, patch)
    out = torch.zeros(counts.shape[:2], dtype=torch.long)
    if not len(keys):
        return out
    best, which = counts.max(-1)  # max returns the first maximum: the lower item number
    out = torch.where(best >= min_fraction * patch * patch, keys[which], out)
    for k, key in enumerate(keys.tolist()):
        if not bool((out == key).any()) and int(counts[..., k].max()) > 0:
            out.view(-1)[int(counts[..., k].reshape(-1).argmax())] = key
    return out


def patch_labels(scene: Scene, patch: int, rule: str = "centre") -> dict[str, torch.Tensor]:
    """Per-patch classes ([height // patch, width // patch] int64) under the centre-pixel rule (module
    docstring) or, with rule="cover", `patch_cover`'s: "colour" 1 + COLOURS index, "shape" 1 + SHAPES
    index, "digit" 1 + value; 0 = none."""
    if rule not in ("centre", "cover"):
        raise ValueError(f"rule must be 'centre' or 'cover', got {rule!r}")
    centre = patch_ids(scene, patch) if rule == "centre" else patch_cover(scene, patch)
    lut = torch.zeros(3, 256, dtype=torch.long)
    for i, obj in enumerate(scene.objects):
        lut[0, i + 1], lut[1, i + 1] = 1 + COLOURS.index(obj.colour), 1 + SHAPES.index(obj.shape)
    for j, d in enumerate(scene.digits):
        lut[2, 100 + j] = 1 + d.value
    return {"colour": lut[0][centre], "shape": lut[1][centre], "digit": lut[2][centre]}


# Questions --------------------------------------------------------------------------------------

def _holds(rel: str, a: Obj, b: Obj) -> bool:
    (ar, ac), (br, bc) = a.cell, b.cell
    return {"left of": ac < bc, "right of": ac > bc, "above": ar < br, "below": ar > br}[rel]


def _candidates(scene: Scene, kind: str) -> list[tuple[float, list[tuple[str, str, tuple[int, ...]]]]]:
    """Weighted pools of (text, answer, refs) for one kind; yes/no kinds get one pool per answer.
    refs: the items the question is about, as `patch_ids` numbers them (object i -> i + 1, digit j -> 100 + j)."""
    objs, pos = scene.objects, lambda cell: POSITIONS[cell[0]][cell[1]]
    ref = {id(o): i + 1 for i, o in enumerate(objs)}
    combos = Counter((o.colour, o.shape) for o in objs)
    if kind == "colour":
        once = [o for o in objs if sum(p.shape == o.shape for p in objs) == 1]
        return [(1, [(f"what colour is the {o.shape} ?", o.colour, (ref[id(o)],)) for o in once])]
    if kind == "shape":
        return [(1, [(f"what shape is at the {pos(o.cell)} ?", o.shape, (ref[id(o)],)) for o in objs])]
    if kind == "digit":
        return [(1, [(f"what digit is in the {pos(d.cell)} ?", NUMBERS[d.value], (100 + j,))
                     for j, d in enumerate(scene.digits)])]
    if kind == "count":  # mostly about colours that are present
        n = {c: sum(o.colour == c for o in objs) for c in COLOURS}
        qs = [(f"how many {c} shapes are there ?", NUMBERS[n[c]], tuple(ref[id(o)] for o in objs if o.colour == c))
              for c in COLOURS]
        return [(3, [q for q in qs if q[1] != "zero"]), (1, [q for q in qs if q[1] == "zero"])]
    if kind == "relation":  # between two objects that colour + shape describe uniquely
        unique = [o for o in objs if combos[o.colour, o.shape] == 1]
        qs = [(f"is the {a.colour} {a.shape} {rel} the {b.colour} {b.shape} ?", "yes" if _holds(rel, a, b) else "no",
               (ref[id(a)], ref[id(b)])) for a in unique for b in unique if a is not b for rel in RELATIONS]
    elif kind == "exist":  # "no" only for combinations one attribute away from a real object
        near = {(c, o.shape) for o in objs for c in COLOURS} | {(o.colour, s) for o in objs for s in SHAPES}
        qs = []
        for c, s in sorted(near):
            hit = tuple(ref[id(o)] for o in objs if (o.colour, o.shape) == (c, s))
            qs.append((f"is there a {c} {s} ?", "yes" if hit else "no",
                       hit or tuple(ref[id(o)] for o in objs if o.colour == c or o.shape == s)))
    else:
        raise ValueError(f"unknown kind {kind!r}")
    return [(1, [q for q in qs if q[1] == "yes"]), (1, [q for q in qs if q[1] == "no"])]


def questions(scene: Scene, rng: random.Random, per_kind: int = 1) -> list[Question]:
    """Up to `per_kind` distinct questions of each kind in KINDS that the scene supports, in KINDS order."""
    out = []
    for kind in KINDS:
        pools = _candidates(scene, kind)
        for _ in range(per_kind):
            pools = [(w, p) for w, p in pools if p]  # (the pools are fresh lists: popping is safe)
            if not pools:
                break
            pool = rng.choices(pools, weights=[w for w, _ in pools])[0][1]
            out.append(Question(kind, *pool.pop(rng.randrange(len(pool)))))
    return out


# Splits, the held-out set and scoring -----------------------------------------------------------

def _rng(split: str, index: int, what: str = "scene") -> random.Random:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return random.Random(f"shapes/{what}/{split}/{int(index)}")  # str seeds hash with sha512: stable


def sample(split: str, index: int, width: int = 224, height: int = 224,
           per_kind: int = 1) -> tuple[Scene, list[Question]]:
    """Scene and questions number `index` of `split` ("train" | "eval"); content is size-free."""
    rng = _rng(split, index)
    scene = make_scene(rng, width, height)
    return scene, questions(scene, rng, per_kind)


def qwen_size(split: str, index: int) -> tuple[int, int]:
    """A deterministic (width, height), both multiples of 28 in [168, 280]."""
    rng = _rng(split, index, "size")
    return 28 * rng.randint(6, 10), 28 * rng.randint(6, 10)


def eval_set(n_questions: int = 1200, width: int = 224, height: int = 224,
             sizes: Callable[[int], tuple[int, int]] | None = None) -> list[tuple[int, Question]]:
    """The fixed held-out set: (eval scene index, question) pairs, walking eval indices 0, 1, ... and
    keeping a question while its kind is under its equal share of `n_questions`, listed one of each kind
    in turn (KINDS' order). So eval_set(n) is eval_set(1200)[:n]: the first n lines of the lmms-eval
    task's data file (`--limit n`, `vtprune sweep --questions n`) are the questions `shapes` scores."""
    quota = {k: n_questions // len(KINDS) + (i < n_questions % len(KINDS)) for i, k in enumerate(KINDS)}
    by_kind: dict[str, list] = {k: [] for k in KINDS}
    taken, index = 0, 0
    while taken < n_questions:
        w, h = sizes(index) if sizes is not None else (width, height)
        for q in sample("eval", index, w, h)[1]:
            if len(by_kind[q.kind]) < quota[q.kind]:
                by_kind[q.kind].append((index, q))
                taken += 1
        index += 1
    return [by_kind[k][j] for j in range(max(quota.values(), default=0)) for k in KINDS if j < len(by_kind[k])]


def report(rows: Iterable[tuple[str, bool]]) -> dict:
    """Accuracy overall and by kind from (kind, correct) rows; accuracies are 0.0 where n is 0."""
    rows = list(rows)
    n_by, ok_by = Counter(k for k, _ in rows), Counter(k for k, ok in rows if ok)
    n = len(rows)
    return {"overall": sum(ok_by.values()) / n if n else 0.0,
            "by_kind": {k: ok_by[k] / n_by[k] for k in sorted(n_by)},
            "n": n, "n_by_kind": {k: n_by[k] for k in sorted(n_by)}}


def majority_baseline(rows: Iterable[tuple[str, str]]) -> dict:
    """`report` for always answering each kind's most common answer (ties: alphabetically first),
    plus "majority": {kind: that answer}."""
    rows = list(rows)
    counts: dict[str, Counter] = {}
    for kind, answer in rows:
        counts.setdefault(kind, Counter())[answer] += 1
    majority = {k: min(c.items(), key=lambda kv: (-kv[1], kv[0]))[0] for k, c in sorted(counts.items())}
    return {**report((k, a == majority[k]) for k, a in rows), "majority": majority}


def eval_rows(n_questions: int = 1200) -> list[dict]:
    """The held-out set as plain records, one per question (the lmms-eval task's data file): the eval
    scene index, its dynamic-resolution size (`qwen_size`, as tiny-qwen2vl is evaluated), kind,
    question text and answer."""
    rows = []
    for i, (idx, q) in enumerate(eval_set(n_questions)):
        w, h = qwen_size("eval", idx)
        rows.append({"id": i, "scene": idx, "width": w, "height": h, "kind": q.kind, "question": q.text,
                     "answer": q.answer})
    return rows
