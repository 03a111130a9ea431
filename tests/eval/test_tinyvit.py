"""The bundled tiny ViT: deterministic data, the shipped weights' accuracy, and the README table."""
import pathlib
import re

import pytest
import torch

pytest.importorskip("timm", reason="the tiny ViT is a timm model: pip install 'vtprune[vit]'")

import vtprune  # noqa: E402
from vtprune.eval import tinyvit  # noqa: E402


def test_samples_are_deterministic_and_balanced():
    a, ya = tinyvit.tensors("eval", 5, 4)
    b, yb = tinyvit.tensors("eval", 5, 4)
    assert torch.equal(a, b) and torch.equal(ya, yb)
    assert not torch.equal(a, tinyvit.tensors("train", 5, 4)[0])
    _, y = tinyvit.tensors("train", 0, 500)
    counts = torch.bincount(y, minlength=5)
    assert counts.min() > 70  # five shapes, roughly uniform


@pytest.mark.skipif(not tinyvit.trained(), reason="tiny-vit weights not trained yet")
def test_bundled_vit_accuracy_and_pruning_costs_accuracy():
    model = tinyvit.load()
    assert next(iter(tinyvit.load_file_dtypes())) == torch.float16  # shipped in fp16
    full = tinyvit.accuracy(model, 300)
    vtprune.patch_vit(model, "random", ratio=0.111, layer=2)
    pruned = tinyvit.accuracy(model, 300)
    vtprune.unpatch(model)
    assert full >= 0.9 and pruned < full - 0.1, (full, pruned)
    assert (tinyvit.BUNDLED / "model.safetensors").stat().st_size <= 10 * 2 ** 20


def test_readme_vit_table_is_generated_from_the_training_log():
    readme = (pathlib.Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = re.search(r"<!-- vit-accuracy:start -->\n(.*?)<!-- vit-accuracy:end -->", readme, re.S)
    assert block, "README lacks the tiny-vit accuracy block"
    assert block.group(1).strip() == tinyvit.readme_table().strip(), "stale: python scripts/update_readme.py"


def test_training_script_smoke(tmp_path):
    import json
    import sys

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "scripts"))
    try:
        import train_tiny_vit
    finally:
        sys.path.pop(0)
    train_tiny_vit.main(["--out", str(tmp_path), "--steps", "2", "--batch", "8", "--eval-images", "20", "--ratios", "0.5"])
    log = json.loads((tmp_path / "train_log.json").read_text())
    assert [(r["method"], r["ratio"]) for r in log["eval"]["rows"]] == [("none", 1.0)] + [
        (m, 0.5) for m in train_tiny_vit.METHODS]
    assert log["command"].startswith("python scripts/train_tiny_vit.py --out")


@pytest.mark.skipif(not tinyvit.trained(), reason="tiny-vit weights not trained yet")
def test_demo_prints_the_vit_accuracy_table_and_plot(tmp_path, capsys):
    from vtprune.demo import run_vit

    rows = run_vit([0.25], tmp_path, images=200)
    text = capsys.readouterr().out
    want = {"divprune", "hiprune", "pool", "random", "todre", "token_shuffle"}
    assert want <= {r["method"] for r in rows} and not {"fastv", "transprune", "vflowopt"} & {r["method"] for r in rows}
    assert "| divprune | " in text and (tmp_path / "vit_accuracy_vs_ratio.png").stat().st_size > 5000
    import json

    saved = json.loads((tmp_path / "vit_results.json").read_text())  # (only the plot was written)
    assert saved["rows"] == rows and saved["images"] == 200
    acc = {r["method"]: r["accuracy"] for r in rows}
    assert acc["divprune"] > acc["random"]  # diversity keeps the one distinctive object


# Found by mutating the harness: the held-out split and paging

def _oracle(n):
    """Knows the first n held-out images' labels; any other image gets class 0."""
    x, y = tinyvit.tensors("eval", 0, n)
    table = {t.numpy().tobytes(): int(label) for t, label in zip(x, y)}
    def model(batch):
        ids = torch.tensor([table.get(t.numpy().tobytes(), 0) for t in batch])
        return torch.nn.functional.one_hot(ids, len(tinyvit.shapes.SHAPES)).float()
    return model


def test_accuracy_and_sweep_score_the_held_out_split():
    oracle = _oracle(20)
    assert tinyvit.accuracy(oracle, 20, batch=8) == 1.0
    assert tinyvit.sweep(oracle, [], [], n=20)[0]["accuracy"] == 1.0


def test_tensors_start_at_start():
    x, y = tinyvit.tensors("eval", 5, 4)
    x9, y9 = tinyvit.tensors("eval", 0, 9)
    assert torch.equal(x, x9[5:]) and torch.equal(y, y9[5:])


# Found by mutating the data path: the pixels' normalisation and layout, and where distractors go

def test_tensors_are_the_images_normalised_channel_first():
    """x[i, c, row, col] = (pixel / 255 - 0.5) / 0.25 of image i (RGB, channel first, rows then columns)."""
    import numpy as np

    x, y = tinyvit.tensors("eval", 3, 2)
    assert x.shape == (2, 3, 64, 64) and x.dtype == torch.float32
    for k in range(2):
        img, label = tinyvit.sample("eval", 3 + k)
        assert int(y[k]) == label
        for col, row in [(0, 0), (63, 0), (5, 40), *[(c, r) for r in range(0, 64, 3) for c in range(1, 64, 5)]]:
            want = [(v / 255 - 0.5) / 0.25 for v in img.getpixel((col, row))]
            assert x[k, :, row, col].tolist() == pytest.approx(want, abs=1e-6), (k, row, col)
        rgb = np.asarray(img, dtype=np.float64).transpose(2, 0, 1)  # [3, rows, columns]
        assert torch.allclose(x[k].double(), (torch.from_numpy(rgb) / 255 - 0.5) / 0.25, atol=1e-6)
    # the dark grey background: (40 / 255 - 0.5) / 0.25 in every channel
    assert (x == (40 / 255 - 0.5) / 0.25).float().mean() > 0.5


def test_distractor_digits_stay_off_the_object():
    import numpy as np

    dark, grey = torch.tensor(tinyvit.shapes.BACKGROUND), torch.tensor(tinyvit.shapes.DIGIT_RGB)
    with_digits = 0
    for i in range(150):
        img, _ = tinyvit.sample("train", i)
        px = torch.from_numpy(np.array(img))  # [64, 64, 3]
        digit = (px == grey).all(-1)
        ys, xs = (~digit & ~(px == dark).all(-1)).nonzero(as_tuple=True)  # the object: its own colour
        with_digits += bool(digit.any())
        assert not digit[ys.min():ys.max() + 1, xs.min():xs.max() + 1].any(), i
    assert with_digits > 50


def test_demo_vit_rows_leave_ratio_one_to_the_unpatched_model_and_record_their_layer(tmp_path, monkeypatch):
    """--ratios 1.0,0.5: 1.0 is the unpatched row only; each strategy runs at 0.5, patched after the block
    vit_results.json names, and the model is left unpatched. (A random-weight tiny ViT stands in for the trained one.)"""
    import io
    import json

    import vtprune.vit
    from vtprune.demo import run_vit

    layers, patch_vit = [], vtprune.patch_vit

    def spy(model, method, **kw):
        layers.append(kw["layer"])
        return patch_vit(model, method, **kw)

    model = tinyvit.build().eval()
    x = tinyvit.tensors("eval", 0, 4)[0]
    with torch.no_grad():
        before = model(x)
    monkeypatch.setattr(tinyvit, "load", lambda: model)
    monkeypatch.setattr(vtprune.vit, "supported", lambda: ["random", "divprune"])
    monkeypatch.setattr(vtprune, "patch_vit", spy)
    rows = run_vit((1.0, 0.5), tmp_path, images=8, out=io.StringIO())
    assert [(r["method"], r["ratio"]) for r in rows] == [("none", 1.0), ("random", 0.5), ("divprune", 0.5)]
    saved = json.loads((tmp_path / "vit_results.json").read_text())
    assert saved["rows"] == rows and saved["images"] == 8 and layers == [saved["layer"]] * 2
    with torch.no_grad():
        assert torch.equal(model(x), before)  # each cell unpatched after it
