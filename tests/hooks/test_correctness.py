"""The correctness matrix on tiny random-weight models of the real classes (CPU):
keep-all and unpatch bit-identity, batch invariance under padding, cache == no cache."""
import re

import pytest
import torch

import vtprune
from vtprune import tiny
from vtprune.methods.base import Method, Selection
from vtprune.methods.registry import get_method

SEED = ["divprune", "hiprune", "todre", "todre_stage2", "token_shuffle", "transprune", "vflowopt"]
METHODS = ["random", "pool", "fastv", "vision_attn_test", "hidden_norm_test", *SEED]
# selections determined by the prompt alone (no attention from rows that generated tokens would add)
STAGE_METHODS = ["random", "vision_attn_test", "hidden_norm_test", "pool",
                 "divprune", "hiprune", "todre", "todre_stage2", "token_shuffle", "vflowopt"]
# test ids -> (registered name, extra options). todre_stage2: stage 2 after decoder layer 1 with
# tau=1, so every pruned sample loses all its visual tokens there whatever the attention.
VARIANTS = {"todre_stage2": ("todre", dict(stage2_layer=1, tau=1.0))}
ALL_FAMILIES = [*tiny.FAMILIES, *tiny.ANYRES_FAMILIES]
PAIRS = [(f, m) for f in ALL_FAMILIES for m in METHODS]
STAGE_PAIRS = [(f, m) for f in ALL_FAMILIES for m in STAGE_METHODS]



def _patch(model, method, **budget):
    name, extra = VARIANTS.get(method, (method, {}))
    return vtprune.patch(model, name, **budget, **extra)


@pytest.mark.parametrize("family, method", PAIRS)
@pytest.mark.parametrize("budget", [dict(keep=10_000), dict(ratio=1.0)])
def test_keep_all_is_bit_identical(model_factory, family, method, budget):
    model = model_factory(family)
    inputs = tiny.batch(family, [0, 1, 2])
    with torch.no_grad():
        ref = model(**inputs).logits
        ref_gen = model.generate(**inputs, max_new_tokens=3, **tiny.GEN)
        _patch(model, method, **budget)
        out = model(**inputs).logits
        gen = model.generate(**inputs, max_new_tokens=3, **tiny.GEN)
    assert torch.equal(ref, out)
    assert torch.equal(ref_gen, gen)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "llava_next"])
def test_ratio_one_computes_no_vision_scores(model_factory, family, monkeypatch):
    """At ratio 1.0 no image is ever over budget: the vision-encoder attention that hiprune, vflowopt and
    todre read is not computed (it was, every forward, and thrown away: +12-28 % per forward)."""
    import vtprune.hooks.base as hooks_base

    calls = []
    real = hooks_base.attention_scores
    monkeypatch.setattr(hooks_base, "attention_scores", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = model_factory(family)
    inputs = tiny.batch(family, [0, 1])
    for method in ("hiprune", "vflowopt", "todre"):
        vtprune.patch(model, method, ratio=1.0)
        with torch.no_grad():
            model(**inputs)
        assert not calls, method
        vtprune.patch(model, method, ratio=0.5)  # (and the same hooks do score when an image is over budget)
        with torch.no_grad():
            model(**inputs)
        assert calls, method
        calls.clear()


@pytest.mark.parametrize("family, method", PAIRS)
def test_unpatch_is_bit_identical_to_never_patched(model_factory, family, method):
    model = model_factory(family)
    fresh = tiny.build(family)  # same seed -> same weights, never patched
    inputs = tiny.batch(family, [0, 1])
    _patch(model, method, ratio=0.25)
    with torch.no_grad():
        pruned = model(**inputs).logits
        model.generate(**inputs, max_new_tokens=2, **tiny.GEN)
        vtprune.unpatch(model)
        out = model(**inputs).logits
        gen = model.generate(**inputs, max_new_tokens=3, **tiny.GEN)
        ref = fresh(**inputs).logits
        ref_gen = fresh.generate(**inputs, max_new_tokens=3, **tiny.GEN)
    assert pruned.shape[1] < ref.shape[1]  # it did prune while patched
    assert torch.equal(out, ref) and torch.equal(gen, ref_gen)


def _logits_by_real_token(logits, layout, mask):
    """{rank of the real token in its sample: logits} for every output slot holding a real token."""
    out = []
    for b in range(logits.shape[0]):
        real = mask[b].nonzero().squeeze(1)
        rank = {int(s): r for r, s in enumerate(real)}
        out.append({rank[int(src)]: logits[b, o] for o, src in enumerate(layout[b]) if int(src) in rank})
    return out


def _check_batch_prefill(model, family, method, padding, videos=(), **options):
    _patch(model, method, ratio=0.4, **options)
    idx = [0, 1, 2]
    inputs = tiny.batch(family, idx, padding=padding, videos=videos)
    with torch.no_grad():
        logits = model(**inputs).logits
        st = vtprune.stats(model)
        batched = _logits_by_real_token(logits, st.layout, inputs["attention_mask"])
        kept_batched = st.visual_after
        assert kept_batched != st.visual_before
        for b, i in enumerate(idx):
            alone = tiny.batch(family, [i], videos=videos)
            single = _logits_by_real_token(model(**alone).logits, vtprune.stats(model).layout, alone["attention_mask"])[0]
            assert vtprune.stats(model).visual_after == [kept_batched[b]]
            assert sorted(single) == sorted(batched[b]), f"sample {b}: different tokens kept"
            for r in single:
                torch.testing.assert_close(batched[b][r], single[r], atol=2e-5, rtol=1e-4,
                                           msg=lambda m: f"sample {b}, real token {r}: {m}")


@pytest.mark.parametrize("family, method", PAIRS)
@pytest.mark.parametrize("padding", ["left", "right"])
def test_batch_prefill_matches_each_sample_alone(model_factory, family, method, padding):
    _check_batch_prefill(model_factory(family), family, method, padding)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "llava_next"])
def test_tiny_batches_pad_on_the_side_they_are_asked(family):
    """The "right" cases above are right-padded: each sample's ids start at slot 0, pads and mask zeros after
    them (and "left" the mirror image)."""
    samples = [tiny.sample(family, i)[0] for i in (0, 1, 2)]
    length = max(map(len, samples))
    for padding in ("left", "right"):
        inputs = tiny.batch(family, [0, 1, 2], padding=padding)
        assert inputs["input_ids"].shape == (3, length)
        for b, ids in enumerate(samples):
            pads = length - len(ids)
            row, mask = inputs["input_ids"][b].tolist(), inputs["attention_mask"][b].tolist()
            if padding == "right":
                assert row == ids + [tiny.PAD] * pads and mask == [1] * len(ids) + [0] * pads
            else:
                assert row == [tiny.PAD] * pads + ids and mask == [0] * pads + [1] * len(ids)
        assert any(length > len(ids) for ids in samples)  # (some sample is padded)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
def test_tiny_qwen_clips_are_laid_out_as_the_processors_write_them(family):
    """Sample 0's clip (VIDEO_GRIDS[0]: 2 temporal patches of 4 x 4 patches, 2 x 2 merged: 4 tokens each) after a
    text token 7: Qwen2-VL one vision_start ... vision_end group; Qwen3-VL one group per temporal patch, each after
    a timestamp text token (3, 4), so text lies between a clip's frames."""
    ids, vis = tiny.sample(family, 0, video=True)
    V, S, E = tiny.VID, tiny.VSTART, tiny.VEND
    want = [S] + [V] * 8 + [E] if family == "qwen2_vl" else [3, S, V, V, V, V, E, 4, S, V, V, V, V, E]
    assert ids[-4 - len(want):-3] == [7] + want  # (sample 0 ends in 3 text tokens)
    assert ids.count(V) == 8
    assert vis["video_grid_thw"].tolist() == [[2, 4, 4]]

def test_tiny_build_seed_sets_the_weights():
    a, b, c = tiny.build("llava", seed=1), tiny.build("llava", seed=1), tiny.build("llava")
    pa, pb, pc = (dict(m.named_parameters()) for m in (a, b, c))
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert not torch.equal(pa["lm_head.weight"], pc["lm_head.weight"])

# batches mixing images and videos: sample 0 has an image, samples 1 and 2 an image and a clip
VIDEO_PAIRS = [(f, m) for f in tiny.VIDEO_FAMILIES for m in METHODS]
MIXED = (1, 2)


@pytest.mark.parametrize("family, method", VIDEO_PAIRS)
def test_image_video_batch_matches_each_sample_alone(model_factory, family, method):
    _check_batch_prefill(model_factory(family), family, method, "left", videos=MIXED)


# video_budget="clip": the strategies that choose among any tokens (not per grid)
CLIP_METHODS = ["random", "fastv", "vision_attn_test", "hidden_norm_test", "divprune", "todre", "todre_stage2",
                "transprune"]


@pytest.mark.parametrize("family, method", [(f, m) for f in tiny.VIDEO_FAMILIES for m in CLIP_METHODS])
def test_clip_budget_batch_matches_each_sample_alone(model_factory, family, method):
    _check_batch_prefill(model_factory(family), family, method, "left", videos=MIXED, video_budget="clip")


@pytest.mark.parametrize("family, method", VIDEO_PAIRS)
def test_image_video_keep_all_is_bit_identical(model_factory, family, method):
    model = model_factory(family)
    inputs = tiny.batch(family, [0, 1, 2], videos=MIXED)
    with torch.no_grad():
        ref = model.generate(**inputs, max_new_tokens=3, output_logits=True, return_dict_in_generate=True, **tiny.GEN)
        _patch(model, method, keep=10_000)
        out = model.generate(**inputs, max_new_tokens=3, output_logits=True, return_dict_in_generate=True, **tiny.GEN)
    assert torch.equal(ref.sequences, out.sequences)
    assert all(torch.equal(a, b) for a, b in zip(ref.logits, out.logits))


@pytest.mark.parametrize("method, options, big", [
    ("divprune", {}, 10), ("fastv", {}, 10), ("transprune", {}, 10),
    ("vflowopt", dict(r2=0.5, r3=0.5), 3),  # 10 before the LLM, then 10 - round(5) = 5, 5 - round(2.5) = 3
    ("todre", dict(tau=1.0), 0),  # stage 2 always fires: the pruned image loses all its tokens
], ids=lambda v: v if isinstance(v, str) else "")
def test_images_under_budget_stay_whole_beside_pruned_ones(model_factory, method, options, big):
    """keep=10: the 16-token image is pruned (to 10, or further inside the LLM); the 8-token image and
    the clips' 4- and 6-token frames keep every token, also through in-LLM drops that rank or count a
    sample's visual tokens (fastv, transprune, vflowopt, todre's stage 2 used to take the sample's total
    budget across its images and frames). Regression: a pre-LLM strategy used to drop every token of
    an image under budget."""
    model = model_factory("qwen2_vl")
    inputs = tiny.batch("qwen2_vl", [0, 1], videos=(0, 1))
    vtprune.patch(model, method, keep=10, **options)
    with torch.no_grad():
        model(**inputs)
    st = vtprune.stats(model)
    assert st.visual_before == [16 + 2 * 4, 8 + 3 * 6]
    assert st.visual_after == [big + 2 * 4, 8 + 3 * 6]
    kept = [set(st.layout[b].tolist()) for b in range(2)]
    for b in range(2):
        img = (inputs["input_ids"][b] == tiny.IMG).nonzero().squeeze(1).tolist()
        vid = (inputs["input_ids"][b] == tiny.VID).nonzero().squeeze(1).tolist()
        assert set(vid) <= kept[b]  # every frame is within its budget
        assert len(set(img) & kept[b]) == (big if b == 0 else 8)


@pytest.mark.parametrize("family", ["llava_next_video", "llava_onevision"])
def test_llava_video_frames_are_grids_and_a_closing_newline_stays(model_factory, family):
    """LLaVA-NeXT-Video and OneVision: each pooled 2x2 frame is a unit with its grid (pool keeps 1 token per
    frame at ratio 0.25); OneVision's newline closing the video is in no frame and is kept."""
    model = model_factory(family)
    inputs = tiny.batch(family, [1], videos=(1,))
    inputs["input_ids"] = torch.where(inputs["input_ids"] == tiny.IMG, 5, inputs["input_ids"])  # video only
    del inputs["pixel_values"], inputs["image_sizes"]
    vid = (inputs["input_ids"][0] == tiny.VID).nonzero().squeeze(1)
    vtprune.patch(model, "pool", ratio=0.25)
    with torch.no_grad():
        model(**inputs)
    st = vtprune.stats(model)
    assert st.visual_before == [12] and st.visual_after == [3]  # 3 frames of 2x2; the newline is not counted
    kept = set(st.layout[0].tolist()) & set(vid.tolist())
    newline = {int(vid[12])} if family == "llava_onevision" else set()
    assert len(vid) == 12 + len(newline)
    assert kept == {int(vid[0]), int(vid[4]), int(vid[8])} | newline  # each frame's window start (+ newline)


def test_video_budget_is_per_frame(model_factory):
    """keep counts per video frame: a 3-frame clip of 6 tokens per frame keeps 3 x keep."""
    model = model_factory("qwen2_vl")
    vtprune.patch(model, "divprune", keep=2)
    with torch.no_grad():
        model(**tiny.batch("qwen2_vl", [0, 1], videos=(1,)))
    st = vtprune.stats(model)
    assert st.visual_before == [16, 8 + 3 * 6]
    assert st.visual_after == [2, 2 + 3 * 2]


def _llm_inputs(model, inputs) -> torch.Tensor:
    """The embeddings the unpatched model hands its language model (projected visual tokens in place)."""
    seen = {}

    def keep(module, args, kwargs):
        seen.setdefault("embeds", kwargs["inputs_embeds"])

    hook = model.model.language_model.register_forward_pre_hook(keep, with_kwargs=True)
    with torch.no_grad():
        model(**inputs)
    hook.remove()
    return seen["embeds"]


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl", "llava_next_video"])
def test_clip_budget_divprune_is_the_selection_on_the_whole_clip(model_factory, family):
    """video_budget="clip": DivPrune selects from all of a clip's tokens at once (its three frames' budgets
    summed: 3 x keep) what `divprune.select` selects from them; the image beside it keeps its own budget."""
    from vtprune.methods import divprune

    model = model_factory(family)
    inputs = tiny.batch(family, [1], videos=(1,))
    embeds = _llm_inputs(model, inputs)[0]
    ids = inputs["input_ids"][0]
    video = (ids == tiny.VID).nonzero().squeeze(1)
    image = (ids == tiny.IMG).nonzero().squeeze(1)
    want = video[divprune.select(embeds[video][None].float(), 3)[0]]
    vtprune.patch(model, "divprune", keep=1, video_budget="clip")
    with torch.no_grad():
        model(**inputs)
    st = vtprune.stats(model)
    kept = set(st.layout[0].tolist())
    assert sorted(kept & set(video.tolist())) == want.tolist()
    assert len(kept & set(image.tolist())) == 1
    assert st.images[-1] == (0, len(video), 3) and len(st.images) == 2


@pytest.mark.parametrize("family", ["llava_next_video", "qwen2_vl"])
def test_clip_budget_drops_repeated_frames_that_per_frame_budgets_keep(model_factory, family):
    """A clip whose first two frames are the same picture: per frame, each copy keeps the same tokens
    (the same features, kept twice); with one budget for the clip, DivPrune keeps no feature twice."""
    model = model_factory(family)
    inputs = tiny.batch(family, [1], videos=(1,))
    pix = inputs["pixel_values_videos"]
    if family == "llava_next_video":  # [videos, frames, 3, H, W]
        pix[:, 1] = pix[:, 0]
    else:  # Qwen: rows of temporal patches (t = 3 of 2 frames each), frame-major
        per = pix.shape[0] // 3
        pix[per:2 * per] = pix[:per]
    ids = inputs["input_ids"][0]
    video = (ids == tiny.VID).nonzero().squeeze(1)
    embeds = _llm_inputs(model, inputs)[0]
    n = len(video) // 3
    # the repeated frame's features (equal up to float rounding: CLIP runs the frames as one batch)
    torch.testing.assert_close(embeds[video[:n]], embeds[video[n:2 * n]], atol=1e-6, rtol=1e-5)
    kept_features = {}
    for mode in ("frame", "clip"):
        vtprune.patch(model, "divprune", keep=2, video_budget=mode)
        with torch.no_grad():
            model(**inputs)
        kept = sorted(set(vtprune.stats(model).layout[0].tolist()) & set(video.tolist()))
        assert len(kept) == 6
        kept_features[mode] = embeds[kept]
    distinct = {mode: len(torch.unique((f * 1e4).round(), dim=0)) for mode, f in kept_features.items()}
    assert distinct == {"frame": 4, "clip": 6}


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl", "llava_next_video"])
def test_clip_budget_hands_a_clip_its_frames_vision_scores_in_order(model_factory, family):
    """A clip's vision-encoder scores are its frames' scores, frame after frame (what a per-frame run sees)."""
    seen = []
    vision_attn = get_method("vision_attn_test")

    class Record(vision_attn):
        def select(self, image):
            seen.append(image.signals["feat"].clone())
            return super().select(image)

    model = model_factory(family)
    inputs = tiny.batch(family, [1], videos=(1,))
    got = {}
    for mode in ("frame", "clip"):
        seen.clear()
        vtprune.patch(model, "vision_attn_test", keep=1, video_budget=mode)
        model._vtprune.method = Record(model._vtprune.method.config)
        with torch.no_grad():
            model(**inputs)
        got[mode] = list(seen)
    assert len(got["frame"]) == 4 and len(got["clip"]) == 2  # the image, then 3 frames / 1 clip
    assert torch.equal(got["clip"][0], got["frame"][0])
    assert torch.equal(got["clip"][1], torch.cat(got["frame"][1:]))


@pytest.mark.parametrize("family", tiny.VIDEO_FAMILIES)
def test_clip_budget_in_generate(model_factory, family):
    """generate() (which encodes the videos before the forward: Qwen3-VL then gets no video_grid_thw, and its
    frames are grouped by the encoded videos' token counts): with and without the cache, one clip unit per
    video, and under beam search each beam prunes as its prompt alone does."""
    model = model_factory(family)
    inputs = tiny.batch(family, [0, 1, 2], videos=MIXED)
    vtprune.patch(model, "divprune", ratio=0.3, video_budget="clip")
    with torch.no_grad():
        cached = model.generate(**inputs, max_new_tokens=4, **tiny.GEN)
        assert sorted(b for b, _, _ in vtprune.stats(model).images) == [0, 1, 1, 2, 2]  # images, one unit per clip
        plain = model.generate(**inputs, max_new_tokens=4, use_cache=False, **tiny.GEN)
        assert cached.tolist() == plain.tolist()
        beams = model.generate(**inputs, max_new_tokens=3, num_beams=2, num_return_sequences=2, **tiny.GEN)[:, -3:]
        for b in range(3):
            alone = model.generate(**tiny.batch(family, [b], videos=MIXED), max_new_tokens=3, num_beams=2,
                                   num_return_sequences=2, **tiny.GEN)[:, -3:]
            assert beams[2 * b:2 * b + 2].tolist() == alone.tolist(), f"sample {b}"


@pytest.mark.parametrize("family", ["llava_next_video", "llava_onevision"])
def test_back_to_back_llava_videos_are_two_videos(model_factory, family):
    """Two clips with no text between them are one run of placeholders: split into the two videos by their
    length (OneVision refused it; a clip budget was shared by both), in a forward and under generate()."""
    g = torch.Generator().manual_seed(5)
    model = model_factory(family)
    (v1, p1), (v2, p2) = tiny._video(family, 0, g), tiny._video(family, 1, g)
    ids = [tiny.BOS, 10, 11] + v1 + v2 + [12, 13]
    inputs = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
              "pixel_values_videos": torch.cat([p1["pixel_values_videos"], p2["pixel_values_videos"]])}
    for mode, want in (("frame", [(0, 4, 1)] * 6), ("clip", [(0, 12, 3)] * 2)):
        vtprune.patch(model, "divprune", keep=1, video_budget=mode)
        with torch.no_grad():
            model(**inputs)
            assert vtprune.stats(model).images == want
            model.generate(**inputs, max_new_tokens=2, **tiny.GEN)
            assert vtprune.stats(model).images == want
    from vtprune.hooks.llava_next_video import _videos

    with pytest.raises(ValueError, match="not a whole number of this call's clips of 12 tokens"):
        _videos(torch.arange(16), 12)  # text inside a clip (at a frame boundary: 16 = 12 + 4)


def test_clip_budget_is_refused_where_it_cannot_apply(model_factory):
    for method in ("pool", "token_shuffle", "hiprune", "vflowopt"):  # they work on each frame's grid
        with pytest.raises(ValueError, match=f"{method} works on each frame's token grid"):
            vtprune.patch(model_factory("qwen2_vl"), method, ratio=0.5, video_budget="clip")
    with pytest.raises(ValueError, match="video_budget must be 'frame' or 'clip', got 'video'"):
        vtprune.patch(model_factory("qwen2_vl"), "divprune", ratio=0.5, video_budget="video")
    with pytest.raises(ValueError, match=r"choose among any tokens \((.*)\)") as err:  # (the ones that can)
        vtprune.patch(model_factory("qwen2_vl"), "pool", ratio=0.5, video_budget="clip")
    named = set(re.search(r"any tokens \((.*)\)", str(err.value)).group(1).split(", "))
    builtin = {"divprune", "fastv", "random", "todre", "transprune", "pool", "token_shuffle", "hiprune", "vflowopt"}
    assert named & builtin == {"divprune", "fastv", "random", "todre", "transprune"}  # (tests register others)
    from vtprune.methods.registry import get_method, option_help

    def note(method):  # the help text of video_budget (vtprune methods / --help)
        return next(n for name, _, _, n in option_help(get_method(method)) if name == "video_budget")
    assert all('"frame" only' in note(m) for m in ("pool", "token_shuffle", "hiprune", "vflowopt"))
    assert not any('"frame" only' in note(m) for m in ("divprune", "fastv", "random", "todre", "transprune"))


def test_clip_budget_needs_to_know_each_frames_video():
    """Qwen3-VL's frames are separate runs: without video_grid_thw they cannot be put together (said so)."""
    from vtprune.hooks.runtime import Unit, _clips

    frames = [Unit(0, torch.tensor([3, 4]), None, 0, video=None)]
    with pytest.raises(ValueError, match="which frames make each video"):
        _clips(frames, [1])
    from vtprune.hooks.qwen2_vl import _row_videos

    # each row's videos by token counts: listed per row, or once per prompt under k = 2 copies per prompt
    assert _row_videos([8, 18, 6], [8, 24, 0]) == [[8], [18, 6], []]
    assert _row_videos([8, 18, 6], [8, 8, 24, 24]) == [[8], [8], [18, 6], [18, 6]]
    assert _row_videos([8, 18], [8, 20]) is None and _row_videos(None, [8]) is None
    assert _row_videos([4, 4], [4, 2, 4, 6]) is None  # rows that are not copies of one prompt's
    image = Unit(0, torch.tensor([0, 1]), None, 0)
    units, budgets, groups = _clips([image, Unit(0, torch.tensor([3, 4]), (1, 1, 2), 1, video=0),
                                     Unit(0, torch.tensor([6, 7]), (1, 1, 2), 2, video=0),
                                     Unit(0, torch.tensor([8, 9]), None, 4),  # a second image: its own budget
                                     Unit(1, torch.tensor([2, 3]), (1, 1, 2), 3, video=1)], [1, 1, 2, 1, 1])
    assert groups == [[0], [1, 2], [3], [4]] and budgets == [1, 3, 1, 1]
    assert units[1].slots.tolist() == [3, 4, 6, 7] and units[1].grid is None and units[3].grid == (1, 1, 2)


@pytest.mark.parametrize("family, method", PAIRS)
def test_batch_generate_matches_each_sample_alone(model_factory, family, method):
    model = model_factory(family)
    _patch(model, method, ratio=0.4)
    idx = [0, 1, 2, 3]
    inputs = tiny.batch(family, idx)
    with torch.no_grad():
        gen = model.generate(**inputs, max_new_tokens=5, **tiny.GEN)[:, -5:]
        for b, i in enumerate(idx):
            alone = model.generate(**tiny.batch(family, [i]), max_new_tokens=5, **tiny.GEN)[:, -5:]
            assert gen[b].tolist() == alone[0].tolist(), f"sample {b}"


def test_pool_on_different_image_sizes_keeps_different_counts(model_factory):
    model = model_factory("qwen2_vl")
    vtprune.patch(model, "pool", ratio=0.25)
    with torch.no_grad():
        model(**tiny.batch("qwen2_vl", [0, 1]))
    # 8x8 patches -> 4x4 tokens, keep 4 -> 2x2; 4x8 -> 2x4 tokens, keep 2 -> 1x2
    assert vtprune.stats(model).visual_after == [4, 2]


@pytest.mark.parametrize("family, method, videos", [(f, m, ()) for f, m in STAGE_PAIRS] + [
    (f, m, MIXED) for f in tiny.VIDEO_FAMILIES for m in STAGE_METHODS])
def test_generate_with_cache_equals_without(model_factory, family, method, videos):
    model = model_factory(family)
    _patch(model, method, ratio=0.3)
    inputs = tiny.batch(family, [0, 1, 2], videos=videos)
    with torch.no_grad():
        cached = model.generate(**inputs, max_new_tokens=6, output_scores=True, return_dict_in_generate=True, **tiny.GEN)
        plain = model.generate(**inputs, max_new_tokens=6, use_cache=False, output_scores=True,
                               return_dict_in_generate=True, **tiny.GEN)
    assert cached.sequences.tolist() == plain.sequences.tolist()
    for step, (a, b) in enumerate(zip(cached.scores, plain.scores)):
        finite = torch.isfinite(a)
        torch.testing.assert_close(a[finite], b[finite], atol=2e-5, rtol=1e-4, msg=lambda m: f"step {step}: {m}")


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_decode_logits_match_manual_full_recompute(model_factory, family):
    """Decode steps after a pruned prefill see the right mask: each step's logits equal a fresh
    pruned forward over prompt + generated tokens (llm stage: fastv, selection fixed by the prompt
    would differ, so this uses the prefix-invariant test strategy)."""
    model = model_factory(family)
    vtprune.patch(model, "hidden_norm_test", ratio=0.3)
    inputs = tiny.batch(family, [0, 1])
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, output_logits=True, return_dict_in_generate=True, **tiny.GEN)
        full = dict(inputs)
        full["input_ids"] = out.sequences[:, :-1]
        full["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones(2, 2, dtype=torch.long)], 1)
        if family.startswith("qwen"):
            full["mm_token_type_ids"] = tiny.token_types(full["input_ids"])
        recomputed = model(**full).logits[:, -1]
    torch.testing.assert_close(out.logits[-1], recomputed, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("family, method, videos, calls", [
    # three 16-token LLaVA images: one batched selection
    ("llava", "divprune", (), [3]),
    ("llava", "todre", (), [3]),
    # Qwen2-VL samples 0, 1, 4: the two 8x8 images together; sample 1's 4x8 image alone (select); its
    # clip's three frames together
    ("qwen2_vl", "divprune", (1,), [2, 3]),
    ("qwen2_vl", "todre", (1,), [2, 3]),
])
def test_images_of_one_shape_are_selected_in_one_batched_call(model_factory, monkeypatch, family, method, videos,
                                                              calls):
    """The runtime hands images of one shape to the method's select_batch together (one kernel launch), and
    what it keeps is exactly what selecting each image alone keeps."""
    cls = get_method(method)
    model = model_factory(family)
    inputs = tiny.batch(family, [0, 1, 4], videos=videos)
    with torch.no_grad():
        monkeypatch.setattr(cls, "select_batch", Method.select_batch)  # one by one
        vtprune.patch(model, method, ratio=0.5)
        ref = model(**inputs).logits
        ref_layout = vtprune.stats(model).layout
        vtprune.unpatch(model)
        monkeypatch.undo()
        seen, singles = [], []
        real_batch, real_select = cls.select_batch, cls.select
        monkeypatch.setattr(cls, "select_batch", lambda self, ims: seen.append(len(ims)) or real_batch(self, ims))
        monkeypatch.setattr(cls, "select", lambda self, im: singles.append(1) or real_select(self, im))
        vtprune.patch(model, method, ratio=0.5)
        out = model(**inputs).logits
    assert sorted(seen) == calls
    assert len(singles) == len(vtprune.stats(model).images) - sum(calls)  # the rest one by one
    assert ref_layout.shape[1] < inputs["input_ids"].shape[1]
    assert torch.equal(vtprune.stats(model).layout, ref_layout)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("where", ["select", "select_batch"])
@pytest.mark.parametrize("bad, message", [
    (lambda k, n: torch.tensor([0] * k), "indices must be unique and ascending"),
    (lambda k, n: torch.arange(n - k + 1, n + 1), r"indices out of range \[0, 16\)"),
    (lambda k, n: torch.arange(k + 1), r"expected 1\.\.8 indices"),
    (lambda k, n: torch.arange(k)[None], r"expected 1\.\.8 indices"),
], ids=["repeated", "out_of_range", "too_many", "wrong_shape"])
def test_a_strategys_bad_selection_is_an_error(model_factory, monkeypatch, where, bad, message):
    """What a strategy returns is checked on both paths (one image, or a batch of one shape): a wrong
    selection is an error naming the strategy, never silently applied."""
    cls = get_method("divprune")
    monkeypatch.setattr(cls, where, (lambda self, im: Selection(bad(im.keep, len(im.features)))) if where == "select"
                        else (lambda self, ims: [Selection(bad(im.keep, len(im.features))) for im in ims]))
    model = model_factory("llava")
    vtprune.patch(model, "divprune", keep=8)
    with torch.no_grad(), pytest.raises(RuntimeError, match="divprune.select: " + message):
        model(**tiny.batch("llava", [0] if where == "select" else [0, 1]))


def _tokens(im, k=None):
    return torch.zeros(im.keep if k is None else k, im.features.shape[-1])


@pytest.mark.parametrize("where", ["select", "select_batch", "per_grid"])
@pytest.mark.parametrize("bad, exc, message", [
    (lambda im: Selection(torch.arange(im.keep) + 0.7), TypeError, "indices must be an integer tensor, got dtype torch.float32"),
    (lambda im: torch.arange(im.keep), TypeError, "must return a vtprune.Selection, got Tensor"),
    (lambda im: Selection(torch.arange(im.keep) - 1), RuntimeError, r"indices out of range"),
    (lambda im: Selection(torch.arange(im.keep), tokens=torch.zeros(im.features.shape[-1])), RuntimeError,
     r"tokens must be a float tensor \[\d+, 64\] \(one per kept index\), got torch.float32 \(64,\)"),
    (lambda im: Selection(torch.arange(im.keep), tokens=_tokens(im).long()), RuntimeError, "tokens must be a float tensor"),
    (lambda im: Selection(torch.arange(im.keep), tokens=_tokens(im, 1)), RuntimeError, "tokens must be a float tensor"),
    (lambda im: Selection(torch.arange(im.keep), importance=torch.tensor(1.0)), RuntimeError,
     r"importance must be a real tensor \[\d+\]"),
    (lambda im: Selection(torch.arange(im.keep), tokens=_tokens(im), grid=(1, -1, -im.keep)), RuntimeError,
     r"grid must be 3 ints >= 1"),
    (lambda im: Selection(torch.arange(im.keep), tokens=_tokens(im), grid=(1, 2, im.keep)), RuntimeError,
     r"merged grid \(1, 2, \d+\) does not match \d+ tokens"),
    (lambda im: Selection(torch.arange(im.keep), tokens=_tokens(im), grid=(2, 1, im.keep)), RuntimeError,
     r"merged grid \(2, 1, \d+\) does not match \d+ tokens"),  # (h w = k, but two frames of them)
], ids=["float", "bare_tensor", "negative", "tokens_1d", "tokens_int", "tokens_rows", "importance", "grid_signs",
        "grid_size", "grid_frames"])
def test_what_a_strategy_returns_is_checked_on_every_path(model_factory, monkeypatch, where, bad, exc, message):
    """Float indices were rounded down (0.7 -> 0), a [D] tokens tensor was broadcast over every kept token,
    a bare tensor's .indices (a torch method) gave "Could not infer dtype", and on LLaVA-NeXT's per-grid
    path nothing was checked (index -1 took each grid's last token)."""
    cls = get_method("divprune")
    if where == "select_batch":
        monkeypatch.setattr(cls, "select_batch", lambda self, ims: [bad(im) for im in ims])
    else:
        monkeypatch.setattr(cls, "select", lambda self, im: bad(im))
    if where == "per_grid":
        monkeypatch.setattr(cls, "per_grid", "select")
    family = "llava_next" if where == "per_grid" else "llava"
    model = model_factory(family)
    vtprune.patch(model, "divprune", keep=8 if where != "per_grid" else 12)
    with torch.no_grad(), pytest.raises(exc, match="divprune.select.*" + message):
        model(**tiny.batch(family, [0, 1] if where == "select_batch" else [0]))


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_selection_importance_reaches_the_llm_stage_at_the_kept_slots(model_factory, monkeypatch, family):
    """Selection.importance (vflowopt's) arrives as LayerTokens.state["importance"] at the kept visual slots,
    each kept token its own value and 0 elsewhere, per sample. (Written to the wrong slots it ranked other
    tokens at the in-LLM drops; batch-vs-alone and cache-vs-none agreed, being wrong alike.)"""
    cls = get_method("vflowopt")
    real_select, real_in_llm = cls.select, cls.select_in_llm
    sels, states = [], []

    def select(self, image):
        sel = real_select(self, image)
        sels.append(sel.importance.clone())
        return sel

    def select_in_llm(self, tokens):
        if not states:
            states.append((tokens.state["importance"].clone(), tokens.visual.clone()))
        return real_in_llm(self, tokens)

    monkeypatch.setattr(cls, "select", select)
    monkeypatch.setattr(cls, "select_in_llm", select_in_llm)
    model = model_factory(family)
    vtprune.patch(model, "vflowopt", ratio=0.5)
    with torch.no_grad():
        model(**tiny.batch(family, [0, 1]))
    (importance, visual), = states
    assert len(sels) == 2
    for b in range(2):
        assert torch.equal(importance[b][visual[b]], sels[b].float()) and not importance[b][~visual[b]].any()


def test_an_llm_strategy_that_drops_nothing_is_an_error(model_factory, monkeypatch):
    """select_in_llm returning None (a forgotten `return`), or an llm-stage strategy naming no drop layer,
    pruned nothing without a word."""
    cls = get_method("fastv")
    model = model_factory("llava")
    monkeypatch.setattr(cls, "select_in_llm", lambda self, tokens: None)
    vtprune.patch(model, "fastv", keep=4)
    with torch.no_grad(), pytest.raises(TypeError, match="fastv.select_in_llm returned None"):
        model(**tiny.batch("llava", [0]))
    monkeypatch.setattr(cls, "drop_layers", lambda self, n: [])
    with pytest.raises(ValueError, match="fastv: an llm-stage strategy must name the decoder layers"):
        vtprune.patch(model, "fastv", keep=4)


@pytest.mark.parametrize("value, shown", [
    ([1], r"it is \[1\]"),  # a list where the method goes (the README's "layers listed in attention_layers")
    (None, "it is None"),
    (lambda self, n: 1, r"attention_layers\(4\) returned 1"),
    (lambda self, n: [1.0], r"attention_layers\(4\) returned \[1.0\]"),
    (lambda self, n: [True], r"attention_layers\(4\) returned \[True\]"),
])
def test_a_strategys_layer_lists_must_be_methods_returning_ints(model_factory, monkeypatch, value, shown):
    monkeypatch.setattr(get_method("fastv"), "attention_layers", value)
    with pytest.raises(TypeError, match=r"fastv.attention_layers must be a method returning decoder layer indices "
                                        r"\(ints\), def attention_layers\(self, num_layers\) -> list\[int\]; " + shown):
        vtprune.patch(model_factory("llava"), "fastv", keep=4)


def test_a_strategys_layer_lists_may_be_any_iterable_of_integers(model_factory, monkeypatch):
    import numpy as np

    monkeypatch.setattr(get_method("fastv"), "attention_layers", lambda self, n: (i for i in np.array([1, 1])))
    model = vtprune.patch(model_factory("llava"), "fastv", keep=4)
    assert model._vtprune.attn_layers == [1]


def test_stats_after_a_forward_that_raised_are_the_last_finished_ones(model_factory, monkeypatch):
    """A forward that raised in the selection left half-filled figures: visual_after [] and kept_fraction 0.0
    ("everything pruned")."""
    model = model_factory("llava")
    inputs = tiny.batch("llava", [0, 1])
    vtprune.patch(model, "divprune", keep=4)
    with torch.no_grad():
        model(**inputs)
    good = vtprune.stats(model)
    assert good.visual_after == [4, 4] and good.kept_fraction == 0.25
    monkeypatch.setattr(get_method("divprune"), "select_batch", lambda self, ims: 1 / 0)
    with torch.no_grad(), pytest.raises(ZeroDivisionError):
        model(**inputs)
    assert vtprune.stats(model) is good
    vtprune.patch(model, "divprune", keep=4)  # no finished forward yet: the empty figures
    with torch.no_grad(), pytest.raises(ZeroDivisionError):
        model(**inputs)
    assert vtprune.stats(model).visual_before == [] and vtprune.stats(model).kept_fraction == 1.0


def test_integer_forms_a_strategy_may_return(model_factory, monkeypatch):
    """An empty list as an in-LLM selection (0 kept tokens, allowed there) read as a float tensor and was
    refused; a merged grid of numpy or 0-dim tensor integers was called "not ints". Both are accepted,
    with the same result as plain Python ints."""
    import numpy as np

    model = model_factory("llava")
    inputs = tiny.batch("llava", [0, 1])
    fastv = get_method("fastv")
    monkeypatch.setattr(fastv, "select_in_llm", lambda self, t: [[] for _ in range(t.hidden.shape[0])])
    vtprune.patch(model, "fastv", keep=4)
    with torch.no_grad():
        model(**inputs)
    assert vtprune.stats(model).visual_after == [0, 0]
    monkeypatch.undo()
    pool = get_method("pool")
    plain = pool.select
    outs = {}
    for name, cast in (("int", int), ("numpy", np.int64), ("tensor", torch.tensor)):
        def select(self, im, cast=cast):
            sel = plain(self, im)
            sel.grid = tuple(cast(int(g)) for g in sel.grid)
            return sel
        monkeypatch.setattr(pool, "select", select)
        monkeypatch.setattr(pool, "select_batch", lambda self, ims: [self.select(im) for im in ims])
        vtprune.patch(model, "pool", ratio=0.25)
        with torch.no_grad():
            outs[name] = model(**inputs).logits
    assert torch.equal(outs["int"], outs["numpy"]) and torch.equal(outs["int"], outs["tensor"])
    with pytest.raises(TypeError, match="indices must be an integer tensor, got dtype torch.float32"):
        from vtprune.hooks.checks import as_indices
        as_indices([0.5], "x")


def test_select_batch_rows_may_differ_in_length_but_not_in_number(model_factory, monkeypatch):
    """A strategy may keep fewer than its budget, differently per image; select_batch must answer for
    every image it was given."""
    cls = get_method("divprune")
    model = model_factory("llava")
    inputs = tiny.batch("llava", [0, 1])
    monkeypatch.setattr(cls, "select_batch", lambda self, ims: [Selection(torch.arange(im.keep - i))
                                                               for i, im in enumerate(ims)])
    vtprune.patch(model, "divprune", keep=4)
    with torch.no_grad():
        model(**inputs)
    assert vtprune.stats(model).visual_after == [4, 3]
    monkeypatch.setattr(cls, "select_batch", lambda self, ims: [Selection(torch.arange(im.keep)) for im in ims[:-1]])
    with torch.no_grad(), pytest.raises(RuntimeError, match="select_batch: 1 selections for 2 images"):
        model(**inputs)


def test_layer_tokens_keep_is_the_sum_of_a_samples_image_and_frame_budgets(model_factory, monkeypatch):
    """LayerTokens.keep (documented: the sum of the sample's images' budgets) over an image and a clip's frames."""
    cls = get_method("fastv")
    seen, real = [], cls.select_in_llm
    monkeypatch.setattr(cls, "select_in_llm", lambda self, t: seen.append(t.keep.tolist()) or real(self, t))
    model = model_factory("qwen2_vl")
    inputs = tiny.batch("qwen2_vl", [0, 1], videos=(0, 1))  # sample 0: 16-token image + 2 frames of 4
    vtprune.patch(model, "fastv", keep=10)                   # sample 1: 8-token image + 3 frames of 6
    with torch.no_grad():
        model(**inputs)
    assert seen and seen[0] == [10 + 4 + 4, 8 + 6 + 6 + 6]
    assert [b for _, _, b in vtprune.stats(model).images] == [10, 8, 4, 4, 6, 6, 6]


class DropFirstOfRow1(Method):
    """test strategy: after decoder layer 0, sample 1 loses its first visual token, sample 0 nothing"""
    stage = "llm"

    def drop_layers(self, num_layers):
        return [0]

    def select_in_llm(self, tokens):
        n = tokens.visual.sum(1).tolist()
        return [torch.arange(n[0]), torch.arange(1, n[1])]


def test_layers_after_an_in_llm_drop_keep_a_model_wide_sliding_window():
    """Mistral-style LMs slide every layer by config.sliding_window (no layer_types): the layers after a
    drop got a full causal mask. Sample 0 keeps its layout (its logits are the unpatched model's), and
    decode steps on the sliding cache equal a cache-free run."""
    vtprune.register("drop_first_of_row_1_test")(DropFirstOfRow1)  # (registered for this test only: conftest)
    model = tiny.build("llava", sliding_window=6)  # shorter than the prompts
    inputs = tiny.batch("llava", [1, 0])  # sample 0 unpadded and longer than the window
    with torch.no_grad():
        want = model(**inputs).logits
        vtprune.patch(model, "drop_first_of_row_1_test", keep=1)
        got = model(**inputs).logits
        assert torch.equal(vtprune.stats(model).layout[0], torch.arange(want.shape[1]))
        torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=0)
        gen = dict(max_new_tokens=4, output_scores=True, return_dict_in_generate=True, **tiny.GEN)
        cached, plain = model.generate(**inputs, **gen), model.generate(**inputs, use_cache=False, **gen)
    assert cached.sequences.tolist() == plain.sequences.tolist()
    for a, b in zip(cached.scores, plain.scores):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("sliding", [None, 6])
def test_one_token_decode_steps_after_an_in_llm_drop_pass_no_mask_where_nothing_is_padded(sliding):
    """At batch 1 generate() drops the all-ones mask, and the layers before an in-LLM drop get none. The
    layers after it got a mask built at every decode step (~0.2 ms of host time per step on the tiny LLaVA,
    for a mask that masks nothing); they now get none either, except at sliding-window layers, whose window
    needs it (the prompt is longer than 6). Cached decoding equals cache-free decoding both ways."""
    model = tiny.build("llava", sliding_window=sliding)
    inputs = tiny.batch("llava", [0])
    vtprune.patch(model, "hidden_norm_test", ratio=0.3)  # drops after layer 1: layers 2 and 3 hold fewer keys
    seen = []
    hook = model.model.language_model.layers[3].register_forward_pre_hook(
        lambda m, a, k: seen.append((a[0].shape[1], k["attention_mask"] is None)), with_kwargs=True)
    gen = dict(max_new_tokens=4, output_scores=True, return_dict_in_generate=True, **tiny.GEN)
    with torch.no_grad():
        cached = model.generate(**inputs, **gen)
        hook.remove()
        plain = model.generate(**inputs, use_cache=False, **gen)
    assert vtprune.stats(model).visual_after == [5]
    assert seen[1:] == [(1, sliding is None)] * 3
    assert cached.sequences.tolist() == plain.sequences.tolist()
    for a, b in zip(cached.scores, plain.scores):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


def test_a_group_s_position_ids_are_made_once_per_prefill_not_per_layer(monkeypatch):
    """The layers after an in-LLM drop get their group's compacted position ids: made at every one of those layers
    (4 tensor ops each: ~120 kernel launches for fastv on a 32-layer model, at batch 1 where the prefill is bound by
    the host), now once per group."""
    import transformers

    from vtprune.hooks import runtime

    cfg = tiny.config("llava")
    cfg.text_config.num_hidden_layers = 8
    torch.manual_seed(0)
    model = transformers.LlavaForConditionalGeneration(cfg).eval()
    inputs = tiny.batch("llava", [0, 1])
    seen, real = [], runtime.compact_text_positions
    monkeypatch.setattr(runtime, "compact_text_positions", lambda mask: seen.append(mask.shape) or real(mask))
    vtprune.patch(model, "fastv", keep=3)
    layers = model.model.language_model.layers
    given = []
    for i in (2, 7):  # the first and last layer after fastv's drop (after layer 1), after vtprune's hooks
        layers[i].register_forward_pre_hook(lambda m, a, k: given.append(k["position_ids"]), with_kwargs=True)
    with torch.no_grad():
        model(**inputs, position_ids=torch.arange(inputs["input_ids"].shape[1]).expand(2, -1))
    kept = torch.tensor(vtprune.stats(model).layer_tokens[2])  # per sample, left-padded to the longest
    width = int(kept.max())
    assert len(seen) == 1 and given[0] is given[1]
    assert given[0].tolist() == [[0] * (width - k) + list(range(k)) for k in kept.tolist()]


def test_fastv_scores_a_sliding_window_layer_within_its_window():
    """FastV's attention at a sliding-window layer is the one the layer computes (each row sees its last
    `sliding_window` slots): under SDPA it keeps what eager attention's probabilities rank highest."""
    sdpa, eager = (tiny.build("llava", attn, sliding_window=6) for attn in ("sdpa", "eager"))
    inputs = tiny.batch("llava", [0, 1, 2])
    with torch.no_grad():
        attn = eager(**inputs, output_attentions=True).attentions[1]  # layer K-1 = 1
    mask = inputs["attention_mask"].bool()
    per_key = (attn.mean(1) * mask[:, :, None]).sum(1) / mask.sum(1, keepdim=True)
    visual = inputs["input_ids"] == tiny.IMG
    keep = 5
    vtprune.patch(sdpa, "fastv", keep=keep, layer=2)
    with torch.no_grad():
        sdpa(**inputs)
    layout = vtprune.stats(sdpa).layout
    for b in range(3):
        slots = visual[b].nonzero().squeeze(1)
        want = slots[torch.sort(per_key[b, slots], descending=True, stable=True).indices[:keep]]
        assert sorted(s for s in layout[b].tolist() if s in set(slots.tolist())) == sorted(want.tolist()), b


class FixedDrops(Method):
    """test strategy: fixed picks, into each sample's current visual slots, after decoder layers 0 and 2"""
    stage = "llm"
    PICKS = {0: [[0, 2, 3, 5, 7, 9, 11], [1, 2, 4, 8, 15], list(range(0, 16, 2))],
             2: [[1, 3, 4], [0, 4], [0, 1, 2, 3, 4, 5]]}

    def drop_layers(self, num_layers):
        return sorted(self.PICKS)

    def select_in_llm(self, tokens):
        return [torch.tensor(p) for p in self.PICKS[tokens.layer]]


def test_in_llm_drops_equal_the_decoder_run_by_hand_on_the_kept_tokens(model_factory):
    """The layers after a drop see the kept tokens alone: each sample's real tokens run through the unpatched
    decoder layer by layer, its hidden states cut to the kept slots after layers 0 and 2 (a causal mask over
    them, each token's own rotary position), give the patched batch's logits at every slot it keeps."""
    vtprune.register("fixed_drops_test")(FixedDrops)  # (registered for this test only: conftest)
    model = model_factory("llava")
    inputs = tiny.batch("llava", [0, 1, 2])  # left padding, 16 visual tokens per sample
    lm = model.model.language_model
    given = tiny.lm_kwargs(model, inputs)  # (unpatched) the spliced embeddings and positions
    length = given["inputs_embeds"].shape[1]
    positions = given.get("position_ids")
    positions = torch.arange(length).expand(3, -1) if positions is None else positions.expand(3, -1)
    vtprune.patch(model, "fixed_drops_test", keep=1)
    with torch.no_grad():
        got = model(**inputs).logits
    layout = vtprune.stats(model).layout  # the caller-side slot of each slot (-1: a pad added), pads included
    real = (layout >= 0) & inputs["attention_mask"].bool().gather(1, layout.clamp(min=0))
    for b in range(3):
        slots = inputs["attention_mask"][b].nonzero().squeeze(1)  # the sample's real slots, then what is kept
        h = given["inputs_embeds"][b, slots][None]
        with torch.no_grad():
            for i, layer in enumerate(lm.layers):
                n = len(slots)
                causal = torch.full((n, n), float("-inf")).triu(1)[None, None]
                cos_sin = lm.rotary_emb(h, positions[b, slots][None])
                h = layer(h, attention_mask=causal, position_embeddings=cos_sin, position_ids=positions[b, slots][None])
                h = h[0] if isinstance(h, tuple) else h
                if i in FixedDrops.PICKS:
                    visual = (inputs["input_ids"][b, slots] == tiny.IMG).nonzero().squeeze(1)
                    keep = torch.ones(n, dtype=torch.bool)
                    keep[visual] = False
                    keep[visual[FixedDrops.PICKS[i][b]]] = True
                    slots, h = slots[keep], h[:, keep]
            want = model.lm_head(lm.norm(h))[0]
        assert layout[b][real[b]].tolist() == slots.tolist()
        torch.testing.assert_close(got[b, real[b]], want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "llava_next"])
def test_todre_stage2_alone_lets_every_token_in_and_drops_them_where_the_question_looks_away(model_factory, family):
    """stage1=False: ToDRE's stage 2 alone (the paper's ablation with every token entering the LLM), although
    every image is within its budget. tau=0 never drops: the unpatched logits bit for bit. tau=1 always drops:
    what a strategy dropping every visual token after the same decoder layer gives, prefill and generate."""
    from vtprune.methods.todre import ToDRE, ToDREConfig

    layer = ToDRE(ToDREConfig(stage1=False)).drop_layers(len(model_factory(family).model.language_model.layers))[0]

    class DropAll(Method):
        """test strategy: every visual token dropped after the layer todre's stage 2 decides at"""
        stage = "llm"

        def drop_layers(self, num_layers):
            return [layer]

        def select_in_llm(self, tokens):
            return [torch.zeros(0, dtype=torch.long)] * tokens.hidden.shape[0]

    vtprune.register("drop_all_test")(DropAll)  # (registered for this test only: conftest)
    model = model_factory(family)
    inputs = tiny.batch(family, [0, 1, 2])  # left padding
    gen = dict(max_new_tokens=3, **tiny.GEN)
    with torch.no_grad():
        ref = model(**inputs).logits
        vtprune.patch(model, "todre", stage1=False, tau=0.0)
        assert torch.equal(model(**inputs).logits, ref)
        assert vtprune.stats(model).visual_after == vtprune.stats(model).visual_before
        vtprune.patch(model, "todre", stage1=False, tau=1.0)
        got, got_ids = model(**inputs).logits, model.generate(**inputs, **gen)
        st = vtprune.stats(model)
        vtprune.patch(model, "drop_all_test", keep=1)
        want, want_ids = model(**inputs).logits, model.generate(**inputs, **gen)
    assert st.visual_after == [0, 0, 0] and all(k == n for _, n, k in st.images)  # every image within budget
    assert torch.equal(got, want) and torch.equal(got_ids, want_ids)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "llava_next"])
@pytest.mark.parametrize("method", ["divprune", "hiprune", "fastv", "transprune"])
def test_threads_running_one_patched_model_at_once_each_prune_their_own_forward(family, method, in_lockstep):
    """A web server's worker threads call generate() on one model at once. The pruning state (the run in
    progress, the vision scores, the adapter's encode, the last figures) was the model's, so a thread read
    another's: other tokens came out, or shape errors ("key_mask must be [B, Nk]", "attention at layer 1
    was not captured"). Each thread now has its own. Here two threads run in lockstep, each forward half
    done while the other's runs; each gets what it gets alone, and its own stats. A thread that ran none
    (as the main one, after a generate() run in a worker for streaming) reads the latest of any."""
    import threading

    model = vtprune.patch(tiny.build(family), method, ratio=0.5)
    inputs = [tiny.batch(family, [0]), tiny.batch(family, [1, 2])]
    gen = dict(max_new_tokens=3, min_new_tokens=3, **tiny.GEN)
    alone = []
    with torch.no_grad():
        for x in inputs:
            alone.append((model.generate(**x, **gen), vtprune.stats(model)))

        def run(x):
            def go():
                with torch.no_grad():
                    return model.generate(**x, **gen), vtprune.stats(model)
            return go

        # held together after the vision encoder and before every decoder-layer-0 call
        tower = model.model.visual if family in tiny.QWEN_FAMILIES else model.model.vision_tower
        together = in_lockstep([run(x) for x in inputs], pre=[model.model.language_model.layers[0]], post=[tower])
    for (ids, st), (want, want_st) in zip(together, alone):
        assert torch.equal(ids, want)
        assert st.visual_after == want_st.visual_after and torch.equal(st.layout, want_st.layout)
        assert st.layer_tokens == want_st.layer_tokens
    seen = []  # a thread that ran no forward
    reader = threading.Thread(target=lambda: seen.append(vtprune.stats(model)))
    reader.start()
    reader.join()
    assert any(seen[0] is st for _, st in together)
