"""LLaVA-NeXT, LLaVA-NeXT-Video and LLaVA-OneVision (anyres) specifics; the shared correctness matrix
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
    embeds = tiny.lm_kwargs(model, inputs)["inputs_embeds"]
    with vtprune.pruned(model, "divprune", keep=20):
        with torch.no_grad():
            model(**inputs)
        st = vtprune.stats(model)
    assert st.visual_before == [88, 52] and st.visual_after == [20, 20]
    visual = inputs["input_ids"] == tiny.IMG
    for b in range(2):
        slots = visual[b].nonzero().squeeze(1)
        want = slots[divprune.select(embeds[b, slots][None], 20)[0]]
        kept = [int(s) for s in st.layout[b] if int(s) >= 0 and bool(visual[b, int(s)])]
        assert kept == want.tolist()


def _kept_image_slots(st, inputs, b=0):
    """Indices into sample b's image tokens that the last pruned forward kept."""
    slots = (inputs["input_ids"][b] == tiny.IMG).nonzero().squeeze(1).tolist()
    return sorted(slots.index(int(s)) for s in st.layout[b] if int(s) in slots)


def test_layout_comes_from_the_models_own_packing(model_factory):
    from vtprune.hooks.anyres import Layout
    from vtprune.hooks.llava_next import LlavaNextAdapter

    adapter = LlavaNextAdapter(model_factory("llava_next"))
    # 30 x 110 px: a 1 x 2 crop pinpoint = a 4 x 8 patch grid, unpadded to rows 1..2 (2 x 8), newline per row
    lay = adapter.layout(3, (30, 110))
    assert lay.n == 34 == tiny.next_tokens(30, 110)[0]
    assert lay.parts[0][0].tolist() == list(range(16)) and lay.parts[0][1] == (4, 4)
    assert lay.parts[1][1] == (2, 8)
    assert lay.parts[1][0].tolist() == [16 + r * 9 + c for r in range(2) for c in range(8)]
    assert lay.newlines.tolist() == lay.crop_rows.tolist() == [24, 33]
    # one tile (OneVision's multi-image rule): the base grid and a closing newline
    single = Layout.from_map(torch.cat([torch.ones(16), torch.zeros(1)]), 16)
    assert len(single.parts) == 1 and single.parts[0][1] == (4, 4) and single.newlines.tolist() == [16]
    with pytest.raises(ValueError, match="layout"):
        Layout.from_map(torch.tensor([1.0] * 16 + [1, 0, 1, 1, 0, 1]), 16)  # newlines not at row ends


def test_onevision_layout_of_a_downsampled_crop_grid():
    """anyres_max_9 bilinear-downsamples a 16 x 16 crop grid to 12 x 12 (ratio sqrt(256 / 144) > 1.1)."""
    from vtprune.hooks.llava_onevision import LlavaOnevisionAdapter

    lay = LlavaOnevisionAdapter(_onevision_224()).layout(17, (224, 224))
    assert lay.parts[1][1] == (12, 12) and lay.n == 16 + 12 * 13
    assert lay.newlines.tolist() == [16 + r * 13 + 12 for r in range(12)]


def test_budget_shares_by_largest_remainder():
    from vtprune.hooks.anyres import shares

    assert shares(14, [16, 64]) == [3, 11]  # 2.8, 11.2
    assert shares(15, [16, 16]) == [8, 7]  # 7.5 each: the tie goes to the earlier grid
    assert shares(2, [1, 100]) == [1, 1]  # at least one each
    assert shares(10, [3, 100]) == [1, 9]  # 0.29 -> at least 1, taken from the larger
    assert shares(4, [8, 8, 1]) == [1, 2, 1]  # 1.88, 1.88, 0.24 -> 2, 2, 0: of two equal donors, the earlier gives
    with pytest.raises(ValueError):
        shares(1, [4, 4])


def test_pool_merges_each_grid_and_keeps_one_newline_per_merged_row(model_factory):
    """100 x 100 px: base 4 x 4, crops 8 x 8 + 8 newlines = 88 tokens; ratio 0.25 -> 22. Shares by size
    (base 16, crop grid 64 + its 8 newlines): 4 and 18. Base -> 2 x 2; the crop grid's largest pooled
    grid whose rows' newlines also fit in 18 is 3 x 3 (+ 3 newlines; 4 x 4 + 4 = 20 would not)."""
    from vtprune.methods.pool import pool

    model = model_factory("llava_next")
    inputs = tiny.batch("llava_next", [2])
    embeds = tiny.lm_kwargs(model, inputs)["inputs_embeds"]
    img = (inputs["input_ids"][0] == tiny.IMG).nonzero().squeeze(1)
    feats = embeds[0, img]
    with vtprune.pruned(model, "pool", ratio=0.25):
        got = tiny.lm_kwargs(model, inputs)["inputs_embeds"]
        st = vtprune.stats(model)
    crop = [16 + r * 9 + c for r in (0, 2, 5) for c in (0, 2, 5, 8)]  # window starts 0, 2, 5 + each row's newline
    assert _kept_image_slots(st, inputs) == [0, 2, 8, 10] + crop
    assert st.visual_after == [16]
    base, _, _ = pool(feats[:16], (4, 4), 4)
    grid = feats[16:].view(8, 9, -1)
    merged, _, _ = pool(grid[:, :8].reshape(64, -1), (8, 8), 15)
    want = torch.cat([base, torch.cat([merged.view(3, 3, -1), grid[[0, 2, 5], 8][:, None]], 1).reshape(12, -1)])
    start = int(st.layout[0].tolist().index(int(img[0])))
    torch.testing.assert_close(got[0, start:start + 16], want, atol=0, rtol=0)


def test_pool_on_a_crop_grid_merged_to_one_row_pays_one_newline(model_factory):
    """30 x 110 px (sample 3): base 4 x 4, crop grid 2 x 8 with 2 newlines = 34 tokens; ratio 0.5 -> 17, shared
    by size (16; 16 + 2) as 8 and 9. Base -> 2 x 2. The crop grid's largest pooled grid that fits in 9 with one
    newline per merged row: budget 9 -> 1 x 6 + 1 newline = 7 (a newline per merged column, 2 x 6 = 12,
    would not fit and shrink it to budget 6's 1 x 4). 4 + 7 = 11 tokens."""
    model = model_factory("llava_next")
    inputs = tiny.batch("llava_next", [3])
    assert tiny.next_tokens(*tiny.NEXT_SIZES[3])[0] == 34
    with vtprune.pruned(model, "pool", ratio=0.5), torch.no_grad():
        model(**inputs)
        st = vtprune.stats(model)
    crop = [16 + c for c in (0, 1, 2, 4, 5, 6)] + [24]  # row 0's 6 window starts (i * 8 // 6) + its newline
    assert _kept_image_slots(st, inputs) == [0, 2, 8, 10] + crop
    assert st.visual_after == [11]


def test_hiprune_runs_per_crop_on_scores_packed_like_the_features(model_factory):
    """30 x 110 px (34 tokens: base 4 x 4, crop grid 2 x 8 unpadded from rows 1..2 of the 4 x 8 grid of
    tiles 1 and 2, 2 newlines). Reference scores: eager CLIP attention per tile, by hand. HiPrune runs on
    the base grid and on each crop's 2 x 4 part (its spec: each crop separately, so no neighbour crosses
    a crop). ratio 0.5 -> 17 = 2 newlines + shares(15, [16, 8, 8]) = 7 base + 4 + 4."""
    from vtprune.methods import hiprune

    model, eager = model_factory("llava_next"), model_factory("llava_next", "eager")
    inputs = tiny.batch("llava_next", [3])
    tiles = inputs["pixel_values"][0, :3]
    with torch.no_grad():
        att = eager.model.vision_tower(tiles, output_attentions=True).attentions
    n = len(att)
    received = lambda li: att[li].mean(1).mean(1)[:, 1:]  # noqa: E731  [tiles, 16]: heads, queries; no CLS
    obj, deep = received(max(0, round(9 * n / 24) - 1)), received(n - 2)  # object layer; feature layer -2

    def crop(scores, t):  # tile t's rows 1..2 (the unpadded ones), row-major
        return scores[t, 4:12]

    want = hiprune.select(obj[0][None], deep[0][None], (4, 4), 7)[0].tolist()
    for t in (1, 2):
        picked = hiprune.select(crop(obj, t)[None], crop(deep, t)[None], (2, 4), 4)[0]
        want += [16 + int(i) // 4 * 9 + (t - 1) * 4 + int(i) % 4 for i in picked]
    want = sorted(want + [24, 33])
    vtprune.patch(model, "hiprune", ratio=0.5)
    with torch.no_grad():
        model(**inputs)
    st = vtprune.stats(model)
    assert st.visual_after == [17]
    assert _kept_image_slots(st, inputs) == want


def test_crop_tiles_come_from_the_models_packing(model_factory):
    """Each crop tile's rectangle of the unpadded crop grid, from the model's own packing of tile numbers;
    none where OneVision's anyres_max downsampling mixed the tiles."""
    from vtprune.hooks.llava_next import LlavaNextAdapter
    from vtprune.hooks.llava_onevision import LlavaOnevisionAdapter

    lay = LlavaNextAdapter(model_factory("llava_next")).layout(5, (100, 100))  # crop grid 8 x 8 = 2 x 2 tiles
    assert [g for _, g in lay.tiles] == [(4, 4)] * 4
    assert [i[:5].tolist() for i, _ in lay.tiles] == [[16, 17, 18, 19, 25], [20, 21, 22, 23, 29],
                                                      [52, 53, 54, 55, 61], [56, 57, 58, 59, 65]]
    lay = LlavaNextAdapter(model_factory("llava_next")).layout(3, (30, 110))  # rows 1..2 of two tiles
    assert [(i.tolist(), g) for i, g in lay.tiles] == [([16, 17, 18, 19, 25, 26, 27, 28], (2, 4)),
                                                       ([20, 21, 22, 23, 29, 30, 31, 32], (2, 4))]
    assert LlavaOnevisionAdapter(_onevision_224()).layout(17, (224, 224)).tiles is None


@pytest.mark.parametrize("family", tiny.ANYRES_FAMILIES)
@pytest.mark.parametrize("i", [0, 1, 2])
def test_todre_searches_its_pivot_over_the_base_tile_only(model_factory, family, i):
    """The pivot is the base (thumbnail) token with the highest CLS attention at the feature layer
    (SigLIP, without CLS: the highest mean attention received), from the eager tower on tile 0 by hand,
    even where a crop token scores higher; the rest is the greedy max-min over all the image's tokens
    seeded by it."""
    from vtprune.methods import todre

    model, eager = model_factory(family), model_factory(family, "eager")
    inputs = tiny.batch(family, [i])
    embeds = tiny.lm_kwargs(model, inputs)["inputs_embeds"]
    slots = (inputs["input_ids"][0] == tiny.IMG).nonzero().squeeze(1)
    with torch.no_grad():
        att = eager.model.vision_tower(inputs["pixel_values"][0, :1], output_attentions=True).attentions
    layer = model.config.vision_feature_layer % (len(att) + 1) - 1  # hidden_states[f] is layer f - 1's output
    probs = att[layer][0].mean(0)  # heads averaged; columns in the base grid's order (after a CLS)
    scores = probs.mean(0) if family == "llava_onevision" else probs[0, 1:]  # CLIP: the CLS row; SigLIP: all rows
    pivot = int(scores.argmax())
    want = todre.select(embeds[0, slots][None], 8, torch.tensor([pivot]))[0]
    with vtprune.pruned(model, "todre", keep=8, stage2=False):
        with torch.no_grad():
            model(**inputs)
        st = vtprune.stats(model)
    assert _kept_image_slots(st, inputs) == want.tolist()
    assert pivot in want.tolist() and pivot < 16


@pytest.mark.parametrize("family", tiny.ANYRES_FAMILIES)
def test_vflowopt_never_drops_newlines(model_factory, family):
    """Newline tokens are never pruned before the LLM (VFlowOpt's spec) and go last in its in-LLM drops:
    22 kept before the LLM (8 newlines), then 18 and 14."""
    model = model_factory(family)
    inputs = tiny.batch(family, [2])
    vtprune.patch(model, "vflowopt", ratio=0.25, r2=0.8, r3=0.8)
    with torch.no_grad():
        model(**inputs)
    st = vtprune.stats(model)
    kept = _kept_image_slots(st, inputs)
    assert st.visual_after == [len(kept)] == [14]
    assert set(16 + r * 9 + 8 for r in range(8)) <= set(kept)


@pytest.mark.parametrize("method, keep", [("hiprune", 5), ("pool", 2), ("pool", 1), ("token_shuffle", 1)])
def test_a_budget_below_newlines_plus_grids_is_refused(model_factory, method, keep):
    """hiprune needs 8 newlines + 2 grids; a merge needs a base token, a crop token and its row's newline."""
    model = model_factory("llava_next")
    vtprune.patch(model, method, keep=keep)
    with pytest.raises(ValueError, match=f"a budget of {keep} is below the"), torch.no_grad():
        model(**tiny.batch("llava_next", [2]))


@pytest.mark.parametrize("family", tiny.ANYRES_FAMILIES)
@pytest.mark.parametrize("method", ["hiprune", "vflowopt", "pool", "token_shuffle"])
def test_the_least_budget_named_is_the_least_that_works(model_factory, family, method):
    """The error names the least budget of the image short by the most and the most any image of the
    batch needs (checked image by image it named the first short image's least, which then failed on the
    next image; a merge's crop share too small for a merged row was called "below the 3 that needs"
    whatever the least). Per image, that least works and one less does not."""
    import re

    model = model_factory(family)
    for i in (0, 1, 2, 3):
        vtprune.patch(model, method, keep=1)
        with pytest.raises(ValueError, match="a budget of 1 is below the") as e, torch.no_grad():
            model(**tiny.batch(family, [i]))
        least = int(re.search(r"below the (\d+) that sample 0's image needs", str(e.value)).group(1))
        vtprune.patch(model, method, keep=least)
        with torch.no_grad():
            model(**tiny.batch(family, [i]))
        if least > 1:
            vtprune.patch(model, method, keep=least - 1)
            with pytest.raises(ValueError, match=f"a budget of {least - 1} is below the {least} "), torch.no_grad():
                model(**tiny.batch(family, [i]))
    vtprune.patch(model, "hiprune", keep=2)
    with pytest.raises(ValueError, match=r"a budget of 2 is below the (\d+) that sample 1's image needs") as e, \
            torch.no_grad():
        model(**tiny.batch(family, [0, 1]))
    most = re.search(r"the most any image of this batch needs: (\d+)", str(e.value))  # (when above the named one)
    most = int((most or re.search(r"below the (\d+)", str(e.value))).group(1))
    vtprune.patch(model, "hiprune", keep=most - 1)
    with pytest.raises(ValueError, match=f"a budget of {most - 1} is below the {most} that sample 1's image needs"), \
            torch.no_grad():
        model(**tiny.batch(family, [0, 1]))
    vtprune.patch(model, "hiprune", keep=most)
    with torch.no_grad():
        model(**tiny.batch(family, [0, 1]))


@pytest.mark.parametrize("family", ["llava_next_video", "llava_onevision"])
@pytest.mark.parametrize("method", ["hiprune", "todre", "vflowopt", "vision_attn_test"])
def test_video_without_an_image(model_factory, family, method):
    """A video-only prompt: strategies reading vision scores work (no image layout is needed), keep-all
    is bit-identical, and each frame gets its budget."""
    from vtprune.tiny import _video

    vids, vis = _video(family, 1, torch.Generator().manual_seed(0))
    ids = torch.tensor([[tiny.BOS, 5, 6, *vids, 7, 8]])
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), **vis)
    model = model_factory(family)
    with torch.no_grad():
        ref = model.generate(**inputs, max_new_tokens=3, **tiny.GEN)
        vtprune.patch(model, method, keep=10_000)
        assert torch.equal(model.generate(**inputs, max_new_tokens=3, **tiny.GEN), ref)
        vtprune.patch(model, method, keep=2)
        model(**inputs)
    assert vtprune.stats(model).images == [(0, 4, 2)] * 3


def test_onevision_video_frame_scores_are_pooled_like_the_frames(model_factory):
    """A 3-frame clip after an image: each frame's SigLIP attention (eager reference, mean over heads and
    queries) bilinear-pooled 4 x 4 -> 2 x 2 as the frames' features are; the test strategy keeps the top 2
    of each frame's 4 tokens; the image before it is scored from its own tiles."""
    import torch.nn.functional as F

    model, eager = model_factory("llava_onevision"), model_factory("llava_onevision", "eager")
    inputs = tiny.batch("llava_onevision", [1], videos=(1,))
    with torch.no_grad():
        att = eager.model.vision_tower(inputs["pixel_values_videos"][0], output_attentions=True).attentions[-1]
    pooled = F.interpolate(att.mean(1).mean(1).view(3, 1, 4, 4), size=(2, 2), mode="bilinear").view(3, 4)
    want = [f * 4 + int(i) for f in range(3) for i in pooled[f].topk(2).indices.sort().values]
    vtprune.patch(model, "vision_attn_test", keep=2)
    with torch.no_grad():
        model(**inputs)
    st = vtprune.stats(model)
    vid = (inputs["input_ids"][0] == tiny.VID).nonzero().squeeze(1).tolist()
    kept = sorted(vid.index(int(s)) for s in st.layout[0] if int(s) in vid)
    assert kept == want + [12]  # and the newline closing the video
    assert st.visual_before == [56 + 12] and st.visual_after == [2 + 3 * 2]


@pytest.mark.parametrize("mode", ["average", "max", "conv"])
def test_next_video_frame_scores_are_pooled_like_the_frames(mode):
    """LLaVA-NeXT-Video: each frame's CLIP attention at the feature layer (eager reference: mean over heads
    and queries, the CLS column dropped) pooled 4 x 4 -> 2 x 2 as its resampler pools the patches (a learned
    conv: averaged); the test strategy keeps each frame's top token (here an average and a max pool pick
    different ones). No newline closes the clip."""
    import torch.nn.functional as F

    def build(attn):
        model = tiny.build("llava_next_video", attn)
        model.config.spatial_pool_mode = mode
        torch.manual_seed(1)
        model.model.vision_resampler = type(model.model.vision_resampler)(model.config).eval()
        return model

    model, eager = build("sdpa"), build("eager")
    eager.load_state_dict(model.state_dict())
    inputs = tiny.batch("llava_next_video", [1], videos=(1,))
    with torch.no_grad():
        att = eager.model.vision_tower(inputs["pixel_values_videos"][0], output_attentions=True).attentions
    layer = model.config.vision_feature_layer % (len(att) + 1) - 1  # hidden_states[f] is layer f - 1's output
    grid = att[layer].mean(1).mean(1)[:, 1:].view(3, 1, 4, 4)
    top = {pool: [f * 4 + int(i) for f in range(3) for i in pool(grid, 2).view(3, 4)[f].topk(1).indices]
           for pool in (F.avg_pool2d, F.max_pool2d)}
    assert top[F.avg_pool2d] != top[F.max_pool2d]
    want = top[F.max_pool2d if mode == "max" else F.avg_pool2d]
    vtprune.patch(model, "vision_attn_test", keep=1)
    with torch.no_grad():
        model(**inputs)
    st = vtprune.stats(model)
    vid = (inputs["input_ids"][0] == tiny.VID).nonzero().squeeze(1).tolist()
    assert len(vid) == 12 and sorted(vid.index(int(s)) for s in st.layout[0] if int(s) in vid) == want
    assert st.visual_before == [56 + 12] and st.visual_after == [1 + 3 * 1]
    assert st.images[1:] == [(0, 4, 1)] * 3


def _onevision_224():
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlavaOnevisionConfig(vision_config=tiny.SIGLIP_VISION, text_config=dict(tiny.LLAMA_TEXT, model_type="qwen2"),
                                  image_token_id=tiny.IMG, video_token_id=tiny.VID, image_grid_pinpoints=[[224, 224]],
                                  vision_feature_layer=-1, vision_feature_select_strategy="full",
                                  vision_aspect_ratio="anyres_max_9")
    return tf.LlavaOnevisionForConditionalGeneration(cfg).eval()


def test_onevision_layout_follows_the_models_anyres_max_and_a_grid_mixing_tiles_has_none():
    """vision_aspect_ratio="anyres_max_1": a 56 x 112 image on its 56 x 112 pinpoint has a 4 x 8 crop grid
    (no unpadding), 32 patches over the 16 of one tile (ratio sqrt(2) > 1.1), so OneVision downsamples it
    to int(4 / 1.41) x int(8 / 1.41) = 2 x 5 before a newline per row: 16 + 2 * 6 = 28 tokens (anyres_max_9,
    the default, would keep 4 x 8: 52). Its column 2 straddles both crop tiles (the model's bilinear
    resampling of the tile numbers 2 and 3 gives 2.5 there): no crop tiles, though every value's cells form
    a rectangle."""
    import transformers as tf

    from vtprune.hooks.llava_onevision import LlavaOnevisionAdapter

    torch.manual_seed(0)
    cfg = tf.LlavaOnevisionConfig(vision_config=tiny.SIGLIP_VISION, text_config=dict(tiny.LLAMA_TEXT, model_type="qwen2"),
                                  image_token_id=tiny.IMG, video_token_id=tiny.VID, image_grid_pinpoints=[[56, 112]],
                                  vision_feature_layer=-1, vision_feature_select_strategy="full",
                                  vision_aspect_ratio="anyres_max_1")
    model = tf.LlavaOnevisionForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=torch.randn(1, 3, 3, 56, 56),
                                               image_sizes=torch.tensor([[56, 112]])).pooler_output
    adapter = LlavaOnevisionAdapter(model)
    lay = adapter.layout(3, (56, 112))
    assert lay.n == feats[0].shape[0] == 28
    assert lay.parts[1][1] == (2, 5) and lay.newlines.tolist() == [21, 27]
    numbers = adapter.pack(torch.arange(1.0, 4.0)[:, None, None].expand(3, 16, 1), (56, 112))[:, 0]
    assert numbers[lay.parts[1][0]].view(2, 5).tolist() == [[2, 2, 2.5, 3, 3]] * 2
    assert lay.tiles is None and lay.grids("select") == lay.parts


def test_onevision_anyres_max_downsampled_crops(model_factory):
    """A 224x224 pinpoint gives a 16x16-patch crop grid, more than anyres_max_9 allows (9 tiles of 4x4
    patches), so OneVision bilinear-downsamples it before adding the row newlines. The image is still
    one unit of whatever the model produced; pruning keeps exactly `keep` and keep-all is bit-identical."""
    model = _onevision_224()
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


@pytest.mark.parametrize("method", ["hiprune", "pool"])
def test_two_images_in_one_sample_are_pruned_as_each_alone(model_factory, method):
    """Two LLaVA-NeXT images of different sizes in one sample are two units, each with its own layout:
    each keeps the slots it keeps when it is the only image."""
    model = model_factory("llava_next")
    pics = [tiny.sample("llava_next", i)[1] for i in (0, 2)]
    sizes = [(40, 90), (100, 100)]
    counts = [tiny.next_tokens(*s)[0] for s in sizes]
    pixels = torch.zeros(2, pics[1]["pixel_values"].shape[1], 3, 56, 56)
    for j, p in enumerate(pics):
        pixels[j, : p["pixel_values"].shape[1]] = p["pixel_values"][0]

    def run(which):
        ids = [tiny.BOS, 5]
        for j in which:
            ids += [tiny.IMG] * counts[j] + [6 + j]
        ids = torch.tensor([ids])
        inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels[which],
                      image_sizes=torch.tensor([sizes[j] for j in which]))
        with torch.no_grad():
            model(**inputs)
        kept, out, start = _kept_image_slots(vtprune.stats(model), inputs), [], 0
        for j in which:
            out.append([k - start for k in kept if start <= k < start + counts[j]])
            start += counts[j]
        return out

    vtprune.patch(model, method, ratio=0.5)
    both = run([0, 1])
    assert both == [run([0])[0], run([1])[0]]
    assert all(len(k) > 0 for k in both)


def _onevision_two_images():
    """One OneVision sample of two images (batch_num_images=2): each its base tile only, 16 tokens + a newline."""
    pixels = torch.stack([tiny.sample("llava_onevision", i)[1]["pixel_values"][0, :1] for i in (0, 2)])
    ids = torch.tensor([[tiny.BOS, 5] + [tiny.IMG] * 17 + [6] + [tiny.IMG] * 17 + [7]])
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels,
                image_sizes=torch.tensor([[40, 90], [100, 100]]), batch_num_images=torch.tensor([2]))


def test_onevision_multi_image_samples_use_one_tile_per_image(model_factory):
    """batch_num_images > 1: OneVision encodes each image as its base tile only (16 tokens + a closing
    newline). ratio 0.5 -> 8 = the newline + 7 HiPrune tokens; pool: 2 x 2 windows + the newline."""
    model = model_factory("llava_onevision")
    inputs = _onevision_two_images()
    for method, want in (("pool", [0, 2, 8, 10, 16]), ("hiprune", None)):
        with vtprune.pruned(model, method, ratio=0.5), torch.no_grad():
            model(**inputs)
            kept = _kept_image_slots(vtprune.stats(model), inputs)
        first, second = [k for k in kept if k < 17], [k - 17 for k in kept if k >= 17]
        assert 16 in first and 16 in second and len(first) == len(second) == (5 if method == "pool" else 8)
        if want is not None:
            assert first == second == want


def test_onevision_single_tile_images_keep_their_closing_newline_under_a_fixed_grid(model_factory):
    """token_shuffle s=2 on OneVision's one-tile images (batch_num_images > 1): each image's budget is its
    2 x 2 merged grid plus its closing newline."""
    model = model_factory("llava_onevision")
    inputs = _onevision_two_images()
    vtprune.patch(model, "token_shuffle", s=2)
    with torch.no_grad():
        model(**inputs)
    assert vtprune.stats(model).images == [(0, 17, 5)] * 2


def _odd_tile_video_model(family):
    """A LLaVA video model whose tower gives 5 x 5 patches per frame (70 px): pooled, OneVision's bilinear
    halving rounds up (3 x 3, as its released 27 x 27 -> 14 x 14), NeXT-Video's stride-2 average pool down (2 x 2)."""
    import transformers

    torch.manual_seed(0)
    if family == "llava_onevision":
        cfg = transformers.LlavaOnevisionConfig(
            vision_config=dict(tiny.SIGLIP_VISION, image_size=70), text_config=dict(tiny.LLAMA_TEXT, model_type="qwen2"),
            image_token_id=tiny.IMG, video_token_id=tiny.VID, image_grid_pinpoints=[[70, 70]], vision_feature_layer=-1,
            vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9")
        return transformers.LlavaOnevisionForConditionalGeneration(cfg).eval()
    cfg = transformers.LlavaNextVideoConfig(
        vision_config=dict(tiny.CLIP_VISION, image_size=70), text_config=tiny.LLAMA_TEXT, image_token_id=tiny.IMG,
        video_token_id=tiny.VID, image_grid_pinpoints=[[70, 70]], vision_feature_layer=-2,
        vision_feature_select_strategy="default", spatial_pool_mode="average", spatial_pool_stride=2)
    return transformers.LlavaNextVideoForConditionalGeneration(cfg).eval()


def test_onevision_closing_video_newline_is_no_question_row(model_factory, monkeypatch):
    """OneVision closes a video with one newline, a placeholder in no frame. With the video last, that slot
    follows the last visual slot: transprune's (and todre's) question rows are the text after it, not it."""
    from vtprune.methods import transprune

    model = model_factory("llava_onevision")
    inputs = tiny.batch("llava_onevision", [1, 0], videos=(1, 0))  # left padding, the video before the question
    seen, real = [], transprune.question_rows
    monkeypatch.setattr(transprune, "question_rows", lambda tokens: seen.append(real(tokens)) or seen[-1])
    vtprune.patch(model, "transprune", ratio=0.5)
    with torch.no_grad():
        model(**inputs)
    ids = inputs["input_ids"]
    idx = torch.arange(ids.shape[1])
    last = torch.where(ids == tiny.VID, idx, -1).max(1).values  # the closing newline's slot
    assert seen and torch.equal(seen[0], inputs["attention_mask"].bool() & (idx[None] > last[:, None]))
    assert len(seen) == 2 and torch.equal(seen[1].sum(1), seen[0].sum(1))  # at the second drop too


@pytest.mark.parametrize("family, per_frame", [("llava_onevision", 9), ("llava_next_video", 4)])
def test_video_frames_of_an_odd_tile_side(family, per_frame):
    """The pooled frame grid of an odd tile side: whole frames kept are the unpatched model bit for bit."""
    model = _odd_tile_video_model(family)
    n = 3 * per_frame + (family == "llava_onevision")  # 3 frames (+ OneVision's closing newline)
    ids = torch.tensor([[tiny.BOS, 5, *[tiny.VID] * n, 7]])
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids),
                  pixel_values_videos=torch.randn(1, 3, 3, 70, 70, generator=torch.Generator().manual_seed(0)))
    with torch.no_grad():
        ref = model(**inputs).logits
        vtprune.patch(model, "pool", keep=per_frame)
        assert torch.equal(model(**inputs).logits, ref)
        assert vtprune.stats(model).images == [(0, per_frame, per_frame)] * 3
        vtprune.patch(model, "pool", keep=1)
        model(**inputs)
    assert vtprune.stats(model).visual_after == [3]


def test_token_shuffle_grid_budget_on_anyres_counts_one_newline_per_merged_row(model_factory):
    """token_shuffle with s= on LLaVA-NeXT: each image's budget is its merged grids plus one newline per
    merged crop row (hp), and is what it keeps (non-square crop grids in samples 0-3)."""
    model = model_factory("llava_next")
    vtprune.patch(model, "token_shuffle", s=2)
    with torch.no_grad():
        model(**tiny.batch("llava_next", [0, 1, 2, 3]))
    st = vtprune.stats(model)
    assert [b for _, _, b in st.images] == st.visual_after == [14, 16, 24, 9]


def test_an_anyres_part_whose_share_is_its_size_stays_whole_without_reaching_the_method():
    """ImageTokens.keep < N is the method's contract: a grid whose largest-remainder share equals its size is
    kept whole (importance inf), never handed to the method with keep == N."""
    from vtprune.hooks import anyres
    from vtprune.methods.base import ImageTokens, Selection
    from vtprune.methods.registry import build_method

    method = build_method("random", {"keep": 11})
    method.per_grid = "select"
    calls = []

    def select(image):
        calls.append((len(image.features), image.keep))
        return Selection(torch.arange(image.keep), importance=torch.arange(image.keep, dtype=torch.float32))

    method.select = select
    crop = torch.arange(4, 12).view(2, 4)
    layout = anyres.Layout(12, [(torch.arange(4), (2, 2)), (crop[:, :-1].reshape(-1), (2, 3))], crop[:, -1], crop[:, -1])
    sel = anyres.select(method, ImageTokens(torch.randn(12, 8), None, 11, {}), layout)
    assert calls == [(6, 5)]  # shares(9, [4, 6]) = [4, 5]: the base grid stays whole
    assert sel.indices.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 11]
    assert torch.isinf(sel.importance[:4]).all()
