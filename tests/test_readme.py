"""README examples marked '# runs as written' must run and print what the README says."""
import contextlib
import io
import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_runnable_readme_examples():
    blocks = [b for b in re.findall(r"```python\n(.*?)```", README.read_text(), re.S) if b.startswith("# runs as written")]
    assert blocks, "README has no runnable example"
    for code in blocks:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(code, "README.md", "exec"), {})
        for line in code.splitlines():  # "print(...)   # expected output" comments are checked
            if line.startswith("print(") and "#" in line:
                assert line.split("#", 1)[1].strip() in out.getvalue()


def test_readme_lists_every_strategy_with_options_and_paper():
    import dataclasses

    import vtprune
    from vtprune.methods.registry import get_method
    table = {row.split("|")[1].strip(" `"): row for row in README.read_text().splitlines() if row.startswith("| `")}
    for name in ("divprune", "hiprune", "todre", "transprune", "vflowopt", "token_shuffle", "random", "pool", "fastv"):
        assert name in vtprune.available() and name in table, name
        own = [f.name for f in dataclasses.fields(get_method(name).Config)
               if f.name not in ("keep", "ratio", "keep_positions", "video_budget", "pixel_mean", "pixel_std",
                                 "accumulate_from")]
        for opt in own:
            assert f"`{opt}`" in table[name], f"{name}: option {opt} missing from the README table"
        assert get_method(name).paper or "baseline" in table[name]
    for common in ("keep_positions", "video_budget"):  # every strategy's: in the options paragraph
        assert f"`{common}=" in README.read_text(), common


def test_demo_command_prints_table():
    from vtprune.cli import main
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["demo", "--plumbing", "--families", "llava", "--ratios", "1.0,0.25"]) == 0
    rows = [l for l in out.getvalue().splitlines() if l.startswith("llava")]
    import vtprune
    assert len(rows) == 2 * len(vtprune.available())  # every registered strategy x 2 ratios
    for row in rows:
        if " 1.000 " in row:
            assert row.split()[-2:] == ["1.00", "1.00"]  # keep-all agrees with the unpruned model


def test_demo_plumbing_columns_by_hand(monkeypatch):
    """The --plumbing row of a strategy at a ratio: tiny llava batch 0-3 holds 4 x 16 image tokens in
    sequences of 22, 25, 26 and 29 tokens (29 padded); at 0.25 each image keeps round(0.25 x 16) = 4, so
    64->16 visual tokens and 29->17 positions. The prefill column is pruned / unpruned (a stand-in timer
    gives the sequence length as its milliseconds)."""
    import torch

    import vtprune.demo as demo

    def length_as_ms(model, inputs, reps=3):
        with torch.no_grad():
            return float(model(**inputs).logits.shape[1])

    monkeypatch.setattr(demo, "available", lambda: ["random"])
    monkeypatch.setattr(demo.sweep, "prefill_ms", length_as_ms)
    out = io.StringIO()
    rows = demo.run(families=("llava",), ratios=(1.0, 0.25), new_tokens=2, out=out)
    assert [(r["method"], r["ratio"], r["visual"], r["seq"], r["prefill_ms"], r["base_ms"]) for r in rows] == [
        ("random", 1.0, "64->64", "29->29", 29.0, 29.0), ("random", 0.25, "64->16", "29->17", 17.0, 29.0)]
    assert rows[0]["top1"] == rows[0]["gen"] == 1.0
    printed = [line.split() for line in out.getvalue().splitlines() if line.startswith("llava")]
    assert [p[:5] + p[6:9] for p in printed] == [  # (p[5]: the selection time)
        ["llava", "random", "1.000", "64->64", "29->29", "29.0", "/", "29.0"],
        ["llava", "random", "0.250", "64->16", "29->17", "17.0", "/", "29.0"]]


def test_reproduce_doc_model_args_build():
    """Every `run NAME "MODEL_ARGS" TASKS` line of docs/reproduce.md (shell variables expanded) names a
    strategy whose options, budget included, build: a paper command must not fail on its arguments."""
    import ast

    from vtprune.methods.registry import build_method

    doc = README.parent / "docs" / "reproduce.md"
    env, runs = {}, []
    for block in re.findall(r"```bash\n(.*?)```", doc.read_text(), re.S):
        for line in block.splitlines():
            if m := re.match(r"^([A-Z])=(\S+)", line):
                env[m.group(1)] = m.group(2)
                continue
            loop = re.match(r"^for (\w) in ([^;]*); do (.*); done", line)  # for k in 192 128; do run ...; done
            bodies = [loop.group(3).replace("$" + loop.group(1), v) for v in loop.group(2).split()] if loop else [line]
            for body in bodies:
                for args in re.findall(r'(?:^|; )run \S+\s+"([^"]*)"', body):
                    runs.append(re.sub(r"\$([A-Z])", lambda v: env[v.group(1)], args))
    methods = set()
    for args in runs:
        kv = dict(item.split("=", 1) for item in re.split(r",(?![^\[]*\])", args))
        method = kv.pop("method", None)
        if method is None:
            continue
        options = {}
        for k, v in kv.items():
            if k in ("pretrained", "dtype", "attn", "config", "max_frames_num"):  # the model's, not the method's
                continue
            try:
                options[k] = ast.literal_eval(v)
            except (ValueError, SyntaxError):
                options[k] = v
        build_method(method, options)
        methods.add(method)
    assert methods >= {"divprune", "hiprune", "todre", "transprune", "vflowopt", "fastv"} and len(runs) == 21
