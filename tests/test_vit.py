"""patch_vit: token pruning inside timm and open_clip ViTs, against forwards written out by hand."""
import pytest
import torch

import vtprune
from vtprune.methods import divprune, hiprune, pool, todre

timm = pytest.importorskip("timm", reason="patch_vit tests need timm: pip install 'vtprune[vit]'")
open_clip = pytest.importorskip("open_clip", reason="patch_vit tests need open_clip: pip install 'vtprune[vit]'")

IMAGES = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def timm_vit(**kw):
    torch.manual_seed(0)
    args = dict(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, num_classes=5)
    return timm.models.vision_transformer.VisionTransformer(**{**args, **kw}).eval()


def clip_vit(batch_first=True, layers=4):
    torch.manual_seed(0)
    v = open_clip.transformer.VisionTransformer(image_size=32, patch_size=8, width=32, layers=layers, heads=2, mlp_ratio=2,
                                                output_dim=16).eval()
    v.transformer.batch_first = batch_first  # older open_clip runs its blocks sequence-first
    for blk in v.transformer.resblocks:
        blk.attn.batch_first = batch_first
    return v


def reference(model, images, layer, pick):
    """The model's forward written out block by block, with `pick(patches [B, N, D]) -> [B, k, D]`
    applied to the patch tokens after block `layer` (prefix tokens kept)."""
    if hasattr(model, "patch_embed"):
        p = model.num_prefix_tokens
        x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))
        for i, blk in enumerate(model.blocks):
            x = blk(x)
            if i == layer:
                x = torch.cat([x[:, :p], pick(x[:, p:])], 1)
        return model.forward_head(model.norm(x))
    x = model._embeds(images)
    seq_first = not model.transformer.batch_first
    for i, blk in enumerate(model.transformer.resblocks):
        x = blk(x.transpose(0, 1)).transpose(0, 1) if seq_first else blk(x)
        if i == layer:
            x = torch.cat([x[:, :1], pick(x[:, 1:])], 1)
    pooled, _ = model._pool(x)
    return pooled @ model.proj


def divprune_each(x, keep=6):
    """`reference`'s pick for divprune: each image's `keep` max-min diverse patches (x [B, N, D])."""
    return torch.stack([x[i, divprune.select(x[i:i + 1], keep)[0]] for i in range(len(x))])


def attention_received(model, layer, images):
    """Explicit softmax attention at block `layer`, mean over heads and query rows, prefix key columns dropped."""
    store = {}
    if hasattr(model, "patch_embed"):
        blk = model.blocks[layer]
        h = blk.norm1.register_forward_hook(lambda m, a, o: store.setdefault("x", o))
        model(images)
        h.remove()
        x = store["x"]
        b, n, _ = x.shape
        qkv = blk.attn.qkv(x).reshape(b, n, 3, blk.attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, scale, p = qkv[0], qkv[1], blk.attn.scale, model.num_prefix_tokens
    else:
        blk = model.transformer.resblocks[layer]
        h = blk.ln_1.register_forward_hook(lambda m, a, o: store.setdefault("x", o))
        model(images)
        h.remove()
        x, d, heads = store["x"], blk.attn.embed_dim, blk.attn.num_heads
        x = x if model.transformer.batch_first else x.transpose(0, 1)
        b, n, _ = x.shape
        q = (x @ blk.attn.in_proj_weight[:d].T + blk.attn.in_proj_bias[:d]).view(b, n, heads, -1).transpose(1, 2)
        k = (x @ blk.attn.in_proj_weight[d:2 * d].T + blk.attn.in_proj_bias[d:2 * d]).view(b, n, heads, -1).transpose(1, 2)
        scale, p = (d // heads) ** -0.5, 1
    att = torch.softmax((q @ k.transpose(-1, -2)).float() * scale, -1)
    return att.mean(1).mean(1)[:, p:], att.mean(1)[:, 0, p:]  # received by all rows, CLS row


MODELS = {"timm": timm_vit, "timm-registers-avg": lambda: timm_vit(class_token=False, reg_tokens=2, global_pool="avg"),
          "open_clip": clip_vit, "open_clip-seq-first": lambda: clip_vit(batch_first=False)}


@pytest.mark.parametrize("name", list(MODELS))
def test_keep_all_and_unpatch_are_bit_identical(name):
    model = MODELS[name]()
    with torch.no_grad():
        ref = model(IMAGES)
        vtprune.patch_vit(model, "divprune", ratio=1.0, layer=1)
        assert torch.equal(model(IMAGES), ref)
        vtprune.patch_vit(model, "random", keep=5, layer=1)  # patching again replaces the configuration
        assert not torch.equal(model(IMAGES), ref)
        assert vtprune.stats(model).visual_after == [5, 5, 5]
        vtprune.unpatch(model)
        assert torch.equal(model(IMAGES), ref)
        assert not hasattr(model, "_vtprune")


@pytest.mark.parametrize("name", list(MODELS))
def test_divprune_and_pool_match_the_forward_written_out(name):
    model = MODELS[name]()
    with torch.no_grad():
        want = reference(model, IMAGES, 1, divprune_each)
        vtprune.patch_vit(model, "divprune", keep=6, layer=1)
        torch.testing.assert_close(model(IMAGES), want, rtol=0, atol=1e-6)
        vtprune.unpatch(model)  # references run the unpatched blocks
        want = reference(model, IMAGES, 2, lambda x: torch.stack([pool.pool(x[i], (4, 4), 6)[0] for i in range(len(x))]))
        vtprune.patch_vit(model, "pool", keep=6, layer=2)
        torch.testing.assert_close(model(IMAGES), want, rtol=0, atol=1e-6)
        assert vtprune.stats(model).visual_before == [16] * 3 and vtprune.stats(model).visual_after == [4] * 3  # 2x2


@pytest.mark.parametrize("name", ["timm", "open_clip", "open_clip-seq-first"])
def test_attention_signals_match_explicit_softmax(name):
    """HiPrune's object/deep scores and ToDRE's CLS-attended pivot come from the blocks' own q, k: the
    selections equal those made from explicitly computed attention maps."""
    model = MODELS[name]()
    with torch.no_grad():
        obj, _ = attention_received(model, 1, IMAGES)  # "object": the middle of blocks 0..2 = block 1
        deep, cls_row = attention_received(model, 2, IMAGES)  # "feature" / -1: the pruning block
        want = hiprune.select(obj, deep, (4, 4), 6, 0.1)
        blocks = model.blocks if hasattr(model, "blocks") else model.transformer.resblocks
        seq_first = not (hasattr(model, "blocks") or model.transformer.batch_first)
        full = {}
        hook = blocks[2].register_forward_hook(lambda m, a, o: full.setdefault("x", o))
        model(IMAGES)
        hook.remove()
        y = full["x"].transpose(0, 1) if seq_first else full["x"]  # block 2's output, unpatched
        ref = reference(model, IMAGES, 2, lambda t: torch.stack([t[i, want[i]] for i in range(len(t))]))
        pivot = cls_row.argmax(1)
        want_todre = torch.stack([todre.select(y[i:i + 1, 1:], 5, pivot[i:i + 1])[0] for i in range(3)])
        ref_todre = reference(model, IMAGES, 2, lambda t: torch.stack([t[i, want_todre[i]] for i in range(len(t))]))

        vtprune.patch_vit(model, "hiprune", keep=6, layer=2, deep_layer=-1)
        got = {}
        hook = blocks[3].register_forward_pre_hook(lambda m, a: got.setdefault("x", a[0]))
        out = model(IMAGES)
        hook.remove()
        x = got["x"].transpose(0, 1) if seq_first else got["x"]  # what block 3 receives
        assert torch.equal(x[:, 0], y[:, 0])  # the CLS token is kept, first
        assert torch.equal(x[:, 1:], torch.stack([y[i, 1:][want[i]] for i in range(3)]))
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
        vtprune.patch_vit(model, "todre", keep=5, layer=2)
        torch.testing.assert_close(model(IMAGES), ref_todre, rtol=0, atol=1e-6)


def test_batch_invariance_and_token_shuffle():
    model = timm_vit()
    with torch.no_grad():
        for method in ("divprune", "hiprune", "token_shuffle", "random"):
            vtprune.patch_vit(model, method, ratio=0.25, layer=1)
            both = model(IMAGES)
            alone = torch.cat([model(IMAGES[i:i + 1]) for i in range(3)])
            torch.testing.assert_close(both, alone, rtol=0, atol=1e-5, msg=method)
            assert vtprune.stats(model).visual_after[0] <= 4


def test_unsupported_strategies_and_bad_input_raise_clearly():
    model = timm_vit()
    for method in ("fastv", "transprune", "vflowopt"):
        with pytest.raises(ValueError, match="language model|no ViT form"):
            vtprune.patch_vit(model, method, keep=4)
    with pytest.raises(ValueError, match="stage 2"):
        vtprune.patch_vit(model, "todre", keep=4, stage2=True)
    with pytest.raises(ValueError, match="layer"):
        vtprune.patch_vit(model, "divprune", keep=4, layer=3)  # the last block: nothing follows it
    with pytest.raises(ValueError):
        vtprune.patch_vit(model, "divprune", keep=4, ratio=0.5)
    no_cls = timm_vit(class_token=False, global_pool="avg")  # todre's pivot falls back to the most-attended token
    with torch.no_grad():
        vtprune.patch_vit(no_cls, "todre", keep=4, layer=1)(IMAGES)
    assert vtprune.stats(no_cls).visual_after == [4, 4, 4]
    with pytest.raises(TypeError, match="timm VisionTransformer"):
        vtprune.patch_vit(torch.nn.Linear(2, 2), "divprune", keep=4)
    # options a ViT has no use for are named, and the allowed list is the ViT's (not keep_positions, video_budget)
    with pytest.raises(TypeError, match=r"unknown option\(s\) 'foo' for method 'divprune' in a ViT; allowed: keep, "
                                        r"ratio$"):
        vtprune.patch_vit(model, "divprune", keep=4, foo=1)
    with pytest.raises(TypeError, match="tau: todre's stage-2 options"):  # (it was taken and ignored)
        vtprune.patch_vit(model, "todre", keep=4, tau=0.9)
    with pytest.raises(TypeError, match="stage2_layer: todre's stage-2 options"):
        vtprune.patch_vit(model, "todre", keep=4, stage2_layer=1)
    for stage1 in (False, True):
        with pytest.raises(TypeError, match="stage1: a ViT runs todre's stage 1 always"):
            vtprune.patch_vit(model, "todre", keep=4, stage1=stage1)
    with pytest.raises(TypeError, match=r"'foo' for method 'todre' in a ViT; allowed: keep, ratio, rule$"):
        vtprune.patch_vit(model, "todre", keep=4, foo=1)
    # stage2 is todre's alone: another strategy's error lists its ViT options (it listed keep_positions, ...)
    with pytest.raises(TypeError, match=r"'stage2' for method 'hiprune' in a ViT; allowed: alpha, deep_layer, keep, "
                                        r"object_layer, ratio$"):
        vtprune.patch_vit(model, "hiprune", keep=4, stage2=False)
    with pytest.raises(TypeError, match=r"use vtprune.patch_vit\(model, 'divprune'"):  # patch() points the way
        vtprune.patch(model, "divprune", keep=4)
    from vtprune import tiny

    with pytest.raises(TypeError, match=r"got LlavaForConditionalGeneration; a vision-language model is patched with "
                                        r"vtprune.patch\(model, method"):  # ... and patch_vit the other way
        vtprune.patch_vit(tiny.build("llava"), "divprune", keep=4)
    with pytest.raises(TypeError, match="got Linear$"):
        vtprune.patch_vit(torch.nn.Linear(2, 2), "divprune", keep=4)
    with pytest.raises(TypeError, match="not NaFlexVit"):  # (the generic "supports timm VisionTransformer" before)
        vtprune.patch_vit(timm.models.naflexvit.NaFlexVit(img_size=32, patch_size=8, embed_dim=32, depth=2,
                                                          num_heads=2), "divprune", keep=4)
    assert not hasattr(model, "_vtprune")  # failed patches leave the model untouched


def test_throughput_benchmark_runs_side_by_side(tmp_path, monkeypatch, benchmark_script):
    import json

    bench = benchmark_script("vit")
    monkeypatch.setattr(bench, "models", lambda: iter([("tiny timm", timm_vit()), ("tiny open_clip", clip_vit())]))
    bench.main(["--quick", "--methods", "divprune,pool", "--ratios", "0.5", "--layer", "1", "--out", str(tmp_path / "v.json")])
    rows = json.loads((tmp_path / "v.json").read_text())["rows"]
    assert [(r["model"], r["method"]) for r in rows] == [(m, x) for m in ("tiny timm", "tiny open_clip")
                                                         for x in ("none", "divprune", "pool", "none (again)")]
    assert all(r["images_per_s"] > 0 for r in rows) and [r.get("kept") for r in rows[:3]] == [None, 8, 4]  # pool: a 2 x 2 grid


class _SeqFirstTransformer(torch.nn.Module):
    """An open_clip transformer as before 2.26: no batch_first attribute, blocks run sequence-first."""

    def __init__(self, resblocks):
        super().__init__()
        self.resblocks = resblocks

    def forward(self, x, attn_mask=None):
        x = x.transpose(0, 1)
        for blk in self.resblocks:
            x = blk(x, attn_mask=attn_mask)
        return x.transpose(0, 1)


def test_open_clip_tower_without_batch_first_is_sequence_first():
    new = clip_vit(batch_first=False)
    old = clip_vit(batch_first=False)
    old.transformer = _SeqFirstTransformer(old.transformer.resblocks)
    with torch.no_grad():
        assert torch.equal(old(IMAGES), new(IMAGES))
        for model in (new, old):
            vtprune.patch_vit(model, "divprune", keep=5, layer=1)
        out = old(IMAGES)
        assert out.shape == (3, 16) and vtprune.stats(old).visual_after == [5, 5, 5]
        assert torch.equal(out, new(IMAGES))


@pytest.mark.parametrize("kind", ["timm", "open_clip"])
def test_forward_intermediates_refuses_grids_after_the_pruning_block(kind):
    model = timm_vit() if kind == "timm" else clip_vit()
    with torch.no_grad():
        ref = model.forward_intermediates(IMAGES, indices=[0, 3], output_fmt="NLC")
        early = model.forward_intermediates(IMAGES, indices=[0])
        vtprune.patch_vit(model, "divprune", keep=5, layer=1)
        with pytest.raises(ValueError, match=r"blocks \[3\] come after the pruning"):
            model.forward_intermediates(IMAGES, indices=[0, 3])
        with pytest.raises(ValueError, match=r"blocks \[1, 2, 3\]"):
            model.forward_intermediates(IMAGES, indices=3)  # the last 3
        out = model.forward_intermediates(IMAGES, indices=[0, 3], output_fmt="NLC")
        same = model.forward_intermediates(IMAGES, indices=[0])  # before the pruning block: the full grid
        vtprune.unpatch(model)
    inter = (lambda o: o[1]) if kind == "timm" else (lambda o: o["image_intermediates"])
    assert inter(out)[0].shape == inter(ref)[0].shape and torch.equal(inter(out)[0], inter(ref)[0])
    assert inter(out)[1].shape[1] == inter(ref)[1].shape[1] - 11  # 16 patches -> 5
    assert torch.equal(inter(same)[0], inter(early)[0]) and inter(same)[0].dim() == 4
    assert "forward_intermediates" not in vars(model)  # unpatch restores the class method


@pytest.mark.parametrize("kind", ["timm", "open_clip"])
def test_forward_intermediates_after_prune_intermediate_layers_counts_the_blocks_left(kind):
    """prune_intermediate_layers replaces the block list: indices were mapped through the count at patching
    (6), so block -4 of the 4 left (block 0, before the pruning) was refused as block 2."""
    model = timm_vit(depth=6) if kind == "timm" else clip_vit(layers=6)
    vtprune.patch_vit(model, "divprune", keep=5, layer=2)
    model.prune_intermediate_layers(indices=[0, 1, 2, 3])
    inter = (lambda o: o) if kind == "timm" else (lambda o: o["image_intermediates"])
    with torch.no_grad():
        assert inter(model.forward_intermediates(IMAGES, indices=[-4], intermediates_only=True))[0].dim() == 4
        with pytest.raises(ValueError, match=r"blocks \[2, 3\] come after"):
            model.forward_intermediates(IMAGES, indices=2, intermediates_only=True)  # the last 2 of 4
        model.prune_intermediate_layers(indices=[0, 1])
        with pytest.raises(ValueError, match="pruning block 2 is gone"):
            model.forward_intermediates(IMAGES, indices=[0], intermediates_only=True)
        with pytest.raises(ValueError, match="pruning block 2 is gone .* so nothing would be pruned"):
            model(IMAGES)  # (it ran unpruned, without a word)


def test_open_clip_parallel_attention_pool():
    """Both of a parallel pool's poolers read the kept tokens: the forward equals the unpatched one with the
    pruned tokens put in place by a hook (it was refused, for no reason)."""
    torch.manual_seed(0)
    v = open_clip.transformer.VisionTransformer(image_size=32, patch_size=8, width=32, layers=4, heads=2, mlp_ratio=2,
                                                output_dim=32, attentional_pool="parallel", attn_pooler_queries=3,
                                                attn_pooler_heads=2, output_tokens=True).eval()
    with torch.no_grad():
        hook = v.transformer.resblocks[1].register_forward_hook(
            lambda m, a, o: torch.cat([o[:, :1], divprune_each(o[:, 1:])], 1))
        want = v(IMAGES)
        hook.remove()
        vtprune.patch_vit(v, "divprune", keep=6, layer=1)
        got = v(IMAGES)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-6)


def test_towers_patch_vit_cannot_run_are_refused_when_patching():
    with pytest.raises(TypeError, match="not Eva"):
        vtprune.patch_vit(timm.models.eva.Eva(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2,
                                              num_classes=5), "divprune", keep=4)
    with pytest.raises(ValueError, match="dynamic_img_size"):
        vtprune.patch_vit(timm_vit(dynamic_img_size=True), "divprune", keep=4)
    parallel = timm_vit(block_fn=timm.models.vision_transformer.ParallelThingsBlock)
    with pytest.raises(ValueError, match="hiprune: vision signals need timm blocks with attn.qkv"):
        vtprune.patch_vit(parallel, "hiprune", keep=4, layer=1)
    with torch.no_grad():
        vtprune.patch_vit(parallel, "divprune", keep=4, layer=1)(IMAGES)  # no signals needed: works
    custom = open_clip.transformer.VisionTransformer(image_size=32, patch_size=8, width=32, layers=4, heads=2,
                                                     mlp_ratio=2, output_dim=16, block_type="custom")
    with pytest.raises(ValueError, match="todre: vision signals need open_clip blocks"):
        vtprune.patch_vit(custom, "todre", keep=4, layer=1)
    assert not hasattr(custom, "_vtprune")


def test_differential_attention_is_refused_when_patching():
    """timm's DiffAttention has qkv, q_norm, k_norm and scale, so it passed the check and crashed on the
    first forward (its head_dim is half the packed one; its map is softmax1 - lambda softmax2)."""
    diff = timm_vit(attn_layer="diff")
    for method in ("hiprune", "todre"):
        with pytest.raises(ValueError, match=f"{method}: vision signals need a standard Attention.*DiffAttention"):
            vtprune.patch_vit(diff, method, ratio=0.25, layer=2)
    with torch.no_grad():
        assert vtprune.patch_vit(diff, "divprune", ratio=0.25, layer=2)(IMAGES).shape == (3, 5)


def _eager_received(model, layers, images):
    """Mean attention each patch key receives at `layers`, read from timm's own eager softmax (attn_drop's input)."""
    maps, hooks = {}, []
    for i in layers:
        model.blocks[i].attn.fused_attn = False
        hooks.append(model.blocks[i].attn.attn_drop.register_forward_hook(
            lambda m, a, o, i=i: maps.setdefault(i, a[0])))
    model(images)
    for h in hooks:
        h.remove()
    for i in layers:
        model.blocks[i].attn.fused_attn = True
    return [maps[i].mean(1).mean(1)[:, model.num_prefix_tokens:] for i in layers]


def test_signals_of_a_post_norm_block_come_from_the_attention_input():
    """timm's ResPostBlock normalises after the attention: reading q, k from norm1's output gave other
    scores (max error 0.16 against the eager map) and other tokens."""
    model = timm_vit(block_fn=timm.models.vision_transformer.ResPostBlock, class_token=False, global_pool="avg")
    with torch.no_grad():
        for blk in model.blocks:
            blk.attn.qkv.weight.mul_(10)  # peaked maps: the wrong input shows in the selection
        obj, deep = _eager_received(model, (1, 2), IMAGES)
        want = hiprune.select(obj, deep, (4, 4), 10, 0.5)  # one anchor (object) and registers (deep)
        assert len({tuple(w.tolist()) for w in want}) == 3
        got, full = _kept_tokens(model, 2, keep=10, alpha=0.5, deep_layer=-1)
    assert torch.equal(got, torch.stack([full[i][want[i]] for i in range(3)]))


@pytest.mark.parametrize("kind", ["timm", "timm-reentrant", "open_clip", "timm-eval"])
def test_gradient_checkpointing_with_attention_signals(kind, monkeypatch):
    """The pruning block rerun alone in backward found its earlier block's "object" scores gone (KeyError);
    then, with two forwards before one backward (two crops), it found the second forward's scores: other
    tokens kept in the rerun, wrong gradients (max error 0.019 against 0.031), or an IndexError when the two
    batches differed in size. Reentrant checkpointing reruns the block on a detached copy of its input. timm
    checkpoints in eval mode too (a gradient saliency map): forwards under grad are recorded there as well."""
    if kind == "timm-reentrant":
        import timm.layers.config

        monkeypatch.setattr(timm.layers.config, "_USE_REENTRANT_CKPT", True)
    grads = []
    for checkpointing in (False, True):
        model = timm_vit() if kind.startswith("timm") else clip_vit()
        model.train(kind != "timm-eval").set_grad_checkpointing(checkpointing)
        vtprune.patch_vit(model, "hiprune", keep=5, layer=2)
        images = IMAGES.clone().requires_grad_(True)
        loss = model(images).square().sum() + model(images[1:].flip(-1)).square().sum()  # second: other crops
        loss.backward()
        grads.append(images.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=1e-6)


def test_a_checkpointed_rerun_whose_scores_are_gone_says_so(monkeypatch):
    monkeypatch.setattr(vtprune.vit, "REPLAYS", 1)  # one forward's earlier-block scores kept
    model = timm_vit()
    model.train().set_grad_checkpointing(True)
    vtprune.patch_vit(model, "hiprune", keep=5, layer=2)
    loss = model(IMAGES).sum() + model(IMAGES[1:]).sum()
    with pytest.raises(RuntimeError, match="gradient checkpointing reran block 2 .* gone"):
        loss.backward()


def test_the_last_replays_forwards_are_the_ones_kept(monkeypatch):
    """REPLAYS forwards are kept, the oldest evicted first; an input at an address seen before (the allocator
    reuses freed memory) counts as the newest."""
    monkeypatch.setattr(vtprune.vit, "REPLAYS", 2)
    model = timm_vit()
    model.train().set_grad_checkpointing(True)
    vtprune.patch_vit(model, "hiprune", keep=5, layer=2)
    model(IMAGES[:1])  # the oldest: evicted
    (model(IMAGES).sum() + model(IMAGES[1:]).sum()).backward()  # the last two: both rerun
    state = model._vtprune
    state.replays.clear()
    xs = [torch.randn(1, 17, 32) for _ in range(3)]
    for x in (xs[0], xs[1], xs[0], xs[2]):
        state._scores(x)
    assert [k[0] for k in state.replays] == [xs[0].untyped_storage().data_ptr(), xs[2].untyped_storage().data_ptr()]


@pytest.mark.parametrize("method", ["divprune", "todre"])  # no signal / the pruning block's own
def test_no_scores_are_kept_per_forward_without_earlier_block_signals(monkeypatch, method):
    monkeypatch.setattr(vtprune.vit, "REPLAYS", 1)
    model = timm_vit()
    model.train().set_grad_checkpointing(True)
    vtprune.patch_vit(model, method, keep=5, layer=2)
    (model(IMAGES).sum() + model(IMAGES[1:]).sum()).backward()  # never "gone"
    assert not model._vtprune.replays


def _kept_tokens(model, layer, **options):
    """The patch tokens block `layer + 1` receives with hiprune patched after block `layer`, and block
    `layer`'s unpatched output."""
    vtprune.patch_vit(model, "hiprune", layer=layer, **options)
    got, full = {}, {}
    hook = model.blocks[layer + 1].register_forward_pre_hook(lambda m, a: got.setdefault("x", a[0]))
    model(IMAGES)
    hook.remove()
    vtprune.unpatch(model)
    hook = model.blocks[layer].register_forward_hook(lambda m, a, o: full.setdefault("x", o))
    model(IMAGES)
    hook.remove()
    return got["x"], full["x"]


@pytest.mark.parametrize("layer, middle, other", [(4, 2, 1), (3, 1, 2)], ids=["odd", "even"])
def test_object_scores_come_from_the_middle_block(layer, middle, other):
    """"object" is block (n - 1) // 2 of blocks 0..layer, as Adapter.object_layer: round(n / 2) - 1 took block 1
    of blocks 0..4 instead of 2; n // 2 would take block 2 of blocks 0..3 (the even case) instead of 1."""
    model = timm_vit(depth=6, class_token=False, global_pool="avg")
    with torch.no_grad():
        for blk in model.blocks:
            blk.attn.qkv.weight.mul_(10)
        right, wrong, deep = _eager_received(model, (middle, other, layer), IMAGES)
        want = hiprune.select(right, deep, (4, 4), 10, 0.5)  # one anchor from the object scores
        assert not torch.equal(want, hiprune.select(wrong, deep, (4, 4), 10, 0.5))  # the test can tell them apart
        got, full = _kept_tokens(model, layer, keep=10, alpha=0.5, deep_layer=-1)
    assert torch.equal(got, torch.stack([full[i][want[i]] for i in range(3)]))


def test_an_attention_mask_is_refused_while_patched():
    model = timm_vit()
    mask = torch.ones(3, 1, 17, 17, dtype=torch.bool)
    with torch.no_grad():
        vtprune.patch_vit(model, "divprune", keep=5, layer=1)
        with pytest.raises(ValueError, match="an attention mask is not supported"):
            model.forward_features(IMAGES, attn_mask=mask)
        # causal attention too: the signals read bidirectional attention (hiprune's kept another set)
        with pytest.raises(ValueError, match=r"causal attention \(is_causal=True\) is not supported"):
            model.forward_features(IMAGES, is_causal=True)
        assert model.forward_features(IMAGES).shape == (3, 6, 32)
        assert model.forward_features(IMAGES, is_causal=False).shape == (3, 6, 32)
    clip = clip_vit()
    clip.set_grad_checkpointing(True)  # its checkpoint() passes the mask positionally
    vtprune.patch_vit(clip, "random", keep=5, layer=1)
    x = clip._embeds(IMAGES)
    with pytest.raises(ValueError, match="an attention mask is not supported"):
        clip.transformer(x, attn_mask=torch.zeros(17, 17))


def test_set_input_size_after_patching_and_patch_dropout_in_train_mode():
    model = timm_vit()
    vtprune.patch_vit(model, "divprune", keep=5, layer=1)
    model.set_input_size(img_size=48)
    with torch.no_grad():
        assert model(torch.randn(2, 3, 48, 48)).shape == (2, 5)
    assert vtprune.stats(model).visual_before == [36, 36]
    dropping = timm_vit(patch_drop_rate=0.25).train()
    vtprune.patch_vit(dropping, "divprune", keep=5, layer=1)
    with pytest.raises(ValueError, match="patch dropout is on in train mode"):
        dropping(IMAGES)
    dropping.eval()
    assert dropping(IMAGES).shape == (3, 5)


def _hooks(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_a_refused_repatch_leaves_the_previous_configuration():
    model = timm_vit()
    vtprune.patch_vit(model, "random", keep=5, layer=1)
    installed = _hooks(model)
    with pytest.raises(ValueError, match="layer"):
        vtprune.patch_vit(model, "hiprune", keep=5, layer=1, deep_layer=3)  # deep_layer past the pruning block
    assert _hooks(model) == installed
    with torch.no_grad():
        model(IMAGES)
    assert vtprune.stats(model).method == "random" and vtprune.stats(model).visual_after == [5, 5, 5]
    vtprune.unpatch(model)
    assert _hooks(model) == 0


def test_clip_model_and_its_visual_tower_share_one_configuration():
    torch.manual_seed(0)
    clip = open_clip.model.CLIP(embed_dim=16, vision_cfg=dict(image_size=32, patch_size=8, width=32, layers=4, head_width=16),
                                text_cfg=dict(context_length=8, vocab_size=64, width=32, heads=2, layers=1)).eval()
    with torch.no_grad():
        ref = clip.encode_image(IMAGES)
        vtprune.patch_vit(clip, "divprune", keep=6, layer=1)
        vtprune.patch_vit(clip.visual, "random", keep=5, layer=1)  # replaces the CLIP model's configuration
        clip.encode_image(IMAGES)
        assert vtprune.stats(clip.visual).visual_after == [5, 5, 5]
        assert vtprune.stats(clip) is vtprune.stats(clip.visual)
        assert _hooks(clip.visual) == 2  # one configuration: its pruning hook and block 0's check
        vtprune.unpatch(clip)
        assert _hooks(clip) == 0 and not hasattr(clip.visual, "_vtprune")
        assert torch.equal(clip.encode_image(IMAGES), ref)


def test_open_clip_model_with_a_timm_trunk():
    """open_clip's timm towers (SigLIP and others: .visual is a TimmModel around a timm ViT, .trunk) were
    refused; the CLIP model, its .visual and the trunk now share one configuration, and the trunk's output
    equals patching the trunk alone."""
    unpatched = vtprune.unpatched  # (public)

    torch.manual_seed(0)
    clip = open_clip.CustomTextCLIP(
        embed_dim=16, vision_cfg=dict(image_size=32, timm_model_name="vit_tiny_patch16_224", timm_model_pretrained=False,
                                      timm_pool="map", timm_proj="none"),
        text_cfg=dict(context_length=8, vocab_size=50, width=32, heads=2, layers=1)).eval()
    clip.visual.trunk.set_input_size(img_size=32)
    with torch.no_grad():
        ref = clip.encode_image(IMAGES)
        for target in (clip, clip.visual):
            vtprune.patch_vit(target, "divprune", keep=1, layer=5)
            out = clip.encode_image(IMAGES)
            assert not torch.equal(out, ref)
            assert vtprune.stats(clip).visual_after == [1] * len(IMAGES)
            assert vtprune.stats(clip) is vtprune.stats(clip.visual) is vtprune.stats(clip.visual.trunk)
            vtprune.unpatch(target)
            assert torch.equal(clip.encode_image(IMAGES), ref) and _hooks(clip) == 0
        vtprune.patch_vit(clip.visual.trunk, "divprune", keep=1, layer=5)
        assert torch.equal(clip.encode_image(IMAGES), out)
        # ... and the trunk's configuration is the CLIP model's and .visual's (they did not see it)
        assert vtprune.stats(clip) is vtprune.stats(clip.visual) is vtprune.stats(clip.visual.trunk)
        with unpatched(clip):
            assert torch.equal(clip.encode_image(IMAGES), ref)
        with vtprune.pruned(clip.visual, "random", keep=2, layer=3):
            pass
        assert torch.equal(clip.encode_image(IMAGES), out)  # restored on exit
        vtprune.unpatch(clip)
        assert torch.equal(clip.encode_image(IMAGES), ref) and _hooks(clip) == 0


def test_vit_scores_keep_no_graph_in_training():
    """hiprune's attention scores pick indices only: in train mode their B x H x N x N softmax and its graph
    stayed alive until the next forward. Gradients still reach the kept tokens."""
    model = timm_vit().train()
    vtprune.patch_vit(model, "hiprune", ratio=0.25, layer=1)
    y = model(IMAGES)
    assert all(not v.requires_grad for v in model._vtprune.call.scores.values())
    y.sum().backward()
    assert model.patch_embed.proj.weight.grad is not None and bool(model.patch_embed.proj.weight.grad.abs().sum() > 0)
    with pytest.raises(TypeError, match="keep_positions is for VLMs"):
        vtprune.patch_vit(timm_vit(), "divprune", keep=4, keep_positions=False)
    with pytest.raises(TypeError, match="video_budget is for VLMs' videos"):
        vtprune.patch_vit(timm_vit(), "divprune", keep=4, video_budget="frame")


def test_pruned_context_on_a_vit_restores_the_previous_configuration():
    model = timm_vit()
    with torch.no_grad():
        ref = model(IMAGES)
        with vtprune.pruned(model, "divprune", keep=4, layer=1):
            model(IMAGES)
            assert vtprune.stats(model).visual_after == [4, 4, 4]
        assert torch.equal(model(IMAGES), ref) and _hooks(model) == 0
        vtprune.patch_vit(model, "random", keep=6, layer=2)
        with vtprune.pruned(model, "pool", keep=4, layer=1):
            model(IMAGES)
        model(IMAGES)
    assert vtprune.stats(model).method == "random" and vtprune.stats(model).visual_after == [6, 6, 6]


def test_a_deep_copy_of_a_patched_vit_prunes_with_its_own_weights():
    import copy

    model = timm_vit()
    vtprune.patch_vit(model, "divprune", keep=5, layer=1)
    twin = copy.deepcopy(model)
    for p in twin.blocks.parameters():
        p.data.mul_(1.5)
    ref = timm_vit()
    ref.load_state_dict(twin.state_dict())
    vtprune.patch_vit(ref, "divprune", keep=5, layer=1)
    with torch.no_grad():
        assert torch.equal(twin(IMAGES), ref(IMAGES))
        assert vtprune.stats(twin).visual_after == [5, 5, 5]
        with pytest.raises(ValueError, match="after the pruning"):
            twin.forward_intermediates(IMAGES, indices=[3])
        vtprune.unpatch(twin)
        assert _hooks(twin) == 0 and _hooks(model) > 0


def test_vit_stats_after_a_forward_that_raised_are_the_last_finished_ones(monkeypatch):
    """(a forward that raised in the selection reported "nothing pruned": visual_after = visual_before)"""
    from vtprune.methods.registry import get_method

    model = vtprune.patch_vit(timm_vit(), "divprune", keep=4, layer=1)
    with torch.no_grad():
        model(IMAGES)
    good = vtprune.stats(model)
    assert good.visual_after == [4] * len(IMAGES) and good.visual_before[0] > 4
    monkeypatch.setattr(get_method("divprune"), "select_batch", lambda self, ims: 1 / 0)
    with torch.no_grad(), pytest.raises(ZeroDivisionError):
        model(IMAGES)
    assert vtprune.stats(model) is good


@pytest.mark.parametrize("bad, exc, message", [
    (lambda im: torch.arange(im.keep), TypeError, "must return a vtprune.Selection, got Tensor"),
    (lambda im: vtprune.Selection(torch.arange(im.keep) + 0.5), TypeError, "indices must be an integer tensor"),
    (lambda im: vtprune.Selection(torch.arange(im.keep), tokens=torch.zeros(32)), RuntimeError,
     r"tokens must be a float tensor \[4, 32\]"),
], ids=["bare_tensor", "float", "tokens_1d"])
def test_what_a_strategy_returns_is_checked_in_a_vit(monkeypatch, bad, exc, message):
    """(a [D] tokens tensor was broadcast over every kept token, float indices rounded down)"""
    from vtprune.methods.registry import get_method

    monkeypatch.setattr(get_method("divprune"), "select_batch", lambda self, ims: [bad(im) for im in ims])
    model = vtprune.patch_vit(timm_vit(), "divprune", keep=4, layer=1)
    with torch.no_grad(), pytest.raises(exc, match="divprune.select.*" + message):
        model(IMAGES)


def test_the_default_layer_is_the_block_before_the_middle():
    """patch_vit's documented default layer: n_blocks // 2 - 1 (block 1 of the 4-block test ViT)."""
    model = timm_vit()
    with torch.no_grad():  # (references run the unpatched blocks)
        want = reference(model, IMAGES, 1, divprune_each)
        later = reference(model, IMAGES, 2, divprune_each)
        vtprune.patch_vit(model, "divprune", keep=6)
        got = model(IMAGES)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert not torch.allclose(got, later, rtol=0, atol=1e-4)


def test_a_non_square_grid_pools_rows_as_rows():
    """The patch grid is (rows, cols) = (img_h / patch, img_w / patch): a 32x16 image in 8-pixel patches is
    4 rows of 2 (row-major), so pool to 2 tokens averages rows 0-1 (patches 0..3) and rows 2-3 (4..7);
    a grid read as 2 rows of 4 would average patches {0, 1, 4, 5} and {2, 3, 6, 7}."""
    model = timm_vit(img_size=(32, 16))
    images = IMAGES[:, :, :, :16]
    with torch.no_grad():
        want = reference(model, images, 1, lambda x: torch.stack([x[:, :4].mean(1), x[:, 4:].mean(1)], 1))
        vtprune.patch_vit(model, "pool", keep=2, layer=1)
        got = model(images)
    assert vtprune.stats(model).visual_before == [8] * 3 and vtprune.stats(model).visual_after == [2] * 3
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("keep", [16, 1000])  # all 16 patches; more than there are
def test_a_budget_of_every_patch_selects_nothing_and_reports_all_kept(keep, monkeypatch):
    """keep >= the patch count: the strategy is not run (a merging one would not be the identity), the output
    is the unpatched one, and the figures say every patch stayed (not the budget)."""
    from vtprune.methods.registry import get_method

    model = timm_vit()
    with torch.no_grad():
        ref = model(IMAGES)
        for method in ("pool", "token_shuffle", "divprune"):
            cls = get_method(method)
            monkeypatch.setattr(cls, "select_batch", lambda self, ims: 1 / 0)
            monkeypatch.setattr(cls, "select", lambda self, im: 1 / 0)
            vtprune.patch_vit(model, method, keep=keep, layer=1)
            assert torch.equal(model(IMAGES), ref), method
            st = vtprune.stats(model)
            assert st.visual_before == st.visual_after == [16] * 3 and st.kept_fraction == 1.0, method


def test_vit_selection_ms_is_in_milliseconds(monkeypatch):
    """stats.selection_ms: the selection's wall time in ms; a selection that sleeps 50 ms reads >= 50 and no
    more than the whole forward took."""
    import time

    from vtprune.methods.registry import get_method

    cls = get_method("divprune")
    real = cls.select_batch
    monkeypatch.setattr(cls, "select_batch", lambda self, ims: time.sleep(0.05) or real(self, ims))
    model = vtprune.patch_vit(timm_vit(), "divprune", keep=4, layer=1)
    with torch.no_grad():
        t0 = time.perf_counter()
        model(IMAGES)
        wall_ms = (time.perf_counter() - t0) * 1e3
    assert 50 <= vtprune.stats(model).selection_ms <= wall_ms


def test_vit_cuda_selection_span_is_read_by_stats(cuda_marks):
    """patch_vit times its selection with the same event marks as patch (no sync in the forward): marks 0
    and 1 read 1 and 2 ms, so the span is 1 ms, read once by vtprune.stats."""
    import vtprune.vit as vit

    cuda_marks.into(vit)
    model = vtprune.patch_vit(timm_vit(), "divprune", keep=4, layer=1)
    with torch.no_grad():
        model(IMAGES)
    assert cuda_marks.synced == []
    st = vtprune.stats(model)
    assert st.selection_ms == 1.0 and [e.t for e in cuda_marks.synced] == [2.0] and st.pending == []
    assert vtprune.stats(model).selection_ms == 1.0


@pytest.mark.parametrize("method", ["divprune", "hiprune"])
def test_a_peft_vit_is_patched_through_the_model_it_wraps(method):
    """patch_vit, pruned, stats and unpatch take a PEFT model and act on the timm ViT it wraps; patch_vit
    refused it before, saying its position encoding needs the full grid. Its pruned outputs are those of the
    merged model, patched (hiprune's scores read the LoRA layers in qkv), and unpatch is bit-identical."""
    import copy

    from peft import LoraConfig, get_peft_model

    model = timm_vit()
    torch.manual_seed(1)
    lora = get_peft_model(model, LoraConfig(r=4, target_modules=["qkv"], init_lora_weights=False)).eval()
    merged = copy.deepcopy(lora).merge_and_unload()
    with torch.no_grad():
        plain = lora(IMAGES)
        assert vtprune.patch_vit(lora, method, keep=4, layer=1) is lora
        got = lora(IMAGES)
        assert vtprune.stats(lora).visual_after == [4, 4, 4]
        with vtprune.pruned(merged, method, keep=4, layer=1):
            torch.testing.assert_close(got, merged(IMAGES), rtol=1e-5, atol=1e-6)
        assert vtprune.unpatch(lora) is lora and _hooks(model) == 0
        assert torch.equal(lora(IMAGES), plain)
        with vtprune.pruned(lora, method, keep=4, layer=1) as same:
            assert same is lora and torch.equal(lora(IMAGES), got)
        assert _hooks(model) == 0


@pytest.mark.parametrize("method", ["hiprune", "divprune"])
def test_threads_running_one_patched_vit_at_once_each_prune_their_own_images(method, in_lockstep):
    """Two threads run one patched ViT in lockstep (held together after every block): each gets what it
    gets alone, and its own stats. The scores of the blocks before the pruning one were the model's, so a
    thread pruned its images by the other's."""
    model = vtprune.patch_vit(timm_vit(), method, keep=4, layer=2)
    images = [IMAGES[:1], IMAGES[1:]]
    with torch.no_grad():
        alone = [(model(x), vtprune.stats(model).visual_after) for x in images]

    def run(x):
        def go():
            with torch.no_grad():
                return model(x), vtprune.stats(model).visual_after
        return go

    out = in_lockstep([run(x) for x in images], post=list(model.blocks))
    for (got, after), (want, want_after) in zip(out, alone):
        assert torch.equal(got, want) and after == want_after
