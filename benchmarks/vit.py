"""ViT throughput with patch_vit: images/s unpatched vs patched, side by side in one run.

  python benchmarks/vit.py --out results/vit_gpu.json                   # on a CUDA machine (bf16, batch 64)
  python benchmarks/vit.py --quick --out /tmp/vit_quick.json            # CPU smoke run (batch 2, 2 reps)

Models (random weights, nothing downloaded): timm `vit_base_patch16_224` and open_clip `ViT-B-16`'s
visual tower, 224 px: 196 patches + CLS. Strategies at --ratios, pruning after --layer (0-based);
the ratio column is patched / unpatched images per second, measured in the same process.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent  # off the path: benchmarks/kernels.py would shadow the `kernels` package
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]  # that transformers imports
sys.path.insert(0, str(HERE.parent))
import vtprune  # noqa: E402
from vtprune.eval.bench import save_text  # noqa: E402


def models():
    import timm

    torch.manual_seed(0)
    yield "timm vit_base_patch16_224", timm.create_model("vit_base_patch16_224", pretrained=False)
    import open_clip  # (after timm's rows: a machine without open_clip still measures those)

    torch.manual_seed(0)
    yield "open_clip ViT-B-16", open_clip.create_model("ViT-B-16", pretrained=None).visual


def image_size(model) -> tuple[int, int]:
    size = model.patch_embed.img_size if hasattr(model, "patch_embed") else model.image_size
    return tuple(size) if isinstance(size, (tuple, list)) else (size, size)


def images_per_s(model, x, reps: int) -> float:
    cuda = x.is_cuda
    with torch.inference_mode():
        for _ in range(2):
            model(x)
        times = []
        for _ in range(reps):
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            model(x)
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    return x.shape[0] / statistics.median(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", default="divprune,hiprune,pool,token_shuffle,random,todre")
    ap.add_argument("--ratios", default="0.5,0.25")
    ap.add_argument("--layer", type=int, default=5, help="prune after this block (0-based; ViT-B has 12)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--quick", action="store_true", help="batch 2, 2 reps (a CPU smoke run)")
    ap.add_argument("--out", help="JSON file to write")
    args = ap.parse_args(argv)
    if args.quick:
        args.batch, args.reps = 2, 2
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    rows = []

    def save(complete: bool):  # after each model too: a run cut short keeps what it measured
        if args.out:
            record = {"command": "python benchmarks/vit.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                      "device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "dtype": str(dtype),
                      "batch": args.batch, "layer": args.layer, "complete": complete, "rows": rows}
            save_text(args.out, json.dumps(record, indent=1) + "\n")

    for name, model in models():
        model = model.to(device, dtype).eval()
        x = torch.randn(args.batch, 3, *image_size(model), generator=torch.Generator().manual_seed(0)).to(device, dtype)
        h, w = vtprune.vit.tower(model).grid
        patches = h * w
        base = images_per_s(model, x, args.reps)
        rows.append(dict(model=name, method="none", ratio=1.0, images_per_s=base, speedup=1.0))
        print(f"{name:<26} {'unpatched':<14} {'':>5} {base:10.1f} img/s", flush=True)
        for method in args.methods.split(","):
            for ratio in (float(r) for r in args.ratios.split(",")):
                vtprune.patch_vit(model, method, ratio=ratio, layer=args.layer)
                ips = images_per_s(model, x, args.reps)
                kept = vtprune.stats(model).visual_after[0]
                vtprune.unpatch(model)
                rows.append(dict(model=name, method=method, ratio=ratio, kept=kept, images_per_s=ips, speedup=ips / base))
                print(f"{name:<26} {method:<14} {ratio:5.2f} {ips:10.1f} img/s  x{ips / base:.2f}  ({kept} of {patches} kept)",
                      flush=True)
                save(complete=False)  # row by row: a run cut short keeps what it measured
        again = images_per_s(model, x, args.reps)  # the baseline once more: how far the machine drifted meanwhile
        rows.append(dict(model=name, method="none (again)", ratio=1.0, images_per_s=again, speedup=again / base))
        print(f"{name:<26} {'unpatched again':<14} {'':>5} {again:10.1f} img/s  x{again / base:.2f}", flush=True)
        save(complete=False)
    save(complete=True)
    if args.out:
        print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
