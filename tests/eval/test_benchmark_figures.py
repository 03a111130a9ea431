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
    # each run's start is read after a synchronize, the first run's too (work queued before measure() is not its)
    starts = [i for i, e in enumerate(log) if e == "clock"][::2]
    assert len(starts) == 3 and all(i > 0 and log[i - 1] == "sync" for i in starts), log


def test_bench_cuda_stage_times_are_read_after_a_synchronize(monkeypatch):
    """An event's elapsed_time before the GPU reached it fails; the timer synchronises first."""
    log = []
    fake_cuda(monkeypatch, log)
    monkeypatch.setattr(FakeEvent, "elapsed_time",
                        lambda self, other: (log.append("elapsed"), (other.t - self.t) * 1e3)[1])
    module = torch.nn.Identity()
    timer = bench._Timer(module, cuda=True)
    module(torch.zeros(1))
    module(torch.zeros(1))
    assert len(timer.times_ms()) == 2 and log == ["sync", "elapsed", "elapsed"]


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


def fake_measure(monkeypatch) -> list:
    """bench.measure and measure_side_by_side replaced by stand-ins that return unit rows: the list of the rows'
    (compiled, method, warmup)."""
    seen = []

    def fake(model, inputs, method, options, new_tokens, reps, warmup=1, compiled=None):
        seen.append((compiled, method, warmup))
        return bench.BenchRow(method or "unpatched", options or {}, 1, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0, None, 1,
                              "compiled" if compiled is not None else "eager")

    def side_by_side(model, inputs, configs, new_tokens, reps, warmup=1, done=None):
        return [fake(model, inputs, method, options, new_tokens, reps, warmup) for method, options in configs]

    monkeypatch.setattr(bench, "measure", fake)
    monkeypatch.setattr(bench, "measure_side_by_side", side_by_side)
    return seen


def patched_method(model) -> str | None:
    """The strategy vtprune has patched onto `model` (its last forward's stats), None when unpatched."""
    import vtprune

    try:
        return vtprune.stats(model).method
    except ValueError:
        return None


def test_bench_cli_warmups_per_path(monkeypatch):
    """Plain rows get one warm-up run, compiled rows --compile-warmup (compilation happens there)."""
    from vtprune.cli import main

    seen = fake_measure(monkeypatch)
    assert main(["bench", "--model", "tiny-test-llava", "--methods", "random", "--keep", "4", "--compile",
                 "--compile-backend", "eager", "--compile-warmup", "4", "--reps", "1", "--new-tokens", "2"]) == 0
    assert [(c is not None, m, w) for c, m, w in seen] == [
        (False, None, 1), (False, "random", 1), (True, None, 4), (True, "random", 4)]


def test_bench_cli_compiled_path_defaults_to_inductor_with_cuda_graphs(monkeypatch):
    """--compile alone (as benchmarks/gpu_figures.sh gives it): the inductor backend in mode reduce-overhead (CUDA
    graphs) after 3 warm-up runs; --compile-mode replaces the mode."""
    from vtprune.cli import main

    seen = fake_measure(monkeypatch)
    argv = ["bench", "--model", "tiny-test-llava", "--methods", "random", "--keep", "4", "--compile", "--reps", "1"]
    assert main(argv) == 0
    assert [(c, w) for c, _, w in seen[2:]] == [({"mode": "reduce-overhead"}, 3)] * 2
    seen.clear()
    assert main([*argv, "--compile-mode", "max-autotune"]) == 0
    assert [(c, w) for c, _, w in seen[2:]] == [({"mode": "max-autotune"}, 3)] * 2


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


def test_kernels_timed_on_cuda_is_the_median_event_span_around_each_call(monkeypatch, benchmark_script):
    """The CUDA branch (events on a fake clock): the same two warm-ups left out, each span around its own call."""
    module = benchmark_script("kernels")
    now, durations = [0.0], iter([1.0, 1.0, 0.004, 0.001, 0.002])
    fake_cuda(monkeypatch, clock=lambda: now[0])

    def fn():
        now[0] += next(durations)
        return now[0]

    ms, out = module.timed(fn, 3, device="cuda")
    assert ms == pytest.approx(2.0) and out == pytest.approx(2.007)


def test_kernels_greedy_compares_the_kernel_s_picks_with_the_reference_s_on_one_input(monkeypatch, benchmark_script):
    """Reference and kernel get the same bf16 [batch, N, D] features; the row counts the picks where they differ
    (three of the second sample's here)."""
    pytest.importorskip("triton")
    from vtprune.kernels import greedy_triton

    module = benchmark_script("kernels")
    seen = []

    def picks(name, offset):
        def select(x, keep):
            seen.append((name, x))
            out = torch.arange(keep).repeat(x.shape[0], 1)
            out[-1, :3] += offset
            return out

        return select

    monkeypatch.setattr(module, "greedy_select_torch", picks("torch", 0))
    monkeypatch.setattr(greedy_triton, "greedy_select_triton", picks("triton", 8))
    monkeypatch.setattr(greedy_triton, "cosine_gram_triton", lambda x: None)
    monkeypatch.setattr(greedy_triton, "greedy_from_gram_triton", lambda sim, keep, first: None)
    row, = module.bench_greedy([(40, 8, 16, 2)], 1, "cpu", lambda msg: None)
    assert (row["n"], row["keep"], row["d"], row["batch"]) == (40, 8, 16, 2)
    assert row["same_indices"] is False and row["differing_picks"] == 3
    assert sorted({name for name, _ in seen}) == ["torch", "triton"]
    assert all(x.shape == (2, 40, 16) and x.dtype == torch.bfloat16 and torch.equal(x, seen[0][1]) for _, x in seen)


def test_kernels_attention_rel_diff_is_relative_to_the_reference(monkeypatch, benchmark_script):
    """A kernel giving 1.25 x the reference's scores, on the same inputs: 0.25 (over the kernel's: 0.2)."""
    pytest.importorskip("triton")
    from vtprune.kernels import attention_triton

    module = benchmark_script("kernels")
    seen, reference = [], module.attention_scores_torch

    def kernel(q, k, scale, rows, causal=False):
        seen.append((q, k, scale, rows, causal))
        return reference(q, k, scale, rows, causal=causal) * 1.25

    monkeypatch.setattr(attention_triton, "attention_scores_triton", kernel)
    monkeypatch.setattr(module, "attention_scores_torch",
                        lambda *a, **k: (seen.append((*a, k["causal"])), reference(*a, **k))[1])
    row, = module.bench_attention([("t", 1, 4, 2, 30, 30, 16, [29], True)], 1, "cpu", lambda msg: None)
    assert row["max_rel_diff"] == pytest.approx(0.25)
    q, k, scale, rows, causal = seen[0]
    assert q.shape == (1, 4, 30, 16) and k.shape == (1, 2, 30, 16) and rows.tolist() == [29] and causal is True
    for other in seen:
        assert torch.equal(other[0], q) and torch.equal(other[1], k) and other[2:] == (scale, rows, causal)


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


def test_kernels_unpatched_figures_are_measured_on_the_unpatched_model(tmp_path, monkeypatch, benchmark_script):
    """tower and e2e: the unpatched prefill and tower first, unpatched; the patched ones inside vtprune.pruned;
    the greedy kernel alone after it."""
    module = benchmark_script("kernels")
    built, seen, llava = [], [], module.llava
    monkeypatch.setattr(module, "llava", lambda *a: (built.append(llava(*a)), built[-1])[1])

    monkeypatch.setattr(module, "timed", lambda fn, reps, warmup=2, device="cuda": (
        seen.append(("timed", patched_method(built[-1]))), (1.0, None))[1])
    monkeypatch.setattr(module, "tower_span", lambda model, fn, reps, device: (
        seen.append(("tower", patched_method(built[-1]))), (1.0, None))[1])
    module.main(["--quick", "--sections", "tower,e2e", "--out", str(tmp_path / "k.json")])
    assert seen == [("timed", None), ("tower", None), ("timed", "hiprune"), ("tower", "hiprune"),
                    ("timed", None), ("timed", "divprune"), ("timed", None)]


def test_kernels_peak_ratios_are_patched_over_unpatched(monkeypatch, benchmark_script):
    """bench_model's CUDA memory figures (torch.cuda faked): the vision tower peaks at 8 MiB unpatched and 12 MiB
    with HiPrune's signals captured, the language model at 40 and 10 MiB: the prefill's peak ratio 12 / 40, the
    tower's 12 / 8."""
    module = benchmark_script("kernels")
    bump = fake_cuda(monkeypatch)
    model, inputs = tiny.build("llava"), tiny.batch("llava", [0])
    model.model.vision_tower.register_forward_hook(lambda *_: bump(12 if hasattr(model, "_vtprune") else 8))
    model.model.language_model.register_forward_hook(lambda *_: bump(10 if hasattr(model, "_vtprune") else 40))
    row = module.bench_model("t", model, inputs, "hiprune", {"keep": 4}, 1, "cuda", lambda msg: None, tower=True)
    assert (row["unpatched_peak_mib"], row["patched_peak_mib"], row["peak_ratio"]) == (40.0, 12.0, 0.3)
    assert (row["unpatched_tower_peak_mib"], row["patched_tower_peak_mib"], row["tower_peak_ratio"]) == (8.0, 12.0, 1.5)


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
    # two 1 s warm-ups, then 0.25, 0.5 and 0.25 s: 4 images / 0.25 s (one warm-up: 8; none: 4; the mean: 12)
    now, durations = [0.0], iter([1.0, 1.0, 0.25, 0.5, 0.25])

    def model(x):
        now[0] += next(durations)

    monkeypatch.setattr(module, "time", SimpleNamespace(perf_counter=lambda: now[0]))
    assert module.images_per_s(model, torch.zeros(4, 3, 2, 2), 3) == pytest.approx(16.0)


def test_vit_images_per_s_on_cuda_reads_the_clock_around_finished_work(monkeypatch, benchmark_script):
    module = benchmark_script("vit")
    log = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: log.append("sync"))
    monkeypatch.setattr(module, "time", SimpleNamespace(perf_counter=lambda: (log.append("clock"), len(log))[1]))
    module.images_per_s(lambda x: log.append("run"), SimpleNamespace(is_cuda=True, shape=(4, 3, 2, 2)), 2)
    assert log == ["run", "run"] + ["sync", "clock", "run", "sync", "clock"] * 2


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


def test_vit_each_row_is_measured_on_the_model_its_method_names(tmp_path, monkeypatch, benchmark_script):
    """The baseline and its repeat at the end (the drift check) unpatched, each strategy's row patched with it."""
    module = benchmark_script("vit")
    monkeypatch.setattr(module, "models", lambda: iter([("tiny timm", _tiny_timm())]))
    seen = []

    def images_per_s(model, x, reps):
        model(x)
        seen.append(patched_method(model))
        return 1.0

    monkeypatch.setattr(module, "images_per_s", images_per_s)
    module.main(["--quick", "--methods", "random,pool", "--ratios", "0.5", "--layer", "1"])
    assert seen == [None, "random", "pool", None]


def test_host_syncs_counts_the_decode_steps_a_pruned_static_cache_adds_none_to(benchmark_script, capsys):
    """benchmarks/host_syncs.py: per decode step of generate() pruning adds none, on the default dynamic cache
    and, for a strategy that prunes before the decoder, on the static cache of the compiled path. (At batch 1
    the patched model handed the language model a mask generate() had dropped, which it read back each step.)"""
    rows = benchmark_script("host_syncs").main(["--families", "llava", "--methods", "divprune,fastv", "--batches", "1"])
    got = {r["method"]: (r["decode_added"], r["static_decode_added"]) for r in rows}
    assert got == {"divprune": (0, 0), "fastv": (0, None)}
    assert all(r["decode_unpatched"] > 0 and r["added"] > 0 for r in rows)
    assert "| static-cache decode step: unpatched |" in capsys.readouterr().out
