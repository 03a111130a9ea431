"""How much of the `shapes` held-out set a bundled tiny VLM saw in training, and its accuracy without it.

  python scripts/split_overlap.py --out results/split_overlap.json

The train and eval splits differ by seed only, so a training scene can repeat a held-out scene's
content (the same shapes, colours, sizes and cells, the same digits in the same cells; only the
pixel jitter differs). This scans every training scene index below each model's `next_scene` (an
upper bound: a training run may skip some), lists the held-out scenes with such a twin, and scores
each bundled model on all 1,200 held-out questions and on those whose scene has no twin.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vtprune.eval import shapes, tinyvlm  # noqa: E402


def content(scene) -> tuple:
    """What a scene shows, without the pixel jitter."""
    return (frozenset((o.shape, o.colour, o.size, o.cell) for o in scene.objects),
            frozenset((d.value, d.cell) for d in scene.digits))


def twins(eval_scenes, stop: int, progress: bool = True) -> dict[int, list[int]]:
    """held-out scene -> the training scene indices below `stop` with the same content."""
    wanted = {}
    for i in eval_scenes:
        wanted.setdefault(content(shapes.make_scene(shapes._rng("eval", i))), []).append(i)
    found: dict[int, list[int]] = {}
    from tqdm.auto import tqdm

    for j in tqdm(range(stop), desc="train scenes", unit="scene", mininterval=5, disable=not progress):
        for i in wanted.get(content(shapes.make_scene(shapes._rng("train", j))), ()):
            found.setdefault(i, []).append(j)
    return found


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--batch", type=int, default=40)
    args = ap.parse_args(argv)
    t0 = time.time()
    held = shapes.eval_set(1200)
    scenes = sorted({i for i, _ in held})
    logs = {name: json.loads((tinyvlm.BUNDLED / name / "train_log.json").read_text()) for name in tinyvlm.NAMES}
    stops = {name: int(log["next_scene"]) for name, log in logs.items()}
    found = twins(scenes, max(stops.values()))
    result = {"command": " ".join(["python", "scripts/split_overlap.py"] + (argv if argv is not None else sys.argv[1:])),
              "held_out_scenes": len(scenes), "held_out_questions": len(held), "models": {}}
    for name in tinyvlm.NAMES:
        seen = {i: [j for j in js if j < stops[name]] for i, js in found.items()}
        seen = {i: js for i, js in seen.items() if js}
        model, proc = tinyvlm.load(name)
        rows = tinyvlm.held_out(tinyvlm.NAMES[name], 1200)
        with torch.no_grad():
            got = tinyvlm.answers(model, proc, [img for _, img, _ in rows], [q.text for _, _, q in rows], args.batch)
        right = [a == q.answer for (_, _, q), a in zip(rows, got)]
        clean = [ok for (i, _), ok in zip(held, right) if i not in seen]
        result["models"][name] = {
            "train_scenes_scanned": stops[name], "held_out_scenes_with_a_train_twin": sorted(seen),
            "twins": {str(i): js for i, js in sorted(seen.items())},
            "questions_on_twinned_scenes": len(held) - len(clean),
            "accuracy_all": sum(right) / len(right), "accuracy_without_twins": sum(clean) / len(clean)}
        print(name, json.dumps({k: v for k, v in result["models"][name].items() if k != "twins"}), flush=True)
    result["seconds"] = round(time.time() - t0, 1)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


def readme_note(path: Path) -> str:
    """The README's sentence on the split (scripts/update_readme.py), from the JSON this script wrote."""
    r = json.loads(Path(path).read_text())
    parts = []
    for name, m in r["models"].items():
        parts.append(f"`{name}`: {len(m['held_out_scenes_with_a_train_twin'])} of {r['held_out_scenes']} held-out "
                     f"scenes ({m['questions_on_twinned_scenes']} of {r['held_out_questions']} questions) have a "
                     f"training twin among the first {m['train_scenes_scanned']:,} training scenes; accuracy "
                     f"{m['accuracy_all']:.3f} on all, {m['accuracy_without_twins']:.3f} without them")
    import textwrap

    return textwrap.fill(
        "The splits differ by seed only, so a training scene can repeat a held-out scene's content (the same "
        "objects, colours, sizes, cells and digits; other pixel jitter). " + "; ".join(parts)
        + " (`results/split_overlap.json`, by `python scripts/split_overlap.py --out results/split_overlap.json`).",
        width=105, break_on_hyphens=False)


if __name__ == "__main__":
    main()
