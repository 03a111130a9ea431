"""Family-specific plumbing checked against an independent reference: Qwen3-VL deepstack through the
pruned layout, Qwen3.5's linear-attention layers, Qwen2.5-VL vision signals from full-attention blocks in raster order."""
import sys

import pytest
import torch

import vtprune
from vtprune import tiny


def _gather(x, layout, dim, fill=0):
    """x[..., b, layout[b], ...] along `dim` (batch at dim-1), `fill` where layout is -1."""
    rows = []
    for b in range(layout.shape[0]):
        xb = x.select(dim - 1, b)
        idx = layout[b].clamp(min=0)
        g = xb.index_select(dim - 1, idx)
        pad = (layout[b] < 0).view([-1 if d == dim - 1 else 1 for d in range(g.dim())])
        rows.append(g.masked_fill(pad, fill))
    return torch.stack(rows, dim - 1)


@pytest.mark.parametrize("method, videos", [("random", ()), ("divprune", ()), ("random", (1, 2)),
                                            ("divprune", (1, 2)), ("pool", ())])
def test_qwen3_deepstack_follows_the_pruned_layout(model_factory, method, videos):
    """A pruned Qwen3-VL forward equals the unpatched language model run by hand on the pruned inputs,
    with visual_pos_masks and the deepstack rows reduced to the kept visual tokens (upstream's own
    _deepstack_process does the adding in the reference). pool merges tokens: its deepstack rows must
    be the same 2-D average pooling of the image's deepstack grid."""
    model = model_factory("qwen3_vl")
    inputs = tiny.batch("qwen3_vl", [0, 1, 2], videos=videos)
    vtprune.patch(model, method, ratio=0.4)
    sent = {}
    h = model.model.language_model.register_forward_pre_hook(lambda m, a, kw: sent.update(kw), with_kwargs=True)
    with torch.no_grad():
        pruned = model(**inputs).logits
    h.remove()
    layout = vtprune.stats(model).layout
    assert layout.shape[1] < inputs["input_ids"].shape[1]
    vtprune.unpatch(model)
    kw = tiny.lm_kwargs(model, inputs)
    vis = kw["visual_pos_masks"]
    assert len(kw["deepstack_visual_embeds"]) == 2
    mask = _gather(kw["attention_mask"], layout, 1)
    assert torch.equal(sent["attention_mask"], mask)
    if method == "pool":
        from vtprune.methods.pool import pooled_grid

        deep = []
        for d in kw["deepstack_visual_embeds"]:
            rows, start = [], 0
            for t, gh, gw in (inputs["image_grid_thw"] // torch.tensor([1, 2, 2])).tolist():
                img = d[start:start + gh * gw].T.reshape(1, -1, gh, gw)
                start += gh * gw
                out = torch.nn.functional.adaptive_avg_pool2d(img, pooled_grid(gh, gw, max(1, round(0.4 * gh * gw))))
                rows.append(out.reshape(d.shape[1], -1).T)
            deep.append(torch.cat(rows))
    else:
        kept = torch.zeros_like(vis)
        for b in range(layout.shape[0]):
            kept[b, layout[b][layout[b] >= 0]] = True
        deep = [d[kept[vis]] for d in kw["deepstack_visual_embeds"]]  # row-major: the deepstack row order
        assert torch.equal(sent["inputs_embeds"], _gather(kw["inputs_embeds"], layout, 1))
        assert torch.equal(sent["position_ids"], _gather(kw["position_ids"], layout, 2))
    with torch.no_grad():
        out = model.model.language_model(
            inputs_embeds=sent["inputs_embeds"], attention_mask=mask, position_ids=sent["position_ids"],
            visual_pos_masks=_gather(vis, layout, 1, False), deepstack_visual_embeds=deep,
        )
        want = model.lm_head(out.last_hidden_state)
    real = mask.bool()
    torch.testing.assert_close(pruned[real], want[real], atol=1e-5, rtol=1e-4)


def test_qwen3_llm_stage_drop_inside_deepstack_layers_matches_unpruned_when_all_kept(model_factory):
    """An llm-stage method active at decoder layer 1 (a deepstack layer) that keeps every token: the
    runtime adds the deepstack features itself, and the logits equal the unpatched model's."""

    @vtprune.register("keep_all_at_1")
    class KeepAll(vtprune.Method):
        """keeps every visual token at layer 1 (test only)"""
        stage = "llm"

        def drop_layers(self, n):
            return [1]

        def select_in_llm(self, tokens):
            return [torch.arange(int(v.sum())) for v in tokens.visual]

    model = model_factory("qwen3_vl")
    inputs = tiny.batch("qwen3_vl", [0, 1, 2], videos=(2,))
    with torch.no_grad():
        ref = model(**inputs).logits
        vtprune.patch(model, "keep_all_at_1", ratio=0.5)
        out = model(**inputs).logits
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)


def _qwen25_reference(model, pixels, grid, layer):
    """Mean attention each ViT patch receives in block `layer`, per image, from an explicit softmax
    over that block's queries and keys; then 2x2-merged and put in raster order."""
    visual = model.model.visual
    mod = sys.modules[type(visual).__module__]
    blk = visual.blocks[layer]
    got = {}

    def grab(module, args, kwargs):
        got["x"], got["kw"] = args[0] if args else kwargs["hidden_states"], kwargs

    h = blk.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            visual(pixels, grid_thw=grid)
    finally:
        h.remove()
    attn = blk.attn
    x = blk.norm1(got["x"])
    seq = x.shape[0]
    q, k, _ = attn.qkv(x).reshape(seq, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    q, k = mod.apply_rotary_pos_emb_vision(q, k, *got["kw"]["position_embeddings"])
    window_index, _ = mod.get_vision_window_index(grid, spatial_merge_size=visual.spatial_merge_size,
                                                  window_size=visual.window_size, patch_size=visual.patch_size,
                                                  kwargs={})
    merge = visual.spatial_merge_size ** 2
    cu = got["kw"]["cu_seqlens"].tolist()
    scores = torch.empty(seq)
    for s, e in zip(cu[:-1], cu[1:]):
        p = torch.softmax(torch.einsum("qhd,khd->hqk", q[s:e], k[s:e]).float() * attn.scaling, -1)
        scores[s:e] = p.mean(0).mean(0)
    per_token = scores.view(-1, merge).mean(1)[torch.argsort(window_index)]
    sizes = [int(t * hh * ww) // merge for t, hh, ww in grid.tolist()]
    return list(per_token.split(sizes)), cu


def test_qwen25_signals_come_from_full_attention_blocks_in_raster_order(model_factory):
    from vtprune.hooks.base import SignalStore
    from vtprune.hooks.qwen2_vl import QwenVLAdapter
    from vtprune.methods.base import VisionSignal

    model = model_factory("qwen2_5_vl")  # 2 blocks: 0 windowed, 1 full attention
    inputs = tiny.batch("qwen2_5_vl", [0, 3])  # 8x8 and 6x6 patch grids: several 4x4 windows each
    pixels, grid = inputs["pixel_values"], inputs["image_grid_thw"]
    store = SignalStore()
    handles = QwenVLAdapter(model).install_vision_signals({"obj": VisionSignal("object", "mean")}, store)
    hooked = [i for i, b in enumerate(model.model.visual.blocks) if b.attn.qkv._forward_hooks]
    try:
        with torch.no_grad():
            model.model.visual(pixels, grid_thw=grid)
    finally:
        for h in handles:
            h.remove()
    assert hooked == [1]  # "object" (block 0 by the midpoint rule) moved to the full-attention block
    want, cu = _qwen25_reference(model, pixels, grid, 1)
    assert cu == [0, 64, 100]  # full attention: one span per image, not per window
    got = store.read()["obj"]
    assert [g.numel() for g in got] == [16, 9]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-5)
    # window order differs from raster order here, so the re-ordering is exercised
    wi = sys.modules[type(model.model.visual).__module__].get_vision_window_index(
        grid, spatial_merge_size=2, window_size=56, patch_size=14, kwargs={})[0]
    assert not torch.equal(wi, torch.arange(wi.numel()))
    with pytest.raises(ValueError, match="windowed block"):
        QwenVLAdapter(model).install_vision_signals({"w": VisionSignal(0, "mean")}, SignalStore())


def test_qwen25_feature_and_object_signals_move_to_the_nearest_full_attention_block_before():
    """Where "feature" or "object" falls on a windowed block, the signal reads the nearest full-attention
    block at or before it (the first one when none is), whatever order the config lists them in."""
    from types import SimpleNamespace

    from vtprune.hooks.qwen2_vl import QwenVLAdapter
    from vtprune.methods.base import VisionSignal

    adapter = QwenVLAdapter.__new__(QwenVLAdapter)  # (_signal_layer reads only the tower's fullatt_block_indexes)
    visual = SimpleNamespace(fullatt_block_indexes=[11, 3, 7])
    assert adapter._signal_layer(visual, VisionSignal("feature"), 16) == 11  # block 15: full blocks 3, 7, 11 are before it
    assert adapter._signal_layer(visual, VisionSignal("object"), 16) == 7  # block (16 - 1) // 2 = 7 is one
    assert adapter._signal_layer(SimpleNamespace(fullatt_block_indexes=[5, 9]), VisionSignal("object"), 16) == 5
    assert adapter._signal_layer(SimpleNamespace(fullatt_block_indexes=[9, 13]), VisionSignal("object"), 16) == 9  # none before
    assert adapter._signal_layer(SimpleNamespace(fullatt_block_indexes=None), VisionSignal("object"), 16) == 7  # Qwen2-VL


def test_hybrid_attention_signals_are_refused_at_linear_attention_layers(model_factory):
    """Qwen3.5's Gated DeltaNet layers have no attention map: a strategy reading one is refused by name,
    with the layers it can read (at patch time; a custom one that reads the next layer's attention without
    saying so, at the first forward)."""
    model = model_factory("qwen3_5")
    inputs = tiny.batch("qwen3_5", [0, 1])
    with pytest.raises(ValueError, match=r"fastv: decoder layer 0 is a linear-attention layer \(Qwen3_5GatedDeltaNet\)"
                                         r".*attention layers are \[1, 2\]"):
        vtprune.patch(model, "fastv", layer=1, keep=4)  # reads layer 0
    with pytest.raises(ValueError, match="todre: decoder layer 0 is a linear-attention layer"):
        vtprune.patch(model, "todre", stage2_layer=0, keep=4)
    with pytest.raises(ValueError, match="transprune: decoder layer 3 is a linear-attention layer"):
        vtprune.patch(model, "transprune", schedule=[[2, 0.5]], keep=4)  # drop after 2 reads layer 3

    @vtprune.register("next_attention_probe_test")
    class NextProbe(vtprune.Method):
        """reads attention_next without declaring it: refused at the first forward"""
        stage = "llm"

        def drop_layers(self, n):
            return [2]

        def select_in_llm(self, tokens):  # (registered for the session: a valid selection where it can run)
            tokens.attention_next(None)
            return [torch.arange(int(v.sum())) for v in tokens.visual]

    vtprune.patch(model, "next_attention_probe_test", keep=4)
    with pytest.raises(ValueError, match="next_attention_probe_test: decoder layer 3 is a linear"), torch.no_grad():
        model(**inputs)
    with pytest.raises(ValueError, match="compile_llm does not support Qwen3_5ForConditionalGeneration"):
        vtprune.compile_llm(model)
    vtprune.patch(model, "fastv", layer=2, keep=4)  # reads layer 1 (attention): prunes
    with torch.no_grad():
        model(**inputs)
    assert vtprune.stats(model).visual_after == [4, 4]


def test_hybrid_linear_attention_layers_are_observed_and_masked_after_a_drop(model_factory):
    """Observed parts at a linear-attention layer (TransPrune's transitions) are its token mixer's (linear_attn)
    input and output, as the model adds them up; after a drop, the layers that follow (one of them linear
    attention, given its padding mask) give each sample of a padded batch its logits as alone. (Padding slots
    stay zero through these bias-free layers, so the mask itself changes nothing here.)"""
    got = {}

    @vtprune.register("hybrid_probe_test")
    class Probe(vtprune.Method):
        """observes layer 0 (linear attention), drops after layer 1 (attention) by hidden norm: layer 2 (attention)
        and layer 3 (linear attention) then run on the pruned, re-padded layout"""
        stage = "llm"

        def drop_layers(self, n):
            return [1]

        def observe_layers(self, n):
            return [0]

        def observe(self, tokens, io):
            got["io"] = io

        def select_in_llm(self, tokens):
            norm = tokens.hidden.norm(dim=-1)
            return [norm[b][tokens.visual[b]].topk(3).indices.sort().values for b in range(norm.shape[0])]

    model = model_factory("qwen3_5")
    inputs = tiny.batch("qwen3_5", [0, 1, 2])
    vtprune.patch(model, "hybrid_probe_test", keep=3)
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True)
        io, layer_tokens = got["io"], vtprune.stats(model).layer_tokens
        alone = [model(**tiny.batch("qwen3_5", [i])).logits[0, -1] for i in range(3)]
    hs = out.hidden_states
    layer = model.model.language_model.layers[0]
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(io["attn_in"][real], layer.input_layernorm(hs[0])[real])
    torch.testing.assert_close((hs[0] + io["attn_out"] + io["mlp_out"])[real], hs[1][real])
    assert layer_tokens[3] == [n - (v - 3) for n, v in zip(
        real.sum(1).tolist(), ((inputs["input_ids"] == tiny.IMG) & real).sum(1).tolist())]
    for i in range(3):
        torch.testing.assert_close(out.logits[i, -1], alone[i], atol=1e-5, rtol=1e-4)


def test_hybrid_decode_without_a_mask_after_a_drop_before_the_first_attention_layer(model_factory):
    """Tiny Qwen3.5 (linear, attention, attention, linear) with a drop after layer 0: decode steps given no
    attention mask rebuild it from the positions the cache holds, read at attention layer 1, in the pruned
    layout of every layer after the drop (a negative-size tensor without that correction)."""
    from transformers import DynamicCache

    from vtprune.hooks.runtime import _cache_kwarg

    @vtprune.register("drop0_probe_test")
    class Probe(vtprune.Method):
        stage = "llm"

        def drop_layers(self, n):
            return [0]

        def select_in_llm(self, tokens):
            norm = tokens.hidden.norm(dim=-1)
            return [norm[b][tokens.visual[b]].topk(3).indices.sort().values for b in range(norm.shape[0])]

    model = model_factory("qwen3_5")
    vtprune.patch(model, "drop0_probe_test", keep=3)
    inputs = tiny.batch("qwen3_5", [0])
    cache = DynamicCache(config=model.config.get_text_config())
    kw = {_cache_kwarg(type(model).forward): cache}  # (past_key_values is deprecated in newer transformers)
    with torch.no_grad():
        model(**inputs, use_cache=True, **kw)
        held = cache.get_seq_length(1)
        for step in range(3):
            logits = model(input_ids=torch.tensor([[7]]), use_cache=True, **kw).logits
            assert torch.isfinite(logits).all() and cache.get_seq_length(1) == held + step + 1


def test_hybrid_group_starting_on_a_linear_attention_layer():
    """A drop after layer 0 of a [attention, linear, attention, attention] decoder: the layers after it form one
    group that starts on a linear-attention layer (as Qwen3.5-27B's after fastv layer=4: linear 4, attention 7).
    Its attention layers' masks were sized at the group's first layer, a linear one, which transformers refused
    (get_mask_sizes on a LinearAttentionLayer); each layer's mask is now sized at that layer."""
    cfg = tiny.build("qwen3_5").config
    cfg.text_config.layer_types = ["full_attention", "linear_attention", "full_attention", "full_attention"]
    torch.manual_seed(0)
    model = type(tiny.build("qwen3_5"))(cfg).eval()
    vtprune.patch(model, "fastv", layer=1, keep=2)
    inputs = tiny.batch("qwen3_5", [0, 1, 2])
    with torch.no_grad():
        batch = model.generate(**inputs, max_new_tokens=3, **tiny.GEN)
        assert vtprune.stats(model).layer_tokens[1] < vtprune.stats(model).layer_tokens[0]
        for i in range(3):
            alone = model.generate(**tiny.batch("qwen3_5", [i]), max_new_tokens=3, **tiny.GEN)
            assert torch.equal(batch[i, -3:], alone[0, -3:]), i
