"""benchmarks/gpu_figures.sh's `vtprune bench` parts, run on the CPU exactly as written there (only the
full-scale configs shrunk, float32 and one repetition), so that a scarce GPU session does not find a
broken command. Timings are not asserted; the rows, kept tokens and KV bytes are."""
import json
import pathlib
import re
import shlex

import pytest
import torch

from vtprune.eval import configs

ROOT = pathlib.Path(__file__).resolve().parents[2]


def bench_parts() -> dict[str, list[str]]:
    """{part name: its `vtprune bench ...` arguments} as the script writes them."""
    text = (ROOT / "benchmarks" / "gpu_figures.sh").read_text().replace("\\\n", " ")
    return {m.group(1): shlex.split(m.group(2)) for m in re.finditer(r"part (\w+) vtprune (bench .*?) ;;", text)}


@pytest.fixture
def small_full_scale(monkeypatch):
    """The full-scale LLaVA configs with the same structure (CLIP-L/336's 24 x 24 patches, anyres tiles,
    vocabulary and token ids) but narrow, with 4 text and 2 vision layers, in float32 on the CPU."""
    monkeypatch.setattr(configs, "LLAMA2_7B", {**configs.LLAMA2_7B, "hidden_size": 64, "intermediate_size": 128,
                                               "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 4})
    monkeypatch.setattr(configs, "CLIP_L336", {**configs.CLIP_L336, "hidden_size": 32, "intermediate_size": 64,
                                               "num_hidden_layers": 2, "num_attention_heads": 2, "projection_dim": 32})
    build = configs.build
    monkeypatch.setattr(configs, "build", lambda name, device=None, dtype=None, attn="sdpa":
                        build(name, device, dtype or torch.float32, attn))


def test_the_script_names_the_bench_parts():
    assert sorted(bench_parts()) == ["bench_llava15_7b", "bench_llava15_7b_compiled", "bench_llava_next_7b"]


@pytest.mark.parametrize("part", ["bench_llava15_7b", "bench_llava15_7b_compiled", "bench_llava_next_7b"])
def test_gpu_bench_part_runs_on_the_cpu(part, small_full_scale, tmp_path):
    from vtprune.cli import main

    args = bench_parts()[part]
    i = args.index("--out")
    assert args[i + 1] == f"results/{part}.json"
    out = tmp_path / f"{part}.json"
    args[i + 1] = str(out)
    fast = ["--reps", "1", "--new-tokens", "2"] + (["--compile-backend", "eager", "--compile-warmup", "1"]
                                                  if "--compile" in args else [])
    assert main(args + fast) == 0
    rows = json.loads(out.read_text())["rows"]
    methods = ["unpatched"] + args[args.index("--methods") + 1].split(",")
    batches = [int(b) for b in args[args.index("--batch") + 1].split(",")]
    paths = ["eager", "compiled"] if "--compile" in args else ["eager"]
    assert [(r["batch"], r["path"], r["method"]) for r in rows] == [(b, p, m) for b in batches for p in paths for m in methods]
    for r in rows:
        base = next(x for x in rows if x["batch"] == r["batch"] and x["path"] == r["path"] and x["method"] == "unpatched")
        if r["method"] == "unpatched":
            continue
        if "--keep" in args:
            assert r["visual_tokens"] == int(args[args.index("--keep") + 1])
        else:  # LLaVA-NeXT at 11 %: 2928 visual tokens (2 x 2 tiles + base + newlines) -> 11 % of them
            assert r["visual_tokens"] == round(0.111 * base["visual_tokens"]) and base["visual_tokens"] > 2000
        assert r["kv_bytes"] < base["kv_bytes"]
