"""Full-scale random-weight architectures (built on the meta device here) and synthetic inputs."""
import pytest
import torch

from vtprune import tiny
from vtprune.eval import configs, models


@pytest.mark.parametrize("name, params", [("llava-1.5-7b", 7_063_427_072), ("llava-next-7b", 7_063_427_072 + 4096),
                                          ("llava-next-video-7b", 7_063_427_072 + 4096),  # NeXT's; its pooling has none
                                          ("llava-onevision-7b", 8_030_807_584),
                                          ("qwen2-vl-7b", 8_291_375_616),
                                          ("qwen2.5-vl-7b", 8_292_166_656),
                                          ("qwen3-vl-8b", 8_767_123_696)])
def test_full_scale_configs_have_the_published_size(name, params):
    model = configs.build(name, device="meta", dtype=torch.bfloat16)
    assert sum(p.numel() for p in model.parameters()) == params  # the model cards' counts


LLAVA = {"text.num_attention_heads": 32, "text.num_key_value_heads": 32, "text.max_position_embeddings": 4096,
         "text.rope_parameters.rope_theta": 10000.0, "vision.num_attention_heads": 16, "vision.hidden_act": "quick_gelu",
         "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "projector_hidden_act": "gelu"}
QWEN2 = {"text.num_attention_heads": 28, "text.num_key_value_heads": 4, "text.rope_parameters.rope_theta": 1e6,
         "image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652, "vision_end_token_id": 151653,
         "vision.num_heads": 16, "vision.patch_size": 14, "vision.spatial_merge_size": 2, "vision.temporal_patch_size": 2}
QWEN3 = {"text.head_dim": 128, "text.max_position_embeddings": 262144, "text.rope_parameters.rope_theta": 5e6,
         "text.rope_parameters.mrope_section": [24, 20, 20], "text.rope_parameters.mrope_interleaved": True,
         "image_token_id": 151655, "video_token_id": 151656, "vision.num_heads": 16, "vision.patch_size": 16,
         "vision.num_position_embeddings": 2304, "vision.hidden_act": "gelu_pytorch_tanh",
         "vision.deepstack_visual_indexes": [8, 16, 24]}


@pytest.mark.parametrize("name, published", [
    ("llava-1.5-7b", {**LLAVA, "image_token_id": 32000, "image_seq_length": 576}),
    ("llava-next-7b", {**LLAVA, "image_token_id": 32000,
                       "image_grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]}),
    ("llava-next-video-7b", {**LLAVA, "image_token_id": 32001, "video_token_id": 32000, "spatial_pool_mode": "average",
                             "spatial_pool_stride": 2}),
    ("llava-onevision-7b", {"text.num_attention_heads": 28, "text.num_key_value_heads": 4,
                            "text.rope_parameters.rope_theta": 1e6, "image_token_id": 151646, "video_token_id": 151647,
                            "vision_feature_layer": -1, "vision_feature_select_strategy": "full",
                            "vision_aspect_ratio": "anyres_max_9", "vision.num_attention_heads": 16}),
    ("qwen2-vl-7b", {**QWEN2, "text.max_position_embeddings": 32768, "text.rope_parameters.mrope_section": [16, 24, 24],
                     "vision.hidden_act": "quick_gelu"}),
    ("qwen2.5-vl-7b", {**QWEN2, "text.max_position_embeddings": 128000, "text.rope_parameters.mrope_section": [16, 24, 24],
                       "vision.hidden_act": "silu", "vision.window_size": 112,
                       "vision.fullatt_block_indexes": [7, 15, 23, 31], "vision.tokens_per_second": 2}),
    ("qwen3-vl-8b", {**QWEN3, "text.num_attention_heads": 32, "text.num_key_value_heads": 8}),
    ("qwen3-vl-30b-a3b", {**QWEN3, "text.num_attention_heads": 32, "text.num_key_value_heads": 4})])
def test_full_scale_configs_have_the_published_values_a_parameter_count_cannot_see(name, published):
    """The checkpoints' config.json values that leave the parameter count alone (head split of an MHA model,
    RoPE, token ids, feature layer and selection, tiling, pooling, windowed blocks, deepstack taps) but
    change the attention, the positions, the visual tokens or the vision FLOPs."""
    config = configs.FULL_SCALE[name]()

    def value(path):
        first, *rest = path.split(".")
        obj = {"text": config.get_text_config(), "vision": config.vision_config}.get(first)
        obj = getattr(config, first) if obj is None else obj
        for key in rest:
            obj = obj[key] if isinstance(obj, dict) else getattr(obj, key)
        return list(obj) if isinstance(obj, tuple) else obj

    assert {path: value(path) for path in published} == published


def test_the_mixture_of_experts_config_has_the_published_size():
    """Qwen3-VL-30B-A3B: the model card says 31.1 B parameters (it gives no exact count)."""
    model = configs.build("qwen3-vl-30b-a3b", device="meta", dtype=torch.bfloat16)
    assert round(sum(p.numel() for p in model.parameters()) / 1e8) == 311
    text = model.config.text_config
    assert [type(layer.mlp).__name__ for layer in model.model.language_model.layers] == ["Qwen3VLMoeTextSparseMoeBlock"] * 48
    assert (text.num_experts, text.num_experts_per_tok, text.moe_intermediate_size) == (128, 8, 768)


def test_the_hybrid_config_has_the_published_layout():
    """Qwen3.5-27B: 27 B parameters; every fourth decoder layer gated attention, the others Gated DeltaNet."""
    model = configs.build("qwen3.5-27b", device="meta", dtype=torch.bfloat16)
    assert round(sum(p.numel() for p in model.parameters()) / 1e9) == 27
    layers = model.model.language_model.layers
    assert [i for i, layer in enumerate(layers) if hasattr(layer, "self_attn")] == list(range(3, 64, 4))
    assert layers[3].self_attn.q_proj.out_features == 2 * 24 * 256  # queries and their output gate


def test_full_scale_needs_random_weights_and_a_gpu():
    with pytest.raises(ValueError, match="--random-weights"):
        models.load("llava-1.5-7b")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            configs.build("qwen2-vl-7b")


@pytest.mark.parametrize("family, px, visual", [("llava", None, 16), ("llava_next", 100, 88),
                                                ("llava_onevision", 100, 88), ("qwen2_vl", 56, 4),
                                                ("qwen2_5_vl", 112, 16), ("qwen3_vl", 64, 4),
                                                ("qwen3_vl_moe", 64, 4), ("qwen3_5", 64, 4),
                                                ("qwen3_5_moe", 64, 4)])
def test_synthetic_inputs_run_through_the_model(family, px, visual):
    model = tiny.build(family)
    inputs = configs.synthetic_inputs(model, 2, text_tokens=5, image_px=px)
    image_id = model.config.image_token_id
    assert (inputs["input_ids"] == image_id).sum(1).tolist() == [visual, visual]
    with torch.no_grad():
        out = model(**inputs, logits_to_keep=1)
    assert out.logits.shape[:2] == (2, 1)
    batches = models.calibration("synthetic", model, None, 5, batch_size=2)
    assert [b["input_ids"].shape[0] for b in batches] == [2, 2, 1]


@pytest.mark.parametrize("family, px, frames, placeholders, length", [
    ("llava_next_video", None, 8, 8 * 4, 1 + 8 * 4 + 5),  # 8 frames of 2 x 2 pooled tokens
    ("llava_onevision", None, 8, 8 * 4 + 1, 1 + 8 * 4 + 1 + 5),  # and a newline
    ("qwen2_vl", 56, 4, 4 * 4, 1 + 1 + 4 * 4 + 1 + 5),  # 4 temporal patches (of 2 frames) of 2 x 2 merged patches
    ("qwen2_5_vl", 112, 4, 4 * 16, 1 + 1 + 4 * 16 + 1 + 5),
    ("qwen3_vl", 64, 4, 4 * 4, 1 + 4 * (3 + 4) + 5),  # a timestamp, start and end around each temporal patch
    ("qwen3_5", 64, 4, 4 * 4, 1 + 4 * (3 + 4) + 5)])
def test_synthetic_video_inputs_run_through_the_model(family, px, frames, placeholders, length):
    """frames=8: one clip instead of the image; every video placeholder is filled (the model checks it),
    keep-all is bit-identical and a strategy prunes each frame to its budget."""
    import vtprune

    model = tiny.build(family)
    inputs = configs.synthetic_inputs(model, 2, text_tokens=5, image_px=px, frames=8)
    assert inputs["input_ids"].shape == (2, length)
    assert (inputs["input_ids"] == model.config.video_token_id).sum(1).tolist() == [placeholders] * 2
    assert not (inputs["input_ids"] == model.config.image_token_id).any()
    with torch.no_grad():
        ref = model(**inputs).logits
        with vtprune.pruned(model, "divprune", keep=10_000):
            assert torch.equal(model(**inputs).logits, ref)
        with vtprune.pruned(model, "divprune", keep=2):
            model(**inputs)
            assert vtprune.stats(model).visual_after == [frames * 2] * 2
    assert [b["input_ids"].shape[0] for b in models.calibration("synthetic-video", model, None, 3, batch_size=2)] == [2, 1]


def test_synthetic_video_inputs_refuse_what_cannot_hold_a_clip():
    with pytest.raises(ValueError, match="LlavaNextForConditionalGeneration takes no video input"):
        configs.synthetic_inputs(tiny.build("llava_next"), 1, frames=8)
    with pytest.raises(ValueError, match="frames in groups of 2: give a multiple of 2"):
        configs.synthetic_inputs(tiny.build("qwen2_vl"), 1, image_px=56, frames=3)
    with pytest.raises(ValueError, match="llava-1.5-7b takes no video input: task 'synthetic-video' needs a model that "
                                         "does, e.g. llava-next-video-7b, llava-onevision-7b, qwen2-vl-7b"):
        models.check_task("synthetic-video", "llava-1.5-7b")
    for name in ("tiny-test-llava-next", "tiny-llava"):  # test and bundled models: known before they load too
        with pytest.raises(ValueError, match=f"{name} takes no video input"):
            models.check_task("synthetic-video", name)
    with pytest.raises(ValueError, match="tiny-qwen2vl videos take frames in groups of 2: give --frames a multiple"):
        models.check_task("synthetic-video", "tiny-qwen2vl", 3)
    assert models.check_task("synthetic-video", "tiny-test-qwen3-vl", 4) == "synthetic-video"


def test_onevision_synthetic_inputs_refuse_downsampled_sizes():
    with pytest.raises(ValueError, match="anyres_max_9"):  # > 3 x 3 tiles would be downsampled: counts would lie
        configs.synthetic_inputs(tiny.build("llava_onevision"), 1, image_px=200)
