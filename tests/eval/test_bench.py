"""vtprune bench on the CPU with tiny models (timings are not asserted; structure and KV bytes are)."""
import json

import pytest
import torch

from vtprune import tiny
from vtprune.eval import bench, flops


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "qwen3_5", "llava_sliding"])  # qwen3_5: attention layers only
def test_measured_kv_bytes_match_the_analytic_count(family):
    # llava_sliding: a model-wide window of 6 (Mistral-style): each layer's cache keeps 5 positions
    model = tiny.build("llava", sliding_window=6) if family == "llava_sliding" else tiny.build(family)
    family = "llava" if family == "llava_sliding" else family
    inputs = tiny.batch(family, [0])  # batch 1: no padding in the cache
    for method, options in ((None, None), ("divprune", {"keep": 3}), ("fastv", {"keep": 3})):
        row = bench.measure(model, inputs, method, options, new_tokens=2, reps=1, warmup=0)
        want = flops.count(model, inputs, method, **(options or {})).kv_bytes
        assert row.kv_bytes == want, method
        if method is None:  # image placeholders only (not Qwen's vision start/end tokens)
            assert row.visual_tokens == int((inputs["input_ids"] == tiny.IMG).sum())
        assert row.prefill_ms > 0 and row.generate_ms >= row.prefill_ms and row.decode_ms_per_token > 0
        if method == "fastv":  # its selection runs inside the prefill, divprune's before the language model
            assert row.selection_in_prefill_ms == row.selection_ms > 0
        else:
            assert row.selection_in_prefill_ms == 0
    assert not hasattr(model, "_vtprune")  # unpatched afterwards


def test_bench_command_writes_json_and_table(tmp_path, capsys):
    from vtprune.cli import main

    out = tmp_path / "b.json"
    assert main(["bench", "--model", "tiny-test-llava", "--methods", "pool,random", "--keep", "4", "--batch", "1,2",
                 "--new-tokens", "2", "--reps", "1", "--out", str(out)]) == 0
    rec = json.loads(out.read_text())
    rows = rec["rows"]
    assert [(r["batch"], r["method"]) for r in rows] == [(b, m) for b in (1, 2) for m in ("unpatched", "pool", "random")]
    for b in (1, 2):
        base = next(r for r in rows if r["batch"] == b and r["method"] == "unpatched")
        for r in rows:
            if r["batch"] == b and r["method"] != "unpatched":
                assert r["visual_tokens"] == 4 and r["kv_bytes"] < base["kv_bytes"]
    table = (tmp_path / "b.md").read_text()
    assert table.count("\n") == 2 + len(rows) and "prefill speed-up" in table
    assert rec["command"].startswith("vtprune bench --model tiny-test-llava") and rec["complete"] is True


def test_a_dotted_out_name_keeps_its_table_and_one_new_token_has_no_decode_time(tmp_path, capsys):
    """--out bench_llava-1.5-7b wrote its table to bench_llava-1.md (with_suffix), which another run named
    bench_llava-1.6-7b overwrote; with --new-tokens 1 there is no decode step, yet 0.00 ms was reported."""
    from vtprune.cli import main

    out = tmp_path / "bench_llava-1.5-7b"
    assert main(["bench", "--model", "tiny-test-llava", "--methods", "random", "--keep", "4", "--new-tokens", "1",
                 "--reps", "1", "--out", str(out)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench_llava-1.5-7b", "bench_llava-1.5-7b.md"]
    assert [r["decode_ms_per_token"] for r in json.loads(out.read_text())["rows"]] == [None, None]
    rows = (tmp_path / "bench_llava-1.5-7b.md").read_text().splitlines()[2:]
    assert [r.split(" | ")[10] for r in rows] == ["-", "-"]  # the decode column


def test_bench_records_its_command_quoted(tmp_path):
    """An inline JSON preset in the record's command re-runs as written (as sweep's commands.txt)."""
    import shlex

    from vtprune.cli import main

    out = tmp_path / "b.json"
    argv = ["bench", "--model", "tiny-test-llava", "--config", '{"method": "random", "options": {"keep": 4}}',
            "--new-tokens", "1", "--reps", "1", "--out", str(out)]
    assert main(argv) == 0
    assert shlex.split(json.loads(out.read_text())["command"])[1:] == argv


def test_flops_and_bench_take_a_synthetic_clip(tmp_path):
    """--task synthetic-video: one 32-frame clip per prompt (a test model's frames: 2 x 2 tokens for
    LLaVA-NeXT-Video; 12 x 12 merged patches per 2 frames for Qwen2-VL); keep counts per frame."""
    from vtprune.cli import main

    f, b = tmp_path / "f.json", tmp_path / "b.json"
    assert main(["flops", "--model", "tiny-test-llava-next-video", "--task", "synthetic-video", "--method", "divprune",
                 "--keep", "2", "--json", str(f)]) == 0
    rec = json.loads(f.read_text())
    assert rec["unpatched"]["visual_tokens"] == [32 * 4] and rec["pruned"]["visual_tokens"] == [32 * 2]
    assert main(["flops", "--model", "tiny-test-llava-next-video", "--task", "synthetic-video", "--frames", "5",
                 "--keep", "1", "--json", str(f)]) == 0
    rec = json.loads(f.read_text())
    assert rec["unpatched"]["visual_tokens"] == [5 * 4] and rec["pruned"]["visual_tokens"] == [5 * 1]
    assert main(["bench", "--model", "tiny-test-qwen2-vl", "--task", "synthetic-video", "--methods", "divprune",
                 "--keep", "16", "--batch", "2", "--new-tokens", "2", "--reps", "1", "--out", str(b)]) == 0
    assert [(r["method"], r["visual_tokens"]) for r in json.loads(b.read_text())["rows"]] == [
        ("unpatched", 16 * 144), ("divprune", 16 * 16)]


def test_visual_token_figures_count_a_kept_closing_newline_on_both_sides(tmp_path):
    """OneVision's newline closing a video is a placeholder in no frame, always kept: the unpatched figure
    counted it and the pruned one did not (6273 -> 1568 at ratio 0.25 on llava-onevision-7b's clip)."""
    from vtprune.cli import main

    f, b = tmp_path / "f.json", tmp_path / "b.json"
    args = ["--model", "tiny-test-llava-onevision", "--task", "synthetic-video", "--keep", "1"]
    assert main(["flops", *args, "--method", "divprune", "--json", str(f)]) == 0
    rec = json.loads(f.read_text())
    assert rec["unpatched"]["visual_tokens"] == [32 * 4 + 1] and rec["pruned"]["visual_tokens"] == [32 * 1 + 1]
    assert main(["bench", *args, "--methods", "divprune", "--batch", "1", "--new-tokens", "2", "--reps", "1",
                 "--out", str(b)]) == 0
    assert [r["visual_tokens"] for r in json.loads(b.read_text())["rows"]] == [32 * 4 + 1, 32 * 1 + 1]


def _generate_log(model, monkeypatch):
    """The configuration (None: unpatched) of each generate() on `model`, in order."""
    from vtprune.patching import _state

    log, generate = [], model.generate

    def logged(*a, **k):
        state = _state(model)
        log.append(state.method_name if state is not None else None)
        return generate(*a, **k)

    monkeypatch.setattr(model, "generate", logged)
    return log


def test_side_by_side_rows_interleave_their_runs_and_equal_rows_measured_alone(monkeypatch):
    """Each row's runs were back to back, unpatched first: one stalled baseline run (seen once: 479 ms against
    1.8 ms) skewed every speed-up of its batch. Now each round runs every configuration once."""
    model, inputs = tiny.build("llava"), tiny.batch("llava", [0, 1])
    configs = [(None, None), ("pool", {"keep": 3}), ("fastv", {"keep": 2})]
    log, rounds = _generate_log(model, monkeypatch), []
    rows = bench.measure_side_by_side(model, inputs, configs, new_tokens=2, reps=3, warmup=2,
                                      done=lambda r: rounds.append([(x.method, x.runs) for x in r]))
    assert log == [None, None, "pool", "pool", "fastv", "fastv"] + [None, "pool", "fastv"] * 3
    assert rounds == [[("unpatched", k), ("pool", k), ("fastv", k)] for k in (1, 2, 3)]
    assert not hasattr(model, "_vtprune")
    for (method, options), row in zip(configs, rows):
        alone = bench.measure(tiny.build("llava"), inputs, method, options, new_tokens=2, reps=1, warmup=0)
        assert (row.method, row.options, row.runs) == (alone.method, alone.options or {}, 3)
        assert (row.kv_bytes, row.visual_tokens, row.path) == (alone.kv_bytes, alone.visual_tokens, "eager")
        assert row.spread["prefill"][0] <= row.prefill_ms <= row.spread["prefill"][1]


def test_a_refused_configuration_fails_before_any_run_is_timed(monkeypatch):
    model, inputs = tiny.build("llava"), tiny.batch("llava", [0])
    log = _generate_log(model, monkeypatch)
    with pytest.raises(ValueError):
        bench.measure_side_by_side(model, inputs, [(None, None), ("random", {"ratio": 5})], new_tokens=2, reps=2,
                                   done=lambda r: pytest.fail("a round finished"))
    assert log == [None] and not hasattr(model, "_vtprune")
    with pytest.raises(ValueError, match="reps must be at least 1"):  # (no round: it returned no rows)
        bench.measure_side_by_side(model, inputs, [(None, None)], reps=0)


def test_bench_command_keeps_the_rounds_of_a_run_cut_short(tmp_path, monkeypatch, capsys):
    import vtprune
    from vtprune.cli import main

    pruned, calls = vtprune.pruned, []

    def pruned_then_stop(*a, **k):  # the second round's random row never comes (a timeout, say)
        calls.append(a[1])
        # the options checked on the model, warm-up + KV, round 1, round 2's pool, then its random
        if len(calls) == 4 * 2:
            raise KeyboardInterrupt
        return pruned(*a, **k)

    monkeypatch.setattr(vtprune, "pruned", pruned_then_stop)
    out = tmp_path / "b.json"
    with pytest.raises(SystemExit) as exit_:  # Ctrl-C: one line, exit status 130
        main(["bench", "--model", "tiny-test-llava", "--methods", "pool,random", "--keep", "4", "--batch", "1",
              "--new-tokens", "2", "--reps", "3", "--out", str(out)])
    assert exit_.value.code == 130
    assert calls == ["pool", "random"] * 4  # (unpatched rows use unpatched(), not pruned())
    rec = json.loads(out.read_text())
    # round 1 finished: every row, each over one run
    assert rec["complete"] is False and [(r["method"], r["runs"]) for r in rec["rows"]] == [
        ("unpatched", 1), ("pool", 1), ("random", 1)]
    assert (tmp_path / "b.md").read_text().count("\n") == 2 + 3
    assert "batch   1 eager    round 1 of 3 done" in capsys.readouterr().out


def test_bench_compiled_path_rows_side_by_side(tmp_path):
    from vtprune.cli import main

    out = tmp_path / "c.json"
    assert main(["bench", "--model", "tiny-test-llava", "--methods", "pool,fastv", "--keep", "4", "--batch", "1",
                 "--new-tokens", "2", "--reps", "1", "--compile", "--compile-backend", "eager", "--compile-warmup", "1",
                 "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    rows = record["rows"]
    # fastv drops tokens inside the decoder: no static cache, so no compiled row (todre with its stage 2 alike)
    assert [(r["path"], r["method"]) for r in rows] == [
        ("eager", "unpatched"), ("eager", "pool"), ("eager", "fastv"), ("compiled", "unpatched"), ("compiled", "pool")]
    # ... and the files say so (it was on the terminal only)
    assert record["skipped"] == [dict(batch=1, path="compiled", method="fastv", options={"keep": 4})]
    assert "Skipped: batch 1, compiled fastv (it drops tokens inside the decoder" in (tmp_path / "c.md").read_text()
    by = {(r["path"], r["method"]): r for r in rows}
    # the static cache is allocated for the unpruned prompt + new tokens either way: pruning saves no KV
    # bytes on the compiled path; the eager path holds the pruned prefill only
    assert by["compiled", "pool"]["kv_bytes"] == by["compiled", "unpatched"]["kv_bytes"] > by["eager", "pool"]["kv_bytes"]
    assert by["eager", "pool"]["kv_bytes"] < by["eager", "unpatched"]["kv_bytes"]
    assert by["compiled", "pool"]["visual_tokens"] == 4
    table = (tmp_path / "c.md").read_text()
    assert "| 1 | compiled | pool |" in table and table.count("1.00x") >= 4  # each path's unpatched row is its own base


EAGER = dict(mode=None, backend="eager")


def test_a_model_the_caller_compiled_is_measured_as_compiled_and_stays_so():
    """Its plain-path row said "eager" with a dynamic cache's bytes while generate() ran compiled on a
    static cache; a compiled row then left it uncompiled."""
    import vtprune
    from vtprune.patching import compiled_options

    inputs = tiny.batch("llava", [0])
    want = bench.measure(tiny.build("llava"), inputs, "pool", {"keep": 3}, new_tokens=2, reps=1, warmup=0,
                         compiled=EAGER)
    model = tiny.build("llava")
    vtprune.compile_llm(model, **EAGER)
    try:
        row = bench.measure(model, inputs, "pool", {"keep": 3}, new_tokens=2, reps=1, warmup=0)
        assert (row.path, row.kv_bytes) == ("compiled", want.kv_bytes)
        bench.measure(model, inputs, "pool", {"keep": 3}, new_tokens=2, reps=1, warmup=0,
                      compiled=dict(mode=None, backend="aot_eager"))
        assert compiled_options(model) == EAGER  # compiled again, with the caller's options
    finally:
        vtprune.uncompile_llm(model)
    assert compiled_options(model) is None and "forward" not in vars(model.model.language_model)


def test_a_compiled_row_s_static_cache_is_its_own_prompt_s():
    """generate() sizes a static cache for the longest prompt it has seen on the model: a row measured
    after a longer prompt reported that one's cache (30720 bytes instead of 23552)."""
    import vtprune

    short, long = tiny.batch("llava", [0]), tiny.batch("llava", [3])
    assert short["input_ids"].shape[1] < long["input_ids"].shape[1]
    alone = bench.measure(tiny.build("llava"), short, new_tokens=2, reps=1, warmup=0, compiled=EAGER).kv_bytes
    model = tiny.build("llava")
    bench.measure(model, long, new_tokens=2, reps=1, warmup=0, compiled=EAGER)
    assert bench.measure(model, short, new_tokens=2, reps=1, warmup=0, compiled=EAGER).kv_bytes == alone
    model._previous_max_cache_length = 99  # what generate() keeps is put back after a row, and by uncompile_llm
    bench.measure(model, short, new_tokens=2, reps=1, warmup=0, compiled=EAGER)
    assert model._previous_max_cache_length == 99
    with pytest.raises(ValueError):  # also when the strategy is refused
        bench.measure(model, short, "random", {"ratio": 5}, new_tokens=2, reps=1, warmup=0, compiled=EAGER)
    assert model._previous_max_cache_length == 99
    vtprune.compile_llm(model, **EAGER)
    model.generate(**short, max_new_tokens=2, **tiny.GEN)
    vtprune.uncompile_llm(model)
    assert model._previous_max_cache_length == 99
    # a model the caller compiled after a longer static generate: the compiled row's recompile (uncompile
    # first) put back the long prompt's length, and the row reported its 30720 bytes
    model = tiny.build("llava")
    model.generate(**long, max_new_tokens=2, cache_implementation="static", **tiny.GEN)
    vtprune.compile_llm(model, **EAGER)
    callers = model._previous_max_cache_length
    assert callers > short["input_ids"].shape[1] + 2
    assert bench.measure(model, short, new_tokens=2, reps=1, warmup=0, compiled=EAGER).kv_bytes == alone
    assert model._previous_max_cache_length == callers  # the caller's, put back


def test_the_unpatched_row_of_a_patched_model_is_unpatched():
    """A model already patched was measured pruned in the row named "unpatched"."""
    import vtprune

    inputs = tiny.batch("llava", [0])
    want = bench.measure(tiny.build("llava"), inputs, new_tokens=2, reps=1, warmup=0)
    model = vtprune.patch(tiny.build("llava"), "pool", keep=3)
    row = bench.measure(model, inputs, new_tokens=2, reps=1, warmup=0)
    assert (row.method, row.visual_tokens, row.kv_bytes) == ("unpatched", want.visual_tokens, want.kv_bytes)
    assert vtprune.stats(model).method == "pool"  # the configuration is back


@pytest.mark.parametrize("argv, words", [
    (["--reps", "0"], "--reps: must be >= 1, got 0"),
    (["--new-tokens", "x"], "--new-tokens: expected an integer"),
    (["--batch", "1,0"], "must be >= 1, got 0"),
    (["--methods", "bogus"], "bogus"),
    (["--ratio", "1.5", "--keep", None], "ratio"),
    (["--methods", ", ,"], "--methods names nothing"),  # it measured the unpatched model alone
    (["--out", "table.md"], "give a .json path"),  # the markdown beside it overwrote the JSON record
    (["--compile", "", "--compile-mode", "fastest"], "Unrecognized mode=fastest"),  # after the plain rows, before
    (["--compile", "", "--compile-backend", "nope"], "Invalid backend: 'nope'"),
    (["--compile-mode", "default", "--compile-warmup", "2"], "--compile-warmup, --compile-mode need --compile"),
    (["--compile-warmup", "2"], "--compile-warmup needs --compile"),
    (["--compile", "", "--compile-backend", "eager", "--compile-mode", "x"], "--compile-backend eager takes none"),
    (["--task", "bogus"], "unknown task 'bogus'; available: shapes, tiny-prompts, synthetic, synthetic-video"),
    (["--task", "shapes"], "tiny-test-llava has none: --task synthetic or tiny-prompts"),
    (["--frames", "8"], "--frames is for --task synthetic-video, not tiny-prompts"),
    (["--task", "synthetic-video"], "tiny-test-llava takes no video input"),
    (["--methods", None, "--config", "missing.json"], "--config: cannot read missing.json: No such file or directory"),
    (["--model", "qwen2-vl-7b", "--random-weights", "", "--task", "synthetic-video", "--frames", "7"],
     "qwen2-vl-7b videos take frames in groups of 2: give --frames a multiple of 2"),
    (["--methods", None], "give --methods, --config, or both"),
    (["--config", '{"method": "fastv"'], "--config: not valid JSON"),
    (["--config", '{"method": "nope", "options": {}}'], "--config: unknown method 'nope'"),
    (["--methods", None, "--keep", None, "--config", '{"method": "fastv", "options": {"layer": 2}}'],
     "--config: give exactly one of keep="),  # a preset without a budget, and none given

    (["--model", "llava-1.5-7b", "--random-weights", "", "--task", "shapes"], "llava-1.5-7b has none"),  # built first
])
def test_bench_refuses_bad_arguments_before_loading_the_model(monkeypatch, capsys, argv, words):
    """One line on stderr, exit status 2, and no model loaded (a full-scale build and its baseline
    used to run before a bad strategy or budget was noticed; --reps 0 ended in a traceback)."""
    from vtprune.cli import main
    from vtprune.eval import models

    monkeypatch.setattr(models, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    args = {"--model": "tiny-test-llava", "--methods": "random", "--keep": "4", "--batch": "1"}
    for flag, value in zip(argv[::2], argv[1::2]):
        if value is None:
            args.pop(flag)
        else:
            args[flag] = value
    with pytest.raises(SystemExit) as exit_:
        main(["bench", *[x for kv in args.items() for x in kv if x != ""]])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert words in err[-1] and "Traceback" not in "".join(err)


@pytest.mark.parametrize("argv, words", [
    (["--config", '{"method": "fastv", "options": {"keep": 4, "layer": 99}}'], "fastv layer=99 must be <"),
    (["--methods", "fastv", "--keep", "4", "--config", '{"method": "fastv", "options": {"layer": 1}}'],
     "fastv: decoder layer 0 is a linear-attention layer"),
    (["--methods", "divprune", "--keep", "4", "--compile", "--compile-backend", "eager"],
     "compile_llm does not support Qwen3_5ForConditionalGeneration"),
])
def test_bench_refuses_what_needs_the_model_before_timing_a_row(monkeypatch, capsys, argv, words):
    """A preset's layers and --compile on a hybrid model were refused after the unpatched (and earlier) rows had
    run, and those rows were lost: minutes of a full-scale GPU run."""
    from vtprune.cli import main

    monkeypatch.setattr(bench, "measure", lambda *a, **k: pytest.fail("a row was timed"))
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "--model", "tiny-test-qwen3.5", "--reps", "1", *argv])
    assert exit_.value.code == 2 and words in capsys.readouterr().err


def test_bench_measures_presets_beside_the_methods(tmp_path):
    """A tuned or hand-set preset (a method's own options) could not be benchmarked: --methods took one budget
    for every strategy. --config (repeatable) adds a row per preset; --keep / --ratio replace its budget."""
    import json

    from vtprune.cli import main

    (tmp_path / "preset.json").write_text(json.dumps({"method": "vflowopt", "options": {"ratio": 0.5, "r2": 0.9}}))
    out = tmp_path / "b.json"
    argv = ["bench", "--model", "tiny-test-llava", "--reps", "1", "--new-tokens", "2", "--out", str(out)]
    assert main([*argv, "--methods", "divprune", "--keep", "3", "--config", '{"method": "fastv", "options": {"layer": 2}}',
                 "--config", str(tmp_path / "preset.json")]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["method"], r["options"]) for r in rows] == [
        ("unpatched", {}), ("divprune", {"keep": 3}), ("fastv", {"layer": 2, "keep": 3}),
        ("vflowopt", {"r2": 0.9, "keep": 3})]
    assert [r["visual_tokens"] for r in rows[1:]] == [3, 3, 3]
    assert main([*argv, "--config", str(tmp_path / "preset.json")]) == 0  # alone: the preset's own budget
    rows = json.loads(out.read_text())["rows"]
    assert [(r["method"], r["options"]) for r in rows] == [("unpatched", {}), ("vflowopt", {"ratio": 0.5, "r2": 0.9})]
    assert rows[1]["visual_tokens"] <= 8  # half of 16 before the LLM, fewer after its in-LLM drops


@pytest.mark.parametrize("argv, words", [
    (["flops", "--model", "tiny-test-llava", "--keep", "4", "--method", "bogus"], "unknown method 'bogus'"),
    (["flops", "--model", "tiny-test-llava", "--keep", "0"], "keep must be >= 1"),
    (["flops", "--model", "tiny-test-llava", "--keep", "4", "--task", "bogus"], "unknown task 'bogus'"),
    (["flops", "--model", "tiny-test-llava", "--keep", "4", "--task", "shapes"], "tiny-test-llava has none"),
    (["flops", "--model", "tiny-llava", "--keep", "4", "--task", "tiny-prompts"], "test models"),
    # (a transformers error about the image size came from the stand-in model)
    (["flops", "--model", "llava-1.5-7b", "--keep", "64", "--task", "tiny-prompts"], "test models (tiny-test-llava"),
    (["flops", "--model", "tiny-test-llava", "--keep", "4", "--json", ""], "--json . is a folder"),  # wrote nothing
    (["flops", "--model", "tiny-test-llava", "--config", '{"method": "fastv", "options": {"keep": 2}}', "--keep", "4",
      "--ratio", "0.5"], "give at most one of --keep and --ratio with --config"),
    (["tune", "--method", "vflowopt", "--model", "tiny-llava", "--budget", "0.3", "--task", "bogus"], "unknown task"),
    (["tune", "--method", "vflowopt", "--model", "tiny-test-llava", "--budget", "0.3"], "has none"),  # default shapes
])
def test_commands_refuse_bad_inputs_before_loading_the_model(monkeypatch, capsys, tmp_path, argv, words):
    """Each was found only after the model had loaded (a checkpoint's gigabytes, a full-scale build)."""
    from vtprune.cli import main
    from vtprune.eval import configs, models

    monkeypatch.setattr(models, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    monkeypatch.setattr(configs, "surrogate", lambda *a, **k: pytest.fail("the stand-in model was built"))
    if argv[0] == "tune":
        argv = [*argv, "--out", str(tmp_path / "t.json")]
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"vtprune {argv[0]}: error: ") and err.count("\n") == 1 and words in err


def test_tune_without_optuna_is_one_line_before_loading(monkeypatch, capsys, tmp_path):
    """It was a traceback, after the model loaded and calibration ran."""
    import sys

    from vtprune.cli import main
    from vtprune.eval import models

    monkeypatch.setitem(sys.modules, "optuna", None)  # as if the tune extra were not installed
    monkeypatch.setattr(models, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(SystemExit) as exit_:
        main(["tune", "--method", "vflowopt", "--model", "tiny-llava", "--budget", "0.3", "--out", str(tmp_path / "t")])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == ("vtprune tune: error: vtprune tune needs optuna: pip install 'vtprune[tune]' "
                                       "(or optuna scipy)\n")


def test_an_unwritable_output_path_is_one_line(capsys, tmp_path):
    from vtprune.cli import main

    blocked = tmp_path / "file"
    blocked.write_text("")
    with pytest.raises(SystemExit) as exit_:
        main(["flops", "--model", "tiny-test-llava", "--keep", "4", "--json", str(blocked / "x.json")])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.startswith("vtprune flops: error: ")


@pytest.mark.parametrize("argv, option", [
    (["flops", "--model", "tiny-test-llava", "--keep", "4", "--json"], "--json"),
    (["bench", "--model", "tiny-test-llava", "--methods", "random", "--keep", "4", "--out"], "--out"),
    (["tune", "--method", "vflowopt", "--model", "tiny-llava", "--budget", "0.3", "--out"], "--out"),
])
@pytest.mark.parametrize("where", ["under a file", "a folder", "under a dangling link"])
def test_output_paths_are_checked_before_the_work(monkeypatch, capsys, tmp_path, argv, option, where):
    """A tune of 50 trials (or a flops count) used to run to the end and then fail to write its file."""
    from vtprune.cli import main
    from vtprune.eval import models

    monkeypatch.setattr(models, "load", lambda *a, **k: pytest.fail("the work started"))
    (tmp_path / "file").write_text("")
    (tmp_path / "link").symlink_to(tmp_path / "missing")
    path = {"under a file": tmp_path / "file" / "x.json", "a folder": tmp_path,
            "under a dangling link": tmp_path / "link" / "x.json"}[where]
    with pytest.raises(SystemExit) as exit_:
        main([*argv, str(path)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"vtprune {argv[0]}: error: ") and err.count("\n") == 1
    if where == "a folder":
        assert f"{option} {tmp_path} is a folder" in err


def test_an_output_path_without_write_access_is_refused(tmp_path, monkeypatch):
    """Its nearest existing folder, or the file itself, not writable (checked with os.access: root may write
    anywhere, so the answer is stood in for here)."""
    from pathlib import Path

    from vtprune.eval import paths

    denied = tmp_path / "ro"
    denied.mkdir()
    (denied / "x.json").write_text("")
    monkeypatch.setattr(paths.os, "access", lambda p, mode: Path(p) != denied)
    for path, folder in ((denied / "y.json", False), (denied / "new" / "y.json", False), (denied / "sub", True),
                         (denied, True)):
        with pytest.raises(ValueError, match=f"--out {path}: not writable"):
            paths.check_output(path, "--out", folder=folder)
    monkeypatch.setattr(paths.os, "access", lambda p, mode: Path(p) != denied / "x.json")  # a read-only file
    with pytest.raises(ValueError, match="not writable"):
        paths.check_output(denied / "x.json", "--json")
    assert paths.check_output(denied / "y.json", "--json") == denied / "y.json"


def test_random_weights_of_a_bundled_model_are_the_same_every_load():
    """A resumed sweep, a bench and a flops run of --random-weights measure one model, not three."""
    from vtprune.eval import models

    a = models.load("tiny-llava", random_weights=True)[0].state_dict()
    torch.manual_seed(123)
    b = models.load("tiny-llava", random_weights=True)[0].state_dict()
    assert all(torch.equal(v, b[k]) for k, v in a.items())
    assert not torch.equal(a["lm_head.weight"], models.load("tiny-llava")[0].state_dict()["lm_head.weight"])


def test_a_full_scale_architecture_is_built_with_the_attention_asked_for(monkeypatch):
    """(a tiny Qwen2-VL config stands in for qwen2-vl-7b's, built on the CPU)"""
    from vtprune.eval import configs, models

    build = configs.build
    monkeypatch.setattr(configs, "build", lambda name, **kw: build(name, device="cpu", dtype=torch.float32, **kw))
    monkeypatch.setitem(configs.FULL_SCALE, "qwen2-vl-7b", lambda: tiny.config("qwen2_vl"))
    for attn in ("eager", "sdpa"):
        model, processor = models.load("qwen2-vl-7b", random_weights=True, attn=attn)
        assert model.config._attn_implementation == attn and processor is None

def test_output_folders_are_made_as_the_writers_make_them(tmp_path, capsys):
    from vtprune.cli import main

    out = tmp_path / "new" / "deeper" / "f.json"
    assert main(["flops", "--model", "tiny-test-llava", "--keep", "4", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["options"] == {"keep": 4}
    for argv in (["bench", "--model", "tiny-test-llava", "--ratio", "0.5", "--methods", "bogus", "--out"],
                 ["flops", "--model", "tiny-test-llava", "--keep", "4", "--task", "bogus", "--json"]):
        with pytest.raises(SystemExit):  # a command refused after the check leaves no folder behind
            main([*argv, str(tmp_path / "a" / "b" / "x.json")])
        assert not (tmp_path / "a").exists()


def test_compiled_measure_holds_no_earlier_run_s_static_cache():
    """Each generate() makes a new static cache; the bench must not keep the previous run's alive, or the new
    one cannot take its address and CUDA graphs (recorded on those static addresses) record again."""
    import gc

    from transformers import StaticCache

    model = tiny.build("llava")
    inputs = tiny.batch("llava", [0])
    alive = []

    def count(module, args, kwargs):
        if kwargs.get("inputs_embeds") is not None and kwargs["inputs_embeds"].shape[1] > 1:  # a prefill
            gc.collect()
            alive.append(sum(type(o) is StaticCache for o in gc.get_objects()))  # type(): no attribute access

    hook = model.model.language_model.register_forward_pre_hook(count, with_kwargs=True)
    row = bench.measure(model, inputs, "random", dict(keep=4), new_tokens=2, reps=2, warmup=1,
                        compiled=dict(mode=None, backend="eager"))
    hook.remove()
    assert alive == [1, 1, 1]  # the current run's only
    assert row.kv_bytes > 0


def test_cli_list_options_strip_and_deduplicate_and_ctrl_c_is_one_line(monkeypatch, capsys):
    """--batch 1,,1 measured batch 1 twice (its speed-up against itself); --methods "a, b" kept the space;
    Ctrl-C printed a torch traceback."""
    from vtprune import cli
    from vtprune.eval import bench

    assert cli._items(" divprune, fastv,,divprune ", "--methods") == ["divprune", "fastv"]
    assert cli._ratios("0.5, 0.25,0.5") == [0.5, 0.25]
    assert cli._ratios("0.5,0.50,.5,0.25") == [0.5, 0.25]  # demo printed every 0.5 row twice
    with pytest.raises(ValueError, match="^--ratios names nothing"):
        cli._ratios(" , ")
    with pytest.raises(ValueError, match="^--ratios: could not convert string to float: 'abc'"):
        cli._ratios("0.5,abc")
    seen = []

    monkeypatch.setattr(bench, "measure_side_by_side", lambda model, inputs, configs, *a, **k: (
        seen.append((inputs["input_ids"].shape[0], configs)), (_ for _ in ()).throw(KeyboardInterrupt))[1])
    with pytest.raises(SystemExit) as exit_:
        cli.main(["bench", "--model", "tiny-test-llava", "--keep", "4", "--methods", "random, divprune", "--batch", "1,,1"])
    assert exit_.value.code == 130
    assert seen == [(1, [(None, None), ("random", {"keep": 4}), ("divprune", {"keep": 4})])]
    err = capsys.readouterr().err
    assert err.startswith("vtprune bench: interrupted") and "Traceback" not in err


def test_sweep_methods_all_with_spaces_and_the_help_lists_every_family(monkeypatch, capsys):
    """--methods " all" / "all," was 'unknown strategies ['all']'; demo --help left out two families."""
    from vtprune import cli, tiny
    from vtprune.eval import sweep
    from vtprune.methods.registry import available

    seen = []
    monkeypatch.setattr(sweep, "run", lambda model, methods, *a, **k: (seen.append(methods), (_ for _ in ()).throw(
        KeyboardInterrupt))[1])
    for methods in (" all", "all,", "all"):
        with pytest.raises(SystemExit):
            cli.main(["sweep", "--model", "tiny-llava", "--methods", methods, "--out", "unused"])
    assert seen == [available()] * 3
    capsys.readouterr()
    with pytest.raises(SystemExit):
        cli.main(["demo", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert all(family in text for family in tiny.CLASSES)


def test_every_command_s_help_lists_its_models_and_defaults(capsys, monkeypatch):
    """Each subcommand's --help exits 0; flops and bench name every full-scale architecture they take (their
    --model help is written by hand), and an option's default is shown where it has one."""
    from vtprune import cli
    from vtprune.eval import configs

    monkeypatch.setenv("COLUMNS", "1000")  # (argparse wraps at the terminal's width, hyphenated names too)

    texts = {}
    for command in ("methods", "demo", "tune", "flops", "bench", "sweep", "lmms-tasks"):
        with pytest.raises(SystemExit) as exit_:
            cli.main([command, "--help"])
        assert exit_.value.code == 0, command
        texts[command] = " ".join(capsys.readouterr().out.split())
    for command in ("flops", "bench"):
        assert all(name in texts[command] for name in configs.FULL_SCALE), command
        assert "synthetic-video" in texts[command] and "--frames" in texts[command]
    assert "comma-separated kept fractions (default: 0.5,0.25,0.111)" in texts["sweep"]
    assert "--config FILE|JSON" in texts["sweep"]


def test_synthetic_prompts_of_a_small_vocabulary_hold_only_their_image_tokens():
    """Random 'text' tokens drawn from a small vocabulary hit the image token id: the model then found
    more image tokens than features (tiny-llava: 199 for 196)."""
    from vtprune.eval import configs, models

    for name in ("tiny-llava", "tiny-test-llava", "tiny-test-qwen2-vl"):
        model = models.load(name, random_weights=True)[0]
        inputs = configs.synthetic_inputs(model, batch=4)
        cfg = model.config
        image = getattr(cfg, "image_token_id", None) or cfg.image_token_index
        counts = (inputs["input_ids"] == image).sum(1).tolist()
        assert len(set(counts)) == 1, (name, counts)
        with torch.no_grad():
            model(**models.to_model(inputs, model))


def test_random_weights_on_a_local_checkpoint_directory_are_random(tmp_path):
    """--random-weights was ignored for a local directory (trained weights, recorded as random)."""
    from vtprune.eval import models

    model, processor = models.load("tiny-llava")
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    trained = models.load(str(tmp_path))[0].state_dict()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in trained.items())
    random = models.load(str(tmp_path), random_weights=True)[0]
    assert type(random) is type(model)
    assert not torch.equal(random.state_dict()["lm_head.weight"], trained["lm_head.weight"])
    model.half().save_pretrained(tmp_path)  # dtype "auto" (the lmms plugin's default) raised AttributeError
    auto = models.load(str(tmp_path), random_weights=True, dtype="auto")[0]
    assert next(auto.parameters()).dtype == torch.float16
    assert next(models.load(str(tmp_path), random_weights=True, dtype=torch.bfloat16)[0].parameters()).dtype == torch.bfloat16


def test_a_local_directory_without_a_processor_or_of_another_model(tmp_path, capsys):
    """A config-only directory failed on its missing processor even for --task synthetic; a directory of
    a model vtprune has no adapter for printed transformers' list of every image-text class."""
    import transformers

    from vtprune.cli import main

    config_only = tmp_path / "llava"
    tiny.build("llava").config.save_pretrained(config_only)
    assert main(["flops", "--model", str(config_only), "--keep", "4", "--random-weights", "--task", "synthetic"]) == 0
    assert "tokens per layer" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:  # shapes needs the processor: said so, with the way out
        main(["flops", "--model", str(config_only), "--keep", "4", "--random-weights"])
    assert exit_.value.code == 2 and "--task synthetic" in capsys.readouterr().err
    broken = tmp_path / "broken"  # a processor that fails to load says why (it read as "no processor")
    _, processor = __import__("vtprune.eval.models", fromlist=["load"]).load("tiny-llava")
    tiny.build("llava").config.save_pretrained(broken)
    processor.save_pretrained(broken)
    (broken / "tokenizer.json").write_text((broken / "tokenizer.json").read_text()[:300])
    with pytest.raises(SystemExit) as exit_:
        main(["flops", "--model", str(broken), "--keep", "4", "--random-weights"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and f"{broken}: its processor failed to load (" in err and "Unterminated" in err
    for config in (transformers.BertConfig(), transformers.Blip2Config()):
        other = tmp_path / config.model_type
        config.save_pretrained(other)
        with pytest.raises(SystemExit) as exit_:
            main(["flops", "--model", str(other), "--keep", "4", "--random-weights", "--task", "synthetic"])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and err.count("\n") == 1
        assert f"holds a '{config.model_type}' model" in err and "vtprune does not support" in err
        assert "LlavaForConditionalGeneration" in err and "Blip2Config" not in err


def test_an_unknown_option_shows_its_subcommands_usage(capsys):
    """It printed the top-level usage, which lists no subcommand's options."""
    from vtprune.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["flops", "--model", "tiny-test-llava", "--keep", "4", "--object_layer", "2"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("usage: vtprune flops ")
    assert err.rstrip().endswith("vtprune flops: error: unrecognized arguments: --object_layer 2")


def test_ratios_take_1_and_refuse_what_is_outside_0_1():
    """--ratios in (0, 1]: 1 is the unpatched budget (the demo's default list starts with 1.0); nan, which fails
    every comparison, is refused too."""
    from vtprune import cli

    assert cli._ratios("1, 1.0,0.5") == [1.0, 0.5]
    for bad in ("nan", "inf", "1.01", "0", "-0.5"):
        with pytest.raises(ValueError, match=r"^--ratios: each must be in \(0, 1\], got"):
            cli._ratios(f"0.5,{bad}")


def test_bench_keep_replaces_the_budget_of_presets_given_alone(monkeypatch, tmp_path):
    """--config without --methods: a --keep or --ratio given still replaces each preset's budget (as beside
    --methods); without one, the preset's own budget stands."""
    import json

    import vtprune
    from vtprune.cli import main

    (tmp_path / "preset.json").write_text(json.dumps({"method": "vflowopt", "options": {"ratio": 0.5, "r2": 0.9}}))
    seen = []

    def pruned(model, method, **options):  # the check of each job's layers, before any row: record, then stop
        seen.append((method, options))
        raise KeyboardInterrupt

    monkeypatch.setattr(vtprune, "pruned", pruned)
    for budget, options in ((["--keep", "3"], {"r2": 0.9, "keep": 3}), (["--ratio", "0.25"], {"r2": 0.9, "ratio": 0.25}),
                            ([], {"ratio": 0.5, "r2": 0.9})):
        with pytest.raises(SystemExit) as exit_:
            main(["bench", "--model", "tiny-test-llava", "--config", str(tmp_path / "preset.json"), *budget])
        assert exit_.value.code == 130 and seen.pop() == ("vflowopt", options)


def test_the_prefill_time_holds_vtprune_s_work_around_the_language_model(monkeypatch):
    """The timers started after vtprune's pre-hook on the language model: its work there (compacting the sequence,
    masks, positions) was in no column but generate's. 60 ms of it, beside a selection of a few ms, is now in the
    prefill (and the selection made before the decoder stays out of it)."""
    import time

    from vtprune.hooks import runtime

    prefill = runtime.PatchState._prefill

    def slow(self, *args, **kwargs):
        time.sleep(0.06)
        return prefill(self, *args, **kwargs)

    monkeypatch.setattr(runtime.PatchState, "_prefill", slow)
    model = tiny.build("llava")
    row = bench.measure(model, tiny.batch("llava", [0]), "divprune", {"keep": 3}, new_tokens=2, reps=1, warmup=0)
    assert row.prefill_ms >= 60 > row.selection_ms
    assert row.prefill_with_selection_ms == row.prefill_ms + row.selection_ms


def test_a_row_records_the_spread_of_its_timed_runs_and_the_table_names_noisy_rows(monkeypatch):
    """The columns are medians over the timed runs; each row also keeps [fastest, slowest] of its prefill and
    generate, and the table lists the rows whose slowest run took over 1.5x their fastest (a stall one median
    hides). Here the second of three timed runs (the warm-up is not counted) sleeps 80 ms in the prefill."""
    import time

    from vtprune.hooks import runtime

    prefill, calls = runtime.PatchState._prefill, []

    def second_slow(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # warm-up, first timed run, then this one
            time.sleep(0.08)
        return prefill(self, *args, **kwargs)

    monkeypatch.setattr(runtime.PatchState, "_prefill", second_slow)
    model = tiny.build("llava")
    row = bench.measure(model, tiny.batch("llava", [0]), "divprune", {"keep": 3}, new_tokens=2, reps=3, warmup=1)
    assert len(calls) == 5  # (and one more forward after them, for the KV-cache bytes)
    (lo, hi), (glo, ghi) = row.spread["prefill"], row.spread["generate"]
    assert hi >= 80 > lo and lo <= row.prefill_ms < hi and ghi >= 80 > glo
    assert row.to_dict()["spread"] == {"prefill": [lo, hi], "generate": [glo, ghi]}
    base = bench.BenchRow("unpatched", {}, 1, 16.0, 1.0, 0.0, 2.0, 1.0, 9.0, None, 1024,
                          spread={"prefill": [1.9, 2.1], "generate": [8.0, 12.0]})  # 12 <= 1.5 x 8: not noisy
    note = bench.markdown([base, row]).splitlines()[-1]
    assert note.startswith("Noisy rows") and "unpatched" not in note
    assert f"batch 1 eager divprune: prefill {lo:.2f}-{hi:.2f} ms; batch 1 eager divprune: generate " in note
    assert not bench.markdown([base]).splitlines()[-1].startswith("Noisy")
