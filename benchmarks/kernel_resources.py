"""Compile every Triton kernel launch vtprune makes for a GPU architecture, without a GPU, and report
each one's registers and spills (ptxas -v).

  python benchmarks/kernel_resources.py                 # sm_90 (H100 / H200)
  python benchmarks/kernel_resources.py --arch 80 --out /tmp/sm80.json

The launchers (greedy_select_triton, attention_scores_triton) run on small CPU tensors with the kernel
launch replaced by a recorder and told they are on a GPU, so the recorded arguments, tile sizes and
warps are the ones a CUDA run would use. Each distinct launch is then specialised as Triton's launcher
does for the target (its own binder: pointers and ints divisible by 16 marked so, ints equal to 1 made
constants), compiled with `triton.compile`, and its PTX passed to the ptxas Triton itself uses for it.
Cases: bf16, fp16, float32 and float64 inputs; greedy max-min and max-sum at N = 70 and 5000; attention with head
dims 64, 80 and 128, grouped (GQA) and one key head per query head, plain and causal + key mask (+ a sliding window); head dim
256 (Qwen3.5); head dims 8 and 12 (below tl.dot's 16); bf16 queries with float32 keys and the reverse. Exit
status 1 if a launch fails to compile, or spills when --no-spills is given.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compiled kernels, not the interpreter's stand-ins
HERE = Path(__file__).resolve().parent  # off the path: benchmarks/kernels.py would shadow the `kernels` package
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from vtprune.eval.bench import save_script_record  # noqa: E402

TYPES = {torch.float32: "fp32", torch.float64: "fp64", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int64: "i64",
         torch.int32: "i32", torch.int8: "i8", torch.uint8: "u8", torch.bool: "i1"}
LAUNCH_OPTIONS = ("num_warps", "num_stages", "enable_fp_fusion")


def record_launches() -> list[tuple[JITFunction, tuple, dict, str]]:
    """(kernel, positional arguments, keyword arguments and launch options, the inputs' dtypes) of every
    launch the cases make."""
    from vtprune.kernels import attention_triton, greedy_triton, launch

    launches, case = [], [""]

    def record(self, *args, grid, warmup, **kwargs):
        if unknown := set(kwargs) - set(self.arg_names) - set(LAUNCH_OPTIONS):
            raise TypeError(f"{self.__name__} launched with {sorted(unknown)}: add them to LAUNCH_OPTIONS")
        launches.append((self, args, kwargs, case[0]))

    run, compiled = JITFunction.run, launch.compiled
    JITFunction.run = record
    launch.compiled = lambda t: True
    try:
        g = torch.Generator().manual_seed(0)
        for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64):  # (float64: float32 dots)
            case[0] = TYPES[dtype]
            for n in (70, 576, 5000):  # (576: a multiple of 16, which Triton's launcher specialises on)
                x = torch.randn(1, n, 32, generator=g).to(dtype)
                for rule in ("maxmin", "maxsum"):
                    greedy_triton.greedy_select_triton(x, 8, rule=rule)
            # GQA (2 query heads per key head) and one key head per query head (CLIP, LLaMA-2); lengths that are
            # and are not multiples of 16; then Qwen3.5's head dim 256 (GQA, a multiple of 16)
            for d, hk, t in [*itertools.product((64, 80, 128), (2, 4), (20, 32)), (256, 2, 32)]:
                q, k = torch.randn(1, 4, t, d, generator=g).to(dtype), torch.randn(1, hk, t, d, generator=g).to(dtype)
                attention_triton.attention_scores_triton(q, k, d ** -0.5)
                attention_triton.attention_scores_triton(q, k, d ** -0.5, torch.tensor([t - 1]), causal=True,
                                                         key_mask=torch.ones(1, t, dtype=torch.bool))
                if (d, hk, t) == (128, 2, 32):  # a sliding-window layer's (Mistral: 4096)
                    attention_triton.attention_scores_triton(q, k, d ** -0.5, torch.tensor([t - 1]), causal=True,
                                                             key_mask=torch.ones(1, t, dtype=torch.bool), window=4096)
            for d in (8, 12):  # head dims below tl.dot's 16 (the tiny test models'): the launcher pads the tile
                q, k = torch.randn(1, 4, 20, d, generator=g).to(dtype), torch.randn(1, 2, 20, d, generator=g).to(dtype)
                attention_triton.attention_scores_triton(q, k, d ** -0.5)
        for qt, kt in ((torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)):  # mixed: IEEE float32 dots
            case[0] = f"{TYPES[qt]}+{TYPES[kt]}"
            q, k = torch.randn(1, 4, 20, 64, generator=g).to(qt), torch.randn(1, 2, 20, 64, generator=g).to(kt)
            attention_triton.attention_scores_triton(q, k, 0.125)
    finally:
        JITFunction.run = run
        launch.compiled = compiled
    return launches


def triton_ptxas(arch: int) -> Path:
    """The ptxas Triton assembles with for `arch`: its PTX is written for that one (Triton 3.9 uses its
    newer `ptxas-blackwell` from sm_90 on, whose PTX version the older `ptxas` beside it rejects)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas
    except ImportError as e:
        raise SystemExit(f"this Triton has no CUDA backend ({e})") from e
    ptxas = Path(get_ptxas(arch).path)
    if not ptxas.exists():
        raise SystemExit(f"no ptxas at {ptxas}: this Triton bundles none")
    return ptxas


def specialise(fn: JITFunction, args: tuple, kwargs: dict, target: GPUTarget) -> tuple[dict, dict, dict, dict]:
    """(signature, constexprs, attrs, options) as `fn[grid](*args, **kwargs)` would compile them for
    `target`, through the binder and argument packing of Triton's own launcher (JITFunction.run)."""
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return signature, constexprs, attrs, options.__dict__


def arg_type(value) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2**31 <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no Triton type for {type(value).__name__}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90 = Hopper, 80 = A100)")
    ap.add_argument("--no-spills", action="store_true", help="fail if any launch spills registers")
    ap.add_argument("--out", help="JSON file to write")
    args = ap.parse_args(argv)
    ptxas = triton_ptxas(args.arch)
    sm = f"sm_{args.arch}a" if args.arch >= 90 else f"sm_{args.arch}"
    target = GPUTarget("cuda", args.arch, 32)
    rows, seen = [], set()
    for fn, positional, kwargs, inputs in record_launches():
        values = {**dict(zip(fn.arg_names, positional)), **kwargs}
        options = {k: kwargs[k] for k in LAUNCH_OPTIONS if k in kwargs}
        constants = {p.name: values[p.name] for p in fn.params if p.is_constexpr}
        try:
            signature, constexprs, attrs, compile_options = specialise(fn, positional, kwargs, target)
            specialised = True
        except (ImportError, AttributeError, TypeError, KeyError):  # another Triton's internals: plain types
            signature = {p.name: "constexpr" if p.is_constexpr else arg_type(values[p.name]) for p in fn.params}
            constexprs, attrs, compile_options, specialised = constants, {}, options, False
        key = (fn.__name__, repr(sorted(signature.items())), repr(sorted(constexprs.items(), key=str)),
               repr(sorted(attrs.items(), key=str)), json.dumps(options, sort_keys=True))
        if key in seen:
            continue
        seen.add(key)
        row = dict(kernel=fn.__name__, inputs=inputs, constants=constants, specialised=specialised, **options)
        try:
            kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=compile_options)
        except Exception as e:  # noqa: BLE001 -- reported per launch
            row.update(error=f"{type(e).__name__}: {e}"[:2000])
        else:
            with tempfile.TemporaryDirectory() as tmp:
                src = Path(tmp) / "k.ptx"
                src.write_text(kernel.asm["ptx"])
                r = subprocess.run([str(ptxas), f"-arch={sm}", "-v", str(src), "-o", str(Path(tmp) / "k.cubin")],
                                   capture_output=True, text=True)
            regs = re.search(r"Used (\d+) registers", r.stderr)
            spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", r.stderr)
            if r.returncode or not (regs and spill):
                row.update(error=f"{ptxas.name} exit {r.returncode}: {r.stderr.strip()}"[:2000])
            else:
                row.update(registers=int(regs.group(1)), spill_stores=int(spill.group(1)),
                           spill_loads=int(spill.group(2)))
        rows.append(row)
        shown = " ".join(f"{k}={v}" for k, v in constants.items())
        print(f"{row['kernel']:<18} {row['inputs']:<9} {shown:<62} warps={options.get('num_warps', 4):<3} "
              + (f"ERROR {row['error'][:200]}" if "error" in row else
                 f"regs {row['registers']:>3}  spills {row['spill_stores']}/{row['spill_loads']} B"), flush=True)
    failed = [r for r in rows if "error" in r]
    spilled = [r for r in rows if r.get("spill_stores") or r.get("spill_loads")]
    print(f"{len(rows)} launches for {sm} with Triton {triton.__version__}: {len(failed)} failed to compile, "
          f"{len(spilled)} spill")
    if args.out:
        save_script_record(args.out, "kernel_resources.py", argv, arch=sm, triton=triton.__version__, launches=rows)
    return 1 if failed or (args.no_spills and spilled) else 0


if __name__ == "__main__":
    sys.exit(main())
