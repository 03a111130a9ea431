"""vtprune sweep: resumable cells, results files and plots (random-weight bundled architecture)."""
import csv
import json
from pathlib import Path

import pytest
import torch

from vtprune.eval import sweep


def test_pareto_front_by_hand():
    pts = [(1.0, 0.5), (2.0, 0.7), (1.5, 0.4), (3.0, 0.7), (0.5, 0.1), (2.5, 0.9)]
    # (1.5, 0.4) is beaten by (1.0, 0.5); (3.0, 0.7) by (2.0, 0.7) and (2.5, 0.9)
    assert sweep.pareto(pts) == [4, 0, 1, 5]
    assert sweep.pareto([(1.0, 1.0), (1.0, 2.0)]) == [1]  # beaten in one coordinate, tied in the other


def _cell(method, ratio, accuracy, **extra):
    return {"method": method, "ratio": ratio, "accuracy": accuracy, "by_kind": {}, "prefill_tflops": ratio,
            "llm_tflops": ratio / 2, "visual_tokens": 100 * ratio, "prefill_ms": 1.0, **extra}


def test_table_puts_the_unpatched_model_under_1():
    """Without 1.0 among the ratios the unpatched accuracy sat under the first pruned ratio (0.5)."""
    cells = [_cell("none", 1.0, 0.9), _cell("random", 0.5, 0.6), _cell("random", 0.25, 0.4), _cell("pool", 0.25, 0.5)]
    assert sweep.table(cells).splitlines() == [
        "| strategy | 1 | 0.5 | 0.25 |", "|---|---|---|---|", "| unpatched | 0.900 |  |  |",
        "| random |  | 0.600 | 0.400 |", "| pool |  |  | 0.500 |"]
    assert sweep.table([*cells, _cell("pool", 1.0, 0.9)]).splitlines()[-1] == "| pool | 0.900 |  | 0.500 |"


def test_a_metric_that_is_not_a_fraction_keeps_its_own_axis(tmp_path, monkeypatch):
    """An lmms-eval task without `accuracy` (MME: a perception score ~1500) was plotted on a 0..1 axis,
    every point off the chart, and nothing said which metric the column holds."""
    import matplotlib.axes

    limits, labels = [], []
    real_limit = matplotlib.axes.Axes.set_ylim  # autoscaling calls it too: only the fixed 0..1.02 is counted
    monkeypatch.setattr(matplotlib.axes.Axes, "set_ylim",
                        lambda ax, *a, **k: (a == (0, 1.02) and limits.append(a), real_limit(ax, *a, **k))[1])
    real_label = matplotlib.axes.Axes.set_ylabel
    monkeypatch.setattr(matplotlib.axes.Axes, "set_ylabel",
                        lambda ax, text, **k: (labels.append(text), real_label(ax, text, **k))[1])
    score = [_cell("none", 1.0, 1510.0, metric="mme_perception_score"),
             _cell("random", 0.5, 1400.0, metric="mme_perception_score")]
    sweep.write(score, tmp_path)
    assert limits == [] and labels[:2] == ["mme_perception_score"] * 2
    rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert [r["metric"] for r in rows] == ["mme_perception_score"] * 2 and rows[0]["accuracy"] == "1510.0"
    sweep.write([_cell("none", 1.0, 0.9), _cell("random", 0.5, 0.6)], tmp_path)  # shapes, or cells before `metric`
    assert limits == [(0, 1.02)] * 2 and labels[3:5] == ["accuracy"] * 2
    assert [r["metric"] for r in csv.DictReader((tmp_path / "results.csv").open())] == ["accuracy"] * 2


def test_a_score_axis_stays_its_own_when_one_cell_scores_within_0_and_1(tmp_path, monkeypatch):
    """A broken cell scoring 0 on a score metric (MME ~1500 unpatched) must not put the plot on 0..1."""
    import matplotlib.axes

    limits = []
    real_limit = matplotlib.axes.Axes.set_ylim
    monkeypatch.setattr(matplotlib.axes.Axes, "set_ylim",
                        lambda ax, *a, **k: (a == (0, 1.02) and limits.append(a), real_limit(ax, *a, **k))[1])
    sweep.plot([_cell("none", 1.0, 1510.0, metric="mme_perception_score"),
                _cell("random", 0.1, 0.0, metric="mme_perception_score")], tmp_path)
    assert limits == []


def _drawn(monkeypatch):
    """What each saved plot draws: {file name: [(label, xs, ys)]} from Axes.plot, and the axhline levels
    under ("axhline", None, level)."""
    import matplotlib.axes
    import matplotlib.figure

    pending, figures = [], {}
    real_plot, real_hline, real_save = matplotlib.axes.Axes.plot, matplotlib.axes.Axes.axhline, matplotlib.figure.Figure.savefig

    def plot(ax, xs, ys, *a, **k):
        pending.append((k.get("label"), [float(x) for x in xs], [float(y) for y in ys]))
        return real_plot(ax, xs, ys, *a, **k)

    def hline(ax, y=0, *a, **k):
        pending.append(("axhline", None, float(y)))
        return real_hline(ax, y, *a, **k)

    def save(fig, path, *a, **k):
        figures[Path(path).name] = list(pending)
        pending.clear()
        return real_save(fig, path, *a, **k)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", plot)
    monkeypatch.setattr(matplotlib.axes.Axes, "axhline", hline)
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", save)
    return figures


def test_each_plot_draws_its_own_axes_and_the_pareto_front_of_every_cell(tmp_path, monkeypatch):
    """Hand-made cells: accuracy vs ratio, accuracy vs prefill TFLOPs (not the LLM's) with the Pareto front of
    every cell, the unpatched one included, and prefill latency vs ratio; one line per strategy, its points in
    x order, the unpatched model as a point and a level line of the plot's own y."""
    figures = _drawn(monkeypatch)
    cells = [_cell("none", 1.0, 0.9, prefill_tflops=4.0, llm_tflops=3.0, prefill_ms=10.0),
             _cell("random", 0.5, 0.6, prefill_tflops=2.0, llm_tflops=1.5, prefill_ms=6.0),
             _cell("random", 0.25, 0.7, prefill_tflops=1.0, llm_tflops=0.5, prefill_ms=4.0),
             _cell("pool", 0.5, 0.6, prefill_tflops=2.5, llm_tflops=2.0, prefill_ms=5.0),
             _cell("pool", 0.25, 0.3, prefill_tflops=0.5, llm_tflops=0.2, prefill_ms=3.0)]
    sweep.plot(cells, tmp_path)
    unpatched = lambda x, y: [("axhline", None, y), ("unpatched", [x], [y])]  # noqa: E731
    assert figures["accuracy_vs_ratio.png"] == [("random", [0.25, 0.5], [0.7, 0.6]), ("pool", [0.25, 0.5], [0.3, 0.6]),
                                                *unpatched(1.0, 0.9)]
    # (2.0, 0.6) is beaten by (1.0, 0.7), (2.5, 0.6) by both; the unpatched (4.0, 0.9) is the costliest, best point
    assert figures["accuracy_vs_tflops.png"] == [("random", [1.0, 2.0], [0.7, 0.6]), ("pool", [0.5, 2.5], [0.3, 0.6]),
                                                 *unpatched(4.0, 0.9),
                                                 ("Pareto front", [0.5, 1.0, 4.0], [0.3, 0.7, 0.9])]
    assert figures["latency_vs_ratio.png"] == [("random", [0.25, 0.5], [4.0, 6.0]), ("pool", [0.25, 0.5], [3.0, 5.0]),
                                               *unpatched(1.0, 10.0)]


def test_the_csv_has_a_column_for_every_kind_any_cell_scored(tmp_path):
    """by_kind columns: the union over the cells, sorted; a cell without a kind leaves its field empty."""
    cells = [_cell("none", 1.0, 0.9, by_kind={"count": 1.0}), _cell("random", 0.5, 0.6, by_kind={"colour": 0.5})]
    sweep.write(cells, tmp_path)
    rows = list(csv.reader((tmp_path / "results.csv").open()))
    assert rows[0][-2:] == ["colour", "count"]
    assert [r[-2:] for r in rows[1:]] == [["", "1.0"], ["0.5", ""]]


def test_preset_rows_put_their_label_and_options_after_the_strategy(tmp_path):
    cells = [_cell("none", 1.0, 0.9), _cell("fastv", 0.5, 0.6, options={"layer": 1}, label="early")]
    sweep.write(cells, tmp_path)
    rows = list(csv.reader((tmp_path / "results.csv").open()))
    assert rows[0][:4] == ["method", "label", "options", "ratio"]
    assert [r[:4] for r in rows[1:]] == [["none", "unpatched", "{}", "1.0"], ["fastv", "early", '{"layer": 1}', "0.5"]]


def test_a_cut_short_last_line_before_blank_lines_is_still_the_last_line(tmp_path):
    """Blank lines are no lines: a cut write followed by them is dropped with a warning, not an error."""
    cell = {"model": "tiny-llava", "task": "shapes", "method": "none", "ratio": 1.0}
    log = tmp_path / "cells.jsonl"
    log.write_text(json.dumps(cell) + "\n" + '{"model": "tiny-ll' + "\n\n \n")
    with pytest.warns(UserWarning, match=r"line 2: skipped an unparsable last line"):
        assert sweep.read_cells(log) == [cell]
    assert log.read_text() == json.dumps(cell) + "\n"


def _counting(monkeypatch):
    """Count the accuracy evaluations (one per cell run); the list holds each one's batch size."""
    calls = []
    real = sweep.accuracy

    def counting(task, model, processor, n, batch):
        calls.append(batch)
        return real(task, model, processor, n, batch)

    monkeypatch.setattr(sweep, "accuracy", counting)
    return calls


def test_sweep_resumes_and_writes_results_and_plots(tmp_path, monkeypatch, capsys):
    calls = _counting(monkeypatch)
    args = dict(model_name="tiny-llava", task="shapes", out=tmp_path, n_questions=6, batch=3, random_weights=True,
                progress=False)
    first = sweep.run(methods=["random"], ratios=[0.5], **args)
    assert [(c["method"], c["ratio"]) for c in first] == [("none", 1.0), ("random", 0.5)]
    assert len(calls) == 2
    again = sweep.run(methods=["random"], ratios=[0.5, 0.25], **args)  # only the new cell runs
    assert len(calls) == 3
    assert again[:2] == first
    lines = (tmp_path / "cells.jsonl").read_text().splitlines()
    assert len(lines) == 3
    cells = json.loads((tmp_path / "results.json").read_text())
    assert [(c["method"], c["ratio"]) for c in cells] == [("none", 1.0), ("random", 0.5), ("random", 0.25)]
    assert [(c["label"], c["options"]) for c in cells] == [("unpatched", {}), ("random", {}), ("random", {})]  # as the CSV
    assert cells[2]["llm_tflops"] < cells[1]["llm_tflops"] < cells[0]["llm_tflops"]
    assert cells[2]["visual_tokens"] == round(0.25 * 196)
    rows = list(csv.reader((tmp_path / "results.csv").open()))
    assert rows[0][:3] == ["method", "ratio", "accuracy"] and len(rows) == 4
    assert rows[0][3:6] == ["prefill_tflops_per_sample", "llm_tflops_per_sample", "visual_tokens_per_sample"]
    settings = [dict(zip(rows[0], r)) for r in rows[1:]]  # which experiment made each row
    assert {(s["model"], s["task"], s["questions"], s["batch"], s["random_weights"]) for s in settings} == \
        {(args["model_name"], "shapes", str(args["n_questions"]), str(args["batch"]), "True")}
    for name in ("accuracy_vs_ratio.png", "accuracy_vs_tflops.png", "latency_vs_ratio.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_resume_reuses_only_cells_of_the_same_experiment(tmp_path, monkeypatch):
    """--random-weights, --batch (and the device) are part of a cell's identity: a cell from another
    experiment is never reused, and the warning says why it runs again."""
    calls = _counting(monkeypatch)
    args = dict(model_name="tiny-llava", methods=["random"], ratios=[0.5], task="shapes", out=tmp_path, n_questions=6,
                progress=False)
    trained = sweep.run(batch=3, random_weights=False, **args)
    assert len(calls) == 2
    with pytest.warns(UserWarning, match=r"2 of the 2 cells.*not reused.*random_weights=False"):
        rand = sweep.run(batch=3, random_weights=True, **args)
    assert len(calls) == 4
    with pytest.warns(UserWarning, match=r"not reused.*batch=3"):
        rand2 = sweep.run(batch=2, random_weights=True, **args)
    assert len(calls) == 6 and calls[-2:] == [2, 2]
    assert {(c["random_weights"], c["batch"], c["format"]) for c in trained} == {(False, 3, 2)}
    assert {(c["random_weights"], c["batch"]) for c in rand} == {(True, 3)}
    assert {(c["random_weights"], c["batch"]) for c in rand2} == {(True, 2)}
    assert sweep.run(batch=3, random_weights=False, **args) == trained  # each experiment's cells are kept
    assert sweep.run(batch=2, random_weights=True, **args) == rand2
    assert len(calls) == 6 and len((tmp_path / "cells.jsonl").read_text().splitlines()) == 6
    with pytest.warns(UserWarning, match=r"not reused.*questions=6.*this run: questions=4"):  # it reran silently
        sweep.run(batch=3, random_weights=False, **{**args, "n_questions": 4})
    assert len(calls) == 8


def test_a_local_directory_is_one_model_however_it_is_spelt(tmp_path, monkeypatch):
    """`--model ck/` after `--model ck` reran every cell (the spelling was part of the cell's identity)."""
    from vtprune.eval import models

    model, processor = models.load("tiny-llava", random_weights=True)
    model.save_pretrained(tmp_path / "ck")
    processor.save_pretrained(tmp_path / "ck")
    monkeypatch.chdir(tmp_path)
    calls = _counting(monkeypatch)
    args = dict(methods=["random"], ratios=[0.5], task="shapes", out=tmp_path / "out", n_questions=2, batch=2,
                progress=False)
    first = sweep.run(model_name="ck", **args)
    assert len(calls) == 2 and {c["model"] for c in first} == {"ck"}
    assert sweep.run(model_name="ck/", **args) == first
    assert sweep.run(model_name="./ck", **args) == first
    assert len(calls) == 2
    log = tmp_path / "out" / "cells.jsonl"  # cells an earlier vtprune logged as "ck/" are reused too
    log.write_text(log.read_text().replace('"model": "ck"', '"model": "ck/"'))
    assert [c["model"] for c in sweep.run(model_name="ck", **args)] == ["ck/", "ck/"]
    assert len(calls) == 2


def test_cells_made_by_other_weights_are_not_reused(tmp_path, monkeypatch):
    """`--model ckpt` from two folders holding different checkpoints (or one folder whose weights were
    replaced) reused the first one's cells silently: a LLaVA sweep's numbers came back for a Qwen2-VL."""
    from vtprune.eval import models

    model, processor = models.load("tiny-llava", random_weights=True)
    for folder in ("A", "B"):
        model.save_pretrained(tmp_path / folder / "ckpt")
        processor.save_pretrained(tmp_path / folder / "ckpt")
        with torch.no_grad():
            next(model.parameters()).add_(1.0)  # B's weights differ from A's
    calls = _counting(monkeypatch)
    args = dict(model_name="ckpt", methods=["random"], ratios=[0.5], task="shapes", out=tmp_path / "out",
                n_questions=2, batch=2, progress=False)
    monkeypatch.chdir(tmp_path / "A")
    first = sweep.run(**args)
    assert len(calls) == 2 and len({c["weights"] for c in first}) == 1 and first[0]["weights"]
    assert sweep.run(**args) == first and len(calls) == 2  # the same weights: reused
    monkeypatch.chdir(tmp_path / "B")
    with pytest.warns(UserWarning, match=r"2 of the 2 cells.*not reused.*other weights"):
        second = sweep.run(**args)
    assert len(calls) == 4 and first[0]["weights"] != second[0]["weights"]
    # with --random-weights only the architecture counts: A's and B's configs are one
    assert sweep.weights_id("ckpt", True) == sweep.weights_id(str(tmp_path / "A" / "ckpt"), True)
    assert sweep.weights_id("tiny-test-llava", False) is None  # built in code, no files
    assert sweep.weights_id("tiny-llava", False) != sweep.weights_id("tiny-qwen2vl", False)  # bundled: their files


def test_the_fingerprint_samples_large_weight_files_and_reads_the_processor_files(tmp_path):
    """A weight file over 16 MiB is sampled at 16 spread offsets (a change near its end is another checkpoint;
    its first 64 KiB, mostly the safetensors header, are alike for one architecture); and the processor's
    files change what the model answers (image mean/std, the chat template), so they count too."""
    size = 20 << 20
    a, b = tmp_path / "a", tmp_path / "b"
    for folder, tail in ((a, b"\x00"), (b, b"\x01")):
        folder.mkdir()
        (folder / "config.json").write_text("{}")
        with open(folder / "model.safetensors", "wb") as f:
            f.truncate(size - 1)
            f.seek(size - 1)
            f.write(tail)
    assert sweep.weights_id(str(a), False) != sweep.weights_id(str(b), False)
    assert sweep.weights_id(str(a), True) == sweep.weights_id(str(b), True)  # random weights: the files' weights not
    before = sweep.weights_id(str(a), True)
    for name in ("processor_config.json", "preprocessor_config.json", "chat_template.jinja", "tokenizer_config.json"):
        (a / name).write_text("{}")
        after = sweep.weights_id(str(a), True)
        assert after != before, name
        before = after
    (a / "README.md").write_text("notes")  # not read by the model or its processor
    assert sweep.weights_id(str(a), True) == before


def test_cells_a_preset_ran_serve_the_plain_rows_under_their_own_names(tmp_path, monkeypatch, no_model_cells):
    """A preset labelled "mine" whose options are fastv's own ran fastv's cells first: a later plain sweep shows
    them as "fastv", not "mine"; and a preset's cells made with other settings are not counted as the plain
    strategy's in the not-reused warning (1 of the 2 cells: the unpatched one, made at another batch)."""
    import contextlib
    import warnings

    monkeypatch.setattr(sweep, "write", lambda cells, out: None)
    monkeypatch.setattr("vtprune.pruned", lambda *a, **k: contextlib.nullcontext())  # (the presets' check on the model)
    args = dict(model_name="tiny-llava", ratios=[0.5], task="shapes", out=tmp_path / "a", n_questions=2,
                random_weights=True, progress=False)
    sweep.run(methods=[], presets=[("fastv", {}, "mine")], batch=2, **args)
    assert [sweep.label(c) for c in sweep.run(methods=["fastv"], batch=2, **args)] == ["unpatched", "fastv"]
    args["out"] = tmp_path / "b"
    sweep.run(methods=[], presets=[("fastv", {"layer": 1}, "early")], batch=3, **args)
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        sweep.run(methods=["fastv"], batch=2, **args)
    said = [str(w.message) for w in got if "not reused" in str(w.message)]
    assert len(said) == 1 and "1 of the 2 cells" in said[0], said


def test_the_not_reused_warning_counts_cells_not_log_lines(tmp_path, no_model_cells):
    """Two older-format lines of the unpatched cell (a sweep run twice before FORMAT 2) are one cell not reused."""
    old = {"model": "tiny-llava", "task": "shapes", "questions": 2, "method": "none", "ratio": 1.0, "accuracy": 0.5}
    (tmp_path / "cells.jsonl").write_text((json.dumps(old) + "\n") * 2)
    with pytest.warns(UserWarning, match=r"1 of the 2 cells to run .* older vtprune"):
        sweep.run("tiny-llava", ["random"], [0.5], "shapes", tmp_path, n_questions=2, batch=2, progress=False)


def test_a_local_folder_named_like_a_bundled_model_stays_a_folder(tmp_path, monkeypatch):
    """`--model ./tiny-llava` (a local folder) was normalised to `tiny-llava`, which loaded the bundled
    model instead and shared its cells."""
    from vtprune.eval import models

    model, processor = models.load("tiny-llava", random_weights=True)
    model.save_pretrained(tmp_path / "tiny-llava")
    processor.save_pretrained(tmp_path / "tiny-llava")
    monkeypatch.chdir(tmp_path)
    loaded, real = [], models.load
    monkeypatch.setattr(models, "load", lambda name, *a, **k: loaded.append(name) or real(name, *a, **k))
    args = dict(methods=["random"], ratios=[0.5], task="shapes", out=tmp_path / "out", n_questions=2, batch=2,
                random_weights=True, progress=False)
    bundled = sweep.run(model_name="tiny-llava", **args)
    local = sweep.run(model_name="tiny-llava/", **args)
    assert loaded == ["tiny-llava", "./tiny-llava"]
    assert {c["model"] for c in bundled} == {"tiny-llava"} and {c["model"] for c in local} == {"./tiny-llava"}
    assert sweep.run(model_name="./tiny-llava", **args) == local and len(loaded) == 2  # one model, reused


def test_cells_of_the_older_format_are_not_reused(tmp_path, monkeypatch):
    """A cell written before `format` 2 (no random_weights; shapes TFLOPs summed over the batch) is
    ambiguous: it runs again, with a warning, and stays in the file."""
    calls = _counting(monkeypatch)
    args = dict(model_name="tiny-llava", methods=["random"], ratios=[0.5], task="shapes", out=tmp_path, n_questions=6,
                batch=3, random_weights=True, progress=False)
    old = [{"model": "tiny-llava", "task": "shapes", "questions": 6, "method": m, "ratio": r, "accuracy": 0.5,
            "by_kind": {}, "prefill_tflops": 3.0, "llm_tflops": 1.0, "visual_tokens": 98.0, "prefill_ms": 1.0,
            "batch": 3, "device": "cuda" if torch.cuda.is_available() else "cpu"} for m, r in (("none", 1.0), ("random", 0.5))]
    (tmp_path / "cells.jsonl").write_text("".join(json.dumps(c) + "\n" for c in old))
    with pytest.warns(UserWarning, match="older vtprune"):
        cells = sweep.run(**args)
    assert len(calls) == 2 and all(c["format"] == 2 and c["prefill_tflops"] < 0.01 for c in cells)
    assert len((tmp_path / "cells.jsonl").read_text().splitlines()) == 4


def test_tflops_are_per_sample_whatever_the_batch():
    """The shapes task counts FLOPs on one batch of min(batch, questions) samples; a cell holds the
    per-sample mean, as the lmms-eval path and visual_tokens do."""
    one, four = (sweep.ShapesCells("tiny-llava", "shapes", 4, b, True).cell("random", 0.5) for b in (1, 4))
    for k in ("prefill_tflops", "llm_tflops", "visual_tokens"):
        assert one[k] == pytest.approx(four[k], rel=1e-9), k
    assert one["visual_tokens"] == 98


def test_a_cut_short_last_line_is_dropped_and_its_cell_runs_again(tmp_path, monkeypatch):
    calls = _counting(monkeypatch)
    args = dict(model_name="tiny-llava", methods=["random"], ratios=[0.5], task="shapes", out=tmp_path, n_questions=6,
                batch=3, random_weights=True, progress=False)
    first = sweep.run(**args)
    log = tmp_path / "cells.jsonl"
    text = log.read_text()
    log.write_text(text[:len(text) - len(text.splitlines()[-1]) // 2])  # killed while writing the random cell
    with pytest.warns(UserWarning, match=r"cells.jsonl, line 2: skipped an unparsable last line"):
        again = sweep.run(**args)
    assert len(calls) == 3 and calls[-1] == 3  # the random cell ran again, the unpatched one was reused
    assert [(c["method"], c["ratio"]) for c in again] == [("none", 1.0), ("random", 0.5)] and again[0] == first[0]
    assert [json.loads(line)["method"] for line in log.read_text().splitlines()] == ["none", "random"]
    assert sweep.run(**args) == again and len(calls) == 3  # and the file resumes cleanly after that


def test_a_corrupt_line_before_the_last_is_an_error_naming_it(tmp_path):
    cell = {"model": "tiny-llava", "task": "shapes", "questions": 6, "method": "none", "ratio": 1.0}
    (tmp_path / "cells.jsonl").write_text(json.dumps(cell) + "\n" + '{"model": "tiny-ll\n' + json.dumps(cell) + "\n")
    with pytest.raises(ValueError, match=r"cells\.jsonl, line 2: not a sweep cell"):
        sweep.run("tiny-llava", ["random"], [0.5], "shapes", tmp_path, n_questions=6, batch=3, random_weights=True,
                  progress=False)


def test_a_whole_line_that_is_no_cell_is_an_error_naming_it(tmp_path, monkeypatch):
    """(a format-2 line without a cell's keys was a KeyError traceback; as the last line it is not a cut
    write, so it is not removed either)"""
    _counting(monkeypatch)
    args = dict(n_questions=6, batch=3, random_weights=True, progress=False)
    sweep.run("tiny-llava", ["random"], [0.5], "shapes", tmp_path, **args)
    log = tmp_path / "cells.jsonl"
    with log.open("a") as f:
        f.write(json.dumps({"format": sweep.FORMAT, "model": "tiny-llava"}) + "\n")
    before = log.read_text()
    with pytest.raises(ValueError, match=r"cells\.jsonl, line 3: not a sweep cell \(no task, questions, "):
        sweep.run("tiny-llava", ["random"], [0.5], "shapes", tmp_path, **args)
    assert log.read_text() == before


def test_repeated_strategies_and_ratios_run_once(tmp_path, monkeypatch):
    calls = _counting(monkeypatch)
    cells = sweep.run("tiny-llava", ["random", "random"], [0.5, 0.5], "shapes", tmp_path, n_questions=6, batch=3,
                      random_weights=True, progress=False)
    assert len(calls) == 2 and [(c["method"], c["ratio"]) for c in cells] == [("none", 1.0), ("random", 0.5)]
    assert len((tmp_path / "cells.jsonl").read_text().splitlines()) == 2
    assert len(list(csv.reader((tmp_path / "results.csv").open()))) == 3


def test_presets_are_rows_of_their_own_at_the_sweep_s_ratios(tmp_path, monkeypatch, capsys):
    """--config: a preset's options at each ratio (its budget replaced), a row beside the plain strategy,
    labelled by its file name or "label"; options are part of a cell's identity (a resumed sweep reuses
    the preset's cells, and the plain strategy's stay apart)."""
    from vtprune.cli import main

    seen = []
    real = sweep.ShapesCells.cell
    monkeypatch.setattr(sweep.ShapesCells, "cell", lambda self, m, r, o=None: (seen.append((m, r, o)),
                                                                              real(self, m, r, o))[1])
    preset = tmp_path / "fastv-early.json"
    preset.write_text(json.dumps({"method": "fastv", "options": {"keep": 7, "layer": 1}}))
    inline = json.dumps({"method": "fastv", "options": {"ratio": 0.9, "layer": 3}, "label": "late"})
    out = tmp_path / "s"
    argv = ["sweep", "--model", "tiny-llava", "--random-weights", "--methods", "fastv", "--ratios", "0.5,0.25",
            "--questions", "4", "--batch", "2", "--config", str(preset), "--config", inline, "--out", str(out)]
    assert main(argv) == 0
    assert seen == [("none", 1.0, None)] + [("fastv", r, o) for o in (None, {"layer": 1}, {"layer": 3})
                                            for r in (0.5, 0.25)]
    table = capsys.readouterr().out
    assert [line.split(" |")[0] for line in table.splitlines() if line.startswith("| ")][1:] == [
        "| unpatched", "| fastv", "| fastv-early", "| late"]
    cells = json.loads((out / "results.json").read_text())
    assert [(c["method"], c.get("options"), c.get("label"), c["ratio"]) for c in cells][3:5] == [
        ("fastv", {"layer": 1}, "fastv-early", 0.5), ("fastv", {"layer": 1}, "fastv-early", 0.25)]
    early, default = cells[3]["llm_tflops"], cells[1]["llm_tflops"]
    assert early < default  # the preset's layer 1 drops tokens sooner than fastv's default layer 2
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [(r["label"], r["options"]) for r in rows][1:4:2] == [("fastv", "{}"), ("fastv-early", '{"layer": 1}')]
    assert main(argv) == 0 and len(seen) == 7  # resumed: every cell reused
    capsys.readouterr()
    alone = ["sweep", "--model", "tiny-llava", "--random-weights", "--ratios", "0.5,0.25", "--questions", "4", "--batch",
             "2", "--config", inline, "--out", str(out)]  # --config without --methods: the presets only
    assert main(alone) == 0 and len(seen) == 7
    assert [line.split(" |")[0] for line in capsys.readouterr().out.splitlines() if line.startswith("| ")][1:] == [
        "| unpatched", "| late"]


@pytest.mark.parametrize("configs, words", [
    (['{"method": "fastv", "options": {"layer": 1}}', '{"method": "fastv", "options": {"layer": 3}, "label": "fastv"}'],
     "labelled alike: fastv"),
    (['{"method": "fastv", "options": {"layer": 0}}'], "--config: layer must be an int >= 1, got 0"),
    (['{"method": "nope", "options": {}}'], "--config: unknown method 'nope'"),
    (['{"options": {"layer": 1}}'], "--config names no method"),
    (['{"method": "token_shuffle", "options": {"s": 3}}'], "--config: the sweep's ratios set the budget, which s would "
                                                          "set too: drop s"),  # (it was dropped silently)
    (['{"method": "fastv", "options": {"layer": 1}, "label": ""}'], '--config: "label" must be a non-empty string'),
    (['{"method": "fastv", "options": {"layer": 1}, "lable": "x"}'], "config key 'lable': did you mean 'label'?"),
])
def test_sweep_refuses_bad_presets_before_loading_the_model(tmp_path, monkeypatch, capsys, configs, words):
    from vtprune.cli import main

    monkeypatch.setattr(sweep.ShapesCells, "__init__", lambda *a, **k: pytest.fail("the model was loaded"))
    argv = ["sweep", "--model", "tiny-llava", "--random-weights", "--ratios", "0.5", "--out", str(tmp_path / "s")]
    argv += ["--methods", "fastv"] if "labelled" in words else []
    with pytest.raises(SystemExit) as exit_:
        main(argv + [x for c in configs for x in ("--config", c)])
    assert exit_.value.code == 2 and words in capsys.readouterr().err


def test_a_labelled_preset_with_a_strategy_s_options_is_a_row_sharing_its_cells(tmp_path, monkeypatch, capsys):
    """A preset whose options, its budget dropped, are none (or equal a plain row's) lost its label and
    merged into the plain row; it is a row of its own now, its cells run once for both."""
    from vtprune.cli import main

    calls = _counting(monkeypatch)
    argv = ["sweep", "--model", "tiny-llava", "--random-weights", "--methods", "fastv", "--ratios", "0.5",
            "--questions", "4", "--batch", "2", "--config", '{"method": "fastv", "options": {"keep": 3}, "label": "mine"}',
            "--out", str(tmp_path)]
    assert main(argv) == 0 and len(calls) == 2  # unpatched, fastv at 0.5: the preset's cell is fastv's
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert [line.split(" |")[0] for line in table][1:] == ["| unpatched", "| fastv", "| mine"]
    assert table[-1].split("|")[2:] == table[-2].split("|")[2:]
    rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert [(r["method"], r["label"], r["options"]) for r in rows] == [
        ("none", "unpatched", "{}"), ("fastv", "fastv", "{}"), ("fastv", "mine", "{}")]
    import shlex  # the command is recorded quoted: the inline JSON preset re-runs as written

    assert shlex.split((tmp_path / "commands.txt").read_text())[1:] == argv
    at_default = argv[:-4] + ["--config", '{"method": "fastv", "options": {"layer": 2}}', "--out", str(tmp_path)]
    assert main(at_default) == 0 and len(calls) == 2  # fastv's own layer: the same cells, not run again
    assert [line.split(" |")[0] for line in capsys.readouterr().out.splitlines() if line.startswith("| ")][1:] == [
        "| unpatched", "| fastv", "| fastv[layer=2]"]


def test_a_preset_the_model_refuses_stops_the_sweep_before_its_first_cell(tmp_path, monkeypatch, capsys):
    """fastv layer=99 on a 4-layer model passes every check without the model: it was refused at its first
    cell, after the unpatched model and the other strategies had been evaluated."""
    from vtprune.cli import main

    calls = _counting(monkeypatch)
    with pytest.raises(SystemExit) as exit_:
        main(["sweep", "--model", "tiny-llava", "--random-weights", "--methods", "random", "--ratios", "0.5",
              "--questions", "4", "--batch", "2", "--config", '{"method": "fastv", "options": {"layer": 99}}',
              "--out", str(tmp_path / "s")])
    assert exit_.value.code == 2 and "fastv layer=99 must be < the model's 4 decoder layers" in capsys.readouterr().err
    assert calls == [] and not (tmp_path / "s").exists()


def test_sweep_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="ratios"):
        sweep.run("tiny-llava", ["random"], [1.5], "shapes", tmp_path, random_weights=True)
    with pytest.raises(ValueError, match="unknown strategies"):
        sweep.run("tiny-llava", ["nope"], [0.5], "shapes", tmp_path, random_weights=True)
    with pytest.raises(ValueError, match="--model must be a local model directory"):  # no empty folder left
        sweep.run("tiny-llama", ["random"], [0.5], "shapes", tmp_path / "new", random_weights=True)
    assert not (tmp_path / "new").exists()
    with pytest.raises(ValueError, match="no metric"):  # nor a first cell that fails (an lmms-eval dataset not cached)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(sweep.ShapesCells, "cell", lambda self, *a: (_ for _ in ()).throw(ValueError("no metric")))
            sweep.run("tiny-llava", ["random"], [0.5], "shapes", tmp_path / "new", n_questions=2, random_weights=True)
    assert not (tmp_path / "new").exists()
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="is a file: give a folder"):
        sweep.run("tiny-llava", ["random"], [0.5], "shapes", tmp_path / "file", random_weights=True)
    with pytest.raises(ValueError, match="labelled alike: unpatched"):  # (it would merge into that row)
        sweep.run("tiny-llava", [], [0.5], "shapes", tmp_path / "new", random_weights=True,
                  presets=[("fastv", {"layer": 1}, "unpatched")])


@pytest.mark.parametrize("where", ["under a file", "a dangling link", "under a dangling link"])
def test_sweep_refuses_an_unusable_out_before_any_cell(tmp_path, monkeypatch, where):
    # such an --out failed at the first cell's mkdir, after the whole unpatched evaluation had run
    (tmp_path / "file").write_text("")
    (tmp_path / "link").symlink_to(tmp_path / "missing")
    out = {"under a file": tmp_path / "file" / "sub", "a dangling link": tmp_path / "link",
           "under a dangling link": tmp_path / "link" / "sub"}[where]
    monkeypatch.setattr(sweep.ShapesCells, "__init__", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(ValueError, match="--out .*(is a file, not a folder|links to a missing folder)"):
        sweep.run("tiny-llava", ["random"], [0.5], "shapes", out, random_weights=True)
    assert not (tmp_path / "missing").exists()


@pytest.mark.parametrize("model", ["tiny-test-llava", "llava-1.5-7b"])
def test_sweep_refuses_a_model_without_a_processor_before_loading_it(tmp_path, monkeypatch, model):
    """It loaded (or built) the model, then suggested --task synthetic, which a sweep does not take."""
    monkeypatch.setattr(sweep.ShapesCells, "__init__", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(ValueError, match=f"{model} has no processor: use tiny-llava, tiny-qwen2vl or a local "):
        sweep.run(model, ["random"], [0.5], "shapes", tmp_path / "s", random_weights=True)


@pytest.mark.parametrize("argv, words", [
    (["--plumbing", "--out", "x"], "--out: for the bundled models' tables, not --plumbing"),
    (["--plumbing", "--questions", "5"], "--questions: for the bundled models' tables"),
    (["--families", "llava"], "--families picks the --plumbing table's"),
    (["--plumbing", "--families", "llava,nope"], "--families: unknown ['nope']; choose from llava, "),  # not built
])
def test_demo_refuses_options_its_mode_ignores(monkeypatch, capsys, argv, words):
    """Each was silently ignored."""
    import vtprune.demo
    from vtprune.cli import main

    for fn in ("run", "run_bundled", "run_vit"):
        monkeypatch.setattr(vtprune.demo, fn, lambda *a, **k: pytest.fail("the demo ran"))
    with pytest.raises(SystemExit) as exit_:
        main(["demo", *argv])
    assert exit_.value.code == 2 and words in capsys.readouterr().err


def test_demo_on_a_bundled_model(tmp_path, monkeypatch, capsys):
    """`vtprune demo` with weights in the package: accuracy table for every strategy x ratio + plots.
    (A random-weight tiny-llava saved as if bundled stands in for the trained one.)"""
    import vtprune
    from vtprune.cli import main
    from vtprune.eval import models, tinyvlm

    model, proc = models.load("tiny-llava", random_weights=True)
    model.save_pretrained(tmp_path / "bundled" / "tiny-llava")
    proc.save_pretrained(tmp_path / "bundled" / "tiny-llava")
    monkeypatch.setattr(tinyvlm, "BUNDLED", tmp_path / "bundled")
    import vtprune.demo

    monkeypatch.setattr(vtprune.demo, "run_vit", lambda *a, **k: None)  # the tiny-vit part has its own test
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--ratios", "0.25", "--questions", "6"]) == 0
    text = capsys.readouterr().out
    rows = [line for line in text.splitlines() if line.startswith("| ") and "strategy" not in line]
    assert len(rows) == 1 + len(vtprune.available())  # unpatched + every strategy
    assert (out / "accuracy_vs_ratio.png").stat().st_size > 5000


def test_sweep_command_records_what_made_the_figures(tmp_path, capsys):
    from vtprune.cli import main

    argv = ["sweep", "--model", "tiny-llava", "--random-weights", "--methods", "random", "--ratios", "0.5",
            "--questions", "6", "--batch", "3", "--out", str(tmp_path) + "/"]
    assert main(argv) == 0 and main(argv) == 0  # the second run resumes: no new cell, and no repeated line
    assert (tmp_path / "commands.txt").read_text().splitlines() == ["vtprune " + " ".join(argv)]
    assert len((tmp_path / "cells.jsonl").read_text().splitlines()) == 2
    text = capsys.readouterr().out
    assert any(line.startswith("| random | ") for line in text.splitlines())
    assert f"wrote {tmp_path / 'results.csv'}," in text  # (was "DIR//results.csv")
    more = argv[:7] + ["0.5,0.25"] + argv[8:]
    assert main(more) == 0 and main(argv) == 0  # another command, then the first again: each is recorded
    assert (tmp_path / "commands.txt").read_text().splitlines() == ["vtprune " + " ".join(a) for a in (argv, more, argv)]


def test_a_task_dataset_that_cannot_download_is_named():
    """An lmms-eval task whose dataset is not cached ended a sweep in tenacity's RetryError traceback; the
    sweep now says which dataset and why (sweep.LmmsCells.cell turns it into a one-line error)."""
    tenacity = pytest.importorskip("tenacity")

    @tenacity.retry(stop=tenacity.stop_after_attempt(2), wait=tenacity.wait_none())
    def download():
        try:
            raise OSError("offline mode")
        except OSError as e:
            raise ConnectionError("Couldn't reach 'lmms-lab/MME' on the Hub (OfflineModeIsEnabled)") from e

    with pytest.raises(tenacity.RetryError) as caught:
        download()
    assert sweep._download_failure(caught.value) == "Couldn't reach 'lmms-lab/MME' on the Hub (OfflineModeIsEnabled)"
    try:
        try:
            raise ConnectionError("no route")
        except ConnectionError as e:
            raise RuntimeError("while building the task") from e
    except RuntimeError as e:
        assert sweep._download_failure(e) == "no route"
    assert sweep._download_failure(ValueError("a bug")) is None


def test_shapes_cells_hand_vflowopt_the_processors_pixel_normalisation_unless_given(monkeypatch, siglip_normalised):
    """vflowopt's entropy undoes the processor's normalisation and defaults to CLIP's: a sweep's cells use
    the checkpoint's own, unless a preset sets pixel_mean / pixel_std; the cell's options stay as given."""
    from vtprune.methods.vflowopt import VFlowOptConfig

    seen = []

    def accuracy(task, model, processor, n, batch):
        config = model._vtprune.method.config if model._vtprune is not None else None
        seen.append(None if config is None else (getattr(config, "pixel_mean", None), getattr(config, "pixel_std", None)))
        return {"overall": 0.5, "by_kind": {}}

    monkeypatch.setattr(sweep, "accuracy", accuracy)
    cells = sweep.ShapesCells("tiny-llava", "shapes", 2, 2, True)
    cells.cell("vflowopt", 0.5)
    cells.cell("vflowopt", 0.5, {"pixel_mean": (0.25, 0.25, 0.25)})
    cells.cell("divprune", 0.5)
    half, clip_std = (0.5, 0.5, 0.5), VFlowOptConfig(keep=1).pixel_std
    assert seen == [(half, half), ((0.25, 0.25, 0.25), clip_std), (None, None)]
