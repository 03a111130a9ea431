"""LLaVA-NeXT and LLaVA-OneVision (anyres) specifics; the shared correctness matrix
(test_correctness.py) also covers them."""
import pytest
import torch

import vtprune
from vtprune import tiny
from vtprune.methods import divprune


@pytest.mark.parametrize("family", tiny.ANYRES_FAMILIES)
@pytest.mark.parametrize("i", range(len(tiny.NEXT_SIZES)))
def test_token_count_rule_matches_the_model(model_factory, family, i):
    model = model_factory(family)
    h, w = tiny.NEXT_SIZES[i]
    n, tiles = tiny.next_tokens(h, w)
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=torch.randn(1, tiles, 3, 56, 56),
                                               image_sizes=torch.tensor([[h, w]]))
    feats = getattr(feats, "pooler_output", feats)
    assert [f.shape[0] for f in feats] == [n]


@pytest.mark.parametrize("family", tiny.ANYRES_FAMILIES)
def test_budget_counts_the_whole_image_and_divprune_is_global_across_crops(model_factory, family):
    model = model_factory(family)
    inputs = tiny.batch(family, [2, 0])  # 88 and 52 image tokens (base + crops + newlines)
    seen = {}
    def grab(module, args, kwargs):
        seen["embeds"] = kwargs["inputs_embeds"].clone()

    hook = model.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad():
        model(**inputs)
    hook.remove()
    with vtprune.pruned(model, "divprune", keep=20):
        with torch.no_grad():
            model(**inputs)
        st = vtprune.stats(model)
    assert st.visual_before == [88, 52] and st.visual_after == [20, 20]
    visual = inputs["input_ids"] == tiny.IMG
    for b in range(2):
        slots = visual[b].nonzero().squeeze(1)
        want = slots[divprune.select(seen["embeds"][b, slots][None], 20)[0]]
        kept = [int(s) for s in st.layout[b] if int(s) >= 0 and bool(visual[b, int(s)])]
        assert kept == want.tolist()


@pytest.mark.parametrize("family", tiny.ANYRES_FAMILIES)
@pytest.mark.parametrize("method", ["hiprune", "todre", "vflowopt"])
def test_vision_attention_strategies_raise_at_patch_time(model_factory, family, method):
    model = model_factory(family)
    with pytest.raises(NotImplementedError, match="anyres images"):
        vtprune.patch(model, method, ratio=0.25)
    assert not hasattr(model, "_vtprune")


@pytest.mark.parametrize("family", tiny.ANYRES_FAMILIES)
@pytest.mark.parametrize("method", ["pool", "token_shuffle"])
def test_grid_strategies_raise_a_clear_error(model_factory, family, method):
    model = model_factory(family)
    vtprune.patch(model, method, ratio=0.25)
    with pytest.raises(ValueError, match="grid"), torch.no_grad():
        model(**tiny.batch(family, [0]))


def test_onevision_anyres_max_downsampled_crops(model_factory):
    """A 224x224 pinpoint gives a 16x16-patch crop grid, more than anyres_max_9 allows (9 tiles of 4x4
    patches), so OneVision bilinear-downsamples it before adding the row newlines. The image is still
    one unit of whatever the model produced; pruning keeps exactly `keep` and keep-all is bit-identical."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlavaOnevisionConfig(vision_config=tiny.SIGLIP_VISION, text_config=dict(tiny.LLAMA_TEXT, model_type="qwen2"),
                                  image_token_id=tiny.IMG, video_token_id=tiny.VID, image_grid_pinpoints=[[224, 224]],
                                  vision_feature_layer=-1, vision_feature_select_strategy="full",
                                  vision_aspect_ratio="anyres_max_9")
    model = tf.LlavaOnevisionForConditionalGeneration(cfg).eval()
    pixels, sizes = torch.randn(1, 17, 3, 56, 56), torch.tensor([[224, 224]])
    with torch.no_grad():
        n = model.model.get_image_features(pixel_values=pixels, image_sizes=sizes).pooler_output[0].shape[0]
    assert n < 16 + 16 * 16 + 16  # downsampled: fewer than base + full crop grid + newlines
    ids = torch.tensor([[tiny.BOS, 5, 6] + [tiny.IMG] * n + [7, 8]])
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels, image_sizes=sizes)
    with torch.no_grad():
        ref = model(**inputs).logits
        for method in ("divprune", "fastv"):
            with vtprune.pruned(model, method, keep=n):
                assert torch.equal(model(**inputs).logits, ref)
            with vtprune.pruned(model, method, keep=12):
                model(**inputs)
                st = vtprune.stats(model)
            assert st.visual_before == [n] and st.visual_after == [12]
