"""Held-out accuracy of one strategy on a bundled tiny model, with its default options and with the
options given, side by side at each kept ratio (what `vtprune sweep` cannot vary). Writes JSON.

  python benchmarks/tiny_options.py --model tiny-qwen2vl --method hiprune --ratios 0.5,0.111 \\
      --option object_layer=2 --option deep_layer=2 --questions 300 --out results/tiny_qwen2vl_hiprune_layers.json
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent  # off the path: benchmarks/kernels.py would shadow the `kernels` package
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]  # that transformers imports
sys.path.insert(0, str(HERE.parent))
import vtprune  # noqa: E402
from vtprune.eval import tinyvlm  # noqa: E402


def value(text: str):
    """An option's value: JSON where it parses (2, 0.5, true, [1, 2]), else the string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, choices=sorted(tinyvlm.NAMES))
    ap.add_argument("--method", required=True)
    ap.add_argument("--ratios", default="0.5,0.111", help="comma-separated kept fractions")
    ap.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="a method option (repeatable)")
    ap.add_argument("--questions", type=int, default=300, help="held-out questions per cell")
    ap.add_argument("--out", required=True, help="JSON file to write")
    args = ap.parse_args(argv)
    if not args.option:
        ap.error("give at least one --option KEY=VALUE to compare with the defaults")
    bad = [o for o in args.option if "=" not in o]
    if bad:
        ap.error(f"--option must be KEY=VALUE, got {bad}")
    options = {k: value(v) for k, v in (o.split("=", 1) for o in args.option)}
    ratios = [float(r) for r in args.ratios.split(",")]
    model, proc = tinyvlm.load(args.model)
    rows = []
    for ratio in ratios:
        for opts in ({}, options):
            vtprune.patch(model, args.method, ratio=ratio, **opts)
            try:
                rep = tinyvlm.evaluate(model, proc, args.questions, progress=True)
            finally:
                vtprune.unpatch(model)
            rows.append({"ratio": ratio, "options": opts, "overall": rep["overall"], "by_kind": rep["by_kind"]})
            print(f"{args.method} ratio {ratio} {opts or 'defaults'}: {rep['overall']:.3f}", flush=True)
    result = {"command": "python benchmarks/tiny_options.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
              "model": args.model, "method": args.method, "questions": args.questions, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
