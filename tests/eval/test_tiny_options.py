"""benchmarks/tiny_options.py: a strategy with its defaults and with given options, side by side."""
import json
import os
import pathlib
import subprocess
import sys

import pytest

import vtprune
from vtprune.eval import tinyvlm


def test_tiny_options_rows_match_patching_by_hand(tmp_path, benchmark_script):
    bench = benchmark_script("tiny_options")
    out = tmp_path / "o.json"
    result = bench.main(["--model", "tiny-llava", "--method", "hiprune", "--ratios", "0.25", "--option", "object_layer=2",
                         "--option", "deep_layer=2", "--questions", "12", "--out", str(out)])
    assert json.loads(out.read_text()) == result
    assert result["command"].startswith("python benchmarks/tiny_options.py --model tiny-llava --method hiprune")
    assert [(r["ratio"], r["options"]) for r in result["rows"]] == [(0.25, {}), (0.25, {"object_layer": 2, "deep_layer": 2})]
    model, proc = tinyvlm.load("tiny-llava")
    for row in result["rows"]:  # the same numbers as patching by hand
        vtprune.patch(model, "hiprune", ratio=0.25, **row["options"])
        rep = tinyvlm.evaluate(model, proc, 12)
        vtprune.unpatch(model)
        assert (row["overall"], row["by_kind"]) == (rep["overall"], rep["by_kind"])


def test_tiny_options_rejects_bad_input(tmp_path, benchmark_script):
    bench = benchmark_script("tiny_options")
    args = ["--model", "tiny-llava", "--method", "hiprune", "--questions", "6", "--out", str(tmp_path / "o.json")]
    with pytest.raises(SystemExit):
        bench.main(args)  # nothing to compare with the defaults
    with pytest.raises(SystemExit):
        bench.main(args + ["--option", "object_layer"])
    with pytest.raises(Exception, match="no_such_option"):
        bench.main(args + ["--option", "no_such_option=1"])
    assert not (tmp_path / "o.json").exists()


def test_tiny_options_runs_as_a_script(tmp_path):
    """`python benchmarks/tiny_options.py` has benchmarks/ on the path, where kernels.py would shadow the
    `kernels` package that transformers imports when it loads the model."""
    root = pathlib.Path(__file__).resolve().parents[2]
    out = tmp_path / "o.json"
    subprocess.run([sys.executable, "benchmarks/tiny_options.py", "--model", "tiny-llava", "--method", "random",
                    "--ratios", "0.5", "--option", "seed=1", "--questions", "6", "--out", str(out)],
                   cwd=root, env={**os.environ, "HF_HUB_OFFLINE": "1"}, check=True, capture_output=True, timeout=600)
    assert [r["options"] for r in json.loads(out.read_text())["rows"]] == [{}, {"seed": 1}]
