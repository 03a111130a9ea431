"""`vtprune sweep`: every strategy x kept ratio on a task -> results (JSONL/CSV/JSON) and plots.

Each cell (strategy, ratio) records accuracy on the task, analytic prefill FLOPs and visual tokens
per sample (cell keys `prefill_tflops`, `llm_tflops`, `visual_tokens`; the `_per_sample` columns of
results.csv) and the median prefill latency of one batch (`prefill_ms`); `accuracy` holds the metric
named in `metric` (accuracy on shapes; on lmms-eval the task's `accuracy`, else its first metric). Tasks: the bundled `shapes`
benchmark (ShapesCells), or any lmms-eval task, vtprune's offline `vtprune_shapes` included, through
lmms-eval's Python API (LmmsCells). Finished cells are appended to OUT/cells.jsonl as they complete,
so an interrupted sweep resumes where it stopped. A cell is reused only when it was made with the same
settings: model, task, question count, --random-weights, --batch, device (cpu/cuda), strategy and
ratio, in this cell format (FORMAT); a finished cell made with other settings, or by a vtprune before
FORMAT 2 (whose shapes TFLOPs were summed over the batch), is run again, with a warning. The unpatched
model is one more cell (ratio 1.0, strategy "none"). A preset (`presets`: a method with its own options, e.g.
a tuned VFlowOpt) is a row of its own: its cells hold the options and a label, and the sweep's ratio replaces
the preset's budget; options are part of a cell's identity. Plots: accuracy vs kept ratio, accuracy vs prefill
TFLOPs per sample with the Pareto front marked, prefill latency vs kept ratio.
"""
from __future__ import annotations

import csv
import fnmatch
import functools
import hashlib
import json
import os
import statistics
import time
import warnings
from pathlib import Path

import torch

from . import flops, models
from .paths import check_output

UNPATCHED = "none"
FORMAT = 2  # OUT/cells.jsonl cell format: 2 = per-sample TFLOPs, random_weights recorded (none before)
SETTINGS = ("random_weights", "batch", "device")  # besides model, task and questions: what makes an experiment
CELL_KEYS = ("model", "task", "questions", *SETTINGS, "method", "ratio", "accuracy", "prefill_tflops", "llm_tflops",
             "visual_tokens", "prefill_ms", "by_kind")  # what a cell of this FORMAT holds (besides its metric)


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


@functools.cache
def vtprune_names() -> frozenset[str]:
    """The model names vtprune.eval.models.load resolves before looking for a directory (read once: every
    logged cell's model name is checked against them)."""
    from . import configs, tinyvlm

    return frozenset(tinyvlm.NAMES) | frozenset(models.TEST_MODELS) | frozenset(configs.FULL_SCALE)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class ShapesCells:
    """Cells on the bundled `shapes` benchmark (vtprune.eval.tinyvlm): accuracy on the held-out
    questions; FLOPs (per-sample means) and prefill latency on one batch of its calibration split."""

    def __init__(self, model_name: str, task: str, n_questions: int, batch: int, random_weights: bool,
                 device: str | None = None):
        self.task, self.n_questions, self.batch = task, n_questions, batch
        self.model, self.processor = models.load(model_name, random_weights=random_weights)
        self.device = device or default_device()
        self.model = self.model.to(self.device)
        n = min(batch, n_questions)  # the FLOPs / latency sample: one batch of the task's calibration split
        self.sample = models.to_model(models.calibration(task, self.model, self.processor, n, batch_size=n)[0], self.model)
        self.patchable = self.model  # what the cells patch

    def cell(self, method: str, ratio: float, options: dict | None = None) -> dict:
        import vtprune

        if method == UNPATCHED:
            acc = accuracy(self.task, self.model, self.processor, self.n_questions, self.batch)
            report, ms = flops.count(self.model, self.sample), prefill_ms(self.model, self.sample)
        else:
            norm = models.pixel_norm(method, self.processor, given=options or {})
            with vtprune.pruned(self.model, method, ratio=ratio, **(options or {}), **norm):
                acc = accuracy(self.task, self.model, self.processor, self.n_questions, self.batch)
                ms = prefill_ms(self.model, self.sample)
            report = flops.count(self.model, self.sample, method, ratio=ratio, **(options or {}))
        n = len(report.visual_tokens)  # the report sums over the sample's batch; a cell holds per-sample means
        return {"accuracy": acc["overall"], "metric": "accuracy", "by_kind": acc["by_kind"],
                "prefill_tflops": report.total_prefill / n / 1e12,
                "llm_tflops": report.llm_prefill / n / 1e12, "visual_tokens": sum(report.visual_tokens) / n,
                "prefill_ms": ms}


class LmmsCells:
    """Cells on an lmms-eval task, through lmms-eval's Python API (`simple_evaluate` with one
    vtprune.eval.lmms model re-patched per cell). Accuracy is the task's `accuracy` metric, else its
    first one; every metric is kept under "by_kind". FLOPs and visual tokens are the per-sample means
    of the cell's own generations; latency is a prefill of the cell's first batch."""

    def __init__(self, model_name: str, task: str, n_questions: int, batch: int, random_weights: bool,
                 device: str | None = None):
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
            raise ValueError(f"lmms-eval has no task {task!r} (the bundled benchmark without lmms-eval: shapes; "
                             "vtprune's lmms-eval tasks: vtprune_shapes, vtprune_shapes_dynres, vtprune_shapes_mc, "
                             "vtprune_shapes_video)")
        self.lm = lmms.Vtprune(pretrained=model_name, batch_size=batch, random_weights=random_weights, device=device)
        self.lm.reuse = True
        self.patchable = self.lm.model
        self.device = self.lm.device.type

    def cell(self, method: str, ratio: float, options: dict | None = None) -> dict:
        import vtprune

        lm = self.lm
        if method == UNPATCHED:
            vtprune.unpatch(lm.model)
            lm.method, lm.options = None, {}
        else:
            norm = models.pixel_norm(method, lm.processor, given=options or {})
            vtprune.patch(lm.model, method, ratio=ratio, **(options or {}), **norm)
            lm.method, lm.options = method, {"ratio": ratio, **(options or {})}
        lm.records, lm.first_inputs = [], None
        try:
            res = self.evaluate(model=lm, tasks=[self.task], task_manager=self.tasks, limit=self.n_questions,
                                log_samples=False, bootstrap_iters=0, verbosity="WARNING")
        except Exception as e:  # noqa: BLE001 - only a dataset download failure is turned into a message
            cause = _download_failure(e)
            if cause is None:
                raise
            raise ValueError(f"lmms-eval could not load the dataset of task {self.task!r}: {cause} (offline, a "
                             "task's dataset must already be in the Hugging Face datasets cache; vtprune's own "
                             "tasks, vtprune_shapes*, need none)") from None
        metrics = {k.split(",")[0]: v for k, v in res["results"][self.task].items()
                   if isinstance(v, (int, float)) and v == v and "_stderr" not in k}  # NaN: no such item
        if not metrics:
            raise ValueError(f"lmms-eval task {self.task!r} reported no numeric metric")
        s = lm.summary()
        ms = prefill_ms(lm.model, lm.first_inputs)
        vtprune.unpatch(lm.model)
        primary = "accuracy" if "accuracy" in metrics else next(iter(metrics))
        return {"accuracy": metrics.pop(primary), "metric": primary, "by_kind": metrics,
                "prefill_tflops": s["prefill_tflops"], "llm_tflops": s["llm_prefill_tflops"],
                "visual_tokens": s["visual_after"], "prefill_ms": ms}


def _download_failure(error: BaseException) -> str | None:
    """The message of the ConnectionError behind an lmms-eval task load (wrapped in tenacity's RetryError
    after its retries), or None when the error is something else."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, ConnectionError):
            return str(error)
        last = getattr(error, "last_attempt", None)  # tenacity.RetryError
        error = (last.exception() if last is not None and last.failed else None) or error.__cause__ or error.__context__
    return None


def _ratio(value) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _options(cell: dict) -> str:
    """A cell's strategy options besides the ratio, as one string ({} for a plain strategy and cells before presets)."""
    return json.dumps(cell.get("options") or {}, sort_keys=True)


def _key(cell: dict) -> tuple:
    """What identifies a cell (of this FORMAT): the experiment's settings, strategy, its options and ratio."""
    return (_model(cell["model"]), cell.get("weights"), cell["task"], cell["questions"], *(cell[k] for k in SETTINGS),
            cell["method"], _options(cell), float(cell["ratio"]))


def _cell_of(cell: dict) -> tuple:
    """The cell alone, whatever its settings or format: model, task, strategy, options, ratio."""
    return _model(cell.get("model")), cell.get("task"), cell.get("method"), _options(cell), _ratio(cell.get("ratio"))


def label(cell: dict) -> str:
    """A cell's row in the table and line in the plots: its strategy, or its preset's label."""
    return "unpatched" if cell["method"] == UNPATCHED else cell.get("label") or cell["method"]


def _model(name):
    """A cell's model as one spelling: dir, dir/ and ./dir are one (cells logged before vtprune wrote
    the normalised name included). A folder spelled like one of vtprune's names (./tiny-llava) stays a
    path, ./tiny-llava: as `tiny-llava` it would load (and share cells with) the bundled model."""
    if not isinstance(name, str) or not name or name in vtprune_names():
        return name
    norm = os.path.normpath(name)
    return os.path.join(".", norm) if norm in vtprune_names() else norm


WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth")
# the files besides the weights that change what a model answers: its config, generation defaults, and what
# its processor and tokenizer read (image/video preprocessing, vocabulary, chat template)
SETTINGS_FILES = ("config.json", "generation_config.json", "*processor_config.json", "tokenizer*", "chat_template*",
                  "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt")


def weights_id(model_name: str, random_weights: bool) -> str | None:
    """A fingerprint of the checkpoint a sweep's cells come from, so that cells made by other weights are
    not reused: a local directory's or a bundled model's weight files and SETTINGS_FILES (config, generation,
    processor and tokenizer files): names, sizes, and the bytes of small files or of 16 spread 64 KiB samples
    of large ones (hashing a 7B model's 15 GB whole would take minutes). None for built-in random-weight
    architectures; with --random-weights the weight files do not count."""
    from . import tinyvlm

    folder = tinyvlm.BUNDLED / model_name if model_name in tinyvlm.NAMES else Path(model_name)
    if (model_name in vtprune_names() and model_name not in tinyvlm.NAMES) or not folder.is_dir():
        return None
    h = hashlib.sha256()
    for f in sorted(folder.iterdir()):
        settings = any(fnmatch.fnmatch(f.name, pattern) for pattern in SETTINGS_FILES)
        if not f.is_file() or not (settings or f.suffix in WEIGHT_FILES and not random_weights):
            continue
        size = f.stat().st_size
        h.update(f"{f.name}\0{size}\0".encode())
        with f.open("rb") as fh:
            if size <= 16 << 20:
                h.update(fh.read())
            else:
                for i in range(16):
                    fh.seek(i * (size - (64 << 10)) // 15)
                    h.update(fh.read(64 << 10))
    return h.hexdigest()[:16]


def read_cells(log: Path) -> list[dict]:
    """The cells in OUT/cells.jsonl, in file order. An unparsable last line (a write cut short by a
    kill or a full disk) is removed from the file with a warning, so its cell runs again; an
    unparsable line before the last is an error naming the file and line."""
    log = Path(log)
    if not log.exists():
        return []
    data = log.read_bytes()
    cells, start, lineno = [], 0, 0
    while start < len(data):
        end = data.find(b"\n", start)
        end = len(data) if end < 0 else end + 1
        line, lineno = data[start:end], lineno + 1
        if line.strip():
            try:
                cell = json.loads(line)  # JSONDecodeError and UnicodeDecodeError are ValueErrors
                if not isinstance(cell, dict):
                    raise ValueError(f"a JSON {type(cell).__name__}, not an object")
            except ValueError as e:
                if data[end:].strip():
                    raise ValueError(f"{log}, line {lineno}: not a sweep cell ({e}); fix or delete that line "
                                     "(its cell then runs again)") from None
                warnings.warn(f"{log}, line {lineno}: skipped an unparsable last line, a write cut short? ({e}); "
                              "removed it from the file, its cell runs again", stacklevel=3)
                with log.open("r+b") as f:
                    f.truncate(start)
                    f.flush()
                    os.fsync(f.fileno())
                return cells
            missing = [k for k in CELL_KEYS if k not in cell] if cell.get("format") == FORMAT else []
            if missing:  # whole JSON, not a cut write: never removed
                raise ValueError(f"{log}, line {lineno}: not a sweep cell (no {', '.join(missing)}); fix or delete "
                                 "that line (its cell then runs again)")
            cells.append(cell)
        start = end
    if data and not data.endswith(b"\n"):  # a complete last cell without its newline: the next one goes below it
        _append(log, b"\n")
    return cells


def _append(log: Path, data: bytes) -> None:
    """Append `data` with one write call (repeated only for what a short write leaves), then fsync."""
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def _warn_not_reused(log: Path, logged: list[dict], base: dict, missing: list[dict]) -> None:
    """Warn when a cell about to run has a finished counterpart in OUT/cells.jsonl made with other
    settings or in an older format, which is not reused."""
    wanted = {_cell_of({**base, **m}) for m in missing}
    settings = ("questions", *SETTINGS, "weights")
    hit, why = set(), set()
    for c in logged:
        if _cell_of(c) not in wanted:
            continue
        if c.get("format") != FORMAT:
            why.add("written by an older vtprune (no random_weights recorded, TFLOPs summed over the batch)"
                    if "format" not in c else f"cell format {c['format']!r} (this vtprune writes {FORMAT})")
        elif any(c.get(k) != base[k] for k in settings):
            why.update(("other weights (the model's files differ, or were not recorded)" if k == "weights" else
                        f"{k}={c.get(k)!r}") for k in settings if c.get(k) != base[k])
        else:
            continue
        hit.add(_cell_of(c))
    if hit:
        now = ", ".join(f"{k}={base[k]!r}" for k in settings if k != "weights")
        warnings.warn(f"{log}: {len(hit)} of the {len(missing)} cells to run have finished cells there that are not "
                      f"reused, made with other settings: {'; '.join(sorted(why))} (this run: {now}); they run "
                      "again", stacklevel=3)


def run(model_name: str, methods: list[str], ratios: list[float], task: str, out: str | Path,
        n_questions: int = 1200, batch: int = 32, random_weights: bool = False, progress: bool = True,
        presets: list[tuple[str, dict, str]] = ()) -> list[dict]:
    """Run the missing cells, then write OUT/results.{json,csv} and the plots; returns every cell
    (repeated strategies, presets and ratios count once). `presets`: (method, options, label) rows beside
    `methods`, each at every ratio (options without a budget: the ratio is the sweep's)."""
    from tqdm.auto import tqdm

    import vtprune

    for r in ratios:
        if not 0 < r <= 1:
            raise ValueError(f"ratios must be in (0, 1], got {r}")
    if n_questions < 1 or batch < 1:
        raise ValueError(f"questions and batch must be >= 1, got {n_questions} and {batch}")
    unknown = [m for m in methods if m not in vtprune.available()]
    if unknown:
        raise ValueError(f"unknown strategies {unknown}; available: {', '.join(vtprune.available())}")
    from ..methods.registry import build_method

    rows = [dict(method=m) for m in methods]  # a plain strategy's cells hold neither label nor options
    for method, options, name in presets:
        defaults = build_method(method, {"ratio": 1.0})
        budget = defaults.Config.budget_fields
        given = sorted(set(options) & set(budget))
        if given:
            raise ValueError(f"preset {name!r}: the sweep's ratios are its budget; drop {', '.join(given)}")
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"a preset's label must be a non-empty string, got {name!r}")
        for r in ratios:  # options that fail at some ratio fail now, before the model loads
            built = build_method(method, {**options, "ratio": float(r)})
        # an option at its default is no option: such a preset shares the strategy's cells
        options = {k: v for k, v in options.items() if getattr(defaults.config, k) != getattr(built.config, k)}
        rows.append(dict(method=method, options=options, label=name) if options or name != method else dict(method=method))
    if not rows:
        raise ValueError("nothing to sweep: give strategies, presets or both")
    from . import configs

    if model_name in models.TEST_MODELS or model_name in configs.FULL_SCALE:
        raise ValueError(f"a sweep asks the model questions, and {model_name} has no processor: use tiny-llava, "
                         "tiny-qwen2vl or a local checkpoint directory (vtprune bench and vtprune flops take it)")
    first = {}
    for row in rows:  # a repeated strategy or preset: once, where it first came (a preset with a strategy's
        first.setdefault((row["method"], _options(row), label(row)), row)  # options: a row of its own, same cells)
    rows = list(first.values())
    names = [label(row) for row in rows]
    twice = sorted({n for n in names if names.count(n) > 1} | ({"unpatched"} & set(names)))
    if twice:
        raise ValueError(f"different rows are labelled alike: {', '.join(twice)}; name the presets apart")
    ratios = list(dict.fromkeys(float(r) for r in ratios))
    if os.path.isdir(model_name):  # dir, dir/ and ./dir: one model
        model_name = _model(model_name)
    out = check_output(out, "--out", folder=True)
    log = out / "cells.jsonl"
    logged = read_cells(log)
    base = dict(format=FORMAT, model=model_name, weights=weights_id(model_name, random_weights), task=task,
                questions=n_questions, random_weights=bool(random_weights), batch=batch, device=default_device())
    done = {_key(c): c for c in logged if c.get("format") == FORMAT}  # a later line wins
    todo = [dict(method=UNPATCHED, ratio=1.0)] + [{**row, "ratio": r} for row in rows for r in ratios]
    missing = {}
    for t in todo:  # each cell once, where it first comes
        key = _key({**base, **t})
        if key not in done:
            missing.setdefault(key, t)
    missing = list(missing.values())
    if missing:
        _warn_not_reused(log, logged, base, missing)
        cells_of = ShapesCells if task == "shapes" else LmmsCells
        runner = cells_of(model_name, task, n_questions, batch, random_weights, device=base["device"])
        if runner.device != base["device"]:
            raise RuntimeError(f"the sweep runs on {runner.device}, not {base['device']}")
        for row in rows:  # what needs the model (a preset's layer in range): refused before the first cell
            if row.get("options"):
                with vtprune.pruned(runner.patchable, row["method"], ratio=ratios[0], **row["options"]):
                    pass
        with tqdm(total=len(missing), desc="sweep", unit="cell", disable=not progress) as bar:
            for t in missing:
                bar.set_postfix_str(f"{label(t)} {t['ratio']:g}")
                options = [t["options"]] if t.get("options") else []  # (a plain cell: cell(method, ratio))
                cell = {**base, **t, **runner.cell(t["method"], t["ratio"], *options)}
                out.mkdir(parents=True, exist_ok=True)  # with the first cell: a bad model, task or dataset leaves none
                _append(log, (json.dumps(cell) + "\n").encode())
                done[_key(cell)] = cell
                bar.update(1)
    cells = []
    for t in todo:  # a cell run for one row may serve another with the same strategy and options: this row's label
        cell = {k: v for k, v in done[_key({**base, **t})].items() if k != "label"}
        cells.append({**cell, "label": t["label"]} if "label" in t else cell)
    write(cells, out)
    return cells


def write(cells: list[dict], out: Path) -> None:
    rows = [{**c, "label": label(c), "options": c.get("options") or {}} for c in cells]  # every row, as in the CSV
    (out / "results.json").write_text(json.dumps(rows, indent=1) + "\n")
    cols = ["method", "ratio", "accuracy", "prefill_tflops", "llm_tflops", "visual_tokens", "prefill_ms", "metric",
            "model", "weights", "task", "questions", *SETTINGS]  # (the settings: which experiment made the row)
    if any(c.get("options") or c.get("label") for c in cells):  # presets: their label and options
        cols[1:1] = ["label", "options"]
    header = {k: k + "_per_sample" for k in ("prefill_tflops", "llm_tflops", "visual_tokens")}
    with (out / "results.csv").open("w", newline="") as f:
        w = csv.writer(f)
        extra = sorted({k for c in cells for k in c["by_kind"]})
        w.writerow([header.get(k, k) for k in cols] + extra)
        for c in cells:
            w.writerow([metric_of(c) if k == "metric" else label(c) if k == "label" else _options(c) if k == "options"
                        else c.get(k, "") for k in cols]  # (a hand-made cell: no settings)
                       + [c["by_kind"].get(k, "") for k in extra])
    plot(cells, out)


def metric_of(cell: dict) -> str:
    """What a cell's "accuracy" holds: "accuracy" on shapes, the task's primary metric on lmms-eval
    (its `accuracy`, else its first metric, e.g. MME's perception score); cells before it was recorded:
    "accuracy"."""
    return cell.get("metric", "accuracy")


def pareto(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats (cost x lower or equal and value y higher or equal,
    one of them strictly), sorted by cost."""
    front = []
    for i, (x, y) in enumerate(points):
        beaten = any((x2 <= x and y2 >= y) and (x2 < x or y2 > y) for x2, y2 in points)
        if not beaten:
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


# the ratio asked for: pool and token_shuffle keep a whole grid (81 of 196 tokens at 0.5), in-LLM strategies
# drop inside the decoder; what each kept is the visual_tokens column, what it cost the TFLOPs plot
RATIO_AXIS = "kept ratio requested (tokens kept: results.csv)"


def plot(cells: list[dict], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.ticker import EngFormatter, FuncFormatter, MaxNLocator

    methods = [m for m in dict.fromkeys(label(c) for c in cells if c["method"] != UNPATCHED)]
    markers = "osD^vP*Xh<>p"  # one per strategy, so that two with equal values still both show
    colours = [c for i, c in enumerate(plt.get_cmap("tab10").colors) if i != 7] + list(plt.get_cmap("Dark2").colors)
    # (tab10's grey left out: grey is the unpatched model's and the Pareto front's)
    metric = " / ".join(dict.fromkeys(metric_of(c) for c in cells))
    fraction = all(0 <= c["accuracy"] <= 1 for c in cells)  # a score (MME's ~1500) keeps its own y range
    full = next((c for c in cells if c["method"] == UNPATCHED), None)
    paths = []
    for name, xkey, ykey, xlabel, ylabel in (
            ("accuracy_vs_ratio.png", "ratio", "accuracy", RATIO_AXIS, metric),
            ("accuracy_vs_tflops.png", "prefill_tflops", "accuracy", "prefill per sample (analytic)", metric),
            ("latency_vs_ratio.png", "ratio", "prefill_ms", RATIO_AXIS, "prefill ms per batch (median)")):
        fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
        for i, m in enumerate(methods):
            pts = sorted((c[xkey], c[ykey]) for c in cells if c["method"] != UNPATCHED and label(c) == m)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=markers[i % len(markers)], alpha=0.8,
                    color=colours[i % len(colours)], markerfacecolor="none" if i % 2 else None, label=m)
        if full is not None:  # its level, and the point itself (at ratio 1, at its own TFLOPs)
            ax.axhline(full[ykey], color="grey", linestyle="--", linewidth=1)
            ax.plot([full[xkey]], [full[ykey]], marker="*", markersize=11, color="grey", linestyle="none",
                    label="unpatched")
        if xkey == "ratio":
            ax.set_xlim(0, 1.05)
        else:  # TFLOPs as SI numbers: 640 G, 1.2 T (tiny models' 0.000639 T read as overlapping ticks)
            si = EngFormatter(unit="FLOPs")
            ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: si(x * 1e12)))
            ax.xaxis.set_major_locator(MaxNLocator(5))
        if name == "accuracy_vs_tflops.png":
            pts = [(c[xkey], c[ykey]) for c in cells]
            front = pareto(pts)
            ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], color="black", linewidth=2.5, alpha=0.35,
                    label="Pareto front")
        if ykey == "accuracy" and fraction:
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
    ratios = sorted({float(c["ratio"]) for c in cells}, reverse=True)  # the unpatched model's 1.0 among them
    lines = ["| strategy | " + " | ".join(f"{r:g}" for r in ratios) + " |", "|---|" + "---|" * len(ratios)]
    for name in dict.fromkeys(label(c) for c in cells):
        acc = {float(c["ratio"]): c["accuracy"] for c in cells if label(c) == name}
        lines.append(f"| {name} | " + " | ".join(f"{acc[r]:.3f}" if r in acc else "" for r in ratios) + " |")
    return "\n".join(lines)
