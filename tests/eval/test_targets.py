"""benchmarks/targets.py: each issue target read from the right row of the right file, against its bar."""
import json

import pytest


def _bench(rows):
    return {"rows": [{"options": {}, "path": "eager", "selection_ms": 0.0, "kv_bytes": 1000, **r} for r in rows]}


@pytest.fixture
def results(tmp_path):
    def write(name, rec):
        (tmp_path / name).write_text(json.dumps(rec))

    write("kernels_gpu.json", {
        "greedy": [dict(n=576, keep=64, d=4096, batch=1, triton_ms=0.07, speedup=50.0, same_indices=True),
                   dict(n=2880, keep=320, d=4096, batch=1, triton_ms=0.6, speedup=40.0, same_indices=True),
                   dict(n=2880, keep=320, d=4096, batch=8, triton_ms=1.5, speedup=40.0, same_indices=False),
                   dict(n=576, keep=64, d=1024, batch=1, triton_ms=9.0, speedup=1.0, same_indices=True)],
        "tower": [dict(tower_time_ratio=1.04, tower_peak_ratio=1.2)],
        "e2e": [dict(selection_share_of_saved=0.01)]})
    write("bench_llava15_7b_compiled.json", _bench([
        dict(method="unpatched", batch=1, prefill_ms=16.0, path="compiled"),
        dict(method="divprune", batch=1, prefill_ms=6.0, selection_ms=0.1, path="compiled"),  # 0.1 / 10 saved
        dict(method="random", batch=1, prefill_ms=7.0, path="compiled"),  # 16 / 7 = 2.29x
        dict(method="unpatched", batch=1, prefill_ms=38.0),
        dict(method="divprune", batch=1, prefill_ms=31.0, selection_ms=0.5)]))  # 0.5 / 7 saved = 0.071
    write("bench_llava15_7b.json", _bench([
        dict(method="unpatched", batch=8, prefill_ms=100.0),
        dict(method="divprune", batch=8, prefill_ms=20.0, selection_ms=2.0, kv_bytes=200, options={"keep": 64}),
        dict(method="pool", batch=8, prefill_ms=19.0, kv_bytes=210, options={"keep": 64}),
        dict(method="fastv", batch=8, prefill_ms=30.0, kv_bytes=300, options={"keep": 64}),  # llm stage: no bar
        dict(method="pool", batch=1, prefill_ms=90.0, kv_bytes=200, options={"keep": 64})]))  # (batch 1: not read)
    write("bench_llava_next_7b.json", _bench([
        dict(method="unpatched", batch=4, prefill_ms=367.0),
        dict(method="divprune", batch=4, prefill_ms=48.0, selection_ms=2.0, selection_in_prefill_ms=0.0,
             prefill_with_selection_ms=50.0),  # 367 / 50 = 7.34x
        dict(method="random", batch=4, prefill_ms=52.0, selection_ms=0.1),  # an older row: 367 / 52.1 = 7.04x
        dict(method="fastv", batch=4, prefill_ms=53.0, selection_ms=3.0)]))  # older, in-LLM: 367 / 53 = 6.92x
    write("vit_gpu.json", {"rows": [dict(model="timm", method="none", ratio=1.0, speedup=1.0),
                                    dict(model="timm", method="divprune", ratio=0.5, speedup=1.8),
                                    dict(model="timm", method="none (again)", ratio=1.0, speedup=0.99)]})
    return tmp_path


def _flops(model, method, options):
    assert (model, options) == ("llava-1.5-7b", {"keep": 64})
    return {"llm": 5.65, "kv": 0.2}  # the bar: 0.9 x 5.65 = 5.085x


def test_each_target_from_its_row_against_its_bar(results, benchmark_script):
    got = {t["target"]: (t["value"], t["verdict"]) for t in benchmark_script("targets").check(results, _flops)}
    assert got == {
        "DivPrune selection, N=576 keep=64 D=4096 batch 1, ms": ("0.070", "met"),
        "DivPrune selection, N=2880 keep=320 D=4096 batch 1, ms": ("0.600", "MISSED"),
        "DivPrune selection, N=2880 keep=320 D=4096 batch 8, ms": ("1.500", "MISSED"),  # fast, other indices
        "HiPrune tower + signals: time over plain SDPA": ("1.040", "met"),
        "HiPrune tower + signals: peak memory over plain SDPA": ("1.200", "MISSED"),
        "DivPrune selection / prefill saved, LLaVA-1.5-7B batch 1, eager": ("0.071", "MISSED"),
        "DivPrune selection / prefill saved, LLaVA-1.5-7B batch 1, compiled": ("0.010", "met"),
        "divprune: LLaVA-1.5-7B prefill speed-up, 64/576, batch 8": ("5.00x", "MISSED"),
        "pool: LLaVA-1.5-7B prefill speed-up, 64/576, batch 8": ("5.26x", "met"),
        "divprune: KV-cache bytes over unpatched, batch 8": ("0.200", "met"),
        "pool: KV-cache bytes over unpatched, batch 8": ("0.210", "MISSED"),
        "divprune: LLaVA-NeXT-7B prefill speed-up incl. selection, 2880->320, batch 4": ("7.34x", "met"),
        "random: LLaVA-NeXT-7B prefill speed-up incl. selection, 2880->320, batch 4": ("7.04x", "met"),
        "fastv: LLaVA-NeXT-7B prefill speed-up incl. selection, 2880->320, batch 4": ("6.92x", "MISSED"),
        "divprune: compiled path LLM prefill speed-up, 64/576, batch 1": ("2.67x", "met"),
        "random: compiled path LLM prefill speed-up, 64/576, batch 1": ("2.29x", "MISSED"),
        "timm: divprune at 0.5, images/s over unpatched": ("1.80x", "met"),
    }


def test_the_kernels_e2e_share_and_the_compiled_eager_share_are_two_lines(results, benchmark_script):
    lines = [t for t in benchmark_script("targets").check(results, _flops)
             if t["target"] == "DivPrune selection / prefill saved, LLaVA-1.5-7B batch 1, eager"]
    assert [(t["source"], t["value"]) for t in lines] == [("kernels_gpu.json e2e", "0.010"),
                                                          ("bench_llava15_7b_compiled.json (eager rows)", "0.071")]


def test_without_figures_every_target_is_missing_and_none_met(tmp_path, benchmark_script, capsys):
    module = benchmark_script("targets")
    lines = module.check(tmp_path, _flops)
    assert lines and {t["verdict"] for t in lines} == {"missing"} and {t["issue"] for t in lines} == {6, 7, 10}
    out = tmp_path / "t" / "targets.md"
    assert module.main(["--results", str(tmp_path), "--out", str(out)]) == 0
    text = out.read_text()
    assert text.startswith(f"`python benchmarks/targets.py --results {tmp_path} --out {out}`")
    assert text.count("| missing |") == len(lines) and "0 met, 0 MISSED" in capsys.readouterr().out


def test_the_flops_bar_is_vtprune_flops_on_the_bench_prompt(benchmark_script):
    ratios = benchmark_script("targets").flops_ratios("llava-1.5-7b", "divprune", {"keep": 64})
    # 625 tokens (576 visual + 49 text) against 113: the LLM FLOPs ratio the README and the issue quote, and
    # the KV cache in proportion to the tokens kept
    assert ratios["llm"] == pytest.approx(5.65, abs=0.005) and ratios["kv"] == pytest.approx(113 / 625)


def test_it_reads_the_files_gpu_figures_sh_writes():
    """A name that drifted apart would leave a target "missing" with its figures right there."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    written = set(re.findall(r"--out results/(\S+\.json)", (root / "benchmarks" / "gpu_figures.sh").read_text()))
    read = set(re.findall(r'"(\w+\.json)"', (root / "benchmarks" / "targets.py").read_text())) - {"f.json"}  # (a temp)
    assert read == {"kernels_gpu.json", "vit_gpu.json", "bench_llava15_7b.json", "bench_llava_next_7b.json",
                    "bench_llava15_7b_compiled.json"}
    assert read <= written


def test_a_speed_up_line_names_the_spread_of_its_rows_runs(results, benchmark_script):
    """Where both bench rows carry their runs' spread, the line's source shows it beside the median ratio."""
    rec = json.loads((results / "bench_llava_next_7b.json").read_text())
    rec["rows"][0]["spread"] = {"prefill": [360.0, 380.5], "generate": [1.0, 1.0]}
    rec["rows"][1]["spread"] = {"prefill": [47.25, 49.0], "generate": [1.0, 1.0]}
    rec["rows"][1]["runs"] = 2  # (the unpatched row: JSON from before the field)
    (results / "bench_llava_next_7b.json").write_text(json.dumps(rec))
    lines = {t["target"].split(":")[0]: t["source"] for t in benchmark_script("targets").check(results, _flops)
             if "LLaVA-NeXT" in t["target"]}
    assert lines == {"divprune": "bench_llava_next_7b.json (eager rows; prefill runs 47.25-49.00 ms (2 runs) vs "
                                 "unpatched 360.00-380.50 ms)",
                     "random": "bench_llava_next_7b.json (eager rows)", "fastv": "bench_llava_next_7b.json (eager rows)"}
