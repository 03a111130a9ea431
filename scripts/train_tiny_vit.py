"""Train the bundled tiny ViT (vtprune.eval.tinyvit) and measure accuracy vs kept ratio per strategy.

  python scripts/train_tiny_vit.py --out vtprune/bundled/tiny-vit

AdamW with a cosine schedule on freshly generated training images (deterministic by seed and step
counts); saves fp16 safetensors, the command and the log to OUT/train_log.json together with the
held-out accuracy of every patch_vit strategy at the kept ratios (pruning after --layer). Same seed,
steps and CPU thread count: the same weights.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vtprune.cli import at_least  # noqa: E402
from vtprune.eval import tinyvit  # noqa: E402

METHODS = ["random", "pool", "token_shuffle", "divprune", "todre", "hiprune"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=at_least(1), default=1500)
    ap.add_argument("--batch", type=at_least(1), default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--layer", type=int, default=2, help="patch_vit layer for the accuracy table")
    ap.add_argument("--ratios", default="0.5,0.25,0.111")
    ap.add_argument("--eval-images", type=at_least(1), default=1000)
    args = ap.parse_args(argv)
    # the evaluation's settings are checked before training (they failed after it, over the saved weights)
    import vtprune

    try:
        ratios = [float(r) for r in args.ratios.split(",")]
    except ValueError:
        ap.error(f"--ratios: comma-separated numbers in (0, 1], got {args.ratios!r}")
    for r in ratios:
        try:
            vtprune.unpatch(vtprune.patch_vit(tinyvit.build(), "random", ratio=r, layer=args.layer))
        except ValueError as e:
            ap.error(f"--ratios / --layer: {e}")
    tinyvit.seed_all(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = tinyvit.build()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    warm = min(100, args.steps // 10 + 1)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps)))
    lines, t0 = [], time.time()

    def log(msg):
        line = f"[{time.time() - t0:7.1f}s] {msg}"
        print(line, flush=True)
        lines.append(line)

    log(f"tiny ViT: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters")
    model.train()
    hits = seen = 0
    for step in range(args.steps):
        x, y = tinyvit.tensors("train", step * args.batch, args.batch)
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        hits += int((logits.argmax(-1) == y).sum())
        seen += len(y)
        if step % 100 == 0 or step == args.steps - 1:
            log(f"step {step:5d} loss {loss.item():.4f} train acc {hits / seen:.3f}")
            hits = seen = 0
    model.eval()
    from safetensors.torch import save_file

    save_file({k: v.half().contiguous() for k, v in model.state_dict().items()}, out / "model.safetensors")
    model = tinyvit.build()  # evaluate what ships: the fp16 weights loaded back in float32
    from safetensors.torch import load_file

    model.load_state_dict({k: v.float() for k, v in load_file(out / "model.safetensors").items()})
    model.eval()
    rows = tinyvit.sweep(model, METHODS, ratios, args.layer, args.eval_images)
    print(tinyvit.table(rows), flush=True)
    record = {"command": " ".join(["python", "scripts/train_tiny_vit.py"] + (argv if argv is not None else sys.argv[1:])),
              "args": vars(args), "arch": tinyvit.ARCH, "torch": torch.__version__,
              "train_seconds": round(time.time() - t0, 1), "log": lines,
              "eval": {"layer": args.layer, "images": args.eval_images, "rows": rows}}
    (out / "train_log.json").write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
