import random
import re
from collections import Counter

import pytest
import torch
from PIL import Image, ImageDraw

from vtprune.eval import shapes
from vtprune.eval.shapes import (
    BACKGROUND, COLOUR_RGB, COLOURS, DIGIT_RGB, KINDS, NUMBERS, POSITIONS, SHAPES, VOCAB, Digit, Scene,
    eval_set, majority_baseline, patch_labels, qwen_size, render, report, sample)

POS = {name: (r, c) for r, row in enumerate(POSITIONS) for c, name in enumerate(row)}


@pytest.fixture(scope="module")
def held_out():
    return eval_set(1200)


def _pixels(img: Image.Image) -> torch.Tensor:
    return torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(img.height, img.width, 3)


def _layout(scene: Scene):
    return tuple(scene.objects), tuple(scene.digits)


def test_sample_is_deterministic_and_splits_differ():
    for i in range(5):
        (s1, q1), (s2, q2) = sample("train", i), sample("train", i)
        assert s1 == s2 and q1 == q2 and render(s1).tobytes() == render(s2).tobytes()
    train = {_layout(sample("train", i)[0]) for i in range(300)}
    held = {_layout(sample("eval", i)[0]) for i in range(300)}
    assert len(train) == 300 and len(held) == 300 and not train & held
    assert render(sample("train", 0)[0]).tobytes() != render(sample("eval", 0)[0]).tobytes()
    with pytest.raises(ValueError):
        sample("test", 0)


def test_content_and_questions_do_not_depend_on_size():
    for i in range(10):
        (a, qa), (b, qb) = sample("eval", i), sample("eval", i, *qwen_size("eval", i))
        assert qa == qb
        assert [(o.shape, o.colour, o.size, o.cell) for o in a.objects] == \
               [(o.shape, o.colour, o.size, o.cell) for o in b.objects]
        assert [(d.value, d.cell) for d in a.digits] == [(d.value, d.cell) for d in b.digits]


def test_qwen_sizes():
    sizes = [qwen_size(s, i) for s in ("train", "eval") for i in range(200)]
    assert all(w % 28 == 0 and h % 28 == 0 and 168 <= w <= 280 and 168 <= h <= 280 for w, h in sizes)
    assert len(set(sizes)) > 10 and qwen_size("eval", 7) == qwen_size("eval", 7)


def test_geometry_in_cells_and_size_mix():
    small = large = 0
    for i in range(200):
        w, h = (224, 224) if i % 2 else qwen_size("train", i)
        scene = sample("train", i, w, h)[0]
        assert 2 <= len(scene.objects) <= 5 and len(scene.digits) <= 2
        cells = [o.cell for o in scene.objects] + [d.cell for d in scene.digits]
        assert len(set(cells)) == len(cells)
        for thing in scene.objects + scene.digits:
            r, c = thing.cell
            x0, y0, x1, y1 = thing.box
            assert c * w // 3 <= x0 <= x1 < (c + 1) * w // 3 and r * h // 3 <= y0 <= y1 < (r + 1) * h // 3
        for o in scene.objects:
            side = o.box[2] - o.box[0] + 1
            assert o.box[3] - o.box[1] + 1 == side
            if o.size == "small":
                small += 1
                assert 14 <= side <= 20
            else:
                large += 1
                cell = min(w // 3, h // 3)
                assert 0.58 * cell <= side <= 0.77 * cell
        for d in scene.digits:
            assert 14 <= d.box[3] - d.box[1] + 1 <= 18
    assert 0.30 <= small / (small + large) <= 0.40


@pytest.mark.parametrize("split, index, patch", [("train", 0, 16), ("train", 1, 16), ("eval", 2, 14),
                                                 ("eval", 3, 14), ("train", 4, 8)])
def test_patch_labels_match_pixels(split, index, patch):
    size = (224, 224) if patch == 16 else qwen_size(split, index)
    scene = sample(split, index, *size)[0]
    px, lab = _pixels(render(scene)), patch_labels(scene, patch)
    gh, gw = size[1] // patch, size[0] // patch
    assert all(t.shape == (gh, gw) and t.dtype == torch.long for t in lab.values())
    centres = px[patch // 2::patch, patch // 2::patch][:gh, :gw]  # [gh, gw, 3]
    col, shp, dig = lab["colour"], lab["shape"], lab["digit"]
    assert torch.equal(col > 0, shp > 0) and not ((col > 0) & (dig > 0)).any()
    for c, name in enumerate(COLOURS, 1):
        assert (centres[col == c] == torch.tensor(COLOUR_RGB[name], dtype=torch.uint8)).all()
    bg = centres[(col == 0) & (dig == 0)]
    assert len(bg) and (bg == torch.tensor(BACKGROUND, dtype=torch.uint8)).all()
    # each labelled centre lies inside its object's box, with that object's shape / digit's value
    for r in range(gh):
        for c in range(gw):
            y, x = r * patch + patch // 2, c * patch + patch // 2
            owner = [o for o in scene.objects if o.box[0] <= x <= o.box[2] and o.box[1] <= y <= o.box[3]]
            if shp[r, c]:
                assert owner and SHAPES[shp[r, c] - 1] == owner[0].shape
            digs = [d for d in scene.digits if d.box[0] <= x <= d.box[2] and d.box[1] <= y <= d.box[3]]
            assert dig[r, c] == (digs[0].value + 1 if digs else 0)
    # large round / square objects always cover some patch centre
    for o in scene.objects:
        if o.size == "large" and o.shape in ("circle", "square") and patch <= 16:
            assert (col == 1 + COLOURS.index(o.colour)).any()


@pytest.mark.parametrize("fallback", [False, True])
def test_digit_ink_stays_in_box_and_digits_are_distinct(fallback, monkeypatch):
    if fallback:  # a Pillow without a scalable default font draws seven-segment digits
        monkeypatch.setattr(shapes, "_font", lambda size: None)
    base = sample("train", 0)[0]
    crops = []
    for v in range(10):
        d = Digit(v, (1, 1), shapes._place(random.Random(0), (75, 75, 149, 149),
                                           *shapes._digit_extent(22), 0), 22)
        scene = Scene(base.width, base.height, [], [d])
        px = _pixels(render(scene))
        ink = (px != torch.tensor(BACKGROUND, dtype=torch.uint8)).any(-1)
        x0, y0, x1, y1 = d.box
        assert ink.sum() > 20 and not ink[:y0].any() and not ink[y1 + 1:].any()
        assert not ink[:, :x0].any() and not ink[:, x1 + 1:].any()
        assert (px[ink] == torch.tensor(DIGIT_RGB, dtype=torch.uint8)).all()
        crops.append(ink[y0:y1 + 1, x0:x1 + 1].flatten().tolist())
    assert len({tuple(c) for c in crops}) == 10


def test_seven_segment_fallback_sizes_and_labels(monkeypatch):
    monkeypatch.setattr(shapes, "_font", lambda size: None)
    for i in range(20):
        scene = sample("train", i)[0]
        assert all(14 <= d.box[3] - d.box[1] + 1 <= 18 for d in scene.digits)
        px, dig = _pixels(render(scene)), patch_labels(scene, 16)["digit"]
        assert set(dig.unique().tolist()) <= {0} | {d.value + 1 for d in scene.digits}
        for d in scene.digits:
            x0, y0, x1, y1 = d.box
            assert (px[y0:y1 + 1, x0:x1 + 1] == torch.tensor(DIGIT_RGB, dtype=torch.uint8)).all(-1).any()
    patterns = set()
    for v in range(10):
        img = Image.new("L", (12, 18))
        shapes._seven_segment(ImageDraw.Draw(img), (1, 1, 10, 16), v, 255)
        patterns.add(img.tobytes())
    assert len(patterns) == 10


def test_small_objects_exist():
    objs = [o for i in range(50) for o in sample("train", i)[0].objects]
    assert any(o.box[2] - o.box[0] + 1 <= 20 for o in objs)
    assert {o.shape for o in objs} == set(SHAPES) and {o.colour for o in objs} == set(COLOURS)


def _check(scene: Scene, q) -> None:
    """Recompute the answer from scene geometry, independently of the generator."""
    words = q.text.split()
    assert set(words) <= set(VOCAB) and q.answer in VOCAB and words[-1] == "?"
    objs = scene.objects
    if q.kind == "colour":
        shape = re.fullmatch(r"what colour is the (\w+) \?", q.text)[1]
        match = [o for o in objs if o.shape == shape]
        assert len(match) == 1 and q.answer == match[0].colour
    elif q.kind == "shape":
        cell = POS[re.fullmatch(r"what shape is at the (.+) \?", q.text)[1]]
        assert [o.shape for o in objs if o.cell == cell] == [q.answer]
    elif q.kind == "digit":
        cell = POS[re.fullmatch(r"what digit is in the (.+) \?", q.text)[1]]
        assert [NUMBERS[d.value] for d in scene.digits if d.cell == cell] == [q.answer]
    elif q.kind == "count":
        colour = re.fullmatch(r"how many (\w+) shapes are there \?", q.text)[1]
        assert q.answer == NUMBERS[sum(o.colour == colour for o in objs)]
    elif q.kind == "exist":
        c, s = re.fullmatch(r"is there a (\w+) (\w+) \?", q.text).groups()
        assert q.answer == ("yes" if any(o.colour == c and o.shape == s for o in objs) else "no")
    elif q.kind == "relation":
        m = re.fullmatch(r"is the (\w+) (\w+) (left of|right of|above|below) the (\w+) (\w+) \?", q.text)
        a = [o for o in objs if (o.colour, o.shape) == m.group(1, 2)]
        b = [o for o in objs if (o.colour, o.shape) == m.group(4, 5)]
        assert len(a) == 1 and len(b) == 1 and a[0] is not b[0]
        (ar, ac), (br, bc) = a[0].cell, b[0].cell
        truth = {"left of": ac < bc, "right of": ac > bc, "above": ar < br, "below": ar > br}[m[3]]
        assert q.answer == ("yes" if truth else "no")
    else:
        raise AssertionError(q.kind)


def test_answers_are_correct_and_in_vocab():
    assert list(VOCAB) == sorted(set(VOCAB)) and "?" in VOCAB
    for split in ("train", "eval"):
        for i in range(150):
            scene, qs = sample(split, i, per_kind=3)
            assert len({q.text for q in qs}) == len(qs)
            assert all(sum(q.kind == k for q in qs) <= 3 for k in KINDS)
            for q in qs:
                _check(scene, q)


def test_eval_set_is_balanced_and_correct(held_out):
    assert len(held_out) == 1200
    n = Counter(q.kind for _, q in held_out)
    assert set(n) == set(KINDS) and min(n.values()) >= 100
    for kind in ("relation", "exist"):
        answers = [q.answer for _, q in held_out if q.kind == kind]
        assert set(answers) == {"yes", "no"} and 0.35 <= answers.count("yes") / len(answers) <= 0.65
    assert [q.kind for _, q in held_out] == list(KINDS) * 200  # one of each kind in turn
    for kind in KINDS:  # each kind's questions in scene order
        indices = [i for i, q in held_out if q.kind == kind]
        assert indices == sorted(indices)
    for i, q in held_out[::7]:
        _check(sample("eval", i)[0], q)
    # per-kind majority answers stay well below perfect: questions are not guessable from the text kind
    base = majority_baseline((q.kind, q.answer) for _, q in held_out)
    assert base["overall"] < 0.5 and base["by_kind"]["relation"] <= 0.65


def test_eval_set_with_sizes_and_small_n():
    sized = eval_set(60, sizes=lambda i: qwen_size("eval", i))
    assert [q for _, q in sized] == [q for _, q in eval_set(60)]
    assert len(eval_set(7)) == 7 and eval_set(0) == []
    full = eval_set(1200)
    for n in (1, 5, 7, 35, 599):  # a smaller set is the full set's first n (the lmms-eval task's --limit n)
        assert eval_set(n) == full[:n]


def test_report_and_majority_baseline_by_hand():
    r = report([("count", True), ("count", False), ("exist", True), ("count", True)])
    assert r == {"overall": 0.75, "by_kind": {"count": 2 / 3, "exist": 1.0}, "n": 4,
                 "n_by_kind": {"count": 3, "exist": 1}}
    assert report([]) == {"overall": 0.0, "by_kind": {}, "n": 0, "n_by_kind": {}}
    rows = [("exist", "yes"), ("exist", "no"), ("exist", "no"), ("count", "one"), ("count", "two"),
            ("count", "one"), ("count", "zero"), ("digit", "two"), ("digit", "five")]
    b = majority_baseline(iter(rows))
    assert b["majority"] == {"count": "one", "digit": "five", "exist": "no"}  # digit tie: alphabetical
    assert b["by_kind"] == {"count": 0.5, "digit": 0.5, "exist": 2 / 3}
    assert b["n"] == 9 and b["overall"] == pytest.approx(5 / 9)


def test_question_refs_and_patch_ids_by_hand():
    from vtprune.eval.shapes import Digit, Obj, Scene, _candidates, patch_ids

    star = Obj("star", "red", "large", (0, 0), (10, 10, 60, 60))
    dot = Obj("square", "blue", "small", (1, 1), (106, 106, 117, 117))  # covers no 16-px patch centre
    scene = Scene(224, 224, [star, dot], [Digit(7, (2, 2), (180, 180, 190, 196), 20)])
    qs = {q[0]: (q[1], q[2]) for _, pool in
          [p for kind in ("colour", "shape", "digit", "count", "relation", "exist") for p in _candidates(scene, kind)]
          for q in pool}
    assert qs["what colour is the star ?"] == ("red", (1,))
    assert qs["what shape is at the centre ?"] == ("square", (2,))
    assert qs["what digit is in the bottom right ?"] == ("seven", (100,))
    assert qs["how many red shapes are there ?"] == ("one", (1,))
    assert qs["how many green shapes are there ?"] == ("zero", ())
    assert qs["is the red star above the blue square ?"] == ("yes", (1, 2))
    assert qs["is there a red square ?"] == ("no", (1, 2))  # near miss: the red thing and the square
    assert qs["is there a blue square ?"] == ("yes", (2,))
    ids = patch_ids(scene, 16)
    assert ids.shape == (14, 14) and not bool((ids == 2).any())
    assert int(ids[11, 11]) == 100 and int(ids[2, 2]) == 1  # pixel (40, 40): the star's middle
    full = patch_ids(scene, 16, every_item=True)
    assert int(full[6, 6]) == 2 and int((full == 2).sum()) == 1  # (106 + 117) // 2 // 16 = 6
    assert torch.equal(full[full != 2], ids[full != 2])


def test_patch_cover_by_hand():
    from vtprune.eval.shapes import Digit, Obj, Scene, patch_cover, patch_labels

    dot = Obj("square", "blue", "small", (1, 1), (106, 106, 117, 117))  # 6 x 6 px in each of 4 patches
    sliver = Obj("square", "red", "small", (0, 2), (180, 10, 180, 40))  # 1 px wide: under 1/8 of every patch
    digit = Digit(7, (2, 2), (180, 180, 190, 196), 20)
    scene = Scene(224, 224, [dot, sliver], [digit])
    ids = patch_cover(scene, 16)
    assert ids.shape == (14, 14)
    assert sorted(map(tuple, (ids == 1).nonzero().tolist())) == [(6, 6), (6, 7), (7, 6), (7, 7)]  # 36 px >= 32 each
    # the sliver covers 6, 16 and 9 px of patches (0, 11), (1, 11), (2, 11): all under 32 px, so
    # only the patch it covers most keeps it
    assert (ids == 2).nonzero().tolist() == [[1, 11]]
    # the digit box (180-190 x 180-196): patch (11, 11) holds 11 x 12 = 132 px, (12, 11) 11 x 5 = 55 px
    assert sorted(map(tuple, (ids == 100).nonzero().tolist())) == [(11, 11), (12, 11)]
    assert int((ids > 0).sum()) == 7
    lab = patch_labels(scene, 16, rule="cover")
    assert int(lab["colour"][6, 7]) == 1 + 2 and int(lab["shape"][1, 11]) == 1 + 1 and int(lab["digit"][12, 11]) == 8
    assert int(patch_labels(scene, 16)["colour"][6, 7]) == 0  # the centre rule misses the dot
    with pytest.raises(ValueError, match="rule"):
        patch_labels(scene, 16, rule="middle")


# Found by mutating the generator: what each shape looks like, and the label rules' edges

def _drawn(shape: str) -> torch.Tensor:
    """[50, 50] bool: where a red `shape` drawn in the box (10, 10)-(39, 39) is."""
    scene = Scene(50, 50, [shapes.Obj(shape, "red", "large", (0, 0), (10, 10, 39, 39))], [])
    return (_pixels(render(scene)) == torch.tensor(COLOUR_RGB["red"], dtype=torch.uint8)).all(-1)


def test_each_shape_is_drawn_as_named_in_its_box():
    # box (10, 10)-(39, 39): centre (24.5, 24.5), half-side 14.5; pixels indexed [y, x]
    for shape in SHAPES:
        on = _drawn(shape)
        assert on.any() and not on[:10].any() and not on[40:].any() and not on[:, :10].any() and not on[:, 40:].any()
    assert _drawn("square")[10:40, 10:40].all()
    circle = _drawn("circle")
    assert circle[24, 24] and not circle[12, 12] and not circle[37, 37]  # corners: 17.7 px from the centre > 14.5
    # triangle, apex up: (24.5, 10) -> (39, 39), (10, 39); half-width at row y = 14.5 (y - 10) / 29
    tri = _drawn("triangle")
    assert tri[14, 24] and not tri[14, 12] and tri[37, 12] and tri[37, 37]
    # star, one point straight up: the tip (24.5, 10); straight down lies an inner corner, 0.45 x 14.5 = 6.5
    # px below the centre (row 31), between the two lower points (which end at row 36.2)
    star = _drawn("star")
    assert star[13, 24] and star[24, 24] and not star[35, 24]
    # cross: two bars a third of the side (30 / 3 = 10 px) thick through the centre: rows / columns
    # round(24.5 -+ 5) = 20..30 (inclusive), the corners empty
    cross = _drawn("cross")
    assert cross[:, 11].nonzero().squeeze(1).tolist() == list(range(20, 31))
    assert cross[11, :].nonzero().squeeze(1).tolist() == list(range(20, 31))
    assert not cross[12, 12] and not cross[37, 37] and cross[24, 24]


def test_patch_cover_threshold_is_inclusive():
    from vtprune.eval.shapes import Obj, patch_cover

    # an 8 x 8 square over the border of patches (0, 0) and (0, 1): 4 x 8 = 32 px in each, exactly 1/8 of 16 x 16
    half = Obj("square", "red", "small", (0, 0), (12, 0, 19, 7))
    ids = patch_cover(Scene(64, 64, [half], []), 16)
    assert sorted(map(tuple, (ids == 1).nonzero().tolist())) == [(0, 0), (0, 1)]
    # one column to the right: 3 x 8 = 24 px in (0, 0), under 1/8; 4 x 8 = 32 px in (0, 1)
    ids = patch_cover(Scene(64, 64, [Obj("square", "red", "small", (0, 0), (13, 0, 20, 7))], []), 16)
    assert (ids == 1).nonzero().tolist() == [[0, 1]]


def test_every_item_marks_the_patch_of_the_box_centre_row_then_column():
    from vtprune.eval.shapes import Obj, patch_ids

    # x 42..52 and y 106..117 hold no 16-px patch centre (8, 24, 40, 56, ... 104, 120): the box centre
    # (47, 111) lies in row 111 // 16 = 6, column 47 // 16 = 2
    dot = Obj("square", "blue", "small", (1, 0), (42, 106, 52, 117))
    scene = Scene(224, 224, [dot], [])
    assert not bool((patch_ids(scene, 16) == 1).any())
    assert (patch_ids(scene, 16, every_item=True) == 1).nonzero().tolist() == [[6, 2]]
