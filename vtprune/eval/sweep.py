"""`vtprune sweep`: every strategy x kept ratio on a task -> results (JSONL/CSV/JSON) and plots.

Each cell (strategy, ratio) records accuracy on the task, analytic prefill FLOPs and the median
prefill latency of one batch. Tasks: the bundled `shapes` benchmark (ShapesCells), or any lmms-eval
task, vtprune's offline `vtprune_shapes` included, through lmms-eval's Python API (LmmsCells). Finished cells are appended to
OUT/cells.jsonl as they complete, so an interrupted sweep resumes where it stopped (a cell is
identified by model, task, question count, strategy and ratio). The unpatched model is one more cell
(ratio 1.0, strategy "none"). Plots: accuracy vs kept ratio, accuracy vs prefill TFLOPs with the
Pareto front marked, prefill latency vs kept ratio.
"""
from __future__ import annotations

import csv
import json
import statistics
import time
from pathlib import Path

import torch

from . import flops

UNPATCHED = "none"


def prefill_ms(model, inputs, reps: int = 3) -> float:
    """Median wall time of a prefill (one forward, last-position logits) over `reps` runs after one
    warm-up run; synchronised on CUDA."""
    times = []
    cuda = next(model.parameters()).is_cuda
    with torch.no_grad():
        for _ in range(reps + 1):
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            model(**inputs, logits_to_keep=1)
            if cuda:
                torch.cuda.synchronize()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times[1:])  # the first run warms up


def accuracy(task: str, model, processor, n_questions: int, batch: int) -> dict:
    if task == "shapes":
        from . import tinyvlm

        return tinyvlm.evaluate(model, processor, n_questions, batch_size=batch)
    raise ValueError(f"unknown task {task!r}; available: shapes, or an lmms-eval task (pip install 'vtprune[eval]')")


class ShapesCells:
    """Cells on the bundled `shapes` benchmark (vtprune.eval.tinyvlm): accuracy on the held-out
    questions; FLOPs and prefill latency on one batch of its calibration split."""

    def __init__(self, model_name: str, task: str, n_questions: int, batch: int, random_weights: bool):
        from . import models

        self.task, self.n_questions, self.batch = task, n_questions, batch
        self.model, self.processor = models.load(model_name, random_weights=random_weights)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = self.model.to(self.device)
        n = min(batch, n_questions)  # the FLOPs / latency sample: one batch of the task's calibration split
        self.sample = models.to_model(models.calibration(task, self.model, self.processor, n, batch_size=n)[0], self.model)

    def cell(self, method: str, ratio: float) -> dict:
        import vtprune

        if method == UNPATCHED:
            acc = accuracy(self.task, self.model, self.processor, self.n_questions, self.batch)
            report, ms = flops.count(self.model, self.sample), prefill_ms(self.model, self.sample)
        else:
            with vtprune.pruned(self.model, method, ratio=ratio):
                acc = accuracy(self.task, self.model, self.processor, self.n_questions, self.batch)
                ms = prefill_ms(self.model, self.sample)
            report = flops.count(self.model, self.sample, method, ratio=ratio)
        return {"accuracy": acc["overall"], "by_kind": acc["by_kind"], "prefill_tflops": report.total_prefill / 1e12,
                "llm_tflops": report.llm_prefill / 1e12,
                "visual_tokens": sum(report.visual_tokens) / len(report.visual_tokens), "prefill_ms": ms}


class LmmsCells:
    """Cells on an lmms-eval task, through lmms-eval's Python API (`simple_evaluate` with one
    vtprune.eval.lmms model re-patched per cell). Accuracy is the task's `accuracy` metric, else its
    first one; every metric is kept under "by_kind". FLOPs and visual tokens are the per-sample means
    of the cell's own generations; latency is a prefill of the cell's first batch."""

    def __init__(self, model_name: str, task: str, n_questions: int, batch: int, random_weights: bool):
        try:
            from lmms_eval.evaluator import simple_evaluate
            from lmms_eval.tasks import TaskManager
        except ImportError:
            raise ValueError(f"task {task!r} is not 'shapes': lmms-eval tasks need pip install 'vtprune[eval]'") from None
        from . import lmms

        self.evaluate, self.task, self.n_questions = simple_evaluate, task, n_questions
        # vtprune's own tasks need no index of lmms-eval's ~2,000 built-in ones
        self.tasks = TaskManager("WARNING", include_path=str(lmms.TASKS), include_defaults=not task.startswith("vtprune_"))
        if task not in self.tasks.all_tasks:
            raise ValueError(f"lmms-eval has no task {task!r} (vtprune's: vtprune_shapes, vtprune_shapes_dynres)")
        self.lm = lmms.Vtprune(pretrained=model_name, batch_size=batch, random_weights=random_weights)
        self.lm.reuse = True
        self.device = self.lm.device.type

    def cell(self, method: str, ratio: float) -> dict:
        import vtprune

        lm = self.lm
        if method == UNPATCHED:
            vtprune.unpatch(lm.model)
            lm.method, lm.options = None, {}
        else:
            vtprune.patch(lm.model, method, ratio=ratio)
            lm.method, lm.options = method, {"ratio": ratio}
        lm.records, lm.first_inputs = [], None
        res = self.evaluate(model=lm, tasks=[self.task], task_manager=self.tasks, limit=self.n_questions,
                            log_samples=False, bootstrap_iters=0, verbosity="WARNING")
        metrics = {k.split(",")[0]: v for k, v in res["results"][self.task].items()
                   if isinstance(v, (int, float)) and v == v and "_stderr" not in k}  # NaN: no such item
        if not metrics:
            raise ValueError(f"lmms-eval task {self.task!r} reported no numeric metric")
        s = lm.summary()
        ms = prefill_ms(lm.model, lm.first_inputs)
        vtprune.unpatch(lm.model)
        primary = "accuracy" if "accuracy" in metrics else next(iter(metrics))
        return {"accuracy": metrics.pop(primary), "by_kind": metrics,
                "prefill_tflops": s["prefill_tflops"], "llm_tflops": s["llm_prefill_tflops"],
                "visual_tokens": s["visual_after"], "prefill_ms": ms}


def _key(cell: dict) -> tuple:
    return cell["model"], cell["task"], cell["questions"], cell["method"], float(cell["ratio"])


def run(model_name: str, methods: list[str], ratios: list[float], task: str, out: str | Path,
        n_questions: int = 1200, batch: int = 32, random_weights: bool = False, progress: bool = True) -> list[dict]:
    """Run the missing cells, then write OUT/results.{json,csv} and the plots; returns every cell."""
    from tqdm.auto import tqdm

    import vtprune

    for r in ratios:
        if not 0 < r <= 1:
            raise ValueError(f"ratios must be in (0, 1], got {r}")
    unknown = [m for m in methods if m not in vtprune.available()]
    if unknown:
        raise ValueError(f"unknown strategies {unknown}; available: {', '.join(vtprune.available())}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "cells.jsonl"
    done = {}
    if log.exists():
        for line in log.read_text().splitlines():
            if line.strip():
                cell = json.loads(line)
                done[_key(cell)] = cell
    todo = [(UNPATCHED, 1.0)] + [(m, r) for m in methods for r in ratios]
    base = dict(model=model_name, task=task, questions=n_questions)
    missing = [(m, r) for m, r in todo if _key({**base, "method": m, "ratio": r}) not in done]
    if missing:
        cells_of = ShapesCells if task == "shapes" else LmmsCells
        runner = cells_of(model_name, task, n_questions, batch, random_weights)
        with tqdm(total=len(missing), desc="sweep", unit="cell", disable=not progress) as bar:
            for method, ratio in missing:
                bar.set_postfix_str(f"{method} {ratio:g}")
                cell = {**base, "method": method, "ratio": ratio, **runner.cell(method, ratio), "batch": batch,
                        "device": runner.device}
                with log.open("a") as f:
                    f.write(json.dumps(cell) + "\n")
                done[_key(cell)] = cell
                bar.update(1)
    cells = [done[_key({**base, "method": m, "ratio": r})] for m, r in todo]
    write(cells, out)
    return cells


def write(cells: list[dict], out: Path) -> None:
    (out / "results.json").write_text(json.dumps(cells, indent=1) + "\n")
    cols = ["method", "ratio", "accuracy", "prefill_tflops", "llm_tflops", "visual_tokens", "prefill_ms"]
    with (out / "results.csv").open("w", newline="") as f:
        w = csv.writer(f)
        extra = sorted({k for c in cells for k in c["by_kind"]})
        w.writerow(cols + extra)
        for c in cells:
            w.writerow([c[k] for k in cols] + [c["by_kind"].get(k, "") for k in extra])
    plot(cells, out)


def pareto(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats (cost x lower or equal and value y higher or equal,
    one of them strictly), sorted by cost."""
    front = []
    for i, (x, y) in enumerate(points):
        beaten = any((x2 <= x and y2 >= y) and (x2 < x or y2 > y) for x2, y2 in points)
        if not beaten:
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def plot(cells: list[dict], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m in dict.fromkeys(c["method"] for c in cells) if m != UNPATCHED]
    full = next((c for c in cells if c["method"] == UNPATCHED), None)
    paths = []
    for name, xkey, ykey, xlabel, ylabel in (
            ("accuracy_vs_ratio.png", "ratio", "accuracy", "kept visual-token ratio", "accuracy"),
            ("accuracy_vs_tflops.png", "prefill_tflops", "accuracy", "prefill TFLOPs (analytic)", "accuracy"),
            ("latency_vs_ratio.png", "ratio", "prefill_ms", "kept visual-token ratio", "prefill ms (median)")):
        fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
        for m in methods:
            pts = sorted((c[xkey], c[ykey]) for c in cells if c["method"] == m)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m)
        if full is not None:
            ax.axhline(full[ykey], color="grey", linestyle="--", label="unpatched")
        if name == "accuracy_vs_tflops.png":
            pts = [(c[xkey], c[ykey]) for c in cells]
            front = pareto(pts)
            ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], color="black", linewidth=2.5, alpha=0.35,
                    label="Pareto front")
        if ykey == "accuracy":
            ax.set_ylim(0, 1.02)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / name)
        plt.close(fig)
        paths.append(out / name)
    return paths


def table(cells: list[dict]) -> str:
    """Markdown: one row per strategy, accuracy per ratio."""
    ratios = sorted({c["ratio"] for c in cells if c["method"] != UNPATCHED}, reverse=True)
    lines = ["| strategy | " + " | ".join(f"{r:g}" for r in ratios) + " |", "|---|" + "---|" * len(ratios)]
    full = next((c for c in cells if c["method"] == UNPATCHED), None)
    if full is not None:
        lines.append(f"| unpatched | {full['accuracy']:.3f} |" + " |" * (len(ratios) - 1))
    for m in dict.fromkeys(c["method"] for c in cells if c["method"] != UNPATCHED):
        acc = {c["ratio"]: c["accuracy"] for c in cells if c["method"] == m}
        lines.append(f"| {m} | " + " | ".join(f"{acc[r]:.3f}" if r in acc else "" for r in ratios) + " |")
    return "\n".join(lines)
