"""The figures the one GPU run will produce are computed right: on the CPU, with torch.cuda's clock and memory
counters faked where the code reads them only on CUDA. Ratios point the documented way (reference over
kernel, patched over unpatched), figures are medians after warm-ups, peaks are above what was allocated
before, and rows reach the disk as they are measured (a deadline keeps them)."""
import json
import time
from types import SimpleNamespace

import pytest
import torch

from vtprune import tiny
from vtprune.eval import bench

MiB = 2**20


class FakeEvent:
    """torch.cuda.Event on a host clock (perf_counter unless fake_cuda is given another)."""
    clock = staticmethod(time.perf_counter)

    def __init__(self, enable_timing=False):
        self.t = None

    def record(self, stream=None):
        self.t = self.clock()

    def elapsed_time(self, other):
        return (other.t - self.t) * 1e3


def fake_cuda(monkeypatch, log=None, alloc=1000 * MiB, leftover_peak=3000 * MiB, clock=None):
    """torch.cuda's timing and memory calls faked: events read `clock` (seconds); allocated stays `alloc`; the
    peak is whatever was set since the last reset (a leftover peak from loading before any reset)."""
    state = dict(alloc=alloc, peak=leftover_peak)
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    if clock is not None:
        monkeypatch.setattr(FakeEvent, "clock", staticmethod(clock))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: log.append("sync") if log is not None else None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a: state["alloc"])
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a: state.update(peak=state["alloc"]))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: state["peak"])

    def bump(mib):
        state["peak"] = max(state["peak"], state["alloc"] + mib * MiB)

    return bump


# vtprune bench (its CUDA branch with torch.cuda faked) ----------------------------------------------

def test_bench_cuda_path_peak_above_weights_positive_event_times_and_synced_clock(monkeypatch):
    """The CUDA branch of measure(), run on the CPU with torch.cuda faked: the peak is what generate()
    allocated above the weights (not the absolute peak, not a peak left from before), event times are
    positive, and the end-to-end clock is read after a synchronize that follows generate()."""
    model, inputs = tiny.build("llava"), tiny.batch("llava", [0])
    log = []
    bump = fake_cuda(monkeypatch, log)
    real = model.generate

    def generate(**kw):
        out = real(**kw)
        bump(5)
        log.append("generated")
        return out

    monkeypatch.setattr(model, "generate", generate)
    clock = time.perf_counter
    monkeypatch.setattr(bench, "time", SimpleNamespace(perf_counter=lambda: (log.append("clock"), clock())[1]))
    monkeypatch.setattr(bench, "next", lambda it: SimpleNamespace(is_cuda=True), raising=False)  # "on CUDA"
    row = bench.measure(model, inputs, "pool", {"keep": 3}, new_tokens=3, reps=2, warmup=1)
    assert row.peak_mib == 5.0
    assert row.prefill_ms > 0 and row.vision_ms > 0 and row.decode_ms_per_token > 0 and row.generate_ms > 0
    for i, e in enumerate(log):
        if e == "generated":
            assert "sync" in log[i + 1:log.index("clock", i)], log


def test_bench_figures_are_medians(monkeypatch):
    """Three timed runs of 100, 200 and 600 ms: the median 200 (the mean is 300)."""
    run, prefill = [0], [100.0, 200.0, 600.0]

    def times_ms(self):
        n = len(self.calls)
        if n > 1:
            run[0] += 1
            return [prefill[run[0] - 1]] + [1.0] * (n - 1)
        return [5.0] * n

    monkeypatch.setattr(bench._Timer, "times_ms", times_ms)
    row = bench.measure(tiny.build("llava"), tiny.batch("llava", [0]), None, None, new_tokens=3, reps=3, warmup=0)
    assert row.prefill_ms == 200.0


def test_bench_cli_warmups_per_path(monkeypatch):
    """Plain rows get one warm-up run, compiled rows --compile-warmup (compilation happens there)."""
    from vtprune.cli import main

    seen = []

    def fake(model, inputs, method, options, new_tokens, reps, warmup=1, compiled=None):
        seen.append((compiled is not None, method, warmup))
        return bench.BenchRow(method or "unpatched", options or {}, 1, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0, None, 1,
                              "compiled" if compiled is not None else "eager")

    monkeypatch.setattr(bench, "measure", fake)
    assert main(["bench", "--model", "tiny-test-llava", "--methods", "random", "--keep", "4", "--compile",
                 "--compile-backend", "eager", "--compile-warmup", "4", "--reps", "1", "--new-tokens", "2"]) == 0
    assert seen == [(False, None, 1), (False, "random", 1), (True, None, 4), (True, "random", 4)]


# benchmarks/kernels.py ------------------------------------------------------------------------------

def test_kernels_timed_is_the_median_after_two_warmups(monkeypatch, benchmark_script):
    module = benchmark_script("kernels")
    now, durations, calls = [0.0], iter([1.0, 1.0, 0.001, 0.002, 0.009]), []

    def fn():
        calls.append(1)
        now[0] += next(durations)
        return len(calls)

    monkeypatch.setattr(module, "time", SimpleNamespace(perf_counter=lambda: now[0]))
    ms, out = module.timed(fn, 3, device="cpu")
    assert ms == pytest.approx(2.0) and out == 5


def test_kernels_ratios_are_consistent_with_their_times(tmp_path, benchmark_script):
    pytest.importorskip("triton")
    module = benchmark_script("kernels")
    out = tmp_path / "k.json"
    module.main(["--quick", "--sections", "greedy,attention,tower", "--out", str(out)])
    r = json.loads(out.read_text())
    for row in r["greedy"] + r["attention"]:
        assert row["speedup"] == pytest.approx(row["torch_ms"] / row["triton_ms"])  # reference over kernel
    t = r["tower"][0]
    assert t["time_ratio"] == pytest.approx(t["patched_ms"] / t["unpatched_ms"])
    assert t["tower_time_ratio"] == pytest.approx(t["patched_tower_ms"] / t["unpatched_tower_ms"])


def test_kernels_e2e_selection_share_of_the_saved_prefill(tmp_path, monkeypatch, benchmark_script):
    pytest.importorskip("triton")
    module = benchmark_script("kernels")
    vals = iter([10.0, 4.0, 0.5])  # unpatched prefill, patched prefill, greedy kernel alone
    monkeypatch.setattr(module, "timed", lambda fn, reps, warmup=2, device="cuda": (next(vals), fn()))
    out = tmp_path / "k.json"
    module.main(["--quick", "--sections", "e2e", "--out", str(out)])
    row = json.loads(out.read_text())["e2e"][0]
    assert (row["unpatched_ms"], row["patched_ms"], row["time_ratio"]) == (10.0, 4.0, 0.4)
    assert row["prefill_saved_ms"] == 6.0 and row["greedy_kernel_ms"] == 0.5 and row["selection_ms"] > 0
    assert row["selection_share_of_saved"] == pytest.approx(row["selection_ms"] / 6.0)


def test_kernels_full_grid_puts_the_issue_targets_first(tmp_path, monkeypatch, benchmark_script):
    module = benchmark_script("kernels")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "fake")
    seen = []
    monkeypatch.setattr(module, "bench_greedy", lambda cases, *a: (seen.extend(cases), [])[1])
    module.main(["--sections", "greedy", "--out", str(tmp_path / "k.json")])
    assert seen[:3] == [(576, 64, 4096, 1), (2880, 320, 4096, 1), (2880, 320, 4096, 8)]
    assert len(seen) == len(set(seen)) == 64


def test_kernels_peak_extra_is_above_what_was_allocated(monkeypatch, benchmark_script):
    module = benchmark_script("kernels")
    bump = fake_cuda(monkeypatch)
    assert module.peak_extra_mib(lambda: bump(7), "cuda") == 7.0
    assert module.peak_extra_mib(lambda: bump(7), "cpu") is None


def test_kernels_tower_span_leaves_out_the_warmup_runs(monkeypatch, benchmark_script):
    """The tower's first two (warm-up) forwards take 1 s and allocate 100 MiB on a fake clock; the timed one
    5 ms and 5 MiB."""
    module = benchmark_script("kernels")
    now, n = [0.0], [0]
    bump = fake_cuda(monkeypatch, clock=lambda: now[0])
    model, inputs = tiny.build("llava"), tiny.batch("llava", [0])

    def inside(*_):
        n[0] += 1
        now[0] += 1.0 if n[0] <= 2 else 0.005
        bump(100 if n[0] <= 2 else 5)

    h = model.model.vision_tower.encoder.register_forward_hook(inside)
    with torch.no_grad():
        ms, mib = module.tower_span(model, lambda: model(**inputs), 1, "cuda")
    h.remove()
    assert n[0] == 3 and ms == pytest.approx(5.0) and mib == 5.0


# benchmarks/vit.py ----------------------------------------------------------------------------------

def test_vit_images_per_s_is_batch_over_median_after_warmup(monkeypatch, benchmark_script):
    module = benchmark_script("vit")
    now, durations = [0.0], iter([1.0, 1.0, 0.5, 0.25, 0.5])

    def model(x):
        now[0] += next(durations)

    monkeypatch.setattr(module, "time", SimpleNamespace(perf_counter=lambda: now[0]))
    assert module.images_per_s(model, torch.zeros(4, 3, 2, 2), 3) == pytest.approx(8.0)


def _tiny_timm():
    timm = pytest.importorskip("timm")

    return timm.models.vision_transformer.VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=4,
                                                            num_heads=2, num_classes=5)


def test_vit_rows_speedup_layer_and_row_by_row(tmp_path, monkeypatch, benchmark_script):
    import vtprune

    module = benchmark_script("vit")
    monkeypatch.setattr(module, "models", lambda: iter([("tiny timm", _tiny_timm())]))
    layers, real = [], vtprune.patch_vit
    monkeypatch.setattr(vtprune, "patch_vit", lambda *a, **k: (layers.append(k["layer"]), real(*a, **k))[1])
    rows = module.main(["--quick", "--methods", "random,pool", "--ratios", "0.5", "--layer", "1",
                        "--out", str(tmp_path / "v.json")])
    base = rows[0]["images_per_s"]
    for r in rows:
        assert r["speedup"] == pytest.approx(r["images_per_s"] / base)  # patched over unpatched
    assert layers == [1, 1]
    # cut short after the first patched row: that row is on disk
    calls, ips = [], module.images_per_s

    def third_stops(*a):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return ips(*a)

    monkeypatch.setattr(module, "images_per_s", third_stops)
    with pytest.raises(KeyboardInterrupt):
        module.main(["--quick", "--methods", "random,pool", "--ratios", "0.5", "--layer", "1",
                     "--out", str(tmp_path / "w.json")])
    rec = json.loads((tmp_path / "w.json").read_text())
    assert [r["method"] for r in rec["rows"]] == ["none", "random"] and rec["complete"] is False
