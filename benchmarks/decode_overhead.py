"""Host work a patched model adds to each decode step (and to the prefill), counted on the CPU with a LLaVA of 7B's
depth and tiny width.

  python benchmarks/decode_overhead.py [--layers 32] [--methods divprune,fastv,transprune,todre] [--batches 1]
                                       [--steps 16] [--reps 5] [--out results/decode_overhead_cpu.json]

At batch 1 a 7B model's decode step in transformers is bound by the host's Python (one module call after another,
32 layers), so what the pruning hooks run per step shows directly in decode ms/token, and the few tokens kept
after the prompt do not make up for it. Per decode step of generate() this prints:
- Python function calls (cProfile's count, builtins included) added over the unpatched model: exact and the same
  on every machine, so they compare across commits;
- ms/token, unpatched beside each strategy, their runs interleaved (`bench.measure_side_by_side`): on the tiny
  width nearly all of it is host time;
- the tensor operations one prefill forward dispatches (about one kernel launch each on a GPU; exact), where the
  batch-1 prefill is bound by the host too.
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]  # (benchmarks/kernels.py would shadow the
sys.path.insert(0, str(HERE.parent))                                     # `kernels` package transformers imports)

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from vtprune.eval.bench import save_script_record  # noqa: E402


def model_of_depth(layers: int):
    """The tiny random LLaVA with `layers` decoder layers (seed 0)."""
    import transformers

    from vtprune import tiny

    cfg = tiny.config("llava")
    cfg.text_config.num_hidden_layers = layers
    torch.manual_seed(0)
    return transformers.LlavaForConditionalGeneration(cfg).eval()


def calls_per_step(model, inputs, steps: int) -> float:
    """Python function calls per decode step of generate(): those of `steps` more new tokens, per token."""
    from vtprune import tiny

    counts = []
    for new in (2, 2 + steps):
        profile = cProfile.Profile()
        with torch.no_grad():
            profile.enable()
            model.generate(**inputs, max_new_tokens=new, min_new_tokens=new, **tiny.GEN)
            profile.disable()
        counts.append(sum(entry[1] for entry in pstats.Stats(profile).stats.values()))
    return (counts[1] - counts[0]) / steps


class _Ops(TorchDispatchMode):
    """Counts the tensor operations dispatched."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def prefill_ops(model, inputs) -> int:
    """Tensor operations of one forward over the prompt (after one untimed, so that nothing is set up in it)."""
    with torch.no_grad():
        model(**inputs)
        with _Ops() as ops:
            model(**inputs)
    return ops.n


def rows(layers: int, methods: list[str], batches: list[int], steps: int, reps: int, keep: int = 4) -> list[dict]:
    import vtprune
    from vtprune import tiny
    from vtprune.eval import bench

    model = model_of_depth(layers)
    out = []
    for b in batches:
        inputs = tiny.batch("llava", list(range(b)))
        configs = [(None, None)] + [(m, {"keep": keep}) for m in methods]
        calls, ops = {}, {}
        for method, options in configs:
            with vtprune.pruned(model, method, **options) if method else vtprune.unpatched(model):
                calls[method] = calls_per_step(model, inputs, steps)
                ops[method] = prefill_ops(model, inputs)
        timed = bench.measure_side_by_side(model, inputs, configs, new_tokens=2 + steps, reps=reps, warmup=1)
        for (method, options), row in zip(configs, timed):
            out.append({"method": method or "unpatched", "options": options or {}, "batch": b, "layers": layers,
                        "calls_per_step": calls[method], "calls_added": calls[method] - calls[None],
                        "decode_ms_per_token": row.decode_ms_per_token,
                        "decode_ratio": row.decode_ms_per_token / timed[0].decode_ms_per_token,
                        "decode_spread_generate_ms": row.spread["generate"],
                        "prefill_ops": ops[method], "prefill_ops_added": ops[method] - ops[None]})
    return out


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--methods", default="divprune,fastv,transprune,todre")
    ap.add_argument("--batches", default="1")
    ap.add_argument("--steps", type=int, default=16, help="decode steps counted / timed per generate()")
    ap.add_argument("--reps", type=int, default=5, help="timed generate() runs per row (interleaved)")
    ap.add_argument("--out", default=None, help="also write the rows (and this command) as JSON")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    found = rows(args.layers, args.methods.split(","), [int(b) for b in args.batches.split(",")], args.steps,
                 args.reps)
    print("| batch | method | Python calls per decode step | added | decode ms/token | vs unpatched "
          "| prefill tensor ops | added |\n|---|---|---|---|---|---|---|---|")
    for r in found:
        print(f"| {r['batch']} | {r['method']} | {r['calls_per_step']:g} | {r['calls_added']:g} | "
              f"{r['decode_ms_per_token']:.3f} | {r['decode_ratio']:.3f}x | {r['prefill_ops']} | "
              f"{r['prefill_ops_added']} |")
    if args.out:
        save_script_record(args.out, "decode_overhead.py", argv, rows=found)
    return found


if __name__ == "__main__":
    main()
