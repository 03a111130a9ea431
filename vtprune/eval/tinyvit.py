"""The bundled tiny ViT for `patch_vit`: a timm VisionTransformer classifying synthetic `shapes`
images by the shape of their one object, trained here by scripts/train_tiny_vit.py.

An image is 64 x 64 px (8-px patches: an 8 x 8 grid + CLS) with one shape of random colour, size
(10-28 px) and place, plus up to two distractor digits; the label is the shape (5 classes). Small
objects cover one or two patches, so dropping patch tokens can lose the object: accuracy then
tells strategies apart. Deterministic by split and index, like the VQA benchmark.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from . import shapes

BUNDLED = Path(__file__).resolve().parents[1] / "bundled" / "tiny-vit"
SIZE, PATCH = 64, 8
ARCH = dict(img_size=SIZE, patch_size=PATCH, embed_dim=96, depth=6, num_heads=3, mlp_ratio=3.0,
            num_classes=len(shapes.SHAPES))
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def sample(split: str, index: int):
    """(PIL image, label) number `index` of `split` ("train" | "eval")."""
    from PIL import Image, ImageDraw

    rng = shapes._rng(split, index, "vit")
    shape, colour = rng.choice(shapes.SHAPES), rng.choice(shapes.COLOURS)
    side = rng.randint(10, 28)
    x0, y0 = rng.randint(0, SIZE - side), rng.randint(0, SIZE - side)
    img = Image.new("RGB", (SIZE, SIZE), shapes.BACKGROUND)
    draw = ImageDraw.Draw(img)
    draw.fontmode = "1"
    obj = shapes.Obj(shape, colour, "small" if side < 16 else "large", (0, 0), (x0, y0, x0 + side - 1, y0 + side - 1))
    font = shapes._font(14)
    for _ in range(rng.randint(0, 2)):  # distractors where the object is not
        for _ in range(10):
            dx, dy = rng.randint(0, SIZE - 10), rng.randint(0, SIZE - 14)
            if dx + 10 < x0 or dx > x0 + side or dy + 14 < y0 or dy > y0 + side:
                if font is None:
                    shapes._seven_segment(draw, (dx, dy, dx + 6, dy + 9), rng.randrange(10), shapes.DIGIT_RGB)
                else:
                    draw.text((dx, dy), str(rng.randrange(10)), fill=shapes.DIGIT_RGB, font=font, anchor="lt")
                break
    shapes._draw_shape(draw, obj, shapes.COLOUR_RGB[colour])
    return img, shapes.SHAPES.index(shape)


def tensors(split: str, start: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised pixels [count, 3, 64, 64] and labels [count]."""
    imgs, labels = [], []
    for i in range(start, start + count):
        img, y = sample(split, i)
        imgs.append(torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(SIZE, SIZE, 3))
        labels.append(y)
    x = torch.stack(imgs).permute(0, 3, 1, 2).float() / 255.0
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    return (x - mean) / std, torch.tensor(labels)


def build():
    import timm

    return timm.models.vision_transformer.VisionTransformer(**ARCH)


def trained() -> bool:
    return (BUNDLED / "model.safetensors").exists()


def load():
    """The bundled trained tiny ViT (float32, eval mode), from the package's files."""
    from safetensors.torch import load_file

    if not trained():
        raise FileNotFoundError(f"{BUNDLED} has no weights; train them with scripts/train_tiny_vit.py")
    model = build()
    model.load_state_dict({k: v.float() for k, v in load_file(BUNDLED / "model.safetensors").items()})
    return model.eval()


def load_file_dtypes() -> set:
    """The dtypes stored in the shipped safetensors file."""
    from safetensors.torch import load_file

    return {v.dtype for v in load_file(BUNDLED / "model.safetensors").values()}


@torch.no_grad()
def accuracy(model, n: int = 1000, batch: int = 250, data=None) -> float:
    """Top-1 accuracy on the first `n` held-out images (patch_vit pruning on `model` applies); `data`:
    those images and labels already made by `tensors("eval", 0, n)`."""
    x, y = data if data is not None else tensors("eval", 0, n)
    hits = sum(int((model(x[s:s + batch]).argmax(-1) == y[s:s + batch]).sum()) for s in range(0, n, batch))
    return hits / n


def sweep(model, methods, ratios, layer: int = 2, n: int = 1000, progress: bool = False) -> list[dict]:
    """Accuracy of every strategy x kept ratio (patch_vit after `layer`), plus the unpatched model."""
    from tqdm.auto import tqdm

    import vtprune

    data = tensors("eval", 0, n)
    rows = [{"method": "none", "ratio": 1.0, "accuracy": accuracy(model, n, data=data)}]
    cells = [(m, r) for m in methods for r in ratios]
    for m, r in tqdm(cells, desc="tiny-vit", unit="cell", disable=not progress):
        vtprune.patch_vit(model, m, ratio=r, layer=layer)
        rows.append({"method": m, "ratio": r, "accuracy": accuracy(model, n, data=data)})
        vtprune.unpatch(model)
    return rows


def plot(rows: list[dict], path) -> Path:
    """Accuracy vs kept ratio, one line per strategy, the unpatched model dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    for m in dict.fromkeys(r["method"] for r in rows if r["method"] != "none"):
        pts = sorted((r["ratio"], r["accuracy"]) for r in rows if r["method"] == m)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m)
    full = next(r for r in rows if r["method"] == "none")
    ax.axhline(full["accuracy"], color="grey", linestyle="--", label="unpatched")
    ax.set_xlabel("kept patch-token ratio")
    ax.set_ylabel("held-out accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_title("tiny-vit (patch_vit)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def train_log() -> dict:
    path = BUNDLED / "train_log.json"
    return json.loads(path.read_text()) if path.exists() else {}


def readme_table() -> str:
    """The README's tiny-ViT table: held-out accuracy per strategy and kept ratio, from the training log."""
    ev = train_log().get("eval")
    if not ev:
        return "(tiny-vit not trained yet: python scripts/train_tiny_vit.py --out vtprune/bundled/tiny-vit)"
    return (f"Held-out accuracy on {ev['images']} images, pruning after block {ev['layer']} of {ARCH['depth']} "
            f"({(SIZE // PATCH) ** 2} patches):\n\n" + table(ev["rows"]))


def table(rows: list[dict]) -> str:
    """Markdown: accuracy per strategy and kept ratio (the sweep's table; rows use its keys)."""
    from .sweep import table as sweep_table

    return sweep_table(rows)


def seed_all(seed: int):
    random.seed(seed)
    torch.manual_seed(seed)
