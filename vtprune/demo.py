"""`vtprune demo`: every strategy x ratio, as a table.

With the bundled trained `tiny-llava` in the package: accuracy on the `shapes` benchmark per strategy
and kept ratio (a `vtprune sweep` over a 90-question slice), the table on the terminal and the plots
in the output directory. Without it (weights not trained yet): the plumbing on tiny random-weight
models (tokens kept, sequence length, selection and prefill time, agreement with the unpruned model),
not accuracy. Then, when timm is installed, the real accuracy trade-off of every ViT-capable strategy
on the bundled trained tiny-vit (`patch_vit`), with its plot.
"""
from __future__ import annotations

import json

import torch

from . import patching
from .eval import sweep
from .methods.registry import available
from .tiny import GEN, batch, build


def run_bundled(ratios=(1.0, 0.5, 0.25, 0.111), out_dir="vtprune-demo", questions: int = 90, out=None):
    """Accuracy of every strategy x ratio on the bundled tiny-llava (a small sweep) + plots."""
    print_ = (lambda s: print(s, file=out)) if out is not None else print
    cells = sweep.run("tiny-llava", available(), list(ratios), "shapes", out_dir, n_questions=questions, batch=40)
    print_(f"vtprune demo: bundled tiny-llava on {questions} held-out `shapes` questions, accuracy per kept ratio")
    print_(sweep.table(cells))
    print_(f"plots and results in {out_dir}/ (accuracy_vs_ratio.png, accuracy_vs_tflops.png, latency_vs_ratio.png)")
    return cells


def run_vit(ratios=(0.5, 0.25, 0.111), out_dir="vtprune-demo", images: int = 500, out=None):
    """Accuracy of every ViT-capable strategy x ratio on the bundled trained tiny-vit (patch_vit) + a plot."""
    from pathlib import Path

    from .eval import tinyvit

    print_ = (lambda s: print(s, file=out)) if out is not None else print
    from .vit import supported

    methods = supported()
    ratios = [r for r in ratios if r < 1.0]  # (1.0 is the unpatched row; --ratios 1.0 alone: that row only)
    rows = tinyvit.sweep(tinyvit.load(), methods, ratios, n=images, progress=True)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    path = tinyvit.plot(rows, Path(out_dir) / "vit_accuracy_vs_ratio.png")
    (Path(out_dir) / "vit_results.json").write_text(json.dumps(
        {"model": "tiny-vit", "images": images, "layer": 2, "rows": rows}, indent=1) + "\n")  # (sweep's layer)
    print_(f"vtprune demo: bundled tiny-vit (trained here) on {images} held-out images, accuracy per kept ratio "
           "(patch_vit after block 2 of 6)")
    print_(tinyvit.table(rows))
    print_(f"plot: {path}")
    return rows


def run(families=("llava", "qwen2_vl"), ratios=(1.0, 0.5, 0.25, 0.111), new_tokens: int = 8, out=None):
    print_ = (lambda s: print(s, file=out)) if out is not None else print
    rows = []
    for family in families:
        model = build(family)
        inputs = batch(family, [0, 1, 2, 3])
        with torch.no_grad():
            ref_logits = model(**inputs).logits[:, -1]
            ref_gen = model.generate(**inputs, max_new_tokens=new_tokens, **GEN)[:, -new_tokens:]
        base_ms = sweep.prefill_ms(model, inputs, reps=5)
        for method in available():
            for ratio in ratios:
                with patching.pruned(model, method, ratio=ratio):
                    with torch.no_grad():
                        logits = model(**inputs).logits
                        st = patching.stats(model)
                        gen = model.generate(**inputs, max_new_tokens=new_tokens, **GEN)[:, -new_tokens:]
                    ms = sweep.prefill_ms(model, inputs, reps=5)
                rows.append(dict(
                    family=family, method=method, ratio=ratio,
                    visual=f"{sum(st.visual_before)}->{sum(st.visual_after)}" if st.visual_before else "-",
                    seq=f"{inputs['input_ids'].shape[1]}->{logits.shape[1]}",
                    select_ms=st.selection_ms, prefill_ms=ms, base_ms=base_ms,
                    top1=(logits[:, -1].argmax(-1) == ref_logits.argmax(-1)).float().mean().item(),
                    gen=(gen == ref_gen).float().mean().item(),
                ))
    header = f"{'model':<11} {'method':<13} {'ratio':>5} {'visual':>9} {'seq':>8} {'sel ms':>7} {'prefill ms':>14} {'top1=full':>9} {'gen=full':>8}"
    print_("vtprune demo: tiny RANDOM-WEIGHT models (batch 4, CPU). Agreement columns show plumbing, not accuracy.")
    print_(header)
    print_("-" * len(header))
    for r in rows:
        print_(f"{r['family']:<11} {r['method']:<13} {r['ratio']:>5.3f} {r['visual']:>9} {r['seq']:>8} {r['select_ms']:>7.2f} "
               f"{r['prefill_ms']:>6.1f} / {r['base_ms']:<5.1f} {r['top1']:>9.2f} {r['gen']:>8.2f}")
    return rows
