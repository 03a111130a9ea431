"""Every Triton launch vtprune makes compiles for Hopper (sm_90) and Ampere (sm_80) with the installed
Triton, and ptxas reports no register spills: checked without a GPU (benchmarks/kernel_resources.py). The interpreter
tests beside this one check what the kernels compute; this one checks what the GPU would be given."""
import json
import os
import pathlib
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")
ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("arch", [90, 80])
def test_every_launch_compiles_without_spills(arch, tmp_path):
    try:
        from triton.backends.nvidia.compiler import get_ptxas
    except ImportError:
        pytest.skip("this Triton has no CUDA backend")
    if not pathlib.Path(get_ptxas(arch).path).exists():
        pytest.skip("this Triton bundles no ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / f"sm{arch}.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "kernel_resources.py"), "--arch", str(arch), "--no-spills",
           "--out", str(out)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    launches = json.loads(out.read_text())["launches"]
    kernels = {x["kernel"] for x in launches}
    assert kernels == {"_gram_kernel", "_isolated_kernel", "_greedy_kernel", "_row_stats_kernel", "_column_kernel"}
    assert all(0 < x["registers"] <= 255 and x["spill_stores"] == x["spill_loads"] == 0 for x in launches)
    # fused multiply-add asked for explicitly: Triton 3.9 says 3.10 turns its default off (vtprune/kernels/launch.py)
    assert all(x.get("enable_fp_fusion") is True for x in launches), [x["kernel"] for x in launches]
    # the launchers' GPU choices, not the interpreter's: bf16 tiles go through tensor cores (IEEE off)
    bf16 = [x for x in launches if x["inputs"] == "bf16" and "IEEE" in x["constants"]]
    assert bf16 and not any(x["constants"]["IEEE"] for x in bf16)
    assert {x["constants"]["BD"] for x in launches if x["kernel"] == "_column_kernel"} == {16, 64, 128, 256}
    assert {x["constants"]["WINDOW"] for x in launches if x["kernel"] == "_column_kernel"} == {False, True}
    mixed = [x for x in launches if "+" in x["inputs"] and "IEEE" in x["constants"]]  # bf16 q with fp32 k: IEEE dots
    assert mixed and all(x["constants"]["IEEE"] for x in mixed)
    # compiled as Triton's launcher would specialise them (divisibility by 16), not with bare types
    assert all(x["specialised"] for x in launches)


def test_each_launch_is_compiled_once_and_ptxas_spills_are_read_and_refused(tmp_path, monkeypatch, benchmark_script):
    """main()'s bookkeeping, with the recorded launches, Triton's compiler and ptxas stood in for: a launch recorded
    twice is compiled and listed once, ptxas' spill stores and loads are read as such, and --no-spills fails on a
    spill (no launch spills today, so the subprocess test above never sees one)."""
    from types import SimpleNamespace

    monkeypatch.setenv("TRITON_INTERPRET", os.environ.get("TRITON_INTERPRET", "1"))  # (the script drops it on import)
    monkeypatch.setattr(sys, "path", list(sys.path))
    module = benchmark_script("kernel_resources")
    kernel = SimpleNamespace(__name__="_k", arg_names=["x", "BLOCK"], params=[
        SimpleNamespace(name="x", is_constexpr=False), SimpleNamespace(name="BLOCK", is_constexpr=True)])
    small, large = (kernel, ("x", 16), {"num_warps": 4}, "bf16"), (kernel, ("x", 32), {"num_warps": 8}, "bf16")
    monkeypatch.setattr(module, "record_launches", lambda: [small, large, small])
    monkeypatch.setattr(module, "specialise", lambda fn, args, kwargs, target: (
        {"x": "*bf16", "BLOCK": "constexpr"}, {"BLOCK": args[1]}, {}, dict(kwargs)))
    monkeypatch.setattr(module, "ASTSource", lambda fn, signature, constexprs, attrs: constexprs)
    monkeypatch.setattr(module, "triton_ptxas", lambda arch: pathlib.Path("ptxas"))
    compiled = []
    monkeypatch.setattr(module.triton, "compile", lambda src, target, options: (
        compiled.append(src), SimpleNamespace(asm={"ptx": "// ptx"}))[1])
    reports = {16: "ptxas info : Used 40 registers\n0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads",
               32: "ptxas info : Used 255 registers\n8 bytes stack frame, 8 bytes spill stores, 24 bytes spill loads"}
    monkeypatch.setattr(module.subprocess, "run", lambda cmd, **kw: SimpleNamespace(
        returncode=0, stderr=reports[compiled[-1]["BLOCK"]]))
    out = tmp_path / "r.json"
    assert module.main(["--out", str(out)]) == 0
    assert compiled == [{"BLOCK": 16}, {"BLOCK": 32}]
    launches = json.loads(out.read_text())["launches"]
    figures = [(x["constants"], x["num_warps"], x["registers"], x["spill_stores"], x["spill_loads"]) for x in launches]
    assert figures == [({"BLOCK": 16}, 4, 40, 0, 0), ({"BLOCK": 32}, 8, 255, 8, 24)]
    assert module.main(["--no-spills"]) == 1
