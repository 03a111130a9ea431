"""The harness's reported figures are the right ones: each test here caught a slip (found by mutating sweep,
bench, tune and configs by hand) that every other test let through: an inverted speed-up, TFLOPs per sample
divided by the batch, a warm-up run timed, a cell reused from another device, a Pareto tie, a tuned preset
below R3's floor, the objective's cosine over the wrong axis, synthetic prompts of the wrong length."""
import pytest
import torch

from vtprune.eval import bench, sweep, tune


def test_pareto_a_costlier_point_of_equal_value_is_beaten():
    assert sweep.pareto([(1.0, 0.5), (2.0, 0.5)]) == [0]
    assert sweep.pareto([(2.0, 0.5), (1.0, 0.5), (3.0, 0.9)]) == [1, 2]


def _row(method, path, prefill, gen, batch=1):
    return bench.BenchRow(method, {}, batch, 10.0, 1.0, 0.0, prefill, 1.0, gen, None, 1024, path)


def test_markdown_speedup_is_baseline_over_row():
    md = bench.markdown([_row("unpatched", "eager", 10.0, 40.0), _row("pool", "eager", 5.0, 20.0)])
    last = md.splitlines()[-1]
    assert "| 2.00x |" in last and last.count("2.00x") == 3 and "0.50x" not in last  # prefill (+ selection 0), generate


def test_markdown_with_selection_adds_a_pre_llm_strategy_s_selection_once():
    """divprune selects before the language model: its 1 ms is outside its 4 ms prefill (10/4 = 2.50x alone,
    10/5 = 2.00x with it); fastv's 1 ms is inside its 5 ms prefill, added to neither (2.00x both); ToDRE's
    3 ms, 1 of them in its stage 2 inside the 3 ms prefill, adds 2 (10/3 = 3.33x, 10/5 = 2.00x)."""
    base = _row("unpatched", "eager", 10.0, 40.0)
    pre = bench.BenchRow("divprune", {}, 1, 10.0, 1.0, 1.0, 4.0, 1.0, 20.0, None, 1024, "eager")
    llm = bench.BenchRow("fastv", {}, 1, 10.0, 1.0, 1.0, 5.0, 1.0, 20.0, None, 1024, "eager", 1.0)
    both = bench.BenchRow("todre", {}, 1, 10.0, 1.0, 3.0, 3.0, 1.0, 20.0, None, 1024, "eager", 1.0)
    lines = bench.markdown([base, pre, llm, both]).splitlines()
    assert "| with selection |" in lines[0]
    assert "| 10.00 | 1.00x | 1.00x |" in lines[2]
    assert "| 4.00 | 2.50x | 2.00x |" in lines[3] and "| 5.00 | 2.00x | 2.00x |" in lines[4]
    assert "| 3.00 | 3.33x | 2.00x |" in lines[5]
    assert [r.to_dict()["prefill_with_selection_ms"] for r in (pre, llm, both)] == [5.0, 5.0, 5.0]


def test_markdown_compiled_rows_use_the_compiled_baseline():
    md = bench.markdown([_row("unpatched", "eager", 10.0, 40.0), _row("unpatched", "compiled", 4.0, 16.0),
                         _row("pool", "compiled", 2.0, 8.0)])
    assert md.splitlines()[-1].count("2.00x") == 3


def test_markdown_options_column_names_each_option():
    row = bench.BenchRow("fastv", {"layer": 1, "keep": 7}, 1, 10.0, 1.0, 0.0, 1.0, 1.0, 1.0, None, 1024, "eager")
    md = bench.markdown([row, _row("pool", "eager", 1.0, 1.0)])
    assert "| fastv | layer=1, keep=7 |" in md and "| pool | - |" in md


def test_sweep_tflops_per_sample_when_batch_exceeds_questions():
    a = sweep.ShapesCells("tiny-llava", "shapes", 2, 2, True).cell("random", 0.5)
    b = sweep.ShapesCells("tiny-llava", "shapes", 2, 8, True).cell("random", 0.5)
    for k in ("prefill_tflops", "llm_tflops", "visual_tokens"):
        assert a[k] == pytest.approx(b[k], rel=1e-9), k


def test_prefill_ms_excludes_the_warmup_run(monkeypatch):
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))

        def forward(self, **kw):
            return None

    clock = iter([0.0, 10.0, 10.0, 10.001, 10.001, 10.004])  # warm-up 10 s, then 1 ms and 3 ms
    monkeypatch.setattr(sweep.time, "perf_counter", lambda: next(clock))
    assert sweep.prefill_ms(M(), {}, reps=2) == pytest.approx(2.0)  # with the warm-up: 3.0


def test_solve_r3_below_r3_min_is_infeasible():
    n1, n2, n3 = tune.layer_split(28)
    r1, r2 = 0.3, 0.9
    budget = (r1 * n1 + r1 * r2 * n2 + r1 * r2 * 0.005 * n3) / 28  # needs R3 = 0.005 < R3_MIN
    assert tune.solve_r3(budget, r1, r2, 28) is None
    budget = (r1 * n1 + r1 * r2 * n2 + r1 * r2 * 0.0101 * n3) / 28
    assert tune.solve_r3(budget, r1, r2, 28) == pytest.approx(0.0101)


def test_objective_is_the_mean_per_sample_cosine(monkeypatch):
    import contextlib

    import vtprune

    monkeypatch.setattr(vtprune, "pruned", lambda *a, **k: contextlib.nullcontext())
    h = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    monkeypatch.setattr(tune, "last_hidden", lambda model, inputs: h)
    ref = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # sample 0 unchanged (cos 1), sample 1 orthogonal (cos 0)
    assert tune.objective(None, [{}], [ref], {}) == pytest.approx(0.5)


@pytest.mark.parametrize("name, visual, extra", [("llava-1.5-7b", 576, 1), ("llava-next-7b", 2928, 1),
                                                 ("qwen2-vl-7b", 576, 3), ("qwen2.5-vl-7b", 576, 3),
                                                 ("qwen3-vl-8b", 576, 3), ("qwen3-vl-30b-a3b", 576, 3),
                                                 ("qwen3.5-27b", 576, 3)])
def test_full_scale_synthetic_prompts_have_the_documented_length(name, visual, extra):
    from vtprune.eval import configs

    model = configs.build(name, device="meta", dtype=torch.bfloat16)
    inputs = configs.synthetic_inputs(model, 1, text_tokens=48)
    assert inputs["input_ids"].shape == (1, extra + visual + 48)


@pytest.mark.parametrize("name, visual, extra", [("llava-next-video-7b", 32 * 144, 1), ("llava-onevision-7b", 32 * 196 + 1, 1),
                                                 ("qwen2-vl-7b", 16 * 144, 3), ("qwen3-vl-8b", 16 * 144, 1 + 16 * 3),
                                                 ("qwen3.5-27b", 16 * 144, 1 + 16 * 3)])
def test_full_scale_synthetic_clips_have_the_documented_length(name, visual, extra):
    """task synthetic-video (README): 32 frames; NeXT-Video 144 tokens a frame, OneVision 196 and a newline,
    Qwen 144 per 2 frames (Qwen3-VL and Qwen3.5: a timestamp, start and end per 2 frames)."""
    from vtprune.eval import configs, models

    model = configs.build(name, device="meta", dtype=torch.bfloat16)
    inputs = models.calibration("synthetic-video", model, None, 1)[0]
    assert inputs["input_ids"].shape == (1, extra + visual + 48)


def test_objective_weights_every_sample_alike_across_uneven_batches(monkeypatch):
    import contextlib

    import vtprune

    monkeypatch.setattr(vtprune, "pruned", lambda *a, **k: contextlib.nullcontext())
    outs = iter([torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[0.0, 1.0]])])
    monkeypatch.setattr(tune, "last_hidden", lambda model, inputs: next(outs))
    refs = [torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([[1.0, 0.0]])]  # cosines 1, 0 | 0
    assert tune.objective(None, [{}, {}], refs, {}) == pytest.approx(1 / 3)


def test_sweep_latency_is_measured_on_the_pruned_model(monkeypatch):
    seen = []
    monkeypatch.setattr(sweep, "prefill_ms", lambda model, inputs, reps=3: (seen.append(hasattr(model, "_vtprune")), 1.0)[1])
    monkeypatch.setattr(sweep, "accuracy", lambda *a, **k: {"overall": 0.5, "by_kind": {}})
    cells = sweep.ShapesCells("tiny-llava", "shapes", 2, 2, True)
    cells.cell("none", 1.0)
    cells.cell("random", 0.5)
    assert seen == [False, True]


def test_a_cell_made_on_another_device_is_not_reused(tmp_path, monkeypatch):
    import json

    calls = []
    monkeypatch.setattr(sweep, "accuracy", lambda *a, **k: (calls.append(1), {"overall": 0.5, "by_kind": {}})[1])
    args = dict(model_name="tiny-llava", methods=["random"], ratios=[0.5], task="shapes", out=tmp_path, n_questions=2,
                batch=2, random_weights=True, progress=False)
    sweep.run(**args)
    assert len(calls) == 2
    log = tmp_path / "cells.jsonl"
    other = "cuda" if sweep.default_device() == "cpu" else "cpu"
    log.write_text("".join(json.dumps({**json.loads(l), "device": other}) + "\n" for l in log.read_text().splitlines()))
    with pytest.warns(UserWarning, match="device="):
        cells = sweep.run(**args)
    assert len(calls) == 4 and {c["device"] for c in cells} == {sweep.default_device()}


def test_bench_stage_times_are_the_right_calls_of_the_timed_runs(monkeypatch):
    from vtprune import tiny

    model = tiny.build("llava")
    inputs = tiny.batch("llava", [0])
    run, prefill = [0], [1000.0, 100.0, 300.0]  # the warm-up run, then the two timed ones

    def times_ms(self):
        n = len(self.calls)
        if n > 1:  # the language model: the prefill, then one call per decoded token
            run[0] += 1
            return [prefill[run[0] - 1]] + [1.0] * (n - 1)
        return [5.0] * n

    monkeypatch.setattr(bench._Timer, "times_ms", times_ms)
    row = bench.measure(model, inputs, None, None, new_tokens=3, reps=2, warmup=1)
    assert run[0] == 3
    assert row.prefill_ms == 200.0 and row.decode_ms_per_token == 1.0 and row.vision_ms == 5.0


def test_bench_cpu_stage_times_are_milliseconds(monkeypatch):
    ticks = iter([2.0, 2.25])  # perf_counter seconds at the module's start and end
    monkeypatch.setattr(bench.time, "perf_counter", lambda: next(ticks))
    module = torch.nn.Identity()
    timer = bench._Timer(module, cuda=False)
    module(torch.zeros(1))
    assert timer.times_ms() == [250.0]


def test_bench_unpatched_visual_tokens_are_the_per_sample_mean(monkeypatch):
    """(a batch whose samples hold 10 and 30 placeholders: 20 per sample, not the largest)"""
    from vtprune import tiny

    monkeypatch.setattr(bench, "visual_token_counts", lambda config, inputs: [10, 30])
    row = bench.measure(tiny.build("llava"), tiny.batch("llava", [0]), None, None, new_tokens=1, reps=1, warmup=0)
    assert row.visual_tokens == 20


def test_bench_pruned_visual_tokens_are_the_per_sample_mean():
    """README's two Qwen2-VL prompts of 16 and 8 image tokens, pool at 0.25: 4 and 2 kept, 3 per sample
    (not the largest, 4)."""
    from vtprune import tiny

    row = bench.measure(tiny.build("qwen2_vl"), tiny.batch("qwen2_vl", [0, 1]), "pool", {"ratio": 0.25}, new_tokens=1,
                        reps=1, warmup=0)
    assert (row.batch, row.visual_tokens) == (2, 3)


def test_bench_selection_ms_is_the_median_of_the_timed_runs(monkeypatch):
    """vtprune.stats' selection time of each run: the warm-up's 1000 ms left out, the median of 3, 9 and 4 ms."""
    import vtprune
    from vtprune import tiny

    real, ms = vtprune.stats, iter([1000.0, 3.0, 9.0, 4.0])

    def stats(model):
        st = real(model)
        st.selection_ms = next(ms)
        return st

    monkeypatch.setattr(vtprune, "stats", stats)
    row = bench.measure(tiny.build("llava"), tiny.batch("llava", [0]), "pool", {"keep": 3}, new_tokens=2, reps=3,
                        warmup=1)
    assert row.selection_ms == 4.0


def test_bench_vision_time_sums_the_encoder_s_calls_of_a_run(monkeypatch):
    """A Qwen2-VL prompt with an image and a video runs the vision encoder twice in one prefill (5 and 7 ms
    here): the vision figure is both, 12 ms."""
    from vtprune import tiny

    model, inputs = tiny.build("qwen2_vl"), tiny.batch("qwen2_vl", [0], videos=[0])

    def times_ms(self):
        n = len(self.calls)  # the encoder: 2 calls; the language model: 3 (prefill, 2 decode steps)
        return [5.0, 7.0] if n == 2 else [100.0] + [1.0] * (n - 1)

    monkeypatch.setattr(bench._Timer, "times_ms", times_ms)
    row = bench.measure(model, inputs, None, None, new_tokens=3, reps=1, warmup=0)
    assert (row.vision_ms, row.prefill_ms, row.decode_ms_per_token) == (12.0, 100.0, 1.0)


def test_bench_generates_exactly_new_tokens(monkeypatch):
    from vtprune import tiny

    model = tiny.build("llava")
    seen, real = [], model.generate
    monkeypatch.setattr(model, "generate", lambda **kw: (seen.append(kw), real(**kw))[1])
    bench.measure(model, tiny.batch("llava", [0]), None, None, new_tokens=3, reps=1, warmup=0)
    assert seen and all(kw["min_new_tokens"] == kw["max_new_tokens"] == 3 for kw in seen)


def test_tune_on_a_tiny_qwen_model_starts_from_the_25_percent_preset(monkeypatch):
    """(on real hidden states; test_tune_and_config checks every start by hand on a stand-in model)"""
    pytest.importorskip("optuna")
    from vtprune import tiny
    from vtprune.eval import models as eval_models

    model = tiny.build("qwen2_vl")
    batches = eval_models.calibration("tiny-prompts", model, None, 2, batch_size=2)
    seen = []
    monkeypatch.setattr(tune, "objective", lambda m, b, r, opts: (seen.append(opts), 0.5)[1])
    tune.tune(model, batches, 0.25, iterations=1, progress=False)
    assert seen[0]["t"] == 34.76 and seen[0]["a"] == 15.58  # the 25 % preset's


def test_sweep_takes_ratio_one(tmp_path, no_model_cells):
    cells = sweep.run("tiny-llava", ["random"], [1.0, 0.5], "shapes", tmp_path, n_questions=2, batch=2, progress=False)
    assert [(c["method"], c["ratio"]) for c in cells] == [("none", 1.0), ("random", 1.0), ("random", 0.5)]


def test_a_last_cell_without_its_newline_is_kept_when_the_sweep_goes_on(tmp_path, no_model_cells):
    args = dict(model_name="tiny-llava", methods=["random"], task="shapes", out=tmp_path, n_questions=2, batch=2,
                progress=False)
    sweep.run(ratios=[0.5], **args)
    log = tmp_path / "cells.jsonl"
    log.write_text(log.read_text().rstrip("\n"))  # a complete last cell, its newline lost
    sweep.run(ratios=[0.5, 0.25], **args)
    assert len(sweep.read_cells(log)) == 3


def test_markdown_kv_column_is_mib():
    row = bench.BenchRow("unpatched", {}, 1, 10.0, 1.0, 0.0, 1.0, 1.0, 1.0, None, 3 * 2**20, "eager")
    assert bench.markdown([row]).splitlines()[-1].endswith("| 3.000 |")
