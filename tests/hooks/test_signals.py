"""Attention signals with SDPA on equal an eager-attention computation of the same scores."""
import pytest
import torch

import vtprune
from vtprune import tiny
from vtprune.methods import fastv


def _signals(model, adapter_cls, signals, run):
    """Install an adapter's vision-signal hooks, call run(), remove them; returns the store's scores."""
    from vtprune.hooks.base import SignalStore

    store = SignalStore()
    handles = adapter_cls(model).install_vision_signals(signals, store)
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    return store.read()


def _recorded_eager_weights(monkeypatch, modeling) -> list:
    """Each call's attention probabilities, appended to the list returned: `modeling`'s eager_attention_forward
    wrapped for the test."""
    weights = []
    eager = modeling.eager_attention_forward

    def recording(module, *args, **kwargs):
        out, w = eager(module, *args, **kwargs)
        weights.append(w)
        return out, w

    monkeypatch.setattr(modeling, "eager_attention_forward", recording)
    return weights


def _kept(layout, visual, b):
    """Indices into sample b's visual slots that the last pruned forward kept."""
    vis_slots = visual[b].nonzero().squeeze(1).tolist()
    return sorted(vis_slots.index(int(s)) for s in layout[b] if s >= 0 and int(s) in vis_slots)


def attention_map(model, out, layer):
    """Decoder layer `layer`'s attention probabilities in `out.attentions`, which holds one per attention layer
    (Qwen3.5's linear-attention layers have none)."""
    attention = [i for i, x in enumerate(model.model.language_model.layers) if hasattr(x, "self_attn")]
    return out.attentions[attention.index(layer)]


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_fastv_under_sdpa_selects_what_eager_attention_selects(model_factory, family):
    sdpa = model_factory(family, "sdpa")
    eager = model_factory(family, "eager")
    inputs = tiny.batch(family, [0, 1, 2])
    k_layer = 2
    with torch.no_grad():
        out = eager(**inputs, output_attentions=True)
    attn = attention_map(eager, out, k_layer - 1)  # [B, H, L, L] probabilities at layer K-1 (0-indexed)
    mask = inputs["attention_mask"].bool()
    per_key = (attn.mean(1) * mask[:, :, None]).sum(1) / mask.sum(1, keepdim=True)  # mean over real rows
    visual = inputs["input_ids"] == tiny.IMG
    n_visual = visual.sum(1)
    keep = torch.tensor([max(1, round(0.3 * int(n))) for n in n_visual])
    want = fastv.select(per_key, visual, keep)

    vtprune.patch(sdpa, "fastv", ratio=0.3, layer=k_layer)
    with torch.no_grad():
        sdpa(**inputs)
    layout = vtprune.stats(sdpa).layout
    for b in range(3):
        assert _kept(layout, visual, b) == want[b].tolist(), f"sample {b}"
    assert sdpa.config.text_config._attn_implementation == "sdpa"


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl", "llava_next_video"])
def test_fastv_with_a_clip_budget_keeps_the_clips_most_attended_tokens(model_factory, family):
    """video_budget="clip": FastV ranks a clip's tokens together (its frames' budgets summed) and the
    image apart, by eager attention at layer K-1 averaged over heads and real rows."""
    sdpa, eager = model_factory(family, "sdpa"), model_factory(family, "eager")
    inputs = tiny.batch(family, [1], videos=(1,))
    with torch.no_grad():
        out = eager(**inputs, output_attentions=True)
    attn = attention_map(eager, out, 1)
    mask = inputs["attention_mask"].bool()
    per_key = ((attn.mean(1) * mask[:, :, None]).sum(1) / mask.sum(1, keepdim=True))[0]
    ids = inputs["input_ids"][0]
    vtprune.patch(sdpa, "fastv", ratio=0.3, video_budget="clip")
    with torch.no_grad():
        sdpa(**inputs)
    st = vtprune.stats(sdpa)
    kept = set(st.layout[0].tolist())
    image, video = (ids == tiny.IMG).nonzero().squeeze(1), (ids == tiny.VID).nonzero().squeeze(1)
    (_, n_img, k_img), (_, n_vid, k_vid) = st.images  # one unit per image, one per clip
    assert (n_img, n_vid) == (len(image), len(video))
    frames = 3  # the tiny clip's frames (temporal patches): each would keep round(0.3 * its tokens)
    assert k_vid == frames * max(1, round(0.3 * n_vid / frames))
    for slots, k in ((image, k_img), (video, k_vid)):
        want = slots[torch.sort(per_key[slots], descending=True, stable=True).indices[:k]]
        assert kept & set(slots.tolist()) == set(want.tolist())


def test_llava_vision_signal_equals_eager_clip_attention(model_factory):
    from vtprune.hooks.llava import LlavaAdapter
    from vtprune.methods.base import VisionSignal

    model = model_factory("llava", "sdpa")
    eager = model_factory("llava", "eager")
    pixels = tiny.batch("llava", [0, 1])["pixel_values"]
    got = _signals(model, LlavaAdapter, {"mean": VisionSignal("feature", "mean"), "cls": VisionSignal(0, "cls")},
                   lambda: model.model.vision_tower(pixels))
    with torch.no_grad():
        ref = eager.model.vision_tower(pixels, output_attentions=True).attentions
    n_layers = len(ref)
    feature = n_layers - 2  # vision_feature_layer=-2 -> hidden_states[-2] is the output of layer n-2
    want_mean = ref[feature].mean(1).mean(1)[:, 1:]  # heads, all query rows; CLS key dropped
    want_cls = ref[0].mean(1)[:, 0, 1:]
    torch.testing.assert_close(torch.stack(got["mean"]), want_mean, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(torch.stack(got["cls"]), want_cls, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_vision_signal_per_image_and_token(model_factory, family):
    """Per image, column means of row-stochastic attention sum to 1 over its patches, so the 2x2-merged
    token scores sum to 1/4: a check that scores are split per image and grouped per LLM token."""
    captured = {}

    @vtprune.register(f"capture_{family}")
    class Capture(vtprune.Method):
        """records the signals it is given"""
        stage = "vision"

        def vision_signals(self):
            return {"last": vtprune.VisionSignal(-1, "mean")}

        def select(self, image):
            captured.setdefault("s", []).append(image.signals["last"])
            return vtprune.Selection(torch.arange(image.keep))

    model = model_factory(family)
    vtprune.patch(model, f"capture_{family}", keep=1)
    inputs = tiny.batch(family, [0, 1, 2])
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=1, **tiny.GEN)
    sizes = [s.numel() for s in captured["s"]]
    assert sizes == [16, 8, 8]
    for s in captured["s"]:
        assert abs(float(s.sum()) - 0.25) < 1e-5


def test_qwen2_vl_vision_signal_equals_eager_attention_per_merged_token(model_factory, monkeypatch):
    """Qwen2-VL's ViT sees patches in 2x2 merge-window order: an LLM token's score is the mean of the
    4 consecutive patches the merger concatenates, per image, on non-square grids (4x8 and 8x4)."""
    import transformers.models.qwen2_vl.modeling_qwen2_vl as mq

    from vtprune.hooks.qwen2_vl import QwenVLAdapter
    from vtprune.methods.base import VisionSignal

    model = model_factory("qwen2_vl", "eager")
    inputs = tiny.batch("qwen2_vl", [1, 2])  # grids (1, 4, 8) and (1, 8, 4)
    weights = _recorded_eager_weights(monkeypatch, mq)
    visual = model.model.visual
    got = _signals(model, QwenVLAdapter, {"last": VisionSignal(-1, "mean")},
                   lambda: visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"]))["last"]
    last = weights[-2:]  # the last block's attention, one [1, H, T, T] chunk per image
    assert [w.shape[-1] for w in last] == [32, 32]
    for scores, w in zip(got, last):
        want = w[0].mean(0).mean(0).view(-1, 4).mean(1)  # heads, all query rows; 4 patches per token
        torch.testing.assert_close(scores, want, atol=1e-6, rtol=1e-5)
    # the merger concatenates the same 4 consecutive patches into one LLM token
    assert visual.merger.hidden_size == 4 * visual.config.embed_dim


def test_qwen25_vl_video_signal_equals_eager_attention_per_frame_in_raster_order(model_factory, monkeypatch):
    """Qwen2.5-VL's ViT runs a video's merged tokens in window order, and its full-attention block spans one
    frame at a time: each frame's signal equals that frame's eager attention mapped back through the tower's
    window index (images: test_families' test_qwen25_signals_come_from_full_attention_blocks_in_raster_order)."""
    import transformers.models.qwen2_5_vl.modeling_qwen2_5_vl as mq
    from transformers.vision_utils import get_vision_window_index

    from vtprune.hooks.qwen2_vl import QwenVLAdapter
    from vtprune.methods.base import VisionSignal

    model = model_factory("qwen2_5_vl", "eager")
    visual = model.model.visual
    inputs = tiny.batch("qwen2_5_vl", [1], videos=(1,))  # the clip: 3 frames of 4x6 patches
    pixels, grid = inputs["pixel_values_videos"], inputs["video_grid_thw"]
    weights = _recorded_eager_weights(monkeypatch, mq)
    got = _signals(model, QwenVLAdapter, {"s": VisionSignal(visual.fullatt_block_indexes[0], "mean")},
                   lambda: visual(pixels, grid_thw=grid))["s"]
    t, h, w = grid[0].tolist()
    chunks = weights[-t:]  # the full-attention block: one [1, H, h*w, h*w] chunk per frame
    assert [c.shape[-1] for c in chunks] == [h * w] * t
    in_window_order = torch.cat([c[0].mean(0).mean(0) for c in chunks]).view(-1, 4).mean(1)  # per merged token
    order, _ = get_vision_window_index(grid, visual.spatial_merge_size, visual.window_size, visual.patch_size)
    assert not torch.equal(order, torch.arange(order.numel()))  # the windows do reorder this clip
    raster = torch.empty_like(in_window_order)
    raster[order] = in_window_order
    want = raster.split(h * w // 4)
    assert len(got) == t
    for scores, frame in zip(got, want):
        torch.testing.assert_close(scores, frame, atol=1e-6, rtol=1e-5)


def test_llava_context_signal_equals_eager_clip_attention(model_factory):
    """VFlowOpt's map: rows S = tokens receiving > t x the mean attention, then the mean of those rows."""
    from vtprune.hooks.llava import LlavaAdapter
    from vtprune.methods.base import VisionSignal

    model = model_factory("llava", "sdpa")
    eager = model_factory("llava", "eager")
    pixels = tiny.batch("llava", [0, 1])["pixel_values"]
    with torch.no_grad():
        ref = eager.model.vision_tower(pixels, output_attentions=True).attentions[1].mean(1)  # [B, T, T]
    received = ref.mean(1)
    for t in (1.5, 1e6):  # a few context rows; none above the threshold -> the argmax row alone
        got = _signals(model, LlavaAdapter, {"c": VisionSignal("feature", "context", t)},
                       lambda: model.model.vision_tower(pixels))
        want = []
        for b in range(2):
            rows = (received[b] > t * received[b].mean()).nonzero().squeeze(1)
            if rows.numel() == 0:
                rows = received[b].argmax()[None]
            assert t > 1e5 or 0 < rows.numel() < received.shape[1]
            want.append(ref[b, rows].mean(0)[1:])
        torch.testing.assert_close(torch.stack(got["c"]), torch.stack(want), atol=1e-6, rtol=1e-5)


def test_hiprune_under_sdpa_selects_what_eager_attention_selects(model_factory):
    from vtprune.methods import hiprune

    sdpa, eager = model_factory("llava", "sdpa"), model_factory("llava", "eager")
    inputs = tiny.batch("llava", [0, 1, 2])
    with torch.no_grad():
        att = eager.model.vision_tower(inputs["pixel_values"], output_attentions=True).attentions
    # tiny CLIP: 3 layers; object layer = round(9 * 3 / 24) - 1 = 0; feature layer (-2) = output of layer 1
    obj, deep = att[0].mean(1).mean(1)[:, 1:], att[1].mean(1).mean(1)[:, 1:]
    want = hiprune.select(obj, deep, (4, 4), 6, alpha=1.0)
    vtprune.patch(sdpa, "hiprune", keep=6, alpha=1.0)
    with torch.no_grad():
        sdpa(**inputs)
    layout = vtprune.stats(sdpa).layout
    visual = inputs["input_ids"] == tiny.IMG
    for b in range(3):
        assert _kept(layout, visual, b) == want[b].tolist(), f"sample {b}"


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_todre_stage2_share_under_sdpa_matches_eager(model_factory, family):
    """Stage 2 drops a sample's visual tokens iff the question's attention share on them at the stage-2
    layer (eager attention of the stage-1-pruned sequence) is below tau."""
    sdpa, eager = model_factory(family, "sdpa"), model_factory(family, "eager")
    inputs = tiny.batch(family, [0, 1, 2])
    layer = 1
    vtprune.patch(eager, "todre", ratio=0.5, stage2=False)
    with torch.no_grad():
        out = eager(**inputs, output_attentions=True)
    st = vtprune.stats(eager)
    attn = attention_map(eager, out, layer).mean(1)  # [B, L', L'] in the pruned layout
    visual = (inputs["input_ids"] == tiny.IMG) | (inputs["input_ids"] == tiny.VID)
    shares = []
    for b in range(3):
        src = st.layout[b]
        vis = torch.tensor([bool(s >= 0 and visual[b, s]) for s in src])
        real = torch.tensor([bool(s >= 0 and inputs["attention_mask"][b, s]) for s in src])
        last_vis = int(vis.nonzero().max())
        rows = real & ~vis & (torch.arange(len(src)) > last_vis)
        a = attn[b][rows]
        shares.append(float(a[:, vis].sum() / a.sum()))
    order = sorted(shares)
    tau = (order[0] + order[1]) / 2  # exactly one sample below
    vtprune.patch(sdpa, "todre", ratio=0.5, stage2_layer=layer, tau=tau)
    with torch.no_grad():
        sdpa(**inputs)
    after = vtprune.stats(sdpa).visual_after
    for b in range(3):
        assert (after[b] == 0) == (shares[b] < tau), (b, shares, tau, after)


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_llm_signals_equal_eager_attention_and_hidden_states(model_factory, family):
    """At a drop layer p: `attention` equals eager layer p, `attention_next` (computed from layer p's
    output before layer p+1 runs) equals eager layer p+1; observe() gets the sub-module inputs/outputs."""
    got = {}

    @vtprune.register(f"llm_probe_{family}")
    class Probe(vtprune.Method):
        """records the llm-stage signals; keeps every token"""
        stage = "llm"

        def drop_layers(self, n):
            return [1]

        def attention_layers(self, n):
            return [1]

        def observe_layers(self, n):
            return [1]

        def observe(self, tokens, io):
            got["io"] = io

        def select_in_llm(self, tokens):
            got["now"], got["next"] = tokens.attention(None), tokens.attention_next(None)
            return [torch.arange(int(v.sum())) for v in tokens.visual]

    sdpa, eager = model_factory(family, "sdpa"), model_factory(family, "eager")
    inputs = tiny.batch(family, [0, 1, 2])
    vtprune.patch(sdpa, f"llm_probe_{family}", ratio=0.5)
    with torch.no_grad():
        out = sdpa(**inputs, output_hidden_states=True)
        ref = eager(**inputs, output_attentions=True)
    mask = inputs["attention_mask"].bool()
    for key, layer in (("now", 1), ("next", 2)):
        a = attention_map(eager, ref, layer).mean(1)
        want = (a * mask[:, :, None]).sum(1) / mask.sum(1, keepdim=True)
        torch.testing.assert_close(got[key], want, atol=1e-6, rtol=1e-5)
    io, hs = got["io"], out.hidden_states
    lm = sdpa.model.language_model.layers[1]
    torch.testing.assert_close(io["attn_in"], lm.input_layernorm(hs[1]))
    torch.testing.assert_close(io["mlp_in"], lm.post_attention_layernorm(hs[1] + io["attn_out"]))
    rows = inputs["input_ids"] != tiny.IMG if family.startswith("qwen3_vl") else slice(None)  # deepstack adds at images
    torch.testing.assert_close((hs[1] + io["attn_out"] + io["mlp_out"])[rows], hs[2][rows])


@pytest.mark.parametrize("method", ["hiprune", "vflowopt", "todre"])
def test_vision_signals_hook_only_the_layers_they_need(model_factory, method):
    """No output_attentions on the tower: q/k are captured at the one or two layers a method reads."""
    from vtprune.hooks.llava import _encoder_layers

    model = model_factory("llava")
    layers = _encoder_layers(model.model.vision_tower)
    vtprune.patch(model, method, ratio=0.25)
    hooked = [i for i, layer in enumerate(layers) if layer.self_attn.q_proj._forward_hooks]
    assert hooked == ({"hiprune": [0, 1]}.get(method, [1]))
    assert not model.config.vision_config.output_attentions


def _normalised(grey):
    """uint8-valued grey [..., H, W] -> CLIP-normalised RGB [..., 3, H, W]."""
    from vtprune.methods.base import CLIP_MEAN, CLIP_STD
    rgb = grey.float()[..., None, :, :].expand(*grey.shape[:-2], 3, *grey.shape[-2:]) / 255
    return (rgb - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]


def _levels(n_tokens, side):
    """Per token, a side x side block whose grey levels have 0, 1 or 2 bits of entropy (token i: i % 3)."""
    blocks = torch.zeros(n_tokens, side, side)
    for i in range(n_tokens):
        if i % 3 == 1:
            blocks[i, :, side // 2:] = 255
        elif i % 3 == 2:
            blocks[i] = torch.tensor([10, 20, 30, 40]).repeat_interleave(side * side // 4).view(side, side)
    return blocks, torch.tensor([float(i % 3) for i in range(n_tokens)])


def test_entropy_signal_from_pixels_llava_and_qwen(model_factory):
    from vtprune.hooks.llava import LlavaAdapter
    from vtprune.hooks.qwen2_vl import QwenVLAdapter
    from vtprune.methods.base import VisionSignal

    sig = {"h": VisionSignal("feature", "entropy")}
    # LLaVA: a 56x56 image of 4x4 patches of 14 px
    blocks, want = _levels(16, 14)
    grey = blocks.view(4, 4, 14, 14).permute(0, 2, 1, 3).reshape(56, 56)
    model = model_factory("llava")
    got = _signals(model, LlavaAdapter, sig, lambda: model.model.vision_tower(_normalised(grey)[None]))
    torch.testing.assert_close(got["h"][0], want)
    # Qwen2-VL: an LLM token merges 2x2 patches of 14 px (consecutive rows of pixel_values), each row a
    # patch's (channel, temporal, y, x) pixels; the grey levels come from the first temporal slice (the
    # second, a flat picture of 0 bits here, as a video's next frame can be, is not read)
    model = model_factory("qwen2_vl")
    blocks, want = _levels(4, 28)
    patches = blocks.view(4, 2, 14, 2, 14).permute(0, 1, 3, 2, 4).reshape(16, 14, 14)
    px = torch.stack([_normalised(patches), _normalised(torch.zeros(16, 14, 14))], 2).reshape(16, -1)
    got = _signals(model, QwenVLAdapter, sig, lambda: model.model.visual(px, grid_thw=torch.tensor([[1, 4, 4]])))
    torch.testing.assert_close(got["h"][0], want)


def test_context_rows_are_those_strictly_above_t_times_the_mean():
    """A permutation attention (query i looks only at key i + 1 mod 4) gives every key the mean 1/4: at t = 1
    none is strictly above t x mean, so S = {argmax} = {0} and the map is row 0, the one-hot on key 1; at
    t = 0.5 every row is context and the map is their mean, uniform."""
    from vtprune.hooks.base import reduce_attention
    from vtprune.methods.base import VisionSignal

    eye = torch.eye(4)
    q, k = eye[[1, 2, 3, 0]][None, None], eye[None, None]  # [B=1, H=1, T=4, d=4]
    got = reduce_attention(q, k, 1000.0, VisionSignal("feature", "context", 1.0), has_cls=False)
    assert got.tolist() == [[0.0, 1.0, 0.0, 0.0]]
    got = reduce_attention(q, k, 1000.0, VisionSignal("feature", "context", 0.5), has_cls=False)
    assert got.tolist() == [[0.25, 0.25, 0.25, 0.25]]


def test_grey_levels_are_pil_luma_of_the_unnormalised_rgb():
    """ITU-R 601-2 as PIL's "L": red 0.299 x 255 = 76.2 -> 76, green 149.7 -> 150 (rounded, not truncated),
    blue 29.1 -> 29, white 255, black 0; from CLIP-normalised pixels [N, 3, 1, 1]."""
    from vtprune.hooks.base import grey_levels
    from vtprune.methods.base import CLIP_MEAN, CLIP_STD

    rgb = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 1], [0, 0, 0]])[:, :, None, None]
    px = (rgb - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]
    got = grey_levels(px, CLIP_MEAN, CLIP_STD)
    assert got.dtype == torch.uint8 and got.flatten().tolist() == [76, 150, 29, 255, 0]


def test_llava_entropy_follows_the_row_major_token_grid(model_factory):
    """Token (row 0, col 1) = 1 holds 1 bit, token (1, 2) = 6 holds 2 bits, all others 0: a transposed grid
    would put them at 4 and 9."""
    from vtprune.hooks.llava import LlavaAdapter
    from vtprune.methods.base import VisionSignal

    blocks = torch.zeros(16, 14, 14)
    blocks[1, :, 7:] = 255
    blocks[6] = torch.tensor([10.0, 20, 30, 40]).repeat_interleave(49).view(14, 14)
    grey = blocks.view(4, 4, 14, 14).permute(0, 2, 1, 3).reshape(56, 56)
    model = model_factory("llava")
    got = _signals(model, LlavaAdapter, {"h": VisionSignal("feature", "entropy")},
                   lambda: model.model.vision_tower(_normalised(grey)[None]))
    want = torch.zeros(16)
    want[1], want[6] = 1.0, 2.0
    torch.testing.assert_close(got["h"][0], want)


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_vflowopt_with_entropy_runs(model_factory, family):
    model = model_factory(family)
    vtprune.patch(model, "vflowopt", ratio=0.5, alpha=0.5)
    with torch.no_grad():
        model.generate(**tiny.batch(family, [0, 1]), max_new_tokens=2, **tiny.GEN)
    assert vtprune.stats(model).visual_after[0] < vtprune.stats(model).visual_before[0]


@pytest.mark.parametrize("family", tiny.QWEN_FAMILIES)
def test_qwen_entropy_comes_from_the_pixels_given_not_their_bf16_cast(monkeypatch, family):
    """A bf16 Qwen-VL casts pixel_values to bf16 before its vision tower; VFlowOpt's grey-level entropy is
    computed from the float32 pixels the processor gave (their bf16 rounding moves ~6 % of grey levels)."""
    from vtprune.hooks.base import grey_levels
    from vtprune.methods import vflowopt
    from vtprune.methods.base import CLIP_MEAN, CLIP_STD

    model = tiny.build(family).to(torch.bfloat16)
    inputs = tiny.batch(family, [0])
    seq = inputs["pixel_values"].shape[0]
    p = model.config.vision_config.patch_size
    rgb = torch.randint(0, 256, (seq, 3, p, p), generator=torch.Generator().manual_seed(0)).float() / 255
    px = (rgb - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]
    inputs["pixel_values"] = px[:, :, None].expand(seq, 3, 2, p, p).reshape(seq, -1)  # float32, as processors give
    seen = []
    real = vflowopt.VFlowOpt.select
    monkeypatch.setattr(vflowopt.VFlowOpt, "select", lambda self, im: seen.append(im.signals["entropy"]) or real(self, im))
    vtprune.patch(model, "vflowopt", keep=6, alpha=1.0)
    with torch.no_grad():
        model(**inputs)
    levels = grey_levels(px, CLIP_MEAN, CLIP_STD)
    assert not torch.equal(grey_levels(px.bfloat16(), CLIP_MEAN, CLIP_STD), levels)  # the cast does move levels
    want = vflowopt.patch_entropy(levels.reshape(-1, 4 * p * p))
    assert seen and all(torch.equal(e.float(), want) for e in seen)  # (Qwen3-VL selects again per deepstack level)


def test_signal_store_gives_a_forward_the_scores_of_its_encoder_outputs():
    from types import SimpleNamespace

    from vtprune.hooks.base import SignalStore

    image, video, stray, other = (SimpleNamespace() for _ in range(4))
    store = SignalStore()
    start = store.counts()
    store.add("s", ["v0", "v1"])  # videos encoded first, images after: the units are images first
    store.tag(stray, start)  # a run nested in the video's (Qwen3-VL computes video features through the image path)
    store.add("s", ["v2"])
    store.tag(video, start)
    start = store.counts()
    store.add("s", ["i0", "i1"])
    store.tag(image, start)
    store.add("s", ["tower called directly"])
    assert store.use({"video": video, "image": image})
    assert store.read()["s"] == ["i0", "i1", "v0", "v1", "v2"]
    assert store.use({"image": image, "video": video})  # generate(use_cache=False) hands the same outputs again
    assert store.read()["s"] == ["i0", "i1", "v0", "v1", "v2"]
    start = store.counts()  # a later run, read by a forward of its own, does not change what earlier outputs carry
    store.add("s", ["o0"])
    store.tag(other, start)
    assert store.read()["s"] == ["o0"]
    assert store.use({"image": stray}) and store.read()["s"] == ["v0", "v1"]
    assert store.use({"image": image}) and store.read()["s"] == ["i0", "i1"]
    # outputs without scores get none, even right after a run (which is another image's: features computed
    # before patching took a same-size image's scores); generate()'s chunk copies are matched in the runtime
    start = store.counts()
    store.add("s", ["n0"])
    store.tag(SimpleNamespace(), start)
    assert not store.use({"image": SimpleNamespace()}) and store.read() == {}
    assert not store.use({"image": SimpleNamespace(), "video": None}) and store.read() == {}
    store.tag((1, 2), store.counts())  # a tuple output cannot carry scores: ignored


@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_vl", "qwen3_vl"])
@pytest.mark.parametrize("method", ["hiprune", "todre"])
def test_reused_encoder_outputs_prune_with_their_own_images_scores(family, method):
    """Features computed ahead (get_image_features) and handed to generate() later are pruned with the
    scores of the images they came from, whatever the encoder ran in between (a second call took the
    first image's scores); features computed before patching carry none: a clear error."""
    model = tiny.build(family)
    a = tiny.batch(family, [0])
    b = dict(a, pixel_values=torch.randn_like(a["pixel_values"]))
    encoder_args = lambda x: {k: x[k] for k in ("pixel_values", "image_grid_thw", "image_sizes") if k in x}  # noqa: E731
    text = {k: v for k, v in a.items() if k != "pixel_values"}
    gen = dict(max_new_tokens=1, **tiny.GEN)
    with torch.no_grad():
        early = model.model.get_image_features(**encoder_args(a), return_dict=True)
        vtprune.patch(model, method, ratio=0.25)
        kept = {}
        for name, x in (("a", a), ("b", b)):
            model.generate(**x, **gen)
            kept[name] = vtprune.stats(model).layout
        assert not torch.equal(kept["a"], kept["b"])
        features = {name: model.model.get_image_features(**encoder_args(x), return_dict=True) for name, x in (("a", a), ("b", b))}
        for name in ("a", "b", "a"):
            model.generate(**text, mm_encoder_outputs={"image": features[name]}, **gen)
            assert torch.equal(vtprune.stats(model).layout, kept[name]), name
        model.generate(**b, **gen)  # a pixel call in between
        model.generate(**text, mm_encoder_outputs={"image": features["a"]}, **gen)
        assert torch.equal(vtprune.stats(model).layout, kept["a"])
        if family != "llava_next":  # (anyres features without pixels already need image_sizes: another error)
            with pytest.raises(ValueError, match="none came with"):
                model.generate(**text, mm_encoder_outputs={"image": early}, **gen)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "qwen3_vl"])
@pytest.mark.parametrize("method", ["hiprune", "fastv", "vflowopt"])
def test_lora_layers_added_after_patching_feed_the_attention_scores(family, method):
    """PEFT wraps each projection it targets in a LoRA layer that calls the old module as its base_layer. The
    hooks left on that module read q/k without the adapter's term, so the scores, and the tokens kept, were
    those of another model: tiny LLaVA's logits came out 0.73 off with hiprune, Qwen3-VL's 0.23 with fastv.
    The hooks follow the attribute now. A model patched and then given LoRA layers gives what its merged
    copy gives, patched. After merge_and_unload (the old modules back, with merged weights) it still does,
    and unpatch leaves no hook behind on any module."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj", "qkv"], init_lora_weights=False)
    inputs = tiny.batch(family, [0, 1])
    model = vtprune.patch(tiny.build(family), method, keep=4)
    torch.manual_seed(1)
    wrapped = get_peft_model(model, lora).eval()
    reference = tiny.build(family)
    torch.manual_seed(1)  # (the same LoRA weights)
    reference = vtprune.patch(get_peft_model(reference, lora).merge_and_unload(), method, keep=4)
    with torch.no_grad():
        want = reference(**inputs).logits
        kept = vtprune.stats(reference).layout
        torch.testing.assert_close(wrapped(**inputs).logits, want, rtol=1e-5, atol=1e-5)
        assert torch.equal(vtprune.stats(wrapped).layout, kept)
        model = wrapped.merge_and_unload()
        torch.testing.assert_close(model(**inputs).logits, want, rtol=1e-5, atol=1e-5)
        assert torch.equal(vtprune.stats(model).layout, kept)
        fresh = tiny.build(family)
        fresh(**inputs)  # (transformers puts hooks of its own on a vision tower at its first forward)
    hooks = lambda m: sum(len(x._forward_hooks) + len(x._forward_pre_hooks) for x in m.modules())  # noqa: E731
    assert hooks(vtprune.unpatch(model)) == hooks(fresh)


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning")
@pytest.mark.parametrize("family, method", [("llava", "hiprune"), ("llava", "fastv"), ("qwen2_vl", "vflowopt")])
def test_a_module_swap_that_carries_hooks_over_leaves_one_hook_and_unpatch_takes_it_off(family, method):
    """torch.ao.quantization.quantize_dynamic swaps each Linear for a quantized one and registers the old one's
    hooks on it. The q/k hooks then ran twice per forward (a copy and the one that followed the attribute), and
    unpatch left the copies on the model. Quantized after patching, the model gives what it gives quantized
    before patching, with as many hooks; unpatched, as many as the quantized model that was never patched."""
    import copy

    from torch.ao.quantization import quantize_dynamic

    inputs = tiny.batch(family, [0, 1])
    hooks = lambda m: sum(len(x._forward_hooks) + len(x._forward_pre_hooks) for x in m.modules())  # noqa: E731
    plain = quantize_dynamic(tiny.build(family), {torch.nn.Linear}, dtype=torch.qint8)
    first = vtprune.patch(copy.deepcopy(plain), method, keep=4)
    then = quantize_dynamic(vtprune.patch(tiny.build(family), method, keep=4), {torch.nn.Linear}, dtype=torch.qint8)
    with torch.no_grad():
        plain(**inputs)  # (transformers puts hooks of its own on a vision tower at its first forward)
        want = first(**inputs).logits
        assert torch.equal(then(**inputs).logits, want)
        assert torch.equal(vtprune.stats(then).layout, vtprune.stats(first).layout)
    assert hooks(then) == hooks(first)
    assert hooks(vtprune.unpatch(then)) == hooks(plain)


@pytest.mark.parametrize("family, method", [("llava", "hiprune"), ("qwen3_vl", "fastv")])
def test_an_adapter_added_through_transformers_after_patching_feeds_the_attention_scores(family, method):
    """transformers' own PEFT integration (model.add_adapter, model.load_adapter) puts LoRA layers into the
    patched model in place: its outputs are its merged copy's, patched, and with the adapter disabled and
    the model unpatched, the plain model's."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj", "qkv"], init_lora_weights=False)
    inputs = tiny.batch(family, [0, 1])
    model = vtprune.patch(tiny.build(family), method, keep=4)
    torch.manual_seed(1)
    model.add_adapter(lora)
    reference = tiny.build(family)
    with torch.no_grad():
        plain = reference(**inputs).logits
    torch.manual_seed(1)
    reference = vtprune.patch(get_peft_model(reference, lora).merge_and_unload(), method, keep=4)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, reference(**inputs).logits, rtol=1e-5, atol=1e-5)
        assert torch.equal(vtprune.stats(model).layout, vtprune.stats(reference).layout)
        model.disable_adapters()
        assert torch.equal(vtprune.unpatch(model)(**inputs).logits, plain)


def test_transprune_s_observed_modules_replaced_after_patching_are_the_ones_read():
    """transprune reads each observed layer's norms, mixer and MLP from hooks on those modules: one put in
    place of the MLP after patching (here the MLP with its output scaled) is the one read, as if it had
    been there at patch time."""

    class Scaled(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x) * 0.5

    def scale_mlps(model):
        for layer in model.model.language_model.layers:
            layer.mlp = Scaled(layer.mlp)
        return model

    inputs = tiny.batch("llava", [0, 1])
    reference = vtprune.patch(scale_mlps(tiny.build("llava")), "transprune", keep=4)
    model = scale_mlps(vtprune.patch(tiny.build("llava"), "transprune", keep=4))
    with torch.no_grad():
        want = reference(**inputs).logits
        kept = vtprune.stats(reference).layer_tokens
        assert torch.equal(model(**inputs).logits, want)
        assert vtprune.stats(model).layer_tokens == kept


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_signal_strategies_under_accelerate_hooks_and_a_one_chunk_prefill(family):
    """accelerate's device hooks (device_map) rebuild generate()'s mm_encoder_outputs on the way in, and
    generate(prefill_chunk_size=...) hands the forward sliced copies: neither carries the encoder run's
    scores, and both gave a 'no scores' error; the ids are those of a plain generate()."""
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    model = tiny.build(family)
    inputs = tiny.batch(family, [1])
    gen = dict(max_new_tokens=3, **tiny.GEN)
    vtprune.patch(model, "hiprune", ratio=0.25)
    with torch.no_grad():
        want = model.generate(**inputs, **gen)
        kept = vtprune.stats(model).layout
        assert torch.equal(model.generate(**inputs, **gen, prefill_chunk_size=4096), want)
        add_hook_to_module(model, AlignDevicesHook(io_same_device=True))  # what dispatch_model puts on the top
        assert torch.equal(model.generate(**inputs, **gen), want)
        features = model.model.get_image_features(**{k: inputs[k] for k in ("pixel_values", "image_grid_thw")
                                                      if k in inputs}, return_dict=True)
        model.generate(**dict(inputs, pixel_values=torch.randn_like(inputs["pixel_values"])), **gen)  # another image
        text = {k: v for k, v in inputs.items() if k != "pixel_values"}
        model.generate(**text, mm_encoder_outputs={"image": features}, **gen)
        assert torch.equal(vtprune.stats(model).layout, kept)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_chunked_prefill_takes_generate_s_own_encoder_outputs(family):
    """generate(prefill_chunk_size=...) hands its chunk a sliced copy without scores: reused features
    worked once and then raised 'none came with the image features' (the copy borrowed the scores of the
    encode just made); after another image's encode they took its scores or mismatched. A prompt split
    over several chunks is refused by name. Features computed before patching, handed right after another
    image's encode, took that image's scores: now the clear error."""
    model = tiny.build(family)
    a = tiny.batch(family, [0])
    b = dict(a, pixel_values=torch.randn_like(a["pixel_values"]))
    encoder_args = lambda x: {k: x[k] for k in ("pixel_values", "image_grid_thw") if k in x}  # noqa: E731
    text = {k: v for k, v in a.items() if k != "pixel_values"}
    gen = dict(max_new_tokens=2, **tiny.GEN)
    with torch.no_grad():
        early = model.model.get_image_features(**encoder_args(a), return_dict=True)
        vtprune.patch(model, "hiprune", ratio=0.25)
        want = model.generate(**a, **gen)
        kept = vtprune.stats(model).layout
        features = model.model.get_image_features(**encoder_args(a), return_dict=True)
        for _ in range(2):
            assert torch.equal(model.generate(**text, mm_encoder_outputs={"image": features}, **gen,
                                              prefill_chunk_size=4096), want)
            assert torch.equal(vtprune.stats(model).layout, kept)
        model.model.get_image_features(**encoder_args(b), return_dict=True)  # another image's encode
        assert torch.equal(model.generate(**text, mm_encoder_outputs={"image": features}, **gen,
                                          prefill_chunk_size=4096), want)
        assert torch.equal(model.generate(**a, **gen, prefill_chunk_size=4096), want)
        assert torch.equal(vtprune.stats(model).layout, kept)
        with pytest.raises(NotImplementedError, match=r"prefill_chunk_size=8\) splits this \d+-token prompt"):
            model.generate(**text, mm_encoder_outputs={"image": features}, **gen, prefill_chunk_size=8)
        model.model.get_image_features(**encoder_args(b), return_dict=True)
        with pytest.raises(ValueError, match="none came with"):
            model.generate(**text, mm_encoder_outputs={"image": early}, **gen)
        ids = torch.tensor([[tiny.BOS] + list(range(10, 30))])  # no image: chunks as unpatched (generate hands {})
        plain = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, **tiny.GEN)
        chunked = model.generate(**plain, prefill_chunk_size=8)
        vtprune.unpatch(model)
        assert torch.equal(chunked, model.generate(**plain, prefill_chunk_size=8))


@pytest.mark.parametrize("family", ["llava_next", "llava_onevision"])
@pytest.mark.parametrize("method", ["hiprune", "pool"])
def test_reused_anyres_features_keep_their_own_layout(family, method):
    """Anyres features handed back after another image (of another size) was encoded took that image's
    crop layout: 'could not determine ...' or a wrong grid; the layout now rides on the features."""
    model = tiny.build(family)
    a, other = tiny.batch(family, [0]), tiny.batch(family, [1])
    assert not torch.equal(a["image_sizes"], other["image_sizes"])
    encoder_args = lambda x: {k: x[k] for k in ("pixel_values", "image_sizes") if k in x}  # noqa: E731
    text = {k: v for k, v in a.items() if k != "pixel_values"}
    gen = dict(max_new_tokens=2, **tiny.GEN)
    with torch.no_grad():
        vtprune.patch(model, method, ratio=0.25)
        want = model.generate(**a, **gen)
        kept = vtprune.stats(model).layout
        features = model.model.get_image_features(**encoder_args(a), return_dict=True)
        model.model.get_image_features(**encoder_args(other), return_dict=True)
        for chunk in (None, 4096):
            assert torch.equal(model.generate(**text, mm_encoder_outputs={"image": features}, **gen,
                                              prefill_chunk_size=chunk), want)
            assert torch.equal(vtprune.stats(model).layout, kept)


def test_features_computed_video_first_are_matched_by_modality():
    """Qwen2-VL video features computed before the image's, then handed together: the image's units take
    the image run's scores (they were matched by run order: a shape error, or the frames' scores)."""
    model = tiny.build("qwen2_vl")
    x = tiny.batch("qwen2_vl", [1], videos=(1,))
    gen = dict(max_new_tokens=1, **tiny.GEN)
    vtprune.patch(model, "hiprune", ratio=0.25)
    text = {k: v for k, v in x.items() if k not in ("pixel_values", "pixel_values_videos")}
    with torch.no_grad():
        model.generate(**x, **gen)
        want = vtprune.stats(model).layout
        video = model.model.get_video_features(x["pixel_values_videos"], x["video_grid_thw"], return_dict=True)
        image = model.model.get_image_features(x["pixel_values"], x["image_grid_thw"], return_dict=True)
        model.generate(**text, mm_encoder_outputs={"image": image, "video": video}, **gen)
    assert torch.equal(vtprune.stats(model).layout, want)


@pytest.mark.parametrize("family", ["llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen3_vl"])
def test_unpatch_removes_every_wrapper(family):
    """LLaVA-NeXT's get_image_features is wrapped twice (image sizes, then the signals' encoder run); the
    handles were removed first-in first-out, which put the inner wrapper back and left it on the model."""
    model = tiny.build(family)
    before = {name: set(m.__dict__) for name, m in model.named_modules()}
    for method in ("hiprune", "divprune", "fastv"):
        vtprune.patch(model, method, ratio=0.5)
        vtprune.unpatch(model)
        assert {name: set(m.__dict__) for name, m in model.named_modules()} == before, method


def test_llava_feature_signal_with_a_positive_vision_feature_layer():
    """vision_feature_layer=k >= 0 reads hidden_states[k], the output of encoder layer k - 1: "feature"
    signals must come from that layer's attention (the tiny config's -2 cannot tell k - 1 from k % n)."""
    import transformers as tf

    from vtprune.hooks.base import SignalStore
    from vtprune.hooks.llava import LlavaAdapter
    from vtprune.methods.base import VisionSignal

    cfg_model = tiny.build("llava")
    n = cfg_model.config.vision_config.num_hidden_layers
    k = n - 2  # positive form; hidden_states[k] = output of layer k - 1
    torch.manual_seed(0)
    cfg = tf.LlavaConfig(vision_config=cfg_model.config.vision_config, text_config=cfg_model.config.text_config,
                         image_token_id=tiny.IMG, image_seq_length=16, vision_feature_layer=k,
                         vision_feature_select_strategy="default")
    model = tf.LlavaForConditionalGeneration(cfg).eval()
    model.model.vision_tower.config._attn_implementation = "eager"
    store = SignalStore()
    handles = LlavaAdapter(model).install_vision_signals({"m": VisionSignal("feature", "mean")}, store)
    pixels = tiny.batch("llava", [0])["pixel_values"]
    with torch.no_grad():
        ref = model.model.vision_tower(pixels, output_attentions=True).attentions
    for h in handles:
        h.remove()
    got = torch.stack(store.read()["m"])
    want = ref[k - 1].mean(1).mean(1)[:, 1:]
    other = ref[k % n].mean(1).mean(1)[:, 1:]
    assert not torch.allclose(want, other)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_the_default_object_layer_is_the_lower_middle_block():
    """HiPrune's "object" signal: block (n - 1) // 2 of a vision tower's n blocks (15 of 32; n // 2 took 16)."""
    from vtprune.hooks.base import Adapter

    assert [Adapter(None).object_layer(n) for n in (1, 2, 4, 5, 32)] == [0, 0, 1, 2, 15]


def test_llava_object_layer_is_hiprunes_layer_9_of_24(model_factory):
    """hiprune.md: CLIP ViT-L/14-336's object layer is the output of encoder layer 9 (1-indexed) = 0-based
    8; other depths scale it: 32 layers -> round(12) - 1 = 11; the tiny 3-layer tower -> round(1.125) - 1 = 0
    (where a layer-10 slip gives 0 too, so only a real depth tells them apart)."""
    from vtprune.hooks.llava import LlavaAdapter

    adapter = LlavaAdapter(model_factory("llava"))
    assert [adapter.object_layer(n) for n in (24, 32, 3)] == [8, 11, 0]


def test_the_object_layer_is_never_deeper_than_the_feature_layer():
    """"object" (HiPrune's shallow layer) is the middle block, or the feature layer where that is shallower
    (a tower whose projector reads an early layer), so that it is never the deeper of the two."""
    from vtprune.hooks.base import Adapter
    from vtprune.methods.base import VisionSignal

    adapter = Adapter(None)
    assert adapter.resolve_layer(VisionSignal("object"), 32, 30) == 15
    assert adapter.resolve_layer(VisionSignal("object"), 32, 10) == 10
    assert adapter.resolve_layer(VisionSignal("feature"), 32, 10) == 10
