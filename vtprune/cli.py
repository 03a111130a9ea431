"""The `vtprune` command line."""
from __future__ import annotations

import argparse
import sys


def _methods(args) -> int:
    from .methods.registry import available, get_method, option_help

    for name in available():
        cls = get_method(name)
        print(f"{name}  (stage: {cls.stage})  {(cls.__doc__ or '').strip().splitlines()[0]}")
        if cls.paper:
            print(f"    paper: {cls.paper}")
        for opt, typ, default in option_help(cls):
            print(f"    {opt}: {typ} = {default!r}")
    return 0


def _demo(args) -> int:
    from .demo import run

    run(families=args.families.split(","), ratios=[float(r) for r in args.ratios.split(",")], out=sys.stdout)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="vtprune", description="Visual-token pruning for vision-language models.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("methods", help="list the registered strategies, their stage and options")
    p.set_defaults(func=_methods)
    p = sub.add_parser("demo", help="patch tiny random-weight LLaVA and Qwen2-VL models with every strategy")
    p.add_argument("--families", default="llava,qwen2_vl", help="comma-separated: llava, qwen2_vl, qwen2_5_vl")
    p.add_argument("--ratios", default="1.0,0.5,0.25,0.111", help="comma-separated kept fractions")
    p.set_defaults(func=_demo)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
