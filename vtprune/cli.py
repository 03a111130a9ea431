"""The `vtprune` command line."""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from .eval.paths import check_output


def _methods(args) -> int:
    from .methods.registry import available, get_method, option_help

    for name in available():
        cls = get_method(name)
        summary = (cls.__doc__ or "").strip().splitlines()  # (a strategy registered without a docstring has none)
        print(f"{name}  (stage: {cls.stage})" + (f"  {summary[0]}" if summary else ""))
        if cls.paper:
            print(f"    paper: {cls.paper}")
        for opt, typ, default, note in option_help(cls):
            print(f"    {opt}: {typ} = {default!r}" + (f"  # {note}" if note else ""))
    return 0


def _items(text: str, option: str) -> list[str]:
    """A comma-separated option's items: spaces stripped, empty ones dropped, repeats once, in order."""
    items = list(dict.fromkeys(x.strip() for x in text.split(",") if x.strip()))
    if not items:
        raise ValueError(f"{option} names nothing: give a comma-separated list")
    return items


def _ratios(text: str) -> list[float]:
    """--ratios as floats in (0, 1], checked before any work."""
    items = _items(text, "--ratios")
    try:
        ratios = list(dict.fromkeys(float(r) for r in items))  # 0.5 and 0.50 are one ratio
    except ValueError as e:
        raise ValueError(f"--ratios: {e}") from None
    for r in ratios:
        if not 0 < r <= 1:  # (nan too)
            raise ValueError(f"--ratios: each must be in (0, 1], got {r}")
    return ratios


# defaults of options that only apply in one mode (left None in argparse, so that a given one can be refused)
DEMO_DEFAULTS = {"out": "vtprune-demo", "questions": 90, "families": "llava,qwen2_vl"}
COMPILE_DEFAULTS = {"compile_warmup": 3, "compile_backend": "inductor", "compile_mode": "reduce-overhead"}


def _demo(args) -> int:
    from .demo import run, run_bundled
    from .eval.tinyvlm import trained
    from .tiny import CLASSES

    ratios = _ratios(args.ratios)
    families = _items(args.families or DEMO_DEFAULTS["families"], "--families")
    if unknown := [f for f in families if f not in CLASSES]:
        raise ValueError(f"--families: unknown {unknown}; choose from {', '.join(CLASSES)}")
    bundled = [o for o in ("out", "questions") if getattr(args, o) is not None]
    if args.plumbing and bundled:
        raise ValueError(f"{', '.join('--' + o for o in bundled)}: for the bundled models' tables, not --plumbing "
                         "(which prints a table only)")
    if args.families is not None and not args.plumbing and trained("tiny-llava"):
        raise ValueError("--families picks the --plumbing table's random-weight models")
    args.out, args.questions = args.out or DEMO_DEFAULTS["out"], args.questions or DEMO_DEFAULTS["questions"]
    if trained("tiny-llava") and not args.plumbing:
        run_bundled(ratios, args.out, questions=args.questions, out=sys.stdout)
    else:
        if not args.plumbing:
            print("(the bundled tiny-llava has no trained weights yet: showing the plumbing on random-weight models)")
        run(families=families, ratios=ratios, out=sys.stdout)
    if not args.plumbing:
        import importlib.util

        if importlib.util.find_spec("timm") is None:
            print("(install the vit extra, pip install -e '.[vit]', for the tiny-vit accuracy table)")
            return 0
        from .demo import run_vit

        print()
        run_vit(ratios, args.out, out=sys.stdout)
    return 0


def _tune(args) -> int:
    from .eval import models, tune

    if args.method != "vflowopt":
        raise ValueError(f"only --method vflowopt has a tuner, got {args.method!r}")
    check_output(args.out, "--out")
    tune.check_budget(args.budget)
    models.check_task(args.task, args.model)
    try:
        tune.require_optuna()
    except ImportError as e:  # before the model loads, as one line
        raise ValueError(str(e)) from None
    import torch

    model, processor = models.load(args.model, random_weights=args.random_weights)
    model = model.to("cuda" if torch.cuda.is_available() else "cpu")
    batches = [models.to_model(b, model) for b in models.calibration(args.task, model, processor, args.samples,
                                                                       seed=args.seed)]
    # the entropy term undoes the processor's normalisation: the written config carries this checkpoint's
    config = tune.tune(model, batches, args.budget, iterations=args.iterations, seed=args.seed,
                       fixed=models.pixel_norm("vflowopt", processor))
    config["tuned"].update(model=args.model, task=args.task)
    tune.write(config, args.out)
    t = config["tuned"]
    start = "infeasible at this budget" if t["start_objective"] is None else f"{t['start_objective']:.5f}"
    print(f"best mean cos(h, h~) = {t['objective']:.5f} (released preset start: {start}); "
          f"layer-averaged retention {t['layer_averaged_retention']:.3f}")
    print(f"wrote {args.out}: vtprune.patch(model, config={args.out!r})")
    return 0


def at_least(least: int):
    """argparse type: an int >= least (the command line and the training scripts)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"must be >= {least}, got {value}")
        return value
    return parse


def _budget(args) -> dict:
    if (args.keep is None) == (args.ratio is None):
        raise ValueError("give exactly one of --keep and --ratio")
    return {"keep": args.keep} if args.keep is not None else {"ratio": args.ratio}


def _preset(text: str, method: str | None, budget: dict, flag: str = "--config", read: dict | None = None
            ) -> tuple[str, dict]:
    """(method, patch() options) of a preset given on the command line: a JSON file (as `vtprune tune` writes)
    or inline JSON; `budget` ({} or --keep / --ratio) replaces the preset's; checked before any model loads.
    `read`: filled with the preset's JSON object (its other keys, e.g. a label)."""
    import json

    from .methods.registry import build_method
    from .patching import _resolve, load_config, read_config

    stripped = text.strip()
    try:
        config = json.loads(stripped) if stripped.startswith(("{", "[")) else text
    except json.JSONDecodeError as e:
        raise ValueError(f"{flag}: not valid JSON: {e}") from None
    try:
        config = read_config(config)  # (a file: read once)
        if read is not None:
            read.update(config if isinstance(config, dict) else {})
        if method is None and load_config(config)[0] is None:
            raise ValueError(f"{flag} names no method: add --method NAME, or \"method\" to the config")
        method, options = _resolve(method, config, dict(budget))
        build_method(method, options)
    except OSError as e:  # a missing or unreadable file
        raise ValueError(f"{flag}: cannot read {text}: {e.strerror or e}") from None
    except (TypeError, ValueError) as e:
        message = str(e)
        raise ValueError(message if message.startswith(flag) else f"{flag}: {message}") from None
    return method, options


def _flops(args) -> int:
    import json

    from .eval import configs, flops, models
    from .methods.registry import build_method

    if args.json is not None:
        check_output(args.json, "--json")
    if args.config is None:
        budget = _budget(args)
        method = args.method or "random"  # (keeps exactly the budget before the LLM; selection costs nothing)
        build_method(method, budget)  # a bad strategy or budget fails before the model loads
    else:  # a preset: the file's (or inline JSON's) method and options; --keep / --ratio replace its budget
        if args.keep is not None and args.ratio is not None:
            raise ValueError("give at most one of --keep and --ratio with --config")
        budget = _budget(args) if (args.keep, args.ratio) != (None, None) else {}
        method, budget = _preset(args.config, args.method, budget)  # (built there, before the model loads)
    task = models.check_task(args.task or models.default_task(args.model), args.model, args.frames)
    if args.model in configs.FULL_SCALE:  # token counts from a narrow stand-in, dimensions from the real config
        real = configs.FULL_SCALE[args.model]()
        model, processor = configs.surrogate(real), None
    else:
        real = None
        model, processor = models.load(args.model, random_weights=args.random_weights)
    inputs = models.calibration(task, model, processor, 1, frames=args.frames)[0]
    import torch

    kv_dtype = torch.bfloat16 if real is not None else None  # the stand-in is float32; the real model runs in bf16
    base = flops.count(model, inputs, arch=real, kv_dtype=kv_dtype)
    pruned = flops.count(model, inputs, method, arch=real, kv_dtype=kv_dtype, **budget)
    given = ", ".join(f"{k}={v}" for k, v in budget.items())
    print(flops.format_table(base, pruned, f"{args.model}, one {task} sample: unpatched vs {method} ({given})"))
    if args.json is not None:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "task": task, "method": method, "options": budget,  # (as bench's rows)
                       "unpatched": base.to_dict(), "pruned": pruned.to_dict()}, f, indent=1)
        print(f"wrote {args.json}")
    return 0


def _check_compile_options(args) -> None:
    """--compile-* options belong to --compile, and a mode to inductor (others take none): refused, not ignored."""
    given = [k for k in COMPILE_DEFAULTS if getattr(args, k) is not None]
    if given and not args.compile:
        raise ValueError(f"{', '.join('--' + k.replace('_', '-') for k in given)} "
                         f"{'needs' if len(given) == 1 else 'need'} --compile")
    if args.compile_mode is not None and args.compile_backend not in (None, "inductor"):
        raise ValueError(f"--compile-mode is the inductor backend's; --compile-backend {args.compile_backend} takes none")
    for k, default in COMPILE_DEFAULTS.items():
        if getattr(args, k) is None and (k != "compile_mode" or args.compile_backend == "inductor"):
            setattr(args, k, default)


def _compile_options(args) -> dict:
    if args.compile_backend == "inductor":
        return {"mode": args.compile_mode}
    return {"mode": None, "backend": args.compile_backend}


def _table_path(out: str) -> Path:
    """bench's markdown table beside its JSON: OUT.json -> OUT.md; any other name gets .md added
    (with_suffix cut bench_qwen2.5-7b to bench_qwen2.md, which bench_qwen2.7-7b would overwrite)."""
    out = Path(out)
    return out.with_suffix(".md") if out.suffix == ".json" else out.with_name(out.name + ".md")


def _bench(args) -> int:
    import json

    import torch

    from .eval import bench, models
    from .methods.registry import build_method

    if args.methods is None and not args.config:
        raise ValueError("give --methods, --config, or both")
    if args.methods is not None or (args.keep, args.ratio) != (None, None):
        budget = _budget(args)  # (--config alone: each preset's own budget)
    else:
        budget = {}
    methods = _items(args.methods, "--methods") if args.methods is not None else []
    if args.out is not None and Path(args.out).suffix == ".md":
        raise ValueError("--out is the JSON record; the markdown table goes beside it as .md: give a .json path")
    if args.out is not None:
        check_output(args.out, "--out")
        check_output(_table_path(args.out), "--out's table")
    for m in methods:  # bad strategies, options or presets fail before the model loads and the baseline runs
        build_method(m, budget)
    jobs = [(m, budget) for m in methods]
    for i, text in enumerate(args.config or []):
        jobs.append(_preset(text, None, budget, "--config" if len(args.config) == 1 else f"--config #{i + 1}"))
    _check_compile_options(args)
    if args.compile:  # torch.compile checks its backend and mode when called: before the plain rows, not after
        try:
            torch.compile(lambda x: x, **_compile_options(args))
        except RuntimeError as e:
            mode = f" / --compile-mode {args.compile_mode}" if args.compile_mode else ""
            raise ValueError(f"--compile-backend {args.compile_backend}{mode}: {e}") from None
    try:
        batches = list(dict.fromkeys(at_least(1)(x) for x in _items(args.batch, "--batch")))
    except argparse.ArgumentTypeError as e:
        raise ValueError(f"--batch: {e}") from None
    task = models.check_task(args.task or models.default_task(args.model), args.model, args.frames)
    model, processor = models.load(args.model, random_weights=args.random_weights)
    import vtprune
    from .patching import check_compilable

    if args.compile:  # what needs the model is refused before any row is timed, too
        check_compilable(model)
    for method, options in jobs:  # (layer choices: in range, attention where they read it)
        with vtprune.pruned(model, method, **options):
            pass
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = model.to(device)
    n_layers = model.config.get_text_config().num_hidden_layers
    rows, skipped = [], []
    gpu = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    why = "it drops tokens inside the decoder, which a static KV cache cannot hold"

    def save(complete: bool):  # after every round and compiled row too: a run cut short keeps what it measured
        record = {"command": "vtprune " + shlex.join(args.argv), "device": gpu, "model": args.model, "complete": complete,
                  "rows": [r.to_dict() for r in rows], "skipped": skipped}
        bench.save_text(args.out, json.dumps(record, indent=1) + "\n")
        note = "".join(f"\n\nSkipped: batch {s['batch']}, {s['path']} {s['method']} ({why})." for s in skipped)
        bench.save_text(_table_path(args.out), bench.markdown(rows) + note + "\n")

    for b in batches:
        inputs = models.to_model(models.calibration(task, model, processor, b, batch_size=b, frames=args.frames)[0], model)

        def show(row):
            print(f"batch {b:3d} {row.path:<8} {row.method:<13} prefill {row.prefill_ms:8.2f} ms  generate "
                  f"{row.generate_ms:9.1f} ms  KV {row.kv_bytes / 2**20:.3f} MiB", flush=True)

        # the plain path: the rows' runs interleaved (a round runs each configuration once), saved after each round
        finished = len(rows)

        def round_done(batch_rows):
            rows[finished:] = batch_rows
            if batch_rows[0].runs < args.reps:
                print(f"batch {b:3d} eager    round {batch_rows[0].runs} of {args.reps} done", flush=True)
            if args.out is not None:
                save(complete=False)

        for row in bench.measure_side_by_side(model, inputs, [(None, None)] + jobs, args.new_tokens, args.reps,
                                              warmup=1, done=round_done):
            show(row)
        if args.compile:  # one row after the other (switching configuration between runs would recompile)
            compiled = _compile_options(args)
            for method, options in [(None, None)] + jobs:
                if method is not None and build_method(method, options).drop_layers(n_layers):
                    print(f"batch {b:3d} compiled {method:<13} skipped: {why}", flush=True)
                    skipped.append(dict(batch=b, path="compiled", method=method, options=options))
                    continue
                rows.append(bench.measure(model, inputs, method, options, args.new_tokens, args.reps,
                                          warmup=args.compile_warmup, compiled=compiled))
                show(rows[-1])
                if args.out is not None:
                    save(complete=False)
    print(bench.markdown(rows))
    if args.out is not None:
        save(complete=True)
        print(f"wrote {args.out} and {_table_path(args.out)}")
    return 0


def _sweep_preset(text: str, flag: str) -> tuple[str, dict, str]:
    """(method, options without a budget, label) of a sweep's --config: the sweep's ratios are its budget. The
    label: the preset's "label", else its file's name, else the method and its options."""
    from .methods.registry import get_method

    config = {}
    method, options = _preset(text, None, {"ratio": 1.0}, flag, config)  # (its own budget replaced, then dropped)
    options.pop("ratio")
    shape = sorted(set(config.get("options") or {}) & set(get_method(method).Config.budget_fields) - {"keep", "ratio"})
    if shape:  # (token_shuffle's s: its window, which the sweep's ratio would replace)
        raise ValueError(f"{flag}: the sweep's ratios set the budget, which {', '.join(shape)} would set too: drop "
                         f"{', '.join(shape)} (or sweep {method} with its own ratios)")
    name = config.get("label")
    if name is not None and (not isinstance(name, str) or not name.strip()):
        raise ValueError(f"{flag}: \"label\" must be a non-empty string, got {name!r}")
    if name is None:
        inline = text.strip().startswith(("{", "["))
        name = f"{method}[{', '.join(f'{k}={v}' for k, v in sorted(options.items()))}]" if inline else Path(text).stem
    return method, options, str(name)


def _sweep(args) -> int:
    import warnings

    from .eval import sweep

    from .methods.registry import available

    if args.methods is None:  # all strategies, or only the presets when --config is given
        methods = [] if args.config else available()
    else:
        methods = _items(args.methods, "--methods")
        methods = available() if methods == ["all"] else methods
    ratios = _ratios(args.ratios)
    presets = [_sweep_preset(text, "--config" if len(args.config) == 1 else f"--config #{i + 1}")
               for i, text in enumerate(args.config or [])]
    with warnings.catch_warnings():  # the sweep's warnings (cells not reused, a cut-short line) as one line each
        warnings.showwarning = lambda message, *_, **__: print(f"vtprune sweep: warning: {message}", file=sys.stderr)
        cells = sweep.run(args.model, methods, ratios, args.task, args.out, n_questions=args.questions,
                          batch=args.batch, random_weights=args.random_weights, presets=presets)

    out = Path(args.out)
    line = "vtprune " + shlex.join(args.argv) + "\n"  # (quoted: inline JSON presets re-run as written)
    log = out / "commands.txt"  # what made the figures: a resumed sweep adds its line, the same one again nothing
    if not log.exists() or line not in log.read_text().splitlines(keepends=True)[-1:]:
        with open(log, "a") as f:
            f.write(line)
    print(sweep.table(cells))
    print(f"wrote {out / 'results.csv'}, results.json, commands.txt, accuracy_vs_ratio.png, accuracy_vs_tflops.png, "
          "latency_vs_ratio.png")
    return 0


def _lmms_tasks(args) -> int:
    print(Path(__file__).resolve().parent / "eval" / "lmms_tasks")  # = vtprune.eval.lmms.TASKS, without lmms-eval
    return 0


def _model_budget_args(p) -> None:
    p.add_argument("--model", required=True,
                   help="a local model directory, a bundled name, a tiny-test model or a full-scale architecture "
                        "(llava-1.5-7b, llava-next-7b, llava-next-video-7b, llava-onevision-7b, qwen2-vl-7b, qwen2.5-vl-7b, qwen3-vl-8b, "
                        "qwen3-vl-30b-a3b, qwen3.5-27b)")
    p.add_argument("--keep", type=int, help="visual tokens kept per image")
    p.add_argument("--ratio", type=float, help="fraction of visual tokens kept (instead of --keep)")
    p.add_argument("--task", help="input source (default: shapes; tiny-prompts for test models; synthetic for full-scale; "
                                  "synthetic-video: a clip instead of the image)")
    p.add_argument("--frames", type=at_least(1), help="frames of the synthetic-video clip (default 32)")
    p.add_argument("--random-weights", action="store_true", help="the architecture with random weights")


class _Help(argparse.HelpFormatter):
    """Each option's default in its help line, where it has one and the help does not say it already."""

    def _get_help_string(self, action):
        text = action.help or ""
        if not any(action.default is x for x in (None, False, argparse.SUPPRESS)) and "default" not in text:
            text += " (default: %(default)s)"
        return text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="vtprune", description="Visual-token pruning for vision-language models.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("methods", help="list the registered strategies, their stage and options")
    p.set_defaults(func=_methods)
    p = sub.add_parser("demo", help="every strategy x ratio on the bundled tiny model (accuracy table + plots)")
    p.add_argument("--ratios", default="1.0,0.5,0.25,0.111", help="comma-separated kept fractions")
    p.add_argument("--out", help="directory for the results and plots (bundled models; "
                                 f"default {DEMO_DEFAULTS['out']})")
    p.add_argument("--questions", type=at_least(1),
                   help=f"held-out questions per cell (bundled models; default {DEMO_DEFAULTS['questions']})")
    p.add_argument("--plumbing", action="store_true", help="random-weight plumbing table even if trained weights exist")
    p.add_argument("--families", help="(--plumbing) comma-separated: llava, llava_next, llava_next_video, llava_onevision, qwen2_vl, "
                                      f"qwen2_5_vl, qwen3_vl, qwen3_vl_moe, qwen3_5, qwen3_5_moe (default {DEMO_DEFAULTS['families']})")
    p.set_defaults(func=_demo)
    p = sub.add_parser("tune", help="search a method's hyperparameters for a model (VFlowOpt's flow-guided search)")
    p.add_argument("--method", required=True, help="the method to tune (vflowopt)")
    p.add_argument("--model", required=True, help="a local model directory, a bundled name (tiny-llava, tiny-qwen2vl) "
                   "or a test model (tiny-test-llava, ... with --task tiny-prompts)")
    p.add_argument("--task", default="shapes", help="calibration task: shapes (train split; LLaVA and Qwen2-VL), "
                   "synthetic (BOS + image + random text), tiny-prompts (test models)")
    p.add_argument("--budget", type=float, required=True, help="layer-averaged kept fraction, e.g. 0.25")
    p.add_argument("--samples", type=at_least(1), default=30, help="calibration samples (default 30, as the paper)")
    p.add_argument("--iterations", type=at_least(1), default=50, help="optimiser trials (default 50, as the paper)")
    p.add_argument("--seed", type=at_least(0), default=0, help="seed of the calibration samples and the optimiser")
    p.add_argument("--random-weights", action="store_true", help="bundled architecture with random weights")
    p.add_argument("--out", required=True, help="config file to write (JSON)")
    p.set_defaults(func=_tune)
    p = sub.add_parser("flops", help="analytic FLOPs per stage and KV-cache bytes, unpatched vs pruned (docs/flops.md)")
    _model_budget_args(p)
    p.add_argument("--method", help="strategy (default: random, which keeps exactly the budget before the LLM; "
                   "in-LLM strategies count per layer)")
    p.add_argument("--config", help="a patch() preset: a JSON file (as vtprune tune writes) or inline JSON, "
                   "'{\"method\": \"vflowopt\", \"options\": {\"ratio\": 0.27, \"r2\": 0.98}}'; --keep/--ratio "
                   "replace its budget")
    p.add_argument("--json", help="also write the figures to this JSON file")
    p.set_defaults(func=_flops)
    p = sub.add_parser("bench", help="latency, memory and KV bytes: unpatched and each strategy side by side")
    _model_budget_args(p)
    p.add_argument("--methods", help="comma-separated strategies, each with --keep or --ratio")
    p.add_argument("--config", action="append",
                   help="also a patch() preset: a JSON file (as vtprune tune writes) or inline JSON, e.g. "
                        "'{\"method\": \"fastv\", \"options\": {\"layer\": 4, \"keep\": 64}}'; repeat for more "
                        "(--keep / --ratio, if given, replace each preset's budget)")
    p.add_argument("--batch", default="1", help="comma-separated batch sizes")
    p.add_argument("--new-tokens", type=at_least(1), default=32, help="tokens generated per run")
    p.add_argument("--reps", type=at_least(1), default=5, help="timed runs per cell (median), after one warm-up")
    p.add_argument("--compile", action="store_true",
                   help="also measure every row on the compiled path (vtprune.compile_llm: torch.compile of the "
                        "language model + static KV cache), side by side with the plain one")
    p.add_argument("--compile-warmup", type=at_least(0),
                   help="untimed runs per compiled cell (compilation and CUDA-graph recording happen in these; "
                        f"default {COMPILE_DEFAULTS['compile_warmup']})")
    p.add_argument("--compile-mode", help="torch.compile mode of the compiled path "
                                          f"(default {COMPILE_DEFAULTS['compile_mode']})")
    p.add_argument("--compile-backend",
                   help=f"torch.compile backend of the compiled path (default {COMPILE_DEFAULTS['compile_backend']}; "
                        "'eager' traces only: a CPU smoke test)")
    p.add_argument("--out", help="JSON file to write (a markdown table is written beside it)")
    p.set_defaults(func=_bench)
    p = sub.add_parser("sweep", help="every strategy x ratio on a task: accuracy, FLOPs, latency; CSV/JSON and plots")
    p.add_argument("--model", required=True, help="a bundled name (tiny-llava, tiny-qwen2vl) or a local model directory")
    p.add_argument("--methods", help="comma-separated strategies (default: all; with --config: none besides the presets)")
    p.add_argument("--config", action="append", metavar="FILE|JSON",
                   help="a patch() preset (a file vtprune tune wrote, or inline JSON): one more row, its method's "
                        "options at each ratio (its budget replaced by the ratio); labelled by its \"label\", file "
                        "name, or method and options; repeatable")
    p.add_argument("--ratios", default="0.5,0.25,0.111", help="comma-separated kept fractions")
    p.add_argument("--task", default="shapes", help="evaluation task: shapes, or an lmms-eval task (vtprune_shapes, "
                   "vtprune_shapes_video, mme, ...; needs pip install 'vtprune[eval]')")
    p.add_argument("--questions", type=at_least(1), default=1200, help="held-out questions per cell (lmms-eval: --limit)")
    p.add_argument("--batch", type=at_least(1), default=32,
                   help="evaluation batch size (prefill latency is of one batch; FLOPs are per sample)")
    p.add_argument("--random-weights", action="store_true", help="bundled architecture with random weights")
    p.add_argument("--out", required=True, help="directory for results and plots (finished cells with the same model, "
                   "weights, task, --questions, --random-weights, --batch and device are reused)")
    p.set_defaults(func=_sweep)
    p = sub.add_parser("lmms-tasks", help="print the folder of vtprune's offline lmms-eval tasks (for --include_path)")
    p.set_defaults(func=_lmms_tasks)
    for command in sub.choices.values():
        command.formatter_class = _Help
    args, extra = parser.parse_known_args(argv)
    if extra:  # the subcommand's usage, not the top-level one
        sub.choices[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    args.argv = list(argv if argv is not None else sys.argv[1:])
    try:
        return args.func(args)
    except BrokenPipeError:  # `vtprune methods | head`: the reader left; no error line (Python docs' recipe)
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (ValueError, NotImplementedError, OSError) as e:  # bad input or a path: one line, not a traceback
        parser.exit(2, f"vtprune {args.command}: error: {e}\n")
    except KeyboardInterrupt:
        parser.exit(130, f"vtprune {args.command}: interrupted (what was written so far is kept; a sweep rerun "
                         "resumes where it stopped)\n")


if __name__ == "__main__":
    sys.exit(main())
