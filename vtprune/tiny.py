"""Tiny random-weight models of the real transformers classes, and inputs built without a processor.

Used by the tests and by `vtprune demo` until the bundled trained models exist; nothing here is
downloaded. Sample i of a batch = [BOS] + text + image block + text, with a different text length
per sample (and, for Qwen-VL, a different image size). Qwen-VL, LLaVA-NeXT-Video and LLaVA-OneVision samples
can also carry a short video after the image (`batch(..., videos=...)`).
"""
from __future__ import annotations

import torch

VOCAB, PAD, BOS, EOS = 256, 0, 1, 2
IMG, VID, VSTART, VEND = 250, 251, 252, 253
SPECIAL = [IMG, VID, VSTART, VEND]

LLAMA_TEXT = dict(model_type="llama", vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                  num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=512, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)
CLIP_VISION = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                   num_attention_heads=4, image_size=56, patch_size=14, projection_dim=32)
QWEN_TEXT = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                 rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 3, 3]),
                 pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)
QWEN_IDS = dict(image_token_id=IMG, video_token_id=VID, vision_start_token_id=VSTART, vision_end_token_id=VEND)
# Qwen3-VL's (and Qwen3.5's, which has no deepstack) tower, its text model's head size and interleaved M-RoPE
QWEN3_VISION = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, patch_size=16, spatial_merge_size=2,
                    temporal_patch_size=2, out_hidden_size=64, num_position_embeddings=16)
QWEN3_TEXT = dict(QWEN_TEXT, head_dim=16, rope_parameters=dict(QWEN_TEXT["rope_parameters"], mrope_interleaved=True))
SIGLIP_VISION = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                     num_attention_heads=4, image_size=56, patch_size=14)

FAMILIES = ["llava", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe"]
QWEN_FAMILIES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe"]
ANYRES_FAMILIES = ["llava_next", "llava_next_video", "llava_onevision"]
VIDEO_FAMILIES = [*QWEN_FAMILIES, "llava_next_video", "llava_onevision"]
# family -> the transformers class `build` makes
CLASSES = {"llava": "LlavaForConditionalGeneration", "llava_next": "LlavaNextForConditionalGeneration",
           "llava_next_video": "LlavaNextVideoForConditionalGeneration",
           "llava_onevision": "LlavaOnevisionForConditionalGeneration", "qwen2_vl": "Qwen2VLForConditionalGeneration",
           "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration", "qwen3_vl": "Qwen3VLForConditionalGeneration",
           "qwen3_vl_moe": "Qwen3VLMoeForConditionalGeneration", "qwen3_5": "Qwen3_5ForConditionalGeneration",
           "qwen3_5_moe": "Qwen3_5MoeForConditionalGeneration"}
# LLaVA-NeXT / OneVision (anyres): 56-px tiles of the tiny CLIP / SigLIP, a base tile + 2 or 4 crops per image
NEXT_PINPOINTS = [[56, 112], [112, 56], [112, 112]]
NEXT_SIZES = [(40, 90), (90, 40), (100, 100), (30, 110)]  # (height, width) of sample i % 4


def build(family: str, attn: str = "sdpa", seed: int = 0, sliding_window: int | None = None):
    import transformers as tf

    cfg = config(family, sliding_window)
    torch.manual_seed(seed)
    cfg._attn_implementation = attn
    model = getattr(tf, CLASSES[family])(cfg).eval()
    model.set_attn_implementation(attn)
    gc = model.generation_config
    gc.pad_token_id, gc.eos_token_id, gc.bos_token_id = PAD, EOS, BOS
    return model


def config(family: str, sliding_window: int | None = None):
    """The transformers config `build` makes the family's model from. `sliding_window` (llava only): a Mistral
    language model instead, attending `sliding_window` slots back in every layer (one model-wide window)."""
    import transformers as tf

    if sliding_window is not None and family != "llava":
        raise ValueError(f"sliding_window is for the llava family, not {family!r}")
    if family == "llava":
        text = LLAMA_TEXT if sliding_window is None else dict(LLAMA_TEXT, model_type="mistral",
                                                             sliding_window=sliding_window)
        cfg = tf.LlavaConfig(vision_config=CLIP_VISION, text_config=text, image_token_id=IMG,
                             image_seq_length=16, vision_feature_layer=-2, vision_feature_select_strategy="default")
    elif family == "llava_next":
        cfg = tf.LlavaNextConfig(vision_config=CLIP_VISION, text_config=LLAMA_TEXT, image_token_id=IMG,
                                 image_grid_pinpoints=NEXT_PINPOINTS, vision_feature_layer=-2,
                                 vision_feature_select_strategy="default")
    elif family == "llava_next_video":  # LLaVA-NeXT's images; video frames average-pooled 2x2 before the projector
        cfg = tf.LlavaNextVideoConfig(vision_config=CLIP_VISION, text_config=LLAMA_TEXT, image_token_id=IMG,
                                      video_token_id=VID, image_grid_pinpoints=NEXT_PINPOINTS, vision_feature_layer=-2,
                                      vision_feature_select_strategy="default", spatial_pool_mode="average",
                                      spatial_pool_stride=2)
    elif family == "llava_onevision":  # SigLIP (no CLS, all patches), Qwen2 LLM, anyres-max-9, videos
        cfg = tf.LlavaOnevisionConfig(vision_config=SIGLIP_VISION, text_config=dict(LLAMA_TEXT, model_type="qwen2"),
                                      image_token_id=IMG, video_token_id=VID, image_grid_pinpoints=NEXT_PINPOINTS,
                                      vision_feature_layer=-1, vision_feature_select_strategy="full",
                                      vision_aspect_ratio="anyres_max_9")
    elif family == "qwen2_vl":
        cfg = tf.Qwen2VLConfig(vision_config=dict(depth=2, embed_dim=32, hidden_size=64, mlp_ratio=2, num_heads=4,
                                                  patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
                               text_config=QWEN_TEXT, **QWEN_IDS)
    elif family == "qwen2_5_vl":
        cfg = tf.Qwen2_5_VLConfig(vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4,
                                                     patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                                                     window_size=56, out_hidden_size=64, fullatt_block_indexes=[1]),
                                  text_config=QWEN_TEXT, **QWEN_IDS)
    elif family in ("qwen3_vl", "qwen3_vl_moe"):  # deepstack: vision blocks 0 and 1 feed decoder layers 0 and 1
        text = dict(QWEN3_TEXT)
        make = tf.Qwen3VLConfig
        if family == "qwen3_vl_moe":  # every decoder MLP a mixture of 4 experts, 2 per token
            make = tf.Qwen3VLMoeConfig
            text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1)
        cfg = make(vision_config=dict(QWEN3_VISION, deepstack_visual_indexes=[0, 1]), text_config=text, **QWEN_IDS)
    elif family in ("qwen3_5", "qwen3_5_moe"):  # Qwen3-VL's tower without deepstack; Gated DeltaNet layers
        text = dict(QWEN3_TEXT, partial_rotary_factor=0.5,  # 8 rotary dims: M-RoPE sections 2 + 1 + 1
                    rope_parameters=dict(QWEN3_TEXT["rope_parameters"], mrope_section=[2, 1, 1]),
                    # attention where the strategies' defaults read it on 4 layers (fastv 1, todre 2, transprune 1
                    # and 2), linear attention first and after every drop
                    layer_types=["linear_attention", "full_attention", "full_attention", "linear_attention"],
                    linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=8)
        make = tf.Qwen3_5Config
        if family == "qwen3_5_moe":  # every MLP 4 experts, 2 per token, and a gated shared expert
            make = tf.Qwen3_5MoeConfig
            text.pop("intermediate_size")
            text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=48)
        cfg = make(vision_config=QWEN3_VISION, text_config=text, **QWEN_IDS)
    else:
        raise ValueError(family)
    return cfg


# Qwen image grids (t, h, w) in ViT patches; LLM tokens = t*h*w/4
QWEN_GRIDS = [(1, 8, 8), (1, 4, 8), (1, 8, 4), (1, 6, 6)]
# Qwen video clips (t, h, w) in ViT patches: t temporal patches = t frames of h*w/4 LLM tokens each
VIDEO_GRIDS = [(2, 4, 4), (3, 4, 6)]


def _patch_dim(family: str) -> int:
    return 3 * 2 * (16 if family.startswith("qwen3") else 14) ** 2


def _video(family: str, i: int, g: torch.Generator):
    """Token ids and inputs of sample i's video clip. Qwen3-VL: one vision_start/end group per frame
    with a timestamp token before it, as its processor writes them; Qwen2/2.5: one group.
    LLaVA-NeXT-Video and LLaVA-OneVision: 3 frames of 56 px (a batch's clips share one tensor), each pooled to
    2x2 tokens; OneVision then adds one newline token."""
    if family in ("llava_next_video", "llava_onevision"):
        frames = 3
        ids = [VID] * (frames * 4 + (family == "llava_onevision"))
        return ids, {"pixel_values_videos": torch.randn(1, frames, 3, 56, 56, generator=g)}
    t, h, w = VIDEO_GRIDS[i % len(VIDEO_GRIDS)]
    per_frame = h * w // 4
    if family.startswith("qwen3"):
        ids = sum(([3 + f, VSTART] + [VID] * per_frame + [VEND] for f in range(t)), [])
    else:
        ids = [VSTART] + [VID] * (t * per_frame) + [VEND]
    vis = {"pixel_values_videos": torch.randn(t * h * w, _patch_dim(family), generator=g),
           "video_grid_thw": torch.tensor([[t, h, w]])}
    return ids, vis


def sample(family: str, i: int, seed: int = 0, video: bool = False):
    """One sample's token ids (list) and its visual inputs (dict of tensors for a batch of one).
    video=True (VIDEO_FAMILIES): a video clip follows the image."""
    g = torch.Generator().manual_seed(1000 * seed + i)
    before = (torch.randint(3, 200, (2 + 2 * i,), generator=g)).tolist()
    after = (torch.randint(3, 200, (3 + (i % 2),), generator=g)).tolist()
    if family == "llava":
        ids = [BOS] + before + [IMG] * 16 + after
        vis = {"pixel_values": torch.randn(1, 3, 56, 56, generator=g)}
    elif family in ANYRES_FAMILIES:
        h, w = NEXT_SIZES[i % len(NEXT_SIZES)]
        n, tiles = next_tokens(h, w)
        ids = [BOS] + before + [IMG] * n + after
        vis = {"pixel_values": torch.randn(1, tiles, 3, 56, 56, generator=g), "image_sizes": torch.tensor([[h, w]])}
    else:
        t, h, w = QWEN_GRIDS[i % len(QWEN_GRIDS)]
        n = t * h * w // 4
        ids = [BOS] + before + [VSTART] + [IMG] * n + [VEND] + after
        vis = {"pixel_values": torch.randn(t * h * w, _patch_dim(family), generator=g),
               "image_grid_thw": torch.tensor([[t, h, w]])}
    if video:
        if family not in VIDEO_FAMILIES:
            raise ValueError(f"tiny video inputs exist for {VIDEO_FAMILIES}, not {family!r}")
        vids, vvis = _video(family, i, g)
        ids = ids[:-len(after)] + [7] + vids + after
        vis.update(vvis)
    return ids, vis


def next_tokens(height: int, width: int, tile: int = 56, patch: int = 14, pinpoints=None) -> tuple[int, int]:
    """(image tokens, tiles) of a LLaVA-NeXT image: the base tile's patches, then the crops' patches
    after unpadding to the image's aspect ratio with one newline token per row (the processor's rule)."""
    from transformers.image_processing_utils import select_best_resolution

    bh, bw = select_best_resolution([height, width], pinpoints or NEXT_PINPOINTS)
    sh, sw = bh // tile, bw // tile
    side = tile // patch
    ch, cw = side * sh, side * sw
    if width / height > cw / ch:
        ch -= 2 * ((ch - int(round(height * (cw / width), 7))) // 2)
    else:
        cw -= 2 * ((cw - int(round(width * (ch / height), 7))) // 2)
    return side * side + ch * cw + ch, 1 + sh * sw


def batch(family: str, indices, padding: str = "left", seed: int = 0, videos=()):
    """Batch the given samples with padding on one side; returns kwargs for forward/generate.
    videos: the sample indices (values of `indices`) that also carry a video clip (VIDEO_FAMILIES)."""
    samples = [sample(family, i, seed, video=i in videos) for i in indices]
    length = max(len(ids) for ids, _ in samples)
    ids_rows, mask_rows = [], []
    for ids, _ in samples:
        pad = [PAD] * (length - len(ids))
        ones, zeros = [1] * len(ids), [0] * len(pad)
        ids_rows.append(pad + ids if padding == "left" else ids + pad)
        mask_rows.append(zeros + ones if padding == "left" else ones + zeros)
    out = {"input_ids": torch.tensor(ids_rows), "attention_mask": torch.tensor(mask_rows)}
    if family in ANYRES_FAMILIES:  # crops padded to the batch's largest count, as the processor does
        tiles = max(v["pixel_values"].shape[1] for _, v in samples)
        out["pixel_values"] = torch.cat([torch.nn.functional.pad(v["pixel_values"], (0, 0, 0, 0, 0, 0, 0,
                                         tiles - v["pixel_values"].shape[1])) for _, v in samples])
        out["image_sizes"] = torch.cat([v["image_sizes"] for _, v in samples])
        clips = [v["pixel_values_videos"] for _, v in samples if "pixel_values_videos" in v]
        if clips:  # one tensor [videos, frames, ...]: clips of one batch need the same frame count
            if len({c.shape[1] for c in clips}) > 1:
                raise ValueError("LLaVA-NeXT-Video/OneVision videos in one batch need the same number of frames")
            out["pixel_values_videos"] = torch.cat(clips)
        return out
    out["pixel_values"] = torch.cat([v["pixel_values"] for _, v in samples])
    if family != "llava":
        out["image_grid_thw"] = torch.cat([v["image_grid_thw"] for _, v in samples])
        out["mm_token_type_ids"] = token_types(out["input_ids"])
        clips = [v for _, v in samples if "video_grid_thw" in v]
        if clips:
            out["pixel_values_videos"] = torch.cat([v["pixel_values_videos"] for v in clips])
            out["video_grid_thw"] = torch.cat([v["video_grid_thw"] for v in clips])
    return out


def token_types(input_ids: torch.Tensor) -> torch.Tensor:
    """Qwen-VL's mm_token_type_ids: 0 text, 1 image, 2 video placeholders."""
    return (input_ids == IMG).int() + 2 * (input_ids == VID).int()


def lm_kwargs(model, inputs) -> dict:
    """The keyword arguments the language model receives when `model` runs on `inputs` (after any
    pruning patched onto it)."""
    got = {}

    def grab(module, args, kwargs):
        got.update(kwargs)

    handle = model.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
    return got


def real_slots(inputs) -> list[torch.Tensor]:
    """Per sample, the sequence slots holding real tokens."""
    return [row.nonzero().squeeze(1) for row in inputs["attention_mask"]]


GEN = dict(do_sample=False, suppress_tokens=SPECIAL)
