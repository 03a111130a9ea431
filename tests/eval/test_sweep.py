"""vtprune sweep: resumable cells, results files and plots (random-weight bundled architecture)."""
import csv
import json

import pytest

from vtprune.eval import sweep


def test_pareto_front_by_hand():
    pts = [(1.0, 0.5), (2.0, 0.7), (1.5, 0.4), (3.0, 0.7), (0.5, 0.1), (2.5, 0.9)]
    # (1.5, 0.4) is beaten by (1.0, 0.5); (3.0, 0.7) by (2.0, 0.7) and (2.5, 0.9)
    assert sweep.pareto(pts) == [4, 0, 1, 5]


def test_sweep_resumes_and_writes_results_and_plots(tmp_path, monkeypatch, capsys):
    calls = []
    real = sweep.accuracy

    def counting(task, model, processor, n, batch):
        calls.append(n)
        return real(task, model, processor, n, batch)

    monkeypatch.setattr(sweep, "accuracy", counting)
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
    assert cells[2]["llm_tflops"] < cells[1]["llm_tflops"] < cells[0]["llm_tflops"]
    assert cells[2]["visual_tokens"] == round(0.25 * 196)
    rows = list(csv.reader((tmp_path / "results.csv").open()))
    assert rows[0][:3] == ["method", "ratio", "accuracy"] and len(rows) == 4
    for name in ("accuracy_vs_ratio.png", "accuracy_vs_tflops.png", "latency_vs_ratio.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_sweep_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="ratios"):
        sweep.run("tiny-llava", ["random"], [1.5], "shapes", tmp_path, random_weights=True)
    with pytest.raises(ValueError, match="unknown strategies"):
        sweep.run("tiny-llava", ["nope"], [0.5], "shapes", tmp_path, random_weights=True)


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
            "--questions", "6", "--batch", "3", "--out", str(tmp_path)]
    assert main(argv) == 0 and main(argv) == 0  # the second run resumes: no new cell
    assert (tmp_path / "commands.txt").read_text().splitlines() == ["vtprune " + " ".join(argv)] * 2
    assert len((tmp_path / "cells.jsonl").read_text().splitlines()) == 2
    assert any(line.startswith("| random | ") for line in capsys.readouterr().out.splitlines())
