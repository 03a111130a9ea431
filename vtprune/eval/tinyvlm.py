"""The bundled tiny VLMs: word-level tokenizer, processors and configs of real transformers classes,
the prompt format, and loading from the package (offline). Trained by scripts/train_tiny.py on the
synthetic `shapes` benchmark (vtprune.eval.shapes)."""
from __future__ import annotations

import os
from pathlib import Path

import torch

BUNDLED = Path(__file__).resolve().parents[1] / "bundled"
NAMES = {"tiny-llava": "llava", "tiny-qwen2vl": "qwen2_vl"}
SPECIAL = ["<pad>", "<s>", "</s>", "<unk>", "<image>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
           "<|video_pad|>"]
LLAVA_IMAGE = 224  # px; 16-px patches -> 14 x 14 = 196 visual tokens (+ CLS in the tower)


def tokenizer(family: str = "llava"):
    """A word-level fast tokenizer over the special tokens and the benchmark's vocabulary."""
    import transformers as tf
    from tokenizers import Tokenizer, models, pre_tokenizers

    from .shapes import VOCAB

    vocab = {w: i for i, w in enumerate(SPECIAL + sorted(set(VOCAB) - set(SPECIAL)))}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tf.PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        padding_side="left", extra_special_tokens={"image_token": "<image>" if family == "llava" else "<|image_pad|>",
                                                   "video_token": "<|video_pad|>", "vision_start_token": "<|vision_start|>",
                                                   "vision_end_token": "<|vision_end|>"},
    )


def processor(family: str):
    import transformers as tf

    tok = tokenizer(family)
    if family == "llava":
        ip = tf.CLIPImageProcessor(size={"shortest_edge": LLAVA_IMAGE}, crop_size={"height": LLAVA_IMAGE, "width": LLAVA_IMAGE})
        return tf.LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=16, vision_feature_select_strategy="default",
                                 num_additional_image_tokens=1, image_token="<image>")
    if family == "qwen2_vl":
        ip = tf.Qwen2VLImageProcessor(min_pixels=168 * 168, max_pixels=280 * 280, patch_size=14, merge_size=2,
                                      temporal_patch_size=2)
        vp = tf.Qwen2VLVideoProcessor(min_pixels=168 * 168, max_pixels=280 * 280, patch_size=14, merge_size=2,
                                      temporal_patch_size=2)
        return tf.Qwen2VLProcessor(image_processor=ip, tokenizer=tok, video_processor=vp)
    raise ValueError(f"unknown family {family!r}")


def config(family: str):
    """The architecture of a bundled model (real transformers config classes)."""
    import transformers as tf

    tok = tokenizer()
    vocab = len(tok)
    ids = dict(pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    if family == "llava":
        vision = dict(model_type="clip_vision_model", hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                      num_attention_heads=4, image_size=LLAVA_IMAGE, patch_size=16, projection_dim=128)
        text = dict(model_type="llama", vocab_size=vocab, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
                    **ids)
        return tf.LlavaConfig(vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids("<image>"),
                              vision_feature_layer=-1, vision_feature_select_strategy="default", **ids)
    if family == "qwen2_vl":
        text = dict(model_type="qwen2_vl_text", vocab_size=vocab, hidden_size=128, intermediate_size=384,
                    num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]},
                    tie_word_embeddings=True, **ids)
        vision = dict(depth=4, embed_dim=128, hidden_size=128, num_heads=4, mlp_ratio=4, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
        cfg = tf.Qwen2VLConfig(vision_config=vision, text_config=text,
                               image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"),
                               video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"),
                               vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
                               vision_end_token_id=tok.convert_tokens_to_ids("<|vision_end|>"), **ids)
        return cfg
    raise ValueError(f"unknown family {family!r}")


def prompt(family: str, question: str, video: bool = False) -> str:
    """The text for one question, laid out as real VLM prompts are (image or video, then question); the
    answer is the next token. Only the Qwen2-VL family reads videos."""
    if video and family == "llava":
        raise ValueError("the tiny LLaVA takes no video")
    pad = "<|video_pad|>" if video else "<|image_pad|>"
    visual = "<image>" if family == "llava" else f"<|vision_start|> {pad} <|vision_end|>"
    return f"<s> {visual} {question}"


def trained(name: str) -> bool:
    """Whether the package holds trained weights for the bundled model `name`."""
    return (BUNDLED / name / "model.safetensors").exists()


def load(name: str, dtype=torch.float32, attn: str = "sdpa"):
    """(model, processor) of a bundled model, from the package's files, offline."""
    import transformers as tf

    if name not in NAMES:
        raise ValueError(f"unknown bundled model {name!r}; bundled: {', '.join(NAMES)}")
    path = BUNDLED / name
    if not trained(name):
        raise FileNotFoundError(f"{path} has no weights; train them with scripts/train_tiny.py --family {NAMES[name]}")
    model = tf.AutoModelForImageTextToText.from_pretrained(os.fspath(path), dtype=dtype, attn_implementation=attn)
    return model.eval(), tf.AutoProcessor.from_pretrained(os.fspath(path))


def scene_size(family: str, split: str, index: int) -> tuple[int, int]:
    """LLaVA: fixed 224 x 224; Qwen2-VL: a per-scene size (multiples of 28) for its dynamic resolution."""
    from . import shapes

    return (LLAVA_IMAGE, LLAVA_IMAGE) if family == "llava" else shapes.qwen_size(split, index)


def family_of(model) -> str:
    name = type(model).__name__
    if name.startswith("Llava"):
        return "llava"
    if name.startswith(("Qwen2VL", "Qwen2_5_VL", "Qwen3VL", "Qwen3_5")):  # one prompt layout (<|vision_start|> ...)
        return "qwen2_vl"
    raise ValueError(f"not a bundled tiny model family: {name}")


@torch.no_grad()
def answers(model, proc, images, questions, batch_size: int = 32) -> list[str]:
    """Greedy one-word answers (the argmax next token after each prompt), batched, left-padded."""
    from .models import left_padding, to_model

    fam = family_of(model)
    out = []
    for i in range(0, len(questions), batch_size):
        texts = [prompt(fam, q) for q in questions[i:i + batch_size]]
        with left_padding(proc):  # a checkpoint's right padding would put pads at the read position
            inputs = proc(images=list(images[i:i + batch_size]), text=texts, padding=True, return_tensors="pt")
        inputs.pop("token_type_ids", None)
        inputs = to_model(inputs, model)
        logits = model(**inputs, logits_to_keep=1).logits[:, -1]
        out += proc.tokenizer.convert_ids_to_tokens(logits.argmax(-1).tolist())
    return out


def held_out(family: str, n_questions: int = 1200) -> list:
    """The fixed held-out `shapes` questions at `family`'s image sizes: (scene, image, question) each,
    every scene rendered once."""
    from . import shapes

    scenes = {}
    out = []
    for idx, q in shapes.eval_set(n_questions, sizes=lambda i: scene_size(family, "eval", i)):
        if idx not in scenes:
            scene = shapes.sample("eval", idx, *scene_size(family, "eval", idx))[0]
            scenes[idx] = (scene, shapes.render(scene))
        out.append((*scenes[idx], q))
    return out


def evaluate(model, proc, n_questions: int = 1200, batch_size: int = 32, progress: bool = False) -> dict:
    """Accuracy on the fixed held-out `shapes` questions, overall and per question kind (batched;
    `progress=True` shows a progress bar). Pruning patched onto `model` applies."""
    from . import shapes

    rows = held_out(family_of(model), n_questions)
    items = [q for _, _, q in rows]
    images = [img for _, img, _ in rows]
    got = []
    from tqdm.auto import tqdm

    with tqdm(total=len(items), desc="shapes", unit="q", disable=not progress) as bar:
        for i in range(0, len(items), batch_size):
            got += answers(model, proc, images[i:i + batch_size], [q.text for q in items[i:i + batch_size]], batch_size)
            bar.update(len(got) - bar.n)
    return shapes.report([(q.kind, a == q.answer) for q, a in zip(items, got)])


def accuracy_table() -> str:
    """Markdown table of the bundled models' held-out accuracy (from their train_log.json), per question
    kind, unpruned and with random pruning, beside the majority-answer baseline. The README embeds it."""
    import json

    from .shapes import KINDS

    rows = ["| model | setting | overall | " + " | ".join(KINDS) + " |", "|---|---|---|" + "---|" * len(KINDS)]
    for name in NAMES:
        path = BUNDLED / name / "train_log.json"
        if not path.exists():
            rows.append(f"| `{name}` | not trained yet |" + " |" * (1 + len(KINDS)))
            continue
        ev = json.loads(path.read_text()).get("eval", {})
        for key, label in (("full", "all tokens"), ("random@0.5", "random 50 %"), ("random@0.25", "random 25 %"),
                           ("random@0.111", "random 11 %"), ("majority_baseline", "majority answer")):
            if key in ev:
                r = ev[key]
                rows.append(f"| `{name}` | {label} | {r['overall']:.3f} | "
                            + " | ".join(f"{r['by_kind'].get(k, 0):.3f}" for k in KINDS) + " |")
    return "\n".join(rows)
