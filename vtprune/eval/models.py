"""Resolve a `--model` argument and a calibration `--task` into a model, its processor and inputs."""
from __future__ import annotations

import contextlib
import os

# vtprune.tiny's test models (random weights, no processor): for plumbing only
TEST_MODELS = {"tiny-test-llava": "llava", "tiny-test-llava-next": "llava_next", "tiny-test-llava-next-video": "llava_next_video",
               "tiny-test-llava-onevision": "llava_onevision", "tiny-test-qwen2-vl": "qwen2_vl",
               "tiny-test-qwen2.5-vl": "qwen2_5_vl", "tiny-test-qwen3-vl": "qwen3_vl",
               "tiny-test-qwen3-vl-moe": "qwen3_vl_moe", "tiny-test-qwen3.5": "qwen3_5",
               "tiny-test-qwen3.5-moe": "qwen3_5_moe"}


# what a checkpoint folder with a processor holds (any one of them)
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json", "tokenizer.json",
                   "video_preprocessor_config.json")


def load(name: str, random_weights: bool = False, attn: str = "sdpa", dtype=None):
    """(model in eval mode, processor or None) for a bundled name, a test model or a local directory.

    Bundled models (`tiny-llava`, `tiny-qwen2vl`) load their trained weights from the package;
    `random_weights=True` builds the same architecture with random weights instead. `dtype` (a torch
    dtype or "auto") is passed to `from_pretrained` for local directories; other models are cast to it."""
    from . import configs, tinyvlm

    if dtype is not None and dtype != "auto" and not os.path.isdir(name):
        model, processor = load(name, random_weights, attn)
        return model.to(dtype), processor
    if name in configs.FULL_SCALE:
        if not random_weights:
            raise ValueError(f"{name} is a full-scale architecture without weights here: add --random-weights "
                             "(speed and memory figures), or pass a local model directory")
        return configs.build(name, attn=attn), None
    if name in tinyvlm.NAMES:
        if random_weights:
            import torch
            import transformers as tf

            torch.manual_seed(0)
            model = tf.AutoModelForImageTextToText.from_config(tinyvlm.config(tinyvlm.NAMES[name]), attn_implementation=attn)
            return model.eval(), tinyvlm.processor(tinyvlm.NAMES[name])
        return tinyvlm.load(name, attn=attn)
    if name in TEST_MODELS:
        from .. import tiny

        return tiny.build(TEST_MODELS[name], attn=attn).eval(), None
    if os.path.isdir(name):
        from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

        extra = {} if dtype is None else {"dtype": dtype}
        config = AutoConfig.from_pretrained(name)
        _check_supported(name, config)  # before reading gigabytes of weights
        if random_weights:  # the directory's architecture, its weights left out
            import torch

            torch.manual_seed(0)
            if dtype == "auto":  # from_config takes no "auto": the dtype the checkpoint was saved in, if known
                saved = getattr(config, "dtype", None) or getattr(config.get_text_config(), "dtype", None)
                extra = {"dtype": saved} if isinstance(saved, torch.dtype) else {}
            model = AutoModelForImageTextToText.from_config(config, attn_implementation=attn, **extra).eval()
        else:
            model = AutoModelForImageTextToText.from_pretrained(name, attn_implementation=attn, **extra).eval()
        if not any(os.path.exists(os.path.join(name, f)) for f in PROCESSOR_FILES):
            return model, None  # a config (and weights) only: synthetic inputs work
        try:
            return model, AutoProcessor.from_pretrained(name)
        except Exception as e:  # noqa: BLE001 - a broken one says where and why (a bare JSON error before)
            raise ValueError(f"{name}: its processor failed to load ({type(e).__name__}: {e})") from e
    names = sorted(tinyvlm.NAMES) + sorted(TEST_MODELS) + sorted(configs.FULL_SCALE)
    raise ValueError(f"--model must be a local model directory or one of {', '.join(names)}; got {name!r}")


def _check_supported(name: str, config) -> None:
    """A clear error for a directory of a model vtprune has no adapter for (transformers' own lists
    every image-text class it knows, or fails later in patch)."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    from ..hooks import ADAPTERS, supported

    cls = getattr(transformers, MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.get(config.model_type, ""), None)
    if cls is None or not any(c.__name__ in ADAPTERS for c in cls.__mro__):
        raise ValueError(f"{name} holds a {config.model_type!r} model"
                         + (f" ({cls.__name__})" if cls is not None else "")
                         + f", which vtprune does not support; supported: {', '.join(supported())}")


@contextlib.contextmanager
def left_padding(processor):
    """The processor's tokenizer pads on the left inside the block (the last position is then every
    sample's last prompt token, whatever the checkpoint's own padding side), and as before after it."""
    tok = getattr(processor, "tokenizer", None)
    side = getattr(tok, "padding_side", None)
    if tok is not None:
        tok.padding_side = "left"
    try:
        yield processor
    finally:
        if tok is not None:
            tok.padding_side = side


def pixel_norm(method: str | None, processor, given=()) -> dict:
    """The options that hand a strategy undoing the processor's normalisation (vflowopt's entropy, on 0-255
    pixels) this processor's pixel_mean / pixel_std, unless either is in `given` (the option names already set,
    as options or in a config file); {} for other strategies or a processor without them. The strategy's
    default is CLIP's, and LLaVA-OneVision's SigLIP checkpoints or Qwen3-VL normalise by 0.5 / 0.5."""
    import dataclasses

    from ..methods.registry import get_method

    if method is None:
        return {}
    try:
        fields = {f.name for f in dataclasses.fields(get_method(method).Config)}
    except (ValueError, TypeError):
        return {}  # an unknown method: patch() says so
    image = getattr(processor, "image_processor", None)
    norm = {k: getattr(image, attr, None) for k, attr in (("pixel_mean", "image_mean"), ("pixel_std", "image_std"))}
    if not {"pixel_mean", "pixel_std"} <= fields or set(given) & set(norm) or not all(
            isinstance(v, (list, tuple)) and len(v) == 3 for v in norm.values()):
        return {}
    return {k: tuple(float(x) for x in v) for k, v in norm.items()}


def to_model(inputs: dict, model) -> dict:
    """Inputs on the model's device, floating tensors (pixels) in its dtype."""
    param = next(model.parameters())
    return {k: (v.to(param.device, dtype=param.dtype) if v.is_floating_point() else v.to(param.device))
            if hasattr(v, "is_floating_point") else v for k, v in inputs.items()}


def default_task(name: str) -> str:
    """The input source that fits a --model: tiny-prompts (test models), synthetic (full-scale random
    architectures), shapes (bundled models and local directories)."""
    from .configs import FULL_SCALE

    return "tiny-prompts" if name in TEST_MODELS else "synthetic" if name in FULL_SCALE else "shapes"


TASKS = ("shapes", "tiny-prompts", "synthetic", "synthetic-video")
TINY_PROMPTS = "task 'tiny-prompts' is for the test models (tiny-test-llava, ...)"


def _known_config(name: str):
    """The transformers config of a full-scale, test or bundled model name, without building it; None otherwise."""
    from . import configs, tinyvlm

    if name in configs.FULL_SCALE:
        return configs.FULL_SCALE[name]()
    if name in TEST_MODELS:
        from .. import tiny

        return tiny.config(TEST_MODELS[name])
    if name in tinyvlm.NAMES and (tinyvlm.BUNDLED / name / "config.json").exists():
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(tinyvlm.BUNDLED / name)
    return None


def check_task(task: str, name: str, frames: int | None = None) -> str:
    """A calibration task that can serve `--model name` (with `frames`, a synthetic-video clip's), checked before
    anything loads (a local directory's processor is only known once loaded: `calibration` checks it then)."""
    from . import configs, tinyvlm

    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; available: {', '.join(TASKS)}")
    if task == "shapes" and (name in TEST_MODELS or name in configs.FULL_SCALE):
        raise ValueError(f"task 'shapes' needs a model with a processor, and {name} has none: --task synthetic"
                         + (" or tiny-prompts" if name in TEST_MODELS else ""))
    if task == "tiny-prompts" and (name in configs.FULL_SCALE or name in tinyvlm.NAMES):
        raise ValueError(f"{TINY_PROMPTS}, not {name}")
    if frames is not None and task != "synthetic-video":
        raise ValueError(f"--frames is for --task synthetic-video, not {task}")
    cfg = _known_config(name) if task == "synthetic-video" else None
    if cfg is not None:
        if getattr(cfg, "video_token_id", None) is None:
            video = [k for k, f in configs.FULL_SCALE.items() if getattr(f(), "video_token_id", None) is not None]
            raise ValueError(f"{name} takes no video input: task 'synthetic-video' needs a model that does, "
                             f"e.g. {', '.join(video)}")
        group = getattr(cfg.vision_config, "temporal_patch_size", 1)
        if (frames or configs.VIDEO_FRAMES) % group:
            raise ValueError(f"{name} videos take frames in groups of {group}: give --frames a multiple of {group}")
    return task


def calibration(task: str, model, processor, n: int, seed: int = 0, batch_size: int = 8,
                frames: int | None = None) -> list[dict]:
    """Batches of model inputs (left-padded) for a task's first `n` calibration samples.

    Tasks: "shapes" = questions on the benchmark's train split (bundled models; the evaluation split is
    never used for calibration); "tiny-prompts" = vtprune.tiny's random prompts (its test models);
    "synthetic" = BOS + one image + random text tokens (configs.synthetic_inputs; any LLaVA/Qwen-VL model);
    "synthetic-video" = BOS + one clip of `frames` frames (default 32) + random text tokens (models with video
    input)."""
    if frames is not None and task != "synthetic-video":
        raise ValueError(f"frames are for task 'synthetic-video', not {task!r}")
    if task in ("synthetic", "synthetic-video"):
        from .configs import VIDEO_FRAMES, synthetic_inputs

        frames = (frames or VIDEO_FRAMES) if task == "synthetic-video" else 0
        return [synthetic_inputs(model, min(batch_size, n - i), seed=seed + i, frames=frames)
                for i in range(0, n, batch_size)]
    if task == "shapes":
        from . import shapes, tinyvlm

        if processor is None:
            raise ValueError("task 'shapes' needs a model with a processor (a bundled model); for speed and FLOPs "
                             "figures of a model without one, --task synthetic")
        fam = tinyvlm.family_of(model)
        texts, images = [], []
        for i in range(n):
            w, h = tinyvlm.scene_size(fam, "train", 10_000_000 + seed * n + i)
            scene, qs = shapes.sample("train", 10_000_000 + seed * n + i, w, h)
            texts.append(tinyvlm.prompt(fam, qs[0].text))
            images.append(shapes.render(scene))
        out = []
        with left_padding(processor):
            batches = [processor(images=images[i:i + batch_size], text=texts[i:i + batch_size], padding=True,
                                 return_tensors="pt") for i in range(0, n, batch_size)]
        for inputs in batches:
            inputs.pop("token_type_ids", None)
            out.append(dict(inputs))
        return out
    if task == "tiny-prompts":
        from .. import tiny

        fam = {cls: family for family, cls in tiny.CLASSES.items()}.get(type(model).__name__)
        if fam is None or processor is not None:
            raise ValueError(TINY_PROMPTS)
        idx = list(range(n))
        return [tiny.batch(fam, idx[i:i + batch_size], seed=seed) for i in range(0, n, batch_size)]
    raise ValueError(f"unknown task {task!r}; available: {', '.join(TASKS)}")
