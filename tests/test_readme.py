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
               if f.name not in ("keep", "ratio", "keep_positions", "pixel_mean", "pixel_std", "accumulate_from")]
        for opt in own:
            assert f"`{opt}`" in table[name], f"{name}: option {opt} missing from the README table"
        assert get_method(name).paper or "baseline" in table[name]


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
