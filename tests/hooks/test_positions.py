"""Qwen M-RoPE: kept tokens keep their original (t, h, w); merged tokens get a coarse grid and the text
after them moves back; decoding continues from the right position. LLaVA: positions renumbered."""
import pytest
import torch

import vtprune
from vtprune import tiny


def expected_positions(ids, grid_hw):
    """Independent M-RoPE positions for one unpadded sample: text counts up, the image block is a
    (h, w) grid starting at the position after vision_start, text resumes at start + max(h, w)."""
    rows, pos, i = [], 0, 0
    ids = ids.tolist()
    while i < len(ids):
        if ids[i] == tiny.IMG:
            h, w = grid_hw
            for r in range(h):
                for c in range(w):
                    rows.append((pos, pos + r, pos + c))
            i += h * w
            pos += max(h, w)
        else:
            rows.append((pos, pos, pos))
            pos += 1
            i += 1
    return torch.tensor(rows).T  # [3, L]


def generate_capturing_positions(model, inputs, new_tokens):
    """Position ids the language model's rotary embedding received: prefill first, then each decode step."""
    seen = []
    hook = model.model.language_model.rotary_emb.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append((args[1] if len(args) > 1 else kwargs["position_ids"]).clone()),
        with_kwargs=True)
    try:
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=new_tokens, **tiny.GEN)
    finally:
        hook.remove()
    return seen


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
@pytest.mark.parametrize("method, opts", [("random", {}), ("fastv", {}), ("pool", dict(positions="topleft"))])
def test_kept_tokens_keep_original_3d_positions(model_factory, family, method, opts):
    model = model_factory(family)
    inputs = tiny.batch(family, [0])
    t, h, w = tiny.QWEN_GRIDS[0]
    want = expected_positions(inputs["input_ids"][0], (h // 2, w // 2))
    vtprune.patch(model, method, ratio=0.25, **opts)
    seen = generate_capturing_positions(model, inputs, 3)
    layout = vtprune.stats(model).layout[0]
    prefill = seen[0][-3:, 0]  # [3, Lp] as the language model received them
    if method != "fastv":
        assert torch.equal(prefill, want[:, layout])
    nxt = int(want.max()) + 1
    for step, pos in enumerate(seen[1:]):
        assert pos[-3:, 0, -1].tolist() == [nxt + step] * 3


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_pool_grid_positions_and_shifted_text(model_factory, family):
    model = model_factory(family)
    inputs = tiny.batch(family, [0])  # 8x8 patches -> 4x4 LLM tokens, keep 4 -> pooled 2x2
    ids = inputs["input_ids"][0]
    vtprune.patch(model, "pool", keep=4)
    seen = generate_capturing_positions(model, inputs, 2)
    first_img = int((ids == tiny.IMG).nonzero()[0])
    n_after = len(ids) - first_img - 16
    s = first_img  # position of the first image token = its slot (no padding, text before is contiguous)
    grid = [(s, s + r, s + c) for r in range(2) for c in range(2)]
    after = [(s + 2 + k,) * 3 for k in range(n_after)]  # vision_end and the text after it
    want = torch.tensor([(p, p, p) for p in range(first_img)] + grid + after).T
    assert torch.equal(seen[0][-3:, 0], want)
    assert seen[1][-3:, 0, -1].tolist() == [s + 2 + n_after] * 3  # decoding continues right after


def test_llava_positions_are_renumbered_or_kept(model_factory):
    model = model_factory("llava")
    inputs = tiny.batch("llava", [0, 1])
    for keep_positions in (False, True):
        vtprune.patch(model, "random", keep=4, keep_positions=keep_positions)
        seen = generate_capturing_positions(model, inputs, 2)
        layout = vtprune.stats(model).layout
        mask = inputs["attention_mask"]
        orig = (mask.cumsum(1) - 1).clamp(min=0)
        for b in range(2):
            real = [int(s) for s in layout[b] if s >= 0 and mask[b, s]]
            got = seen[0][b, -len(real):].tolist()
            want = orig[b, real].tolist() if keep_positions else list(range(len(real)))
            assert got == want
            n_real = int(mask[b].sum())
            assert seen[1][b, -1].item() == (n_real if keep_positions else len(real))


def test_a_merged_grid_of_other_slots_starts_at_the_image_and_text_resumes_after_it(model_factory, monkeypatch):
    """A strategy's merged grid (a custom one: 2 x 2 windows each represented by its bottom-right token, slots
    5, 7, 13, 15) starts at the image's first position, not at its first kept slot's; the text after the
    block moves back from after the block's last slot, though that slot is kept."""
    from vtprune.methods.base import Selection
    from vtprune.methods.registry import get_method

    def select(self, image):
        idx = torch.tensor([5, 7, 13, 15])
        return Selection(idx, tokens=image.features[idx].clone(), grid=(1, 2, 2))

    monkeypatch.setattr(get_method("pool"), "select", select)
    model = model_factory("qwen2_vl")
    inputs = tiny.batch("qwen2_vl", [0])
    ids = inputs["input_ids"][0]
    assert tiny.QWEN_GRIDS[0][1:] == (8, 8)  # a 4 x 4 grid of merged tokens
    vtprune.patch(model, "pool", keep=4)
    seen = generate_capturing_positions(model, inputs, 2)
    s = int((ids == tiny.IMG).nonzero()[0])
    after = len(ids) - s - 16
    want = torch.tensor([(p, p, p) for p in range(s)] + [(s, s + r, s + c) for r in range(2) for c in range(2)]
                        + [(s + 2 + k,) * 3 for k in range(after)]).T
    assert torch.equal(seen[0][-3:, 0], want)
    assert seen[1][-3:, 0, -1].tolist() == [s + 2 + after] * 3


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_layers_after_an_in_llm_drop_get_position_ids_of_their_layout(model_factory, family):
    """Decoder layers after fastv's drop run on fewer slots; the position_ids they are given (what
    flash-attention reads to find packed sequences; RoPE itself comes from position_embeddings) count the real
    slots of that layout, 0, 1, 2, ... with pads 0, as generate() would build them from its mask, instead of
    being the prefill's longer ones."""
    model = model_factory(family)
    inputs = tiny.batch(family, [0, 1])
    vtprune.patch(model, "fastv", layer=1, ratio=0.25)
    seen = {}

    def record(i):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            seen.setdefault(i, (kwargs["position_ids"], hidden.shape[1]))
        return hook

    hooks = [layer.register_forward_pre_hook(record(i), with_kwargs=True)
             for i, layer in enumerate(model.model.language_model.layers)]
    try:
        with torch.no_grad():  # (generate: Qwen's layers get its text row of positions then, none from a bare forward)
            model.generate(**inputs, max_new_tokens=1, **tiny.GEN)  # the prefill only
    finally:
        for h in hooks:
            h.remove()
    layout = vtprune.stats(model).layout  # [B, L]: the caller-side slot of each slot after the drop (-1: a pad added)
    assert layout.shape[1] == seen[1][1] < seen[0][1]  # (layer=1: scored at layer 0, dropped after it)
    real = (layout >= 0) & inputs["attention_mask"].bool().gather(1, layout.clamp(min=0))  # (the caller's pads too)
    want = (real.long().cumsum(-1) - 1).masked_fill(~real, 0)
    for i in (1, 2, 3):
        assert torch.equal(seen[i][0], want), (i, seen[i][0], want)
