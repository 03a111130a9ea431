"""Decode-loop and input-form regressions of the model hooks: manual decode loops without position_ids,
Qwen video positions and frames, failed forwards, cache reuse, 4-D pixel_values, keep-all with a static cache."""
import inspect

import pytest
import torch
import transformers
from transformers import DynamicCache

import vtprune
from vtprune import tiny
from vtprune.hooks.runtime import _cache_kwarg

# the KV cache argument: `cache=` from transformers 5.24, `past_key_values=` before (the old name warns)
CACHE = _cache_kwarg(transformers.LlavaForConditionalGeneration.forward)
GEN = dict(max_new_tokens=3, output_scores=True, return_dict_in_generate=True, **tiny.GEN)


def _new_cache(model):
    return DynamicCache(config=model.config.get_text_config(decoder=True))


def _rotary_positions(model, seen):
    """Hook the language model's rotary embedding; appends the position ids of each call to `seen`."""
    return model.model.language_model.rotary_emb.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append((args[1] if len(args) > 1 else kwargs["position_ids"]).clone()),
        with_kwargs=True)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_manual_decode_without_positions_continues_after_the_pruned_prompt(model_factory, family):
    """A pruning prefill shifts rope_deltas, so a decode step with the cache but no
    position_ids continues at max + 1 and gives the logits of a no-cache pruned forward."""
    model = model_factory(family)
    inputs = tiny.batch(family, [0])  # batch 1, no padding
    vtprune.patch(model, "random", ratio=0.25)
    ids, cache, seen = inputs["input_ids"], _new_cache(model), []
    hook = _rotary_positions(model, seen)
    try:
        with torch.no_grad():
            model(**inputs, use_cache=True, **{CACHE: cache})
            prompt_max = int(seen[0][-3:].max())
            for step in range(3):
                nxt = torch.tensor([[5 + step]])
                ids = torch.cat([ids, nxt], 1)
                cached = model(input_ids=nxt, use_cache=True, **{CACHE: cache}).logits[:, -1]
                full = model(**dict(inputs, input_ids=ids, attention_mask=torch.ones_like(ids),
                                    mm_token_type_ids=tiny.token_types(ids))).logits[:, -1]
                assert (cached - full).abs().max().item() < 1e-5, f"step {step}"
    finally:
        hook.remove()
    decode = [pos[-3:, 0, -1].tolist() for pos in seen[1::2]]  # the cached steps (every other call)
    assert decode == [[prompt_max + 1 + step] * 3 for step in range(3)]


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
def test_qwen_pruning_leaves_the_models_rope_deltas_as_the_unpatched_model_does(model_factory, family):
    """The decode-step rope_deltas shift is lent for that forward only: pruned forwards leave the
    model's rope_deltas as the unpatched model would, so inputs_embeds-only forwards (which read it) repeat
    exactly, and after unpatch the model equals the one never patched."""
    model = model_factory(family)
    inputs = tiny.batch(family, [0])
    embeds_only = {k: v for k, v in inputs.items() if k not in ("input_ids", "mm_token_type_ids")}
    embeds_only["inputs_embeds"] = model.get_input_embeddings()(inputs["input_ids"])
    with torch.no_grad():
        model(**inputs)  # sets rope_deltas from input_ids
        own = model.model.rope_deltas.clone()
        want = model(**embeds_only).logits
        vtprune.patch(model, "divprune", ratio=0.25)
        try:
            model(**inputs)
            assert vtprune.stats(model).visual_after < vtprune.stats(model).visual_before
            assert torch.equal(model.model.rope_deltas, own)
            first = model(**embeds_only).logits
            assert torch.equal(model(**embeds_only).logits, first)
            cache = _new_cache(model)
            model(**inputs, use_cache=True, **{CACHE: cache})
            model(input_ids=torch.tensor([[5]]), use_cache=True, **{CACHE: cache})  # reads own + the shift
            assert torch.equal(model.model.rope_deltas, own)
        finally:
            vtprune.unpatch(model)
        assert torch.equal(model(**embeds_only).logits, want)


def test_qwen_inputs_embeds_alone_on_a_model_that_has_not_run_asks_for_input_ids(model_factory):
    model = model_factory("qwen2_vl")
    inputs = tiny.batch("qwen2_vl", [0])
    embeds_only = {k: v for k, v in inputs.items() if k not in ("input_ids", "mm_token_type_ids")}
    embeds_only["inputs_embeds"] = model.get_input_embeddings()(inputs["input_ids"])
    model.model.rope_deltas = None  # as a freshly loaded model has it
    vtprune.patch(model, "divprune", ratio=0.25)
    try:
        with torch.no_grad(), pytest.raises(ValueError, match="has not run yet.*pass input_ids"):
            model(**embeds_only)
    finally:
        vtprune.unpatch(model)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_pool_on_video_gives_get_rope_index_positions(model_factory, family):
    """After a pooled video the text moves back by the h/w extent lost (as
    get_rope_index advances by max(h, w)), even where the clip's t positions reach further."""
    model = model_factory(family)
    inputs = tiny.batch(family, [1], videos=(1,))  # image 2x4 tokens; video 3 frames of 2x3 tokens
    vtprune.patch(model, "pool", keep=2)
    got = tiny.lm_kwargs(model, inputs)["position_ids"][-3:, 0]
    st = vtprune.stats(model)
    assert st.visual_before == [8 + 18] and st.visual_after == [2 + 3 * 1]  # 1x2 image, three 1x1 frames
    ids = inputs["input_ids"][0, st.layout[0]][None]
    image_grid = torch.tensor([[1, 2, 4]])  # ViT patches (x2 merge) of a 1x2 token grid
    video_grid = torch.tensor([[3, 2, 2]])  # three frames of 1x1 tokens
    want, _ = model.model.get_rope_index(ids, tiny.token_types(ids), image_grid, video_grid)
    assert torch.equal(got, want[:, 0])


def test_qwen25_frames_sharing_a_t_position_keep_per_frame_budgets(model_factory):
    """Qwen2.5-VL frames with tokens_per_second * second_per_grid_ts < 1 share t
    positions; keep still counts per frame, keep >= frame size is a no-op, and pool works."""
    model = model_factory("qwen2_5_vl")
    inputs = dict(tiny.batch("qwen2_5_vl", [1], videos=(1,)), second_per_grid_ts=torch.tensor([0.1]))
    with torch.no_grad():
        unpatched = model(**inputs).logits
        vtprune.patch(model, "divprune", keep=2)
        model(**inputs)
        assert vtprune.stats(model).visual_after == [2 + 3 * 2]  # image 8 -> 2, each 6-token frame -> 2
        vtprune.patch(model, "pool", keep=2)
        model(**inputs)
        assert vtprune.stats(model).visual_after == [2 + 3 * 1]
        vtprune.patch(model, "divprune", keep=8)  # >= the image's 8 and every frame's 6 tokens
        kept = model(**inputs).logits
    assert vtprune.stats(model).visual_after == [26]
    assert torch.equal(kept, unpatched)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
def test_two_qwen_videos_in_one_sample_are_two_clips(model_factory, family):
    """A Qwen-VL sample with two videos (2 frames of 4 tokens, then 3 of 6): per frame 5 units; under a clip
    budget each video is one unit with its frames' budgets summed (keep=1: 2 and 3), where DivPrune picks what
    it picks from that clip's tokens alone (in the LLM inputs of the unpatched model)."""
    from vtprune.methods import divprune

    g = torch.Generator().manual_seed(3)
    (v1, p1), (v2, p2) = tiny._video(family, 0, g), tiny._video(family, 1, g)
    ids = torch.tensor([[tiny.BOS, 10, 11, *v1, 12, *v2, 13, 14]])
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=tiny.token_types(ids),
                  **{k: torch.cat([p1[k], p2[k]]) for k in ("pixel_values_videos", "video_grid_thw")})
    model = model_factory(family)
    embeds = tiny.lm_kwargs(model, inputs)["inputs_embeds"][0]  # (unpatched)
    video = (ids[0] == tiny.VID).nonzero().squeeze(1)
    clips = [video[:8], video[8:]]
    for mode, want in (("frame", [(0, 4, 1)] * 2 + [(0, 6, 1)] * 3), ("clip", [(0, 8, 2), (0, 18, 3)])):
        vtprune.patch(model, "divprune", keep=1, video_budget=mode)
        with torch.no_grad():
            model(**inputs)
        st = vtprune.stats(model)
        assert st.images == want, mode
    kept = set(st.layout[0].tolist())
    for clip, k in zip(clips, (2, 3)):
        assert sorted(kept & set(clip.tolist())) == clip[divprune.select(embeds[clip][None].float(), k)[0]].tolist()


@pytest.mark.parametrize("method, keep_positions", [("divprune", False), ("divprune", True), ("fastv", None),
                                                    ("transprune", None)])
def test_llava_manual_decode_on_left_padding_equals_no_cache_forward(model_factory, monkeypatch, method,
                                                                     keep_positions):
    """A LLaVA decode step without position_ids, after a prefill without them,
    counts pad slots as the prefill did, so left-padded rows match a no-cache pruned forward (after an
    in-LLM drop too: fastv and transprune's row 0 was off by 2.6e-3, its first decoded token misplaced).
    The no-cache forwards replay the prefill's in-LLM picks (their question now holds the new tokens,
    which may rank others)."""
    from vtprune.methods.registry import get_method

    cls = get_method(method)
    picks, real = [], cls.select_in_llm
    monkeypatch.setattr(cls, "select_in_llm", lambda self, tokens: picks.append(real(self, tokens)) or picks[-1])
    model = model_factory("llava")
    inputs = tiny.batch("llava", [0, 1])  # row 0 is left-padded
    assert int((inputs["attention_mask"][0] == 0).sum()) > 0
    vtprune.patch(model, method, keep=4, **({} if keep_positions is None else {"keep_positions": keep_positions}))
    ids, am, cache = inputs["input_ids"], inputs["attention_mask"], _new_cache(model)
    with torch.no_grad():
        model(**inputs, use_cache=True, **{CACHE: cache})
        assert (len(picks) > 0) == (method != "divprune")  # one pick per drop layer
        for step in range(3):
            nxt = torch.tensor([[5 + step], [9 + step]])
            ids, am = torch.cat([ids, nxt], 1), torch.cat([am, torch.ones_like(nxt)], 1)
            cached = model(input_ids=nxt, attention_mask=am, use_cache=True, **{CACHE: cache}).logits[:, -1]
            replay = iter(picks)
            monkeypatch.setattr(cls, "select_in_llm", lambda self, tokens: next(replay))
            full = model(input_ids=ids, attention_mask=am, pixel_values=inputs["pixel_values"]).logits[:, -1]
            assert (cached - full).abs().amax(-1).tolist() == pytest.approx([0.0, 0.0], abs=1e-5), f"step {step}"


def test_failed_forward_after_encoding_leaves_no_stale_vision_scores(model_factory):
    """A forward that raises after the vision encoder ran releases its scores, so
    the next valid forward and generate() work and equal a clean run."""
    model = model_factory("llava")
    good = tiny.batch("llava", [0, 1])
    bad = dict(good, input_ids=good["input_ids"].clone())
    bad["input_ids"][0, (bad["input_ids"][0] == tiny.IMG).nonzero()[0]] = 5  # one image token short
    vtprune.patch(model, "hiprune", keep=4)
    with torch.no_grad():
        clean = model(**good).logits
        clean_gen = model.generate(**good, **GEN)
        with pytest.raises(ValueError):
            model(**bad)
        again = model(**good).logits
        with pytest.raises(ValueError):
            model.generate(**bad, **GEN)
        again_gen = model.generate(**good, **GEN)
    assert vtprune.stats(model).visual_after == [4, 4]
    assert torch.equal(again, clean)
    assert torch.equal(again_gen.sequences, clean_gen.sequences)
    assert all(torch.equal(x, y) for x, y in zip(again_gen.scores, clean_gen.scores))


def test_reset_dynamic_cache_can_be_reused_while_patched(model_factory):
    """A DynamicCache reset after a pruned generate() is reused like a fresh one."""
    model = model_factory("llava")
    inputs = tiny.batch("llava", [0, 1])
    vtprune.patch(model, "divprune", keep=4)
    cache = _new_cache(model)
    with torch.no_grad():
        fresh = model.generate(**inputs, **GEN)
        first = model.generate(**inputs, **{CACHE: cache}, **GEN)
        cache.reset()
        again = model.generate(**inputs, **{CACHE: cache}, **GEN)
    assert vtprune.stats(model).visual_after == [4, 4]
    for out in (first, again):
        assert torch.equal(out.sequences, fresh.sequences)
        assert all(torch.equal(x, y) for x, y in zip(out.scores, fresh.scores))


def test_a_reset_pruned_cache_takes_new_images_and_so_does_an_unpruned_prefix(model_factory):
    """Forward calls on one cache: after reset() it holds nothing, so a new image prompt is pruned as a prefill
    (not continued); images continuing a prefix the unpatched model cached are pruned as the whole prompt's
    are: the same logits as one forward of it."""
    model = model_factory("llava")
    vtprune.patch(model, "divprune", keep=4)
    a, b = tiny.batch("llava", [0]), tiny.batch("llava", [1])
    cache = _new_cache(model)
    with torch.no_grad():
        model(**a, use_cache=True, **{CACHE: cache})
        cache.reset()
        model(**b, use_cache=True, **{CACHE: cache})
        assert vtprune.stats(model).visual_after == [4]
        vtprune.unpatch(model)
        ids, prefix = b["input_ids"], _new_cache(model)
        model(input_ids=ids[:, :3], attention_mask=torch.ones_like(ids[:, :3]), use_cache=True, **{CACHE: prefix})
        vtprune.patch(model, "divprune", keep=4)
        logits = model(input_ids=ids[:, 3:], attention_mask=torch.ones_like(ids), pixel_values=b["pixel_values"],
                       use_cache=True, **{CACHE: prefix}).logits
        assert vtprune.stats(model).visual_after == [4]
        assert prefix.get_seq_length() == ids.shape[1] - 12  # (16 image tokens, 4 kept)
        torch.testing.assert_close(logits, model(**b).logits[:, 3:], rtol=1e-5, atol=1e-5)


def test_llava_next_takes_4d_pixel_values(model_factory):
    """LLaVA-NeXT with 4-D pixel_values (all images' tiles stacked) prunes as the
    5-D form does, as transformers accepts both."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    model = model_factory("llava_next")
    inputs = tiny.batch("llava_next", [0, 1])
    cfg = model.config
    tiles = [image_size_to_num_patches(s, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
             for s in inputs["image_sizes"]]
    flat = dict(inputs, pixel_values=torch.cat([p[:n] for p, n in zip(inputs["pixel_values"], tiles)]))
    assert flat["pixel_values"].dim() == 4 and flat["pixel_values"].shape[0] == sum(tiles) > 2
    vtprune.patch(model, "random", ratio=0.5)
    with torch.no_grad():
        five = model(**inputs).logits
        stats5 = vtprune.stats(model)
        four = model(**flat).logits
        stats4 = vtprune.stats(model)
    assert stats4.visual_before == stats5.visual_before and stats4.visual_after == stats5.visual_after
    assert stats4.visual_after < stats4.visual_before
    assert torch.equal(four, five)


def test_keep_all_with_in_llm_strategy_and_static_cache_is_a_no_op(model_factory):
    """keep >= N with fastv (drops inside the decoder) and a static cache prunes
    nothing and gives the unpatched tokens and scores, instead of raising."""
    model = model_factory("llava")
    inputs = tiny.batch("llava", [0, 1])
    with torch.no_grad():
        unpatched = model.generate(**inputs, cache_implementation="static", **GEN)
        vtprune.patch(model, "fastv", keep=10_000)
        out = model.generate(**inputs, cache_implementation="static", **GEN)
    assert vtprune.stats(model).visual_after == vtprune.stats(model).visual_before == [16, 16]
    assert torch.equal(out.sequences, unpatched.sequences)
    assert all(torch.equal(x, y) for x, y in zip(out.scores, unpatched.scores))


# strategies that read vision-encoder scores or an anyres layout, which generate() records for the B prompts
# and then repeats per beam / returned sequence; divprune needs neither (a control)
EXPAND_METHODS = ["todre", "hiprune", "vflowopt", "pool", "token_shuffle", "divprune"]
EXPAND_CASES = [(f, m, ()) for f in [*tiny.FAMILIES, *tiny.ANYRES_FAMILIES] for m in EXPAND_METHODS] + \
               [(f, m, (1,)) for f in ["qwen2_vl", "llava_next_video", "llava_onevision"] for m in EXPAND_METHODS]  # with a video


@pytest.mark.parametrize("family, method, videos", EXPAND_CASES)
def test_beams_and_returned_sequences_prune_each_copy_as_its_prompt(model_factory, family, method, videos):
    """generate() with num_return_sequences / num_beams k encodes the prompts' images once and repeats each
    prompt k times: every copy is pruned as its prompt is in a plain forward (same slots kept, same first-step
    logits), and with keep-all beams equal the unpatched model's."""
    model = model_factory(family)
    inputs = tiny.batch(family, [0, 1], videos=videos)
    sample = dict(do_sample=True, num_return_sequences=3, max_new_tokens=1, output_logits=True,
                  return_dict_in_generate=True, suppress_tokens=tiny.SPECIAL)
    beams = dict(num_beams=2, num_return_sequences=2, max_new_tokens=3, **tiny.GEN)
    with torch.no_grad():
        unpatched = model.generate(**inputs, **beams)
        vtprune.patch(model, method, keep=10_000)
        assert torch.equal(model.generate(**inputs, **beams), unpatched)
        vtprune.unpatch(model)
        vtprune.patch(model, method, ratio=0.5)
        plain = model(**inputs).logits[:, -1]
        st = vtprune.stats(model)
        layout, images = st.layout, st.images
        assert layout.shape[1] < inputs["input_ids"].shape[1]
        torch.manual_seed(0)
        out = model.generate(**inputs, **sample)
        st = vtprune.stats(model)
        assert torch.equal(st.layout, layout.repeat_interleave(3, 0))
        assert sorted(st.images) == sorted((b * 3 + c, n, k) for c in range(3) for b, n, k in images)
        torch.testing.assert_close(out.logits[0], plain.repeat_interleave(3, 0), atol=2e-5, rtol=1e-4)
        model.generate(**inputs, **beams)
        assert torch.equal(vtprune.stats(model).layout[::2], layout)


def test_llava_text_only_sample_beside_an_image_has_no_image(model_factory):
    """A LLaVA batch with a text-only sample: it has no image unit, and strategies reading vision scores
    run (the scores are the one image's), keeping the image tokens it keeps alone and all of the text."""
    ids0, vis0 = tiny.sample("llava", 0)
    ids1 = [tiny.BOS] + list(range(10, 40))
    pad = len(ids1) - len(ids0)
    inputs = {"input_ids": torch.tensor([[tiny.PAD] * pad + ids0, ids1]),
              "attention_mask": torch.tensor([[0] * pad + [1] * len(ids0), [1] * len(ids1)]), **vis0}
    model = model_factory("llava")

    def kept_image_slots(layout, ids):
        return [int(s) for s in layout if s >= 0 and ids[s] == tiny.IMG]

    for method in ["todre", "hiprune", "vflowopt", "divprune"]:
        vtprune.patch(model, method, keep=4)
        with torch.no_grad():
            model(**inputs)
            st = vtprune.stats(model)
            model(input_ids=torch.tensor([ids0]), **vis0)
            alone = vtprune.stats(model)
        assert st.images == [(0, 16, 4)], method
        batch_kept = [s - pad for s in kept_image_slots(st.layout[0], inputs["input_ids"][0])]
        assert batch_kept == kept_image_slots(alone.layout[0], ids0) and len(batch_kept) == 4, method
        assert [int(s) for s in st.layout[1] if s >= 0] == list(range(len(ids1))), method
        vtprune.unpatch(model)


@pytest.mark.parametrize("method", ["divprune", "fastv"])
def test_a_batch_without_padding_that_pruning_pads_decodes_as_each_sample_alone(model_factory, method):
    """Two prompts of one length, no padding: generate() drops the all-ones mask. Pruning keeps 10 of the image
    sample's 22 tokens and all of the text-only one's, so the pruned batch is padded and its decode steps need
    the mask, which is dropped only where the pruned prompt has no padding either (one read, then none)."""
    ids0, vis0 = tiny.sample("llava", 0)
    ids1 = [tiny.BOS] + list(range(10, 10 + len(ids0) - 1))
    both = {"input_ids": torch.tensor([ids0, ids1]), "attention_mask": torch.ones(2, len(ids0), dtype=torch.long),
            **vis0}
    model = model_factory("llava")
    vtprune.patch(model, method, keep=4)
    gen = dict(max_new_tokens=4, output_logits=True, return_dict_in_generate=True, **tiny.GEN)
    with torch.no_grad():
        batch = model.generate(**both, **gen)
        assert vtprune.stats(model).visual_after == [4, 0]
        alone = [model.generate(input_ids=torch.tensor([ids0]), **vis0, **gen),
                 model.generate(input_ids=torch.tensor([ids1]), **gen)]
    for i, one in enumerate(alone):
        assert torch.equal(batch.sequences[i], one.sequences[0])
        assert all(torch.allclose(x[i], y[0], atol=1e-5) for x, y in zip(batch.logits, one.logits))


@pytest.mark.parametrize("method", ["divprune", "hiprune"])
def test_two_llava_images_in_one_sample_are_pruned_as_each_alone(model_factory, method):
    """A LLaVA sample with two images (two pixel_values, 2 x 16 image tokens) has two units, each with its own
    budget and (hiprune) its own image's vision scores: each keeps the slots it keeps as the only image."""
    model = model_factory("llava")
    pixels = [tiny.sample("llava", i)[1]["pixel_values"] for i in (0, 2)]

    def run(which):
        ids = [tiny.BOS, 5]
        for j in which:
            ids += [tiny.IMG] * 16 + [6 + j]
        ids = torch.tensor([ids])
        with torch.no_grad():
            model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=torch.cat([pixels[j] for j in which]))
        st = vtprune.stats(model)
        image = (ids[0] == tiny.IMG).nonzero().squeeze(1).tolist()
        kept = [image.index(int(s)) for s in st.layout[0] if int(s) in image]
        return st.images, [[k - 16 * n for k in kept if 16 * n <= k < 16 * (n + 1)] for n in range(len(which))]

    vtprune.patch(model, method, keep=4)
    images, both = run([0, 1])
    assert images == [(0, 16, 4), (0, 16, 4)]
    assert both == [run([0])[1][0], run([1])[1][0]]
    assert both[0] != both[1]  # (the two images keep different slots: neither took the other's)


@pytest.mark.parametrize("samples, encoded, order", [
    ([0, 0, 1, 1], 4, [0, 1, 2, 3]),  # no expansion
    ([0, 1, 2, 3], 2, [0, 0, 1, 1]),  # 2 prompts x 2 copies, one image each
    ([0, 0, 1, 1, 2, 3], 3, [0, 1, 0, 1, 2, 2]),  # prompt 0 with two images, prompt 1 with one
    ([0, 1, 2, 3, 0, 1, 2, 3], 4, [0, 0, 1, 1, 2, 2, 3, 3]),  # Qwen order: all images, then all frames
    ([0, 1, 1, 1], 2, None),  # copies of one prompt with different image counts
    ([0, 1, 2], 2, None),
    ([0, 1], 0, None),
])
def test_encode_order_matches_units_to_encoded_images(samples, encoded, order):
    from vtprune.hooks.base import encode_order
    from vtprune.hooks.runtime import Unit

    units = [Unit(b, torch.arange(2), None, block=0) for b in samples]
    assert encode_order(units, encoded) == order


# (strategy, options): before the LLM, inside it, and both (todre's stage 2 after layer 1, every visual token dropped)
TURN_METHODS = [("divprune", dict(keep=1)), ("fastv", dict(keep=1)), ("todre", dict(keep=1, stage2_layer=1, tau=1.0))]


def _one_at_a_time(model, family, cache, ids, mask):
    """Logits [B, V] after feeding `ids` [B, n] to a pruned `cache` one token per forward (the decode path);
    `mask` is the whole conversation's. Qwen-VL is given its text M-RoPE positions (mask-counted, plus the
    model's rope_deltas): its own forward places a decode token by the whole mask's length."""
    start = mask.shape[1] - ids.shape[1]
    for j in range(ids.shape[1]):
        kw = {}
        if family.startswith("qwen"):
            pos = (mask[:, :start + j + 1].cumsum(-1) - 1)[:, -1:] + model.model.rope_deltas
            kw["position_ids"] = pos[None].expand(3, -1, -1)
        out = model(input_ids=ids[:, j:j + 1], attention_mask=mask[:, :start + j + 1], use_cache=True,
                    **{CACHE: cache}, **kw)
    return out.logits[:, -1]


def _conversation(inputs, whole) -> dict:
    """The attention_mask (and Qwen-VL's mm_token_type_ids) of `whole`, the prompt of `inputs` continued by
    text tokens."""
    out = {"attention_mask": torch.cat([inputs["attention_mask"], torch.ones_like(whole)], 1)[:, :whole.shape[1]]}
    if "mm_token_type_ids" in inputs:
        out["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(whole)], 1)[:, :whole.shape[1]]
    return out


@pytest.mark.parametrize("samples", [[0, 1], [2]])  # left padding; one sample, whose all-ones mask generate() drops
@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_vl", "qwen3_vl", "qwen3_5"])  # (qwen3_5: hybrid)
@pytest.mark.parametrize("method, options", TURN_METHODS)
def test_a_new_turn_on_a_pruned_cache_equals_feeding_it_one_token_at_a_time(model_factory, family, method, options,
                                                                             samples):
    """generate() continuing a pruned cache: given the whole conversation it cuts the ids at the cache's (shorter)
    length, so the last `short` tokens it already holds come again (dropped); given only the new tokens with the
    whole conversation's mask, they come alone. Both equal those tokens fed one at a time through the decode path,
    and so do their continuations. The prompts end in an image (keep=1): on Qwen-VL generate() took the prompt's
    own image tokens for new ones and zeroed the model's rope_deltas, until it was shown only what the cache lacks."""
    import copy

    model = model_factory(family)
    inputs = tiny.batch(family, samples)
    vtprune.patch(model, method, **options)
    gen = dict(max_new_tokens=3, output_logits=True, return_dict_in_generate=True, **tiny.GEN)
    with torch.no_grad():
        first = model.generate(**inputs, **gen)
        seq, cache = first.sequences, first.past_key_values
        deltas = getattr(model.model, "rope_deltas", None)
        new = torch.tensor([[11, 12, 13], [14, 15, 16]])[:len(samples)]
        whole = torch.cat([seq, new], 1)
        types = _conversation(inputs, whole)
        mask = types.pop("attention_mask")
        unseen = torch.cat([seq[:, -1:], new], 1)  # (the last generated token is not in the cache yet)
        a = model.generate(input_ids=whole, attention_mask=mask, **{CACHE: copy.deepcopy(cache)}, **types, **gen)
        if deltas is not None:
            assert torch.equal(model.model.rope_deltas, deltas)
        b = model.generate(input_ids=unseen, attention_mask=mask, **{CACHE: copy.deepcopy(cache)},
                           **{k: v[:, -4:] for k, v in types.items()}, **gen)
        ref = _one_at_a_time(model, family, copy.deepcopy(cache), unseen, mask)
    last = len(model.model.language_model.layers) - 1  # (pruned: the cache is shorter than the prompt there)
    assert cache.get_seq_length(last) < inputs["input_ids"].shape[1]
    torch.testing.assert_close(a.logits[0], ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b.logits[0], ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(a.sequences[:, -3:], b.sequences[:, -3:])
    assert all(torch.allclose(x, y, atol=1e-5) for x, y in zip(a.logits, b.logits))


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
@pytest.mark.parametrize("samples", [[0, 1], [2]])  # left padding; one sample, whose all-ones mask generate() drops
def test_a_chunked_new_turn_on_a_pruned_cache_is_refused_where_its_masks_would_be_cut_short(model_factory, family,
                                                                                             samples):
    """generate(prefill_chunk_size=...) continuing a pruned cache cuts each chunk's mask and positions at the
    cache's length plus the chunk's: after pruning before the decoder, `short` columns short of the whole
    sequence's. Each chunk was read as a whole new turn (logits 0.17 off on LLaVA), or the new tokens alone were
    placed `short` positions early (1.6e-3 off at batch 1), silently. That is refused. Chunked equals unchunked
    where nothing is cut short: after fastv (a cache as long as the sequence) and for a whole conversation in
    one chunk."""
    import copy

    model = model_factory(family)
    inputs = tiny.batch(family, samples)
    gen = dict(max_new_tokens=3, output_logits=True, return_dict_in_generate=True, **tiny.GEN)
    for method in ("divprune", "fastv"):
        vtprune.patch(model, method, keep=2)
        with torch.no_grad():
            first = model.generate(**inputs, **gen)
            seq, cache = first.sequences, first.past_key_values
            whole = torch.cat([seq, torch.arange(11, 25).expand(len(samples), -1)], 1)
            types = _conversation(inputs, whole)
            unseen = {"input_ids": whole[:, seq.shape[1] - 1:], "attention_mask": types["attention_mask"],
                      **{k: v[:, seq.shape[1] - 1:] for k, v in types.items() if k != "attention_mask"}}
            want = model.generate(input_ids=whole, **types, **{CACHE: copy.deepcopy(cache)}, **gen)
            short = whole.shape[1] - cache.get_seq_length() - unseen["input_ids"].shape[1]
            assert short == (inputs["input_ids"].shape[1] - vtprune.stats(model).layout.shape[1] if method == "divprune"
                             else 0)
            for call, fed in (({"input_ids": whole, **types}, short + 15), (unseen, 15)):
                for size in (4, fed):
                    refused = method == "divprune" and (size < fed or call is unseen)
                    if refused:
                        with pytest.raises(NotImplementedError, match=rf"prefill_chunk_size={size}\) on a KV cache "
                                           rf"pruned before the decoder cuts the mask and positions of the {fed} tokens "
                                           rf"it feeds at the cache's length, {short} columns short"):
                            model.generate(**call, **{CACHE: copy.deepcopy(cache)}, **gen, prefill_chunk_size=size)
                        continue
                    got = model.generate(**call, **{CACHE: copy.deepcopy(cache)}, **gen, prefill_chunk_size=size)
                    assert torch.equal(got.sequences[:, -3:], want.sequences[:, -3:]), (method, size)
                    assert all(torch.allclose(x, y, atol=1e-5) for x, y in zip(got.logits, want.logits)), (method, size)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
@pytest.mark.parametrize("samples", [[0, 1], [2]])
def test_a_dynamic_cache_cropped_back_to_its_pruned_prompt_continues_and_one_cropped_into_it_is_refused(
        model_factory, family, samples):
    """crop(-k) of the cache a pruned generate() returned: back to the prompt, a new turn equals a fresh
    generate() of prompt + turn (divprune, which the turn does not change), and the decoded tokens fed again give
    their logits again (fastv, whose later layers hold fewer positions). Cut into the pruned prompt, the next
    forward failed with "decode steps need the 2-D attention mask that grows from the prompt's"; now it says
    what happened (a static cache refuses the crop itself)."""
    import copy

    inputs = tiny.batch(family, samples)
    gen = dict(max_new_tokens=3, output_logits=True, return_dict_in_generate=True, **tiny.GEN)
    turn = torch.arange(11, 16).expand(len(samples), -1)
    whole = torch.cat([inputs["input_ids"], turn], 1)
    conversation = {"input_ids": whole, **_conversation(inputs, whole)}
    for method in ("divprune", "fastv"):
        model = model_factory(family)
        vtprune.patch(model, method, keep=2)
        with torch.no_grad():
            first = model.generate(**inputs, **gen)
            back = copy.deepcopy(first.past_key_values)
            back.crop(-2)  # the two decoded positions (the third token was never fed)
            if method == "divprune":
                fresh = model.generate(**{**inputs, **conversation}, **gen)  # (the images again: a fresh prefill)
                got = model.generate(**conversation, **{CACHE: back}, **gen)
                assert torch.equal(got.sequences[:, -3:], fresh.sequences[:, -3:])
                assert all(torch.allclose(x, y, atol=1e-5) for x, y in zip(got.logits, fresh.logits))
            else:
                fed = first.sequences[:, :-1]  # the prompt and the two tokens cropped: the last logits again
                again = model.generate(input_ids=fed, **_conversation(inputs, fed), **{CACHE: back}, **gen)
                torch.testing.assert_close(again.logits[0], first.logits[-1], rtol=1e-5, atol=1e-5)
            into = copy.deepcopy(first.past_key_values)
            into.crop(-4)
            with pytest.raises(NotImplementedError, match=r"this KV cache was cropped into its pruned prompt: it holds "
                                                          r"\d+ of the \d+ positions the prompt kept\. A pruned prompt"):
                model.generate(**conversation, **{CACHE: into}, **gen)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_a_new_turn_on_a_pruned_static_cache_equals_one_on_a_dynamic_cache(model_factory, family):
    """The same new turn (the whole conversation given) on the static cache a pruned generate() filled."""
    import copy

    from transformers import StaticCache

    model = model_factory(family)
    vtprune.patch(model, "divprune", keep=2)
    inputs = tiny.batch(family, [0, 1])
    gen = dict(max_new_tokens=3, output_logits=True, return_dict_in_generate=True, **tiny.GEN)
    turns = []
    with torch.no_grad():
        for cache in (StaticCache(config=model.config, max_cache_len=64), None):
            first = model.generate(**inputs, **({CACHE: cache} if cache is not None else {}), **gen)
            whole = torch.cat([first.sequences, torch.tensor([[11, 12, 13], [14, 15, 16]])], 1)
            turns.append(model.generate(input_ids=whole, **_conversation(inputs, whole),
                                        **{CACHE: copy.deepcopy(first.past_key_values)}, **gen))
    static, dynamic = turns
    assert type(static.past_key_values).__name__ == "StaticCache"
    assert torch.equal(static.sequences, dynamic.sequences)
    assert all(torch.allclose(x, y, atol=1e-5) for x, y in zip(static.logits, dynamic.logits))


@pytest.mark.parametrize("guesses", ["prompt_lookup", "assistant", "patched_assistant"])
@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_vl", "qwen3_5"])
@pytest.mark.parametrize("method, options", [*TURN_METHODS, ("transprune", dict(keep=1))])
def test_assisted_and_prompt_lookup_decoding_on_a_patched_model_equal_greedy(model_factory, family, method, options,
                                                                               guesses):
    """generate()'s prompt-lookup and assisted decoding (an assistant model of the same vocabulary, patched or
    not) feed a few guessed tokens at once and crop the rejected ones from the cache: the same tokens as greedy
    decoding, several-token forwards included. Their first guesses would have come with the prompt's own forward
    (a text-aware strategy would have selected for them, a rejected one been cropped from inside the prompt)."""
    model = model_factory(family)
    vtprune.patch(model, method, **options)
    if guesses == "prompt_lookup":
        extra = dict(prompt_lookup_num_tokens=3)
    else:
        helper = tiny.build(family, seed=1)  # (another model: some guesses right, some wrong)
        if guesses == "patched_assistant":
            vtprune.patch(helper, "divprune", keep=2)
        extra = dict(assistant_model=helper)
    lm, fed = model.model.language_model, []
    gen = dict(max_new_tokens=16, **tiny.GEN)
    with torch.no_grad():
        for i in range(3):  # (assisted decoding takes batch 1)
            inputs = tiny.batch(family, [i])
            greedy = model.generate(**inputs, **gen)
            sizes = []
            handle = lm.register_forward_pre_hook(lambda m, a, k: sizes.append(k["inputs_embeds"].shape[1]),
                                                  with_kwargs=True, prepend=True)
            try:
                guessed = model.generate(**inputs, **extra, **gen)
            finally:
                handle.remove()
            assert torch.equal(guessed, greedy)
            assert sizes[0] == inputs["input_ids"].shape[1]  # the prompt's forward: no guesses
            fed += sizes[1:]
    assert max(fed) > 1  # guesses were fed


def test_new_tokens_on_a_pruned_cache_need_the_whole_sequence_s_mask(model_factory):
    """Several new tokens on a pruned cache are placed by the mask of the whole unpruned sequence; a mask of
    another length (the cache's, or a token short) would misplace them, and is refused naming the length."""
    model = model_factory("llava")
    inputs = tiny.batch("llava", [0])
    vtprune.patch(model, "divprune", keep=4)
    cache = _new_cache(model)
    with torch.no_grad():
        model(**inputs, use_cache=True, **{CACHE: cache})
        full = inputs["input_ids"].shape[1]
        for width in (cache.get_seq_length() + 2, full + 1):
            with pytest.raises(ValueError, match=f"need the attention_mask of the whole unpruned sequence, {full} "
                                                 f"positions before them; got {width} in all"):
                model(input_ids=torch.tensor([[5, 6]]), attention_mask=torch.ones(1, width, dtype=torch.long),
                      use_cache=True, **{CACHE: cache})


def _second_images(family, samples):
    """A second turn for each of `samples` (the same tokens, n image placeholders: 16 on LLaVA, a 100x100 image on
    LLaVA-NeXT/OneVision), its pixels (other per sample), and n."""
    if family == "llava":
        pixels, n = {"pixel_values": torch.randn(len(samples), 3, 56, 56, generator=torch.Generator().manual_seed(5))}, 16
    else:
        extra = tiny.batch(family, [2 + 4 * j for j in range(len(samples))])  # (all 100x100)
        pixels, n = {k: extra[k] for k in ("pixel_values", "image_sizes")}, tiny.next_tokens(100, 100)[0]
    turn = torch.tensor([[20, 21] + [tiny.IMG] * n + [22, 23, 24]] * len(samples))
    return turn, pixels, n


def _per_sample_images(family, first, second) -> dict:
    """Both turns' images of each sample in the order of the whole conversation (sample 0's two, then 1's ...)."""
    if family == "llava":
        return {"pixel_values": torch.stack([x for pair in zip(first["pixel_values"], second["pixel_values"])
                                             for x in pair])}
    tiles = max(first["pixel_values"].shape[1], second["pixel_values"].shape[1])
    pad = lambda p: torch.nn.functional.pad(p, (0, 0, 0, 0, 0, 0, 0, tiles - p.shape[1]))  # noqa: E731
    a, b = pad(first["pixel_values"]), pad(second["pixel_values"])
    return {"pixel_values": torch.stack([x for pair in zip(a, b) for x in pair]),
            "image_sizes": torch.stack([x for pair in zip(first["image_sizes"], second["image_sizes"]) for x in pair])}


# (family, strategy, options): the strategies that prune before the language model only
CONTINUING = [(family, method, options) for family in ("llava", "llava_next", "llava_onevision")
              for method, options in (("divprune", {}), ("hiprune", {}), ("pool", {}), ("token_shuffle", {}), ("random", {}),
                                      ("todre", dict(stage2=False)))] + [("llava", "divprune", dict(keep_positions=True))]


@pytest.mark.parametrize("samples", [[0, 1], [2]])  # left padding; one sample, whose all-ones mask generate() drops
@pytest.mark.parametrize("family, method, options", CONTINUING)
def test_a_new_image_turn_on_a_pruned_cache_equals_the_whole_conversation_pruned_at_once(model_factory, family,
                                                                                         method, options, samples):
    """A chat's next turn with a new image, on the cache a pruned generate() returned (as transformers continues
    it unpatched, given only the new image's pixels): its image is pruned as it would be in one prefill of the
    whole conversation with both images, and its tokens are placed after the cache's pruned ones. So generate()
    gives the tokens and, within 1e-5, the logits of that one prefill, given the whole conversation (cut at the
    cache's length: the first image's placeholders come again and are dropped) or only what the cache lacks; a
    manual forward of what it lacks (no position ids: placed as a decode step is) gives the first of those logits.
    (They were refused: "new images on a KV cache that already holds a pruned prefill are not supported".)"""
    import copy

    model = model_factory(family)
    vtprune.patch(model, method, ratio=0.25, **options)
    first = tiny.batch(family, samples)
    turn, pixels, n = _second_images(family, samples)
    gen = dict(max_new_tokens=3, output_logits=True, return_dict_in_generate=True, **tiny.GEN)
    with torch.no_grad():
        out = model.generate(**first, **gen)
        kept_first = vtprune.stats(model).visual_after
        whole = torch.cat([out.sequences, turn], 1)
        mask = torch.cat([first["attention_mask"], torch.ones_like(whole[:, first["attention_mask"].shape[1]:])], 1)
        ref = model.generate(input_ids=whole, attention_mask=mask, **_per_sample_images(family, first, pixels), **gen)
        fresh = vtprune.stats(model)
        given_whole = model.generate(input_ids=whole, attention_mask=mask, **pixels, **gen,
                                     **{CACHE: copy.deepcopy(out.past_key_values)})
        stats = vtprune.stats(model)
        unseen = torch.cat([out.sequences[:, -1:], turn], 1)  # (the last generated token is not in the cache yet)
        given_new = model.generate(input_ids=unseen, attention_mask=mask, **pixels, **gen,
                                   **{CACHE: copy.deepcopy(out.past_key_values)})
        manual = model(input_ids=unseen, attention_mask=mask, **pixels, use_cache=True,
                       **{CACHE: copy.deepcopy(out.past_key_values)}).logits[:, -1]
    kept = stats.visual_after
    assert stats.visual_before == [n] * len(samples) and all(k < n for k in kept)
    assert [a + b for a, b in zip(kept_first, kept)] == fresh.visual_after  # (the two images' shares of it)
    assert stats.layer_tokens[0] == [unseen.shape[1] - n + k for k in kept]  # what the turn fed
    torch.testing.assert_close(manual, ref.logits[0], rtol=1e-5, atol=1e-5)
    for got in (given_whole, given_new):
        assert torch.equal(got.sequences[:, -3:], ref.sequences[:, -3:])
        for x, y in zip(got.logits, ref.logits):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("video_budget", ["frame", "clip"])
@pytest.mark.parametrize("family", ["llava_next_video", "llava_onevision"])
def test_a_new_turn_with_an_image_and_a_video_on_a_pruned_cache_equals_the_whole_conversation_pruned_at_once(
        model_factory, family, video_budget):
    """The same with a video beside the new image: its frames (or its clip) are budgeted as in one prefill."""
    import copy

    model = model_factory(family)
    vtprune.patch(model, "divprune", ratio=0.25, video_budget=video_budget)
    first = tiny.batch(family, [0])
    ids, second = tiny.sample(family, 1, video=True)
    gen = dict(max_new_tokens=3, output_logits=True, return_dict_in_generate=True, **tiny.GEN)
    with torch.no_grad():
        out = model.generate(**first, **gen)
        before_first, kept_first = vtprune.stats(model).visual_before, vtprune.stats(model).visual_after
        whole = torch.cat([out.sequences, torch.tensor([ids[1:]])], 1)
        both = {**_per_sample_images(family, first, second), "pixel_values_videos": second["pixel_values_videos"]}
        ref = model.generate(input_ids=whole, attention_mask=torch.ones_like(whole), **both, **gen)
        fresh = vtprune.stats(model)
        got = model.generate(input_ids=whole, attention_mask=torch.ones_like(whole), **second, **gen,
                             **{CACHE: copy.deepcopy(out.past_key_values)})
        stats = vtprune.stats(model)
    assert [a + b for a, b in zip(before_first, stats.visual_before)] == fresh.visual_before
    assert [a + b for a, b in zip(kept_first, stats.visual_after)] == fresh.visual_after < fresh.visual_before
    assert torch.equal(got.sequences[:, -3:], ref.sequences[:, -3:])
    for x, y in zip(got.logits, ref.logits):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


def _after_prefix(family, samples, prefix):
    """The prompts of `samples` after a shared text `prefix` [1, P] (its BOS for theirs): a sample's padding, if
    any, now sits between the prefix and its tokens, as a batch on one prefix cache has it."""
    inputs = tiny.batch(family, samples)
    rows = len(samples)
    ids = torch.cat([prefix.expand(rows, -1), inputs["input_ids"][:, 1:]], 1)
    out = {**inputs, "input_ids": ids,
           "attention_mask": torch.cat([torch.ones(rows, prefix.shape[1], dtype=torch.long),
                                        inputs["attention_mask"][:, 1:]], 1)}
    if "mm_token_type_ids" in inputs:
        out["mm_token_type_ids"] = tiny.token_types(ids)
    return out


@pytest.mark.parametrize("samples", [[1], [0, 1]])
@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_5"])
@pytest.mark.parametrize("method", ["divprune", "token_shuffle", "hiprune"])
def test_images_after_a_cached_text_prefix_are_pruned_as_the_whole_prompt_s(model_factory, family, method, samples):
    """A prefix cached ahead (a system prompt, as in transformers' prefix-caching recipe), then prompts with images
    on a copy of that cache: the images are pruned as in one prefill of the whole prompts, the same tokens and
    logits within 1e-5 (Qwen-VL's M-RoPE positions, token_shuffle's coarse grids and Qwen3-VL's deepstack
    features included); the prefix cache itself is left as it was. (Refused before: "images in a call that
    continues an existing KV cache are not supported".) On a hybrid model (qwen3_5: linear attention) a batch
    whose rows keep different numbers of tokens would be padded between the cache and the new tokens, which
    its linear-attention layers do not skip (logits 1.7e-2 off): refused by name."""
    import copy

    model = model_factory(family)
    vtprune.patch(model, method, ratio=0.25)
    prefix = torch.tensor([[tiny.BOS, 5, 6, 7, 8]])
    inputs = _after_prefix(family, samples, prefix)
    gen = dict(max_new_tokens=3, output_logits=True, return_dict_in_generate=True, **tiny.GEN)
    positions = []  # what the language model's prefill forwards are given
    lm = model.model.language_model
    handle = lm.register_forward_pre_hook(lambda m, a, kw: positions.append(kw.get("position_ids")), with_kwargs=True)
    with torch.no_grad():
        cache = _new_cache(model)
        model(input_ids=prefix.expand(len(samples), -1), use_cache=True, **{CACHE: cache})
        ref = model.generate(**inputs, **gen)
        fresh = vtprune.stats(model)
        if family == "qwen3_5" and len(samples) > 1:
            with pytest.raises(NotImplementedError, match=r"keep different numbers of tokens per sample, so the "
                                                          r"shorter rows would be padded .*\['linear_attention'\]"):
                model.generate(**inputs, **gen, **{CACHE: copy.deepcopy(cache)})
            return
        got = model.generate(**inputs, **gen, **{CACHE: copy.deepcopy(cache)})
    handle.remove()
    if len(samples) == 1:  # (no padding: the whole prompt's prefill positions, less the prefix's, every row of them)
        whole, continued = positions[1], positions[1 + 3]  # (after the prefix's forward and 3 generated tokens)
        assert torch.equal(continued, whole[..., 5:])
    assert cache.get_seq_length() == 5
    assert vtprune.stats(model).visual_after == fresh.visual_after < fresh.visual_before
    assert torch.equal(got.sequences, ref.sequences)
    for x, y in zip(got.logits, ref.logits):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_a_forward_with_images_on_a_prefix_cache_is_refused_where_its_tokens_would_be_misplaced(model_factory, family):
    """A manual forward with images after a cached prefix needs the whole prompt's mask: another width would
    place its tokens wrongly. (On Qwen-VL transformers' own position count fails on it first.)"""
    model = model_factory(family)
    vtprune.patch(model, "divprune", ratio=0.25)
    inputs = _after_prefix(family, [1], torch.tensor([[tiny.BOS, 5, 6, 7, 8]]))
    ids, mask = inputs.pop("input_ids"), inputs.pop("attention_mask")
    with torch.no_grad():
        cache = _new_cache(model)
        model(input_ids=ids[:, :5], use_cache=True, **{CACHE: cache})
        with pytest.raises(ValueError, match=f"{ids.shape[1] - 5} new tokens .* need the attention_mask of the whole "
                                             f"unpruned sequence, 5 positions before them; got {ids.shape[1] - 1}"):
            model(input_ids=ids[:, 5:], attention_mask=mask[:, 1:], use_cache=True, **{CACHE: cache}, **inputs)
        assert cache.get_seq_length() == 5  # (refused before the language model ran)
        model(input_ids=ids[:, 5:], attention_mask=mask, use_cache=True, **{CACHE: cache}, **inputs)
    assert vtprune.stats(model).visual_after < vtprune.stats(model).visual_before


@pytest.mark.parametrize("family, method, options, message", [
    ("llava", "fastv", {}, "with fastv, which reads or drops tokens inside the decoder"),
    ("llava", "transprune", {}, "with transprune, which reads or drops"),
    ("llava", "vflowopt", {}, "with vflowopt, which reads or drops"),
    ("llava_next", "todre", {}, "with todre, which reads or drops"),  # (its stage 2; stage2=False continues)
    ("qwen2_vl", "divprune", {}, "on Qwen-VL"),  # (transformers cannot continue one unpatched either)
    ("llava", "divprune", dict(static=True), "on a static cache"),
])
def test_images_continuing_a_cache_are_refused_by_name_where_they_cannot_be_pruned(model_factory, family, method,
                                                                                  options, message):
    """The cases a new image turn is not pruned in raise before transformers' placeholder check fails unclearly
    ("Image features and image tokens do not match")."""
    from transformers import StaticCache

    model = model_factory(family)
    vtprune.patch(model, method, ratio=0.25)
    inputs = tiny.batch(family, [0])
    cache = (StaticCache(config=model.config.get_text_config(decoder=True), max_cache_len=128)
             if options.get("static") else _new_cache(model))
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=2, return_dict_in_generate=True, **tiny.GEN, **{CACHE: cache})
        ids2, visual = tiny.sample(family, 1)
        ids = torch.cat([out.sequences, torch.tensor([ids2])], 1)
        extra = {"mm_token_type_ids": tiny.token_types(ids)} if family.startswith("qwen") else {}
        with pytest.raises(NotImplementedError, match=f"images continuing a KV cache that already holds a pruned "
                                                      f"prefill are not supported {message}"):
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **visual, **extra,
                           **{CACHE: out.past_key_values}, max_new_tokens=2, **tiny.GEN)


def _decode_step(model, inputs, cache, steps):
    """The logits of decode step `steps` (1-based) after the prefill in `cache`: token 7 fed each step."""
    am = torch.cat([inputs["attention_mask"], torch.ones(len(inputs["attention_mask"]), steps, dtype=torch.long)], 1)
    token = torch.full((len(am), 1), 7)
    return model(input_ids=token, attention_mask=am, use_cache=True, **{CACHE: cache}).logits


@pytest.mark.parametrize("method", ["divprune", "fastv"])  # pruned before the LLM; inside it (shorter later layers)
def test_a_pruned_cache_refuses_to_continue_without_its_configuration(model_factory, method):
    """A KV cache holds its configuration's layout and positions: continued by the unpatched model (after
    unpatch or a `pruned` block) or under another configuration it would give wrong logits silently (an
    unpatched model continued divprune's cache with other tokens than a fresh run; fastv's failed inside SDPA).
    It refuses by name instead; back under its own configuration (after `unpatched`) it continues exactly;
    a static cache reset for a new prompt is an empty cache again."""
    import copy
    import gc
    import pickle
    import weakref

    from transformers import StaticCache

    unpatched = vtprune.unpatched  # (public)

    model = model_factory("llava")
    inputs = tiny.batch("llava", [0, 1])
    options = dict(ratio=0.25, **({"layer": 1} if method == "fastv" else {}))
    refused = f"holds a prefill pruned by {method} under another vtprune configuration: one since removed"
    with torch.no_grad():
        vtprune.patch(model, method, **options)
        clone = copy.deepcopy(model)  # (before a forward: transformers' hooks stop a deep copy's pickle after)
        cache = _new_cache(model)
        model(**inputs, use_cache=True, **{CACHE: cache})
        twin, unused = copy.deepcopy(cache), copy.deepcopy(cache)  # (copies made while patched)
        want = [_decode_step(model, inputs, twin, 1), _decode_step(model, inputs, twin, 2)]
        mine = vars(cache)["update"] = cache.update  # a wrapper the caller set on the instance stays
        with unpatched(model):
            with pytest.raises(RuntimeError, match=refused):
                _decode_step(model, inputs, cache, 1)
            held = copy.deepcopy(cache)  # a copy of a refusing cache refuses too ...
            with pytest.raises(RuntimeError, match=refused):
                _decode_step(model, inputs, held, 1)
        assert vars(cache)["update"] is mine
        for c in (cache, held):  # ... and both continue back on their configuration
            assert torch.equal(_decode_step(model, inputs, c, 1), want[0])
        other = tiny.build("llava")
        vtprune.patch(other, method, **options)  # another model, the same settings; a copy of this one
        for m in (other, clone):
            with pytest.raises(RuntimeError, match="or another model's"):
                _decode_step(m, inputs, cache, 2)
        vtprune.patch(model, "random", ratio=0.5)  # another configuration
        with pytest.raises(RuntimeError, match=refused):
            _decode_step(model, inputs, cache, 2)
        vtprune.unpatch(model)
        pickled = pickle.loads(pickle.dumps(cache))
        for c, step in ((cache, 2), (held, 2), (twin, 3), (unused, 1), (pickled, 2)):
            with pytest.raises(RuntimeError, match=refused):
                _decode_step(model, inputs, c, step)
        for c in (held, pickled, unused):  # a copy's refusal is its own: reset, it is free again (the original is not)
            assert c.update.cache() is c
        shallow = copy.copy(unused)  # shares the refusal, which outlives its cache
        del c
        gc.disable()  # no reference cycle: a dropped refusing cache is freed at once, not at a collection
        try:
            gone = weakref.ref(unused)
            del unused
            assert gone() is None
        finally:
            gc.enable()
        with pytest.raises(RuntimeError, match="holds a prefill pruned by a strategy under another"):
            _decode_step(model, inputs, shallow, 1)
        with vtprune.pruned(model, "divprune", ratio=0.25):  # (a static cache holds pre-LLM pruning only)
            static = StaticCache(config=model.config.get_text_config(decoder=True), max_cache_len=64)
            model(**inputs, use_cache=True, **{CACHE: static})
        with pytest.raises(RuntimeError, match="pruned by divprune under another vtprune configuration"):
            _decode_step(model, inputs, static, 1)
        static.reset()
        fresh = StaticCache(config=model.config.get_text_config(decoder=True), max_cache_len=64)
        assert torch.equal(model(**inputs, use_cache=True, **{CACHE: static}).logits,
                           model(**inputs, use_cache=True, **{CACHE: fresh}).logits)
        assert torch.equal(_decode_step(model, inputs, static, 1), _decode_step(model, inputs, fresh, 1))
    assert "update" not in vars(static) and not hasattr(static, "_vtprune_run")


@pytest.mark.parametrize("method, options", [("divprune", dict(ratio=0.25)), ("fastv", dict(ratio=0.25, layer=2))])
def test_a_hybrid_cache_refuses_before_its_linear_attention_state_moves(model_factory, method, options):
    """Qwen3.5: decoder layer 0 is linear attention, which read and advanced its conv and recurrent state in
    place before layer 1's KV `update` refused: back under its own configuration, the cache then continued
    wrongly, silently. The refusal now comes at the first state a step reads, so the cache is left as it was."""
    import copy
    import pickle

    from transformers import StaticCache

    unpatched = vtprune.unpatched  # (public)

    model = model_factory("qwen3_5")
    inputs = tiny.batch("qwen3_5", [0])  # (transformers' Qwen-VL decode by hand takes no padded batch: batch 1)

    def step(cache):
        return model(input_ids=torch.tensor([[7]]), use_cache=True, **{CACHE: cache}).logits

    refused = f"holds a prefill pruned by {method} under another vtprune configuration"
    with torch.no_grad():
        vtprune.patch(model, method, **options)
        cache = _new_cache(model)
        model(**inputs, use_cache=True, **{CACHE: cache})
        twin = copy.deepcopy(cache)
        want = [step(twin), step(twin)]
        with unpatched(model):
            for c in (cache, copy.deepcopy(cache), pickle.loads(pickle.dumps(cache))):
                with pytest.raises(RuntimeError, match=refused):
                    step(c)
        assert not {"update", "get_conv_state"} & set(vars(cache))
        assert torch.equal(step(cache), want[0]) and torch.equal(step(cache), want[1])
        if method == "divprune":  # a static cache reset for a new prompt is free again
            static = StaticCache(config=model.config.get_text_config(decoder=True), max_cache_len=64)
            model(**inputs, use_cache=True, **{CACHE: static})
            vtprune.unpatch(model)
            with pytest.raises(RuntimeError, match=refused):
                step(static)
            static.reset()
            fresh = StaticCache(config=model.config.get_text_config(decoder=True), max_cache_len=64)
            assert torch.equal(model(**inputs, use_cache=True, **{CACHE: static}).logits,
                               model(**inputs, use_cache=True, **{CACHE: fresh}).logits)
            assert not {"update", "get_conv_state"} & set(vars(static))


def _scaled_copy(model, part: str):
    """A deep copy of `model` whose `part` weights are scaled (so that it computes differently), and a fresh
    model with the same weights as that copy."""
    import copy

    twin = copy.deepcopy(model)
    for p in getattr(twin.model, part).parameters():
        p.data.mul_(1.5)
    return twin


@pytest.mark.parametrize("family, method, options", [
    ("llava_next", "divprune", dict(ratio=0.25)),  # the image-size recorder wraps get_image_features
    ("llava_onevision", "hiprune", dict(ratio=0.5)),
    ("qwen2_vl", "vflowopt", dict(ratio=0.5, alpha=0.5)),  # the pixel recorder for the entropy
])
def test_a_deep_copy_of_a_patched_model_runs_its_own_weights(family, method, options):
    """copy.deepcopy of a patched model (before any forward): the copy encodes with its own vision tower
    and equals a model patched after loading the copy's weights; the original is unaffected; both pickle."""
    import pickle

    model = tiny.build(family)
    inputs = tiny.batch(family, [0, 1])
    vtprune.patch(model, method, **options)
    loaded = pickle.loads(pickle.dumps(model))  # (before a forward: transformers' own hooks then stop a pickle)
    twin = _scaled_copy(model, "visual" if family.startswith("qwen") else "vision_tower")
    ref = tiny.build(family)
    ref.load_state_dict(twin.state_dict())
    vtprune.patch(ref, method, **options)
    with torch.no_grad():
        want, want_twin = tiny.build(family), ref(**inputs).logits
        vtprune.patch(want, method, **options)
        want = want(**inputs).logits
        assert torch.equal(twin(**inputs).logits, want_twin)
        assert torch.equal(model(**inputs).logits, want)
        assert not torch.equal(want, want_twin)
        assert torch.equal(loaded(**inputs).logits, want)
        plain = tiny.build(family)  # unpatching a copy restores it (a copied sentinel went back as '_prefill',
        gen = dict(max_new_tokens=2, **tiny.GEN)  # and generate() raised "'object' object is not callable")
        expected = plain.generate(**inputs, **gen)
        for copy_ in (twin, loaded):
            vtprune.unpatch(copy_)
            assert "_prefill" not in copy_.__dict__ and "get_image_features" not in copy_.model.__dict__
        assert torch.equal(loaded.generate(**inputs, **gen), expected)
        assert torch.equal(vtprune.unpatch(model).generate(**inputs, **gen), expected)


@pytest.mark.parametrize("family, method", [("llava", "hiprune"), ("qwen2_vl", "vflowopt")])
def test_a_patched_model_deep_copies_after_a_forward_with_gradients_on(family, method):
    """The vision scores a forward leaves on the model carry no graph: with gradients on they kept the vision
    tower's autograd graph alive, and copy.deepcopy refused it ("Only Tensors created explicitly by the user").
    Gradients still reach the vision tower through the kept tokens."""
    import copy

    model = tiny.build(family)
    inputs = tiny.batch(family, [0, 1])
    vtprune.patch(model, method, ratio=0.5)
    model(**inputs).logits.sum().backward()
    tower = model.model.visual if family.startswith("qwen") else model.model.vision_tower
    assert any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in tower.parameters())
    twin = copy.deepcopy(model)
    with torch.no_grad():
        assert torch.equal(twin(**inputs).logits, model(**inputs).logits)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
@pytest.mark.parametrize("method", ["divprune", "hiprune", "fastv", "transprune"])
def test_gradient_checkpointing_recomputes_the_pruned_forward(family, method):
    """Training a patched model (no labels: a loss of one's own on the logits) with gradient checkpointing:
    the backward recomputes each decoder layer, and in-LLM strategies drop tokens after some. The loss and
    every gradient equal those without checkpointing (the tiny configs have no dropout, whose reruns would
    draw other masks)."""
    models = [vtprune.patch(tiny.build(family), method, ratio=0.25).train() for _ in range(2)]
    models[1].gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert models[1].model.language_model.gradient_checkpointing
    inputs = tiny.batch(family, [0, 1])
    losses = []
    for model in models:
        loss = model(**inputs).logits.float().pow(2).mean()
        loss.backward()
        losses.append(loss.detach())
    assert torch.equal(losses[0], losses[1])
    grads = [[p.grad for p in model.parameters()] for model in models]
    assert sum(g is not None for g in grads[0]) > 0
    for a, b in zip(*grads):
        assert (a is None) == (b is None) and (a is None or torch.equal(a, b))


def test_a_deep_copy_after_compile_llm_runs_its_own_decoder():
    model = tiny.build("llava")
    inputs = tiny.batch("llava", [0])
    vtprune.patch(model, "divprune", ratio=0.25)
    vtprune.compile_llm(model, mode=None, backend="eager")
    twin = _scaled_copy(model, "language_model")
    ref = tiny.build("llava")
    ref.load_state_dict(twin.state_dict())
    vtprune.patch(ref, "divprune", ratio=0.25)
    with torch.no_grad():
        assert torch.allclose(twin(**inputs).logits, ref(**inputs).logits, atol=1e-5)
        assert not torch.allclose(twin(**inputs).logits, model(**inputs).logits, atol=1e-3)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "llava_next"])
def test_an_encoder_call_of_the_users_own_does_not_leak_into_the_next_forward(family):
    """Vision scores of a direct get_image_features call are not taken for the next generate()'s (beams:
    several copies of the prompt) or forward's images."""
    model = tiny.build(family)
    inputs, other = tiny.batch(family, [0]), tiny.batch(family, [3])
    encode = {k: v for k, v in other.items() if k.startswith("pixel") or k in ("image_grid_thw", "image_sizes")}
    gen = dict(max_new_tokens=4, num_beams=2, num_return_sequences=2, **tiny.GEN)
    vtprune.patch(model, "hiprune", keep=12)
    with torch.no_grad():
        ref, layout, logits = model.generate(**inputs, **gen), vtprune.stats(model).layout, model(**inputs).logits
        model.model.get_image_features(**encode)
        assert torch.equal(model.generate(**inputs, **gen), ref)
        assert torch.equal(vtprune.stats(model).layout, layout)
        model.model.get_image_features(**encode)
        assert torch.equal(model(**inputs).logits, logits)
        if family == "llava":  # the tower called directly: scores of no encoder run
            model.model.vision_tower(other["pixel_values"], output_hidden_states=True)
            assert torch.equal(model.generate(**inputs, **gen), ref)
            assert torch.equal(vtprune.stats(model).layout, layout)


def test_unpatch_restores_a_method_wrapper_of_the_users_own():
    model = tiny.build("llava")
    calls = []
    original = model.model.get_image_features

    def mine(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    model.model.get_image_features = mine
    vtprune.patch(model, "hiprune", keep=4)
    with torch.no_grad():
        model(**tiny.batch("llava", [0]))
        vtprune.unpatch(model)
        assert model.model.__dict__["get_image_features"] is mine
        model(**tiny.batch("llava", [0]))
    assert len(calls) == 2


@pytest.mark.parametrize("family, method", [("llava", "divprune"), ("llava", "fastv"), ("qwen2_vl", "transprune")])
def test_labels_while_pruning_are_refused_clearly(model_factory, family, method):
    model = model_factory(family)
    inputs = tiny.batch(family, [0])
    labels = inputs["input_ids"].clone()
    with torch.no_grad():
        want = model(**inputs, labels=labels).loss
        vtprune.patch(model, method, keep=4)
        with pytest.raises(NotImplementedError, match="labels .* while pruning are not supported"):
            model(**inputs, labels=labels)
        params = list(inspect.signature(model.forward).parameters)
        positional = [inputs.get(p) for p in params[:params.index("labels") + 1]]  # labels=None, positionally
        model(*positional)
        model(**inputs)  # the next call is not affected
        assert vtprune.stats(model).visual_after != vtprune.stats(model).visual_before
        vtprune.patch(model, method, keep=10_000)  # nothing pruned: the loss is the model's
        assert torch.equal(model(**inputs, labels=labels).loss, want)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_qwen_video_as_inputs_embeds_is_per_frame_or_refused(model_factory, family):
    """Given inputs_embeds alone, transformers gives Qwen-VL tokens text positions: a Qwen2/2.5-VL clip
    (one run of all its frames) was pruned as one unit with one frame's budget; it is refused. Qwen3-VL's
    frames are runs of their own and keep per-frame budgets; images are pruned as with input_ids."""
    model = model_factory(family)
    video = tiny.batch(family, [1], videos=(1,))
    image = tiny.batch(family, [1])
    vtprune.patch(model, "divprune", keep=2)
    with torch.no_grad():
        model(**video)
        want = vtprune.stats(model).images
        assert len(want) == 4  # the image and 3 frames
        as_embeds = lambda x: {**{k: v for k, v in x.items() if k != "input_ids"},  # noqa: E731
                               "inputs_embeds": model.get_input_embeddings()(x["input_ids"])}
        model(**as_embeds(image))
        assert vtprune.stats(model).images == want[:1]
        if family == "qwen3_vl":
            model(**as_embeds(video))
            assert vtprune.stats(model).images == want
        else:
            with pytest.raises(ValueError, match="text positions.*pass input_ids"):
                model(**as_embeds(video))


def test_reading_the_cache_off_an_output_does_not_touch_the_deprecated_name(monkeypatch):
    """use_cache=False left `cache` None and the fallback read `past_key_values`, which transformers
    answers with a deprecation warning on every patched call."""
    from transformers.utils import generic

    from vtprune.hooks.runtime import kv_cache

    warned = []
    monkeypatch.setattr(generic.logger, "warning_once", lambda msg, *a, **k: warned.append(msg))
    model = tiny.build("llava")
    inputs = tiny.batch("llava", [0, 1])
    with torch.no_grad():
        out = model(**inputs, use_cache=False)
        assert kv_cache(out) is None and not warned
        assert kv_cache(model(**inputs)) is not None and not warned
        vtprune.patch(model, "divprune", keep=4)
        model(**inputs, use_cache=False)
        model.generate(**inputs, use_cache=False, max_new_tokens=2, **tiny.GEN)
    assert not warned


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
def test_qwen_inputs_embeds_with_a_grid_strategy_says_why(model_factory, family):
    """inputs_embeds alone gets text positions, so no image grid can be read off them: the refusal said only
    "could not determine for this input"."""
    model = model_factory(family)
    x = dict(tiny.batch(family, [0]))
    x["inputs_embeds"] = model.get_input_embeddings()(x.pop("input_ids"))
    vtprune.patch(model, "pool", ratio=0.5)
    with torch.no_grad(), pytest.raises(ValueError, match="inputs_embeds alone gets text positions; pass input_ids"):
        model.generate(**x, max_new_tokens=2, **tiny.GEN)


def test_placeholder_slots_from_embeddings_need_every_element_to_match(model_factory):
    """inputs_embeds without input_ids: a text embedding that shares one value with the image token's row
    (common in bf16) is not an image slot."""
    from vtprune.hooks import adapter_for

    model = model_factory("llava")
    ids = tiny.batch("llava", [0])["input_ids"]
    raw = model.get_input_embeddings()(ids).clone()
    row = model.get_input_embeddings().weight[tiny.IMG]
    text = int((ids[0] != tiny.IMG).nonzero()[0])
    raw[0, text, 0] = row[0]
    got = adapter_for(model).token_mask({"inputs_embeds": raw}, tiny.IMG, raw.shape[:2])
    assert torch.equal(got, ids == tiny.IMG)


def test_llm_stage_manual_decode_without_attention_mask_equals_no_cache_forward(model_factory):
    """A manual decode loop passing neither attention_mask nor position_ids after an in-LLM drop (the
    cache holds the unpruned prompt at layers <= the drop layer): each step equals a no-cache forward."""
    model = model_factory("llava")
    inputs = tiny.batch("llava", [1])  # one unpadded prompt
    vtprune.patch(model, "hidden_norm_test", keep=4)  # prefix-invariant in-LLM pick after decoder layer 1
    ids = inputs["input_ids"]
    cache = _new_cache(model)
    with torch.no_grad():
        model(input_ids=ids, pixel_values=inputs["pixel_values"], use_cache=True, **{CACHE: cache})
        for step in range(3):
            nxt = torch.tensor([[5 + step]])
            ids = torch.cat([ids, nxt], 1)
            cached = model(input_ids=nxt, use_cache=True, **{CACHE: cache}).logits[:, -1]
            full = model(input_ids=ids, pixel_values=inputs["pixel_values"]).logits[:, -1]
            torch.testing.assert_close(cached, full, atol=2e-5, rtol=1e-4, msg=lambda m: f"step {step}: {m}")
