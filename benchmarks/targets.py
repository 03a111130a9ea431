"""The issues' GPU targets, checked against the figures benchmarks/gpu_figures.sh wrote into results/.

  python benchmarks/targets.py                          # reads results/, prints the table
  python benchmarks/targets.py --out results/targets.md # and writes it (with the command) as markdown

One line per target: the issue, what is measured, the value, the bar, and met / MISSED / missing (the file
or row it needs is not there: a part that failed or was cut short). Nothing is measured here; every value
comes from a row of a committed JSON, named in the line. The FLOPs bar of the LLaVA-1.5-7B target (prefill
speed-up >= 90 % of the LLM FLOPs ratio) is computed here with `vtprune flops` on the bench rows' model,
budget and strategy.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent  # off the path: benchmarks/kernels.py would shadow the `kernels` package
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(HERE.parent))


def _load(results: Path, name: str):
    path = results / name
    return json.loads(path.read_text()) if path.exists() else None


def with_selection(row: dict) -> float:
    """The prefill plus the selection run before the language model (JSON written before the field existed:
    its selection counted whole unless the strategy selects inside the decoder)."""
    if "prefill_with_selection_ms" in row:
        return row["prefill_with_selection_ms"]
    from vtprune.methods.registry import get_method

    inside = row["method"] != "unpatched" and get_method(row["method"]).stage == "llm"
    return row["prefill_ms"] + (0.0 if inside else row["selection_ms"])


def flops_ratios(model: str, method: str, options: dict) -> dict:
    """Unpatched over pruned LLM prefill FLOPs (dense attention) and pruned over unpatched KV-cache bytes, from
    `vtprune flops` on one sample of the bench's synthetic prompt."""
    from vtprune.cli import main

    argv = ["flops", "--model", model, "--method", method]
    for k, v in options.items():
        argv += [f"--{k}", str(v)]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "f.json"
        with contextlib.redirect_stdout(io.StringIO()):
            if main(argv + ["--json", str(out)]) != 0:
                raise RuntimeError(f"vtprune {' '.join(argv)} failed")
        rec = json.loads(out.read_text())
    base, pruned = rec["unpatched"], rec["pruned"]
    return {"llm": base["llm_prefill"] / pruned["llm_prefill"], "kv": pruned["kv_bytes"] / base["kv_bytes"]}


def _rows(rec, batch, path="eager"):
    """{method: row} of one batch size and path of a bench record."""
    return {r["method"]: r for r in (rec or {}).get("rows", []) if r["batch"] == batch and r.get("path", "eager") == path}


def runs(row: dict, base: dict) -> str:
    """The spread of the timed prefill runs behind a speed-up (bench JSON since the field existed), e.g.
    "; prefill runs 4.10-4.30 ms (5 runs) vs unpatched 18.0-18.9 ms (5 runs)" (a row of a run cut short may
    have fewer); "" without it."""
    spread = [r.get("spread", {}).get("prefill") for r in (row, base)]
    if not all(spread):
        return ""
    (lo, hi), (blo, bhi) = spread
    n = [f" ({r['runs']} runs)" if r.get("runs") else "" for r in (row, base)]  # (bench JSON since interleaving)
    return f"; prefill runs {lo:.2f}-{hi:.2f} ms{n[0]} vs unpatched {blo:.2f}-{bhi:.2f} ms{n[1]}"


def check(results: Path, flops=flops_ratios) -> list[dict]:
    """Every target as a dict: issue, target, source, value, bar, verdict ("met", "MISSED", "missing")."""
    from vtprune.methods.registry import get_method

    out = []

    def add(issue, target, source, value, bar, ok, fmt="{:.3f}"):
        out.append(dict(issue=issue, target=target, source=source,
                        value=None if value is None else fmt.format(value), bar=bar,
                        verdict="missing" if value is None else ("met" if ok else "MISSED")))

    # issue 6: the kernels
    k = _load(results, "kernels_gpu.json") or {}
    greedy = {(r["n"], r["keep"], r["d"], r["batch"]): r for r in k.get("greedy", [])}
    for (n, keep, d, b), bar in (((576, 64, 4096, 1), 0.08), ((2880, 320, 4096, 1), 0.5), ((2880, 320, 4096, 8), 2.0)):
        r = greedy.get((n, keep, d, b))
        extra = f" (x{r['speedup']:.1f} the torch reference's speed; same indices: {r['same_indices']})" if r else ""
        add(6, f"DivPrune selection, N={n} keep={keep} D={d} batch {b}, ms", f"kernels_gpu.json greedy{extra}",
            r and r["triton_ms"], f"<= {bar}", r is not None and r["triton_ms"] <= bar and r["same_indices"])
    tower = (k.get("tower") or [None])[0]
    add(6, "HiPrune tower + signals: time over plain SDPA", "kernels_gpu.json tower",
        tower and tower["tower_time_ratio"], "<= 1.05", tower is not None and tower["tower_time_ratio"] <= 1.05)
    peak = tower and tower.get("tower_peak_ratio")
    add(6, "HiPrune tower + signals: peak memory over plain SDPA", "kernels_gpu.json tower",
        peak, "<= 1.10", peak is not None and peak <= 1.10)
    e2e = (k.get("e2e") or [None])[0]
    share = e2e and e2e.get("selection_share_of_saved")
    add(6, "DivPrune selection / prefill saved, LLaVA-1.5-7B batch 1, eager", "kernels_gpu.json e2e",
        share, "<= 0.02", share is not None and 0 <= share <= 0.02)
    compiled = _load(results, "bench_llava15_7b_compiled.json")
    for path in ("compiled", "eager"):
        rows = _rows(compiled, 1, path)
        base, div = rows.get("unpatched"), rows.get("divprune")
        saved = base and div and base["prefill_ms"] - div["prefill_ms"]
        share = div["selection_ms"] / saved if saved and saved > 0 else None
        add(6, f"DivPrune selection / prefill saved, LLaVA-1.5-7B batch 1, {path}",
            f"bench_llava15_7b_compiled.json ({path} rows)", share, "<= 0.02", share is not None and share <= 0.02)

    # issue 7: bench
    rows8 = _rows(_load(results, "bench_llava15_7b.json"), 8)
    base = rows8.get("unpatched")
    pre = [name for name in rows8 if name != "unpatched" and get_method(name).stage != "llm"]
    for name in pre or [None]:
        r = rows8.get(name)
        ratios = flops("llava-1.5-7b", name, r["options"]) if r else None
        speedup = base["prefill_ms"] / r["prefill_ms"] if base and r else None
        extra = f" (x{base['prefill_ms'] / with_selection(r):.2f} with selection{runs(r, base)})" if speedup else ""
        add(7, f"{name or 'each pre-LLM strategy'}: LLaVA-1.5-7B prefill speed-up, 64/576, batch 8",
            f"bench_llava15_7b.json{extra}", speedup,
            f">= {0.9 * ratios['llm']:.2f} (0.9 x LLM FLOPs)" if ratios else ">= 0.9 x LLM FLOPs",
            speedup is not None and speedup >= 0.9 * ratios["llm"], "{:.2f}x")
        kv = r["kv_bytes"] / base["kv_bytes"] if base and r else None
        add(7, f"{name or 'each strategy'}: KV-cache bytes over unpatched, batch 8", "bench_llava15_7b.json", kv,
            f"= {ratios['kv']:.4f} (kept tokens, `vtprune flops`)" if ratios else "= kept tokens",
            kv is not None and abs(kv - ratios["kv"]) <= 1e-3)
    for rec, batch, path, target, bar, speedup_of in (
            ("bench_llava_next_7b.json", 4, "eager", "LLaVA-NeXT-7B prefill speed-up incl. selection, 2880->320, "
             "batch 4", 7.0, with_selection),
            ("bench_llava15_7b_compiled.json", 1, "compiled", "compiled path LLM prefill speed-up, 64/576, batch 1",
             2.5, lambda r: r["prefill_ms"])):
        rows = _rows(_load(results, rec), batch, path)
        base = rows.get("unpatched")
        for name in [n for n in rows if n != "unpatched"] or [None]:
            speedup = base["prefill_ms"] / speedup_of(rows[name]) if base and name else None
            add(7, f"{name or 'each strategy'}: {target}",
                f"{rec} ({path} rows{runs(rows[name], base) if speedup else ''})", speedup, f">= {bar}",
                speedup is not None and speedup >= bar, "{:.2f}x")

    # issue 10: no numeric bar; the throughput ratios are reported
    vit = _load(results, "vit_gpu.json")
    for r in (vit or {}).get("rows", []):
        if r["method"] not in ("none", "none (again)"):
            add(10, f"{r['model']}: {r['method']} at {r['ratio']}, images/s over unpatched", "vit_gpu.json",
                r["speedup"], "(reported)", True, "{:.2f}x")
    if vit is None:
        add(10, "ViT images/s over unpatched", "vit_gpu.json", None, "(reported)", False)
    return out


def markdown(lines: list[dict], command: str) -> str:
    head = "| issue | target | value | bar | verdict | from |\n|---|---|---|---|---|---|"
    body = [f"| {t['issue']} | {t['target']} | {t['value'] or '-'} | {t['bar']} | {t['verdict']} | {t['source']} |"
            for t in lines]
    return "\n".join([f"`{command}`", "", head, *body]) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", default="results", help="the folder gpu_figures.sh wrote (default: results)")
    ap.add_argument("--out", help="also write the table here (markdown)")
    args = ap.parse_args(argv)
    lines = check(Path(args.results))
    text = markdown(lines, " ".join(["python benchmarks/targets.py", *(argv if argv is not None else sys.argv[1:])]))
    print(text, end="")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    counts = {v: sum(t["verdict"] == v for t in lines) for v in ("met", "MISSED", "missing")}
    print(", ".join(f"{n} {v}" for v, n in counts.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
