"""Full-scale architectures with random weights, for speed and memory figures without downloading
anything: the published configs of LLaVA-1.5-7B, LLaVA-NeXT-7B (v1.6-vicuna), LLaVA-NeXT-Video-7B, LLaVA-OneVision-7B, Qwen2-VL-7B,
Qwen2.5-VL-7B, Qwen3-VL-8B, Qwen3-VL-30B-A3B and Qwen3.5-27B written out as transformers config objects, and synthetic inputs shaped like a real
prompt (image tokens + text).

  vtprune bench --model llava-1.5-7b --random-weights --methods divprune,fastv --keep 64 --batch 1,8

Weights are random, so the outputs are meaningless; shapes, FLOPs, latency and memory are real.
"""
from __future__ import annotations

import torch

LLAMA2_7B = dict(model_type="llama", vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5,
                 pad_token_id=32001, bos_token_id=1, eos_token_id=2)
CLIP_L336 = dict(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                 num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768)
_QWEN2_7B_TEXT = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                      num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768, rms_norm_eps=1e-6,
                      rope_parameters=dict(rope_type="default", rope_theta=1000000.0, mrope_section=[16, 24, 24]),
                      tie_word_embeddings=False, bos_token_id=151643, eos_token_id=151645)
_QWEN_IDS = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653)


def llava_1_5_7b():
    import transformers as tf

    return tf.LlavaConfig(vision_config=CLIP_L336, text_config=LLAMA2_7B, image_token_id=32000, image_seq_length=576,
                          vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu",
                          pad_token_id=32001)


def llava_next_7b():
    """llava-v1.6-vicuna-7b: LLaVA-1.5-7B's tower and LLM, anyres tiles up to 672 x 672 (+ image_newline)."""
    import transformers as tf

    return tf.LlavaNextConfig(vision_config=CLIP_L336, text_config=LLAMA2_7B, image_token_id=32000,
                              image_grid_pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
                              vision_feature_layer=-2, vision_feature_select_strategy="default",
                              projector_hidden_act="gelu", pad_token_id=32001)


def llava_next_video_7b():
    """LLaVA-NeXT-Video-7B: LLaVA-NeXT-7B's tower, LLM and anyres images; video frames average-pooled 24 x 24 ->
    12 x 12 (144 tokens) before the projector. Token ids as in transformers' defaults (video 32000, image 32001)."""
    import transformers as tf

    return tf.LlavaNextVideoConfig(vision_config=CLIP_L336, text_config=LLAMA2_7B, image_token_id=32001,
                                   video_token_id=32000, image_grid_pinpoints=llava_next_7b().image_grid_pinpoints,
                                   vision_feature_layer=-2, vision_feature_select_strategy="default",
                                   spatial_pool_mode="average", spatial_pool_stride=2, projector_hidden_act="gelu",
                                   pad_token_id=32001)


def llava_onevision_7b():
    """llava-onevision-qwen2-7b-ov: SigLIP-so400m at 384 px (26 layers used, no pooling head), Qwen2-7B,
    anyres-max-9 over 384-px tiles (transformers' default pinpoints: 1 x 1 to 6 x 6 tiles)."""
    import transformers as tf

    vision = dict(model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304, patch_size=14,
                  image_size=384, num_hidden_layers=26, num_attention_heads=16, vision_use_head=False)
    text = dict(model_type="qwen2", **{**_QWEN2_7B_TEXT, "vocab_size": 152128, "rope_parameters": dict(
        rope_type="default", rope_theta=1000000.0)})
    return tf.LlavaOnevisionConfig(vision_config=vision, text_config=text, image_token_index=151646,
                                   video_token_index=151647, vision_feature_layer=-1,
                                   vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9")


def qwen2_vl_7b():
    import transformers as tf

    vision = dict(depth=32, embed_dim=1280, hidden_size=3584, num_heads=16, mlp_ratio=4, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, in_channels=3, hidden_act="quick_gelu")
    return tf.Qwen2VLConfig(vision_config=vision, text_config=dict(_QWEN2_7B_TEXT), **_QWEN_IDS)


def qwen2_5_vl_7b():
    import transformers as tf

    vision = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31],
                  hidden_act="silu", in_channels=3, tokens_per_second=2)
    # the published text config differs from Qwen2-VL-7B's in its context length only
    return tf.Qwen2_5_VLConfig(vision_config=vision, text_config={**_QWEN2_7B_TEXT, "max_position_embeddings": 128000},
                               **_QWEN_IDS)


def _qwen3_vision(out_hidden_size: int, deepstack=(8, 16, 24)) -> dict:
    """Qwen3-VL's (and Qwen3.5's, without deepstack) 27-block SigLIP-2-style ViT with 16-px patches, merging
    to the LLM's width."""
    vision = dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, patch_size=16,
                  out_hidden_size=out_hidden_size, spatial_merge_size=2, temporal_patch_size=2,
                  num_position_embeddings=2304, hidden_act="gelu_pytorch_tanh", in_channels=3)
    return dict(vision, deepstack_visual_indexes=list(deepstack)) if deepstack else vision


def qwen3_vl_8b():
    """Qwen3-VL-8B-Instruct: Qwen3-8B (q/k norms, interleaved M-RoPE) and a 27-block SigLIP-2-style ViT
    with 16-px patches whose blocks 8, 16 and 24 feed the first three decoder layers (deepstack)."""
    import transformers as tf

    text = dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=262144,
                rms_norm_eps=1e-6, rope_parameters=dict(rope_type="default", rope_theta=5000000.0,
                                                        mrope_section=[24, 20, 20], mrope_interleaved=True),
                bos_token_id=151643, eos_token_id=151645)
    return tf.Qwen3VLConfig(vision_config=_qwen3_vision(4096), text_config=text, tie_word_embeddings=False, **_QWEN_IDS)


def qwen3_vl_30b_a3b():
    """Qwen3-VL-30B-A3B-Instruct: Qwen3-30B-A3B (48 layers, every MLP 128 experts of width 768, 8 per token)
    and Qwen3-VL-8B's vision tower, its mergers projecting to the LLM's width 2048."""
    import transformers as tf

    text = dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=48,
                num_attention_heads=32, num_key_value_heads=4, head_dim=128, max_position_embeddings=262144,
                num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768, decoder_sparse_step=1,
                mlp_only_layers=[], rms_norm_eps=1e-6,
                rope_parameters=dict(rope_type="default", rope_theta=5000000.0, mrope_section=[24, 20, 20],
                                     mrope_interleaved=True),
                bos_token_id=151643, eos_token_id=151645)
    return tf.Qwen3VLMoeConfig(vision_config=_qwen3_vision(2048), text_config=text, tie_word_embeddings=False, **_QWEN_IDS)


def qwen3_5_27b():
    """Qwen3.5-27B: 64 decoder layers, each group of four three Gated DeltaNet (linear attention: 16 key and 48 value
    heads of 128) and one gated attention layer (24 query heads, 4 key/value heads of 256, 25 % rotary); Qwen3-VL's
    vision tower without deepstack, merging to the LLM's width 5120. Token ids as Qwen3-VL's (any serve here)."""
    import transformers as tf

    text = dict(vocab_size=248320, hidden_size=5120, intermediate_size=17408, num_hidden_layers=64,
                num_attention_heads=24, num_key_value_heads=4, head_dim=256, linear_num_key_heads=16,
                linear_num_value_heads=48, linear_key_head_dim=128, linear_value_head_dim=128, linear_conv_kernel_dim=4,
                full_attention_interval=4, max_position_embeddings=262144, rms_norm_eps=1e-6, partial_rotary_factor=0.25,
                rope_parameters=dict(rope_type="default", rope_theta=10000000.0, mrope_section=[11, 11, 10],
                                     mrope_interleaved=True, partial_rotary_factor=0.25))
    return tf.Qwen3_5Config(vision_config=_qwen3_vision(5120, deepstack=()), text_config=text, tie_word_embeddings=False, **_QWEN_IDS)


FULL_SCALE = {"llava-1.5-7b": llava_1_5_7b, "llava-next-7b": llava_next_7b, "llava-next-video-7b": llava_next_video_7b,
              "llava-onevision-7b": llava_onevision_7b,
              "qwen2-vl-7b": qwen2_vl_7b,
              "qwen2.5-vl-7b": qwen2_5_vl_7b, "qwen3-vl-8b": qwen3_vl_8b, "qwen3-vl-30b-a3b": qwen3_vl_30b_a3b,
              "qwen3.5-27b": qwen3_5_27b}


def build(name: str, device=None, dtype=None, attn: str = "sdpa"):
    """A full-scale model with random weights (bf16 on CUDA by default). Needs ~16 GB of GPU memory for the 7-8 B
    models, ~55 GB for qwen3.5-27b, ~62 GB for qwen3-vl-30b-a3b."""
    import transformers as tf

    if name not in FULL_SCALE:
        raise ValueError(f"unknown full-scale config {name!r}; available: {', '.join(FULL_SCALE)}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if str(device) == "cpu" and dtype is None:
        size = {"qwen3-vl-30b-a3b": "~31 B", "qwen3.5-27b": "~27 B"}.get(name, "~7-8 B")
        raise ValueError(f"{name} with random weights is a {size} parameter model: build it on a CUDA device "
                         "(or pass dtype= explicitly to build it on the CPU anyway)")
    dtype = dtype or torch.bfloat16
    torch.manual_seed(0)
    with torch.device(device):
        model = tf.AutoModelForImageTextToText.from_config(FULL_SCALE[name](), attn_implementation=attn, dtype=dtype)
    return model.eval()


VIDEO_FRAMES = 32  # synthetic clips: LLaVA-NeXT-Video's and LLaVA-OneVision's frame count


def synthetic_inputs(model, batch: int, text_tokens: int = 48, image_px: int | None = None, seed: int = 0,
                     frames: int = 0) -> dict:
    """A batch of prompts shaped like real ones: BOS + one image + `text_tokens` random text tokens (Qwen:
    vision start/end around the image), no padding. LLaVA images are the tower's size; Qwen images are
    `image_px` square (default 24 merged patches a side -> 576 visual tokens, as many as LLaVA-1.5:
    672 px for Qwen2/2.5-VL, 768 px for Qwen3-VL).

    frames > 0: a video clip of that many frames instead of the image (models with video input). LLaVA
    frames are the tower's size (NeXT-Video: 144 tokens each at 336 px; OneVision: 196 at 384 px, then a
    newline); Qwen frames are `image_px` square (default 12 merged patches a side: 144 tokens per
    temporal patch of 2 frames; 336 px for Qwen2/2.5-VL, 384 px for Qwen3-VL and Qwen3.5)."""
    cfg = model.config
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    g = torch.Generator().manual_seed(seed)
    vocab = cfg.get_text_config().vocab_size
    text = torch.randint(3, min(vocab, 30000), (batch, text_tokens), generator=g)
    special = {getattr(cfg, k, None) for k in ("image_token_id", "image_token_index", "video_token_id",
                                               "video_token_index", "vision_start_token_id", "vision_end_token_id")}
    special |= {getattr(cfg.get_text_config(), k, None) for k in ("pad_token_id", "eos_token_id", "bos_token_id")}
    special = sorted(t for t in special if isinstance(t, int) and 3 <= t < min(vocab, 30000))
    if special:  # small vocabularies: a random "text" token must not be an image placeholder or a special token
        ordinary = torch.tensor([t for t in range(3, min(vocab, 30000)) if t not in special])
        text = ordinary[torch.randint(len(ordinary), (batch, text_tokens), generator=g)]
    name = type(model).__name__
    if frames:
        out = _synthetic_video(model, batch, frames, image_px, g)
        out["input_ids"] = torch.cat([out["input_ids"], text], 1)
        if name.startswith(("Qwen2", "Qwen3")):
            out["mm_token_type_ids"] = 2 * (out["input_ids"] == cfg.video_token_id).int()  # 2 = video, for M-RoPE
    elif name.startswith("Llava"):
        vc = cfg.vision_config
        if name.startswith(("LlavaNext", "LlavaOnevision")):  # anyres: base tile + crops (+ a newline per row);
            from ..tiny import next_tokens                     # default 2 x 2 tiles: 672 px -> 2928 tokens (NeXT)

            px = image_px or 2 * vc.image_size
            n, tiles = next_tokens(px, px, vc.image_size, vc.patch_size, cfg.image_grid_pinpoints)
            if name.startswith("LlavaOnevision") and px > 3 * vc.image_size:  # > 3 x 3 tiles: downsampled
                raise ValueError(f"{px} px would be downsampled by anyres_max_9: pick image_px <= {3 * vc.image_size}")
            pixels = torch.randn(batch, tiles, 3, vc.image_size, vc.image_size, generator=g)
            out = dict(pixel_values=pixels, image_sizes=torch.tensor([[px, px]] * batch))
        else:
            n = (vc.image_size // vc.patch_size) ** 2
            out = dict(pixel_values=torch.randn(batch, 3, vc.image_size, vc.image_size, generator=g))
        out["input_ids"] = torch.cat([torch.ones(batch, 1, dtype=torch.long), torch.full((batch, n), cfg.image_token_id),
                                      text], 1)
    elif name.startswith(("Qwen2", "Qwen3")):
        vc = cfg.vision_config
        side = _qwen_side(vc, image_px, 24)
        n = side * side // vc.spatial_merge_size ** 2
        block = torch.cat([torch.tensor([cfg.vision_start_token_id]), torch.full((n,), cfg.image_token_id),
                           torch.tensor([cfg.vision_end_token_id])])
        bos = cfg.get_text_config().bos_token_id or 1
        ids = torch.cat([torch.full((batch, 1), bos), block.expand(batch, -1), text], 1)
        patch_dim = vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2
        pixels = torch.randn(batch * side * side, patch_dim, generator=g)
        out = dict(input_ids=ids, pixel_values=pixels, image_grid_thw=torch.tensor([[1, side, side]] * batch),
                   mm_token_type_ids=(ids == cfg.image_token_id).int())  # 1 = image token, for M-RoPE
    else:
        raise ValueError(f"no synthetic inputs for {name}")
    out["attention_mask"] = torch.ones_like(out["input_ids"])
    return {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in out.items()}


def _qwen_side(vc, px: int | None, merged: int) -> int:
    """ViT patches a side of a square Qwen image or frame of `px` pixels (default: `merged` merged patches a side)."""
    side = (px or merged * vc.spatial_merge_size * vc.patch_size) // vc.patch_size
    if side % vc.spatial_merge_size:
        raise ValueError(f"image_px must be a multiple of {vc.patch_size * vc.spatial_merge_size}")
    return side


def _synthetic_video(model, batch: int, frames: int, px: int | None, g) -> dict:
    """BOS + one clip of `frames` random frames per sample (input_ids without the text, and the video inputs)."""
    cfg = model.config
    vc = cfg.vision_config
    name = type(model).__name__
    bos = torch.full((batch, 1), cfg.get_text_config().bos_token_id or 1)
    if name.startswith(("LlavaNextVideo", "LlavaOnevision")):
        side = vc.image_size // vc.patch_size
        if name.startswith("LlavaOnevision"):
            n = frames * ((side + 1) // 2) ** 2 + 1  # apply_pooling's ceil(side / 2) a side, then one newline
        else:
            n = frames * (side // cfg.spatial_pool_stride) ** 2
        pixels = torch.randn(batch, frames, 3, vc.image_size, vc.image_size, generator=g)
        return dict(input_ids=torch.cat([bos, torch.full((batch, n), cfg.video_token_id)], 1), pixel_values_videos=pixels)
    if name.startswith(("Qwen2", "Qwen3")):
        merge, tp = vc.spatial_merge_size, vc.temporal_patch_size
        side = _qwen_side(vc, px, 12)
        if frames % tp:
            raise ValueError(f"{name} videos take frames in groups of {tp}: give a multiple of {tp}")
        t = frames // tp
        per = side * side // merge ** 2
        start, end = torch.tensor([cfg.vision_start_token_id]), torch.tensor([cfg.vision_end_token_id])
        group = torch.cat([start, torch.full((per,), cfg.video_token_id), end])
        if name.startswith("Qwen3"):  # (and Qwen3.5) one group per temporal patch, after a timestamp (one token here)
            block = torch.cat([torch.cat([torch.tensor([3 + i % 100]), group]) for i in range(t)])
        else:
            block = torch.cat([start, torch.full((t * per,), cfg.video_token_id), end])
        patch_dim = vc.in_channels * tp * vc.patch_size ** 2
        return dict(input_ids=torch.cat([bos, block.expand(batch, -1)], 1),
                    pixel_values_videos=torch.randn(batch * t * side * side, patch_dim, generator=g),
                    video_grid_thw=torch.tensor([[t, side, side]] * batch))
    raise ValueError(f"{name} takes no video input: task 'synthetic-video' needs a video model "
                     "(LLaVA-NeXT-Video, LLaVA-OneVision, Qwen2/2.5/3-VL, Qwen3.5)")


def surrogate(config):
    """A narrow copy of a full-scale config: the same layer counts, image geometry, token ids and
    vocabulary and head sizes, but one attention head per layer and MLPs as narrow, so it runs on a CPU.
    The tokens entering each decoder layer under a strategy's budget and schedule are the real model's
    (data-dependent choices, e.g. ToDRE's stage-2 trigger, follow the random weights); `flops.count`
    then applies the real config's dimensions to them."""
    import copy

    import transformers as tf

    cfg = copy.deepcopy(config)
    tc, vc = cfg.get_text_config(), cfg.vision_config
    head = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads  # RoPE sections need it
    tc.hidden_size, tc.intermediate_size, tc.num_attention_heads, tc.num_key_value_heads = head, head, 1, 1
    if getattr(tc, "num_experts", 0):  # routing changes no token count: two narrow experts, one per token
        tc.num_experts, tc.num_experts_per_tok, tc.moe_intermediate_size = 2, 1, head
    if getattr(tc, "linear_num_key_heads", None):  # Qwen3.5's linear attention: one narrow head
        tc.linear_num_key_heads = tc.linear_num_value_heads = 1
        tc.linear_key_head_dim = tc.linear_value_head_dim = min(head, 16)
    if getattr(tc, "head_dim", None):
        tc.head_dim = head
    name = type(cfg).__name__
    if name.startswith("Llava"):
        vh = vc.hidden_size // vc.num_attention_heads
        vc.hidden_size, vc.intermediate_size, vc.num_attention_heads, vc.projection_dim = vh, vh, 1, vh
    elif name.startswith("Qwen2VL"):
        vc.embed_dim, vc.num_heads, vc.mlp_ratio, vc.hidden_size = vc.embed_dim // vc.num_heads, 1, 1, head
    elif name.startswith(("Qwen2_5_VL", "Qwen3VL", "Qwen3_5")):
        vh = vc.hidden_size // vc.num_heads
        vc.hidden_size, vc.intermediate_size, vc.num_heads, vc.out_hidden_size = vh, vh, 1, head
    else:
        raise ValueError(f"no surrogate for {name}")
    torch.manual_seed(0)
    return tf.AutoModelForImageTextToText.from_config(cfg, attn_implementation="sdpa").eval()
