"""Host syncs a pruning forward and each decode step add over the unpatched model's, counted on the CPU with tiny
random models.

  python benchmarks/host_syncs.py [--families llava,qwen2_vl] [--methods random,divprune,fastv,transprune]
                                  [--batches 1,8] [--out results/host_syncs.json]

A host sync is a read of a tensor's values back to the host (nonzero, item / int() / bool(), tolist): on a
GPU each one waits for the queued work and leaves the GPU idle while the host launches the next kernels.
The counts are exact and the same on every machine (no timing), so they can be compared across commits.
Decode steps are counted in generate() on the default dynamic cache, and on a static cache (the compiled path's)
for strategies that prune before the decoder (a static cache cannot hold drops inside it).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]  # (benchmarks/kernels.py would shadow the
sys.path.insert(0, str(HERE.parent))                                     # `kernels` package transformers imports)

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from vtprune.eval.bench import save_script_record  # noqa: E402


class HostSyncs(TorchDispatchMode):
    """Counts the reads of a tensor's values back to the host: nonzero, item / int() / bool(), and tolist
    (which reaches no dispatch mode on the CPU, so it is counted where it is called)."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __enter__(self):
        real, self._real = torch.Tensor.tolist, torch.Tensor.tolist

        def tolist(t):
            self.n += 1
            return real(t)

        torch.Tensor.tolist = tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._real
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += func in (torch.ops.aten.nonzero.default, torch.ops.aten._local_scalar_dense.default)
        return func(*args, **(kwargs or {}))


def count(model, inputs) -> int:
    with torch.no_grad(), HostSyncs() as s:
        model(**inputs)
    return s.n


def per_decode_step(model, inputs, static: bool, steps: int = 4) -> float:
    """Host syncs per decode step of generate(): `steps` more new tokens, on a static cache (the compiled
    path's) or the default dynamic one."""
    from transformers import StaticCache

    from vtprune import tiny

    counts = []
    for new in (2, 2 + steps):
        cache = {"past_key_values": StaticCache(config=model.config, max_cache_len=128)} if static else {}
        with torch.no_grad(), HostSyncs() as s:
            model.generate(**inputs, max_new_tokens=new, min_new_tokens=new, **cache, **tiny.GEN)
        counts.append(s.n)
    return (counts[1] - counts[0]) / steps


def rows(families, methods, batches, ratio=0.25) -> list[dict]:
    import vtprune
    from vtprune import tiny
    from vtprune.patching import unpatched

    out = []
    for family in families:
        model = tiny.build(family).eval()
        for method in methods:
            vtprune.patch(model, method, ratio=ratio)
            for b in batches:
                inputs = tiny.batch(family, list(range(b)))
                static = not model._vtprune.drop_layers  # (a static cache cannot hold drops inside the decoder)
                with unpatched(model):
                    base, step = count(model, inputs), per_decode_step(model, inputs, False)
                    static_step = per_decode_step(model, inputs, True) if static else None
                out.append({"family": family, "method": method, "batch": b, "unpatched": base,
                            "added": count(model, inputs) - base,
                            "decode_unpatched": step, "decode_added": per_decode_step(model, inputs, False) - step,
                            "static_decode_unpatched": static_step,
                            "static_decode_added": per_decode_step(model, inputs, True) - static_step if static else None})
            vtprune.unpatch(model)
    return out


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--families", default="llava,qwen2_vl")
    ap.add_argument("--methods", default="random,divprune,fastv,transprune")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--out", default=None, help="also write the rows (and this command) as JSON")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    found = rows(args.families.split(","), args.methods.split(","), [int(b) for b in args.batches.split(",")])
    print("| family | method | batch | prefill: unpatched | added | decode step: unpatched | added "
          "| static-cache decode step: unpatched | added |\n|---|---|---|---|---|---|---|---|---|")
    def cell(v):
        return "-" if v is None else f"{v:g}"

    for r in found:
        print(f"| {r['family']} | {r['method']} | {r['batch']} | {r['unpatched']} | {r['added']} | "
              f"{cell(r['decode_unpatched'])} | {cell(r['decode_added'])} | {cell(r['static_decode_unpatched'])} | "
              f"{cell(r['static_decode_added'])} |")
    if args.out:
        save_script_record(args.out, "host_syncs.py", argv, rows=found)
    return found


if __name__ == "__main__":
    main()
