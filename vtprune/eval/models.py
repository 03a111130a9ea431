"""Resolve a `--model` argument: a local directory, or a bundled name (random weights for now)."""
from __future__ import annotations

import os

# bundled names -> tiny family (vtprune.tiny). Trained weights arrive with the bundled-models work;
# until then these names need --random-weights.
TINY = {"tiny-llava": "llava", "tiny-qwen2-vl": "qwen2_vl", "tiny-qwen2.5-vl": "qwen2_5_vl"}


def load(name: str, random_weights: bool = False, attn: str = "sdpa"):
    """The model for `name`, in eval mode."""
    if name in TINY:
        if not random_weights:
            raise ValueError(f"trained weights for {name!r} are not bundled yet; pass --random-weights")
        from .. import tiny

        return tiny.build(TINY[name], attn=attn).eval()
    if os.path.isdir(name):
        from transformers import AutoModelForImageTextToText

        return AutoModelForImageTextToText.from_pretrained(name, attn_implementation=attn).eval()
    raise ValueError(f"--model must be a local model directory or one of {', '.join(sorted(TINY))}; got {name!r}")


def family(model) -> str | None:
    """The tiny family of a model built by vtprune.tiny, from its class name."""
    names = {"LlavaForConditionalGeneration": "llava", "Qwen2VLForConditionalGeneration": "qwen2_vl",
             "Qwen2_5_VLForConditionalGeneration": "qwen2_5_vl"}
    return names.get(type(model).__name__)


def calibration(task: str, model, n: int, seed: int = 0, batch_size: int = 8) -> list[dict]:
    """Batches of model inputs (left-padded) for a task's first `n` calibration samples.

    Tasks: "tiny-prompts" = vtprune.tiny's random prompts and images (for the tiny models)."""
    if task != "tiny-prompts":
        raise ValueError(f"unknown task {task!r}; available now: tiny-prompts")
    fam = family(model)
    if fam is None:
        raise ValueError(f"task 'tiny-prompts' needs a tiny model (tiny-llava, tiny-qwen2-vl, ...), got {type(model).__name__}")
    from .. import tiny

    idx = list(range(n))
    return [tiny.batch(fam, idx[i:i + batch_size], seed=seed) for i in range(0, n, batch_size)]
