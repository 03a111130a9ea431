"""Held-out `shapes` accuracy of a bundled model for every registered strategy x ratio, in one run.

  python scripts/eval_strategies.py --model tiny-llava --out results/tiny-llava-strategies.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import vtprune  # noqa: E402
from vtprune.eval import tinyvlm  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny-llava")
    ap.add_argument("--ratios", default="1.0,0.5,0.25,0.111")
    ap.add_argument("--questions", type=int, default=1200)
    ap.add_argument("--methods", default=None, help="comma-separated (default: all registered)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    model, proc = tinyvlm.load(args.model)
    methods = args.methods.split(",") if args.methods else vtprune.available()
    ratios = [float(r) for r in args.ratios.split(",")]
    rows = []
    for method in methods:
        for ratio in ratios:
            t0 = time.perf_counter()
            with vtprune.pruned(model, method, ratio=ratio), torch.no_grad():
                r = tinyvlm.evaluate(model, proc, args.questions)
            rows.append(dict(method=method, ratio=ratio, overall=r["overall"], by_kind=r["by_kind"],
                             seconds=round(time.perf_counter() - t0, 2)))
            print(f"{method:<14} {ratio:>5.3f} {r['overall']:.3f}", flush=True)
    record = {"command": " ".join(["python", "scripts/eval_strategies.py"] + (argv or sys.argv[1:])),
              "model": args.model, "questions": args.questions, "torch": torch.__version__, "rows": rows}
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
