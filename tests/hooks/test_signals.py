"""Attention signals with SDPA on equal an eager-attention computation of the same scores."""
import pytest
import torch

import vtprune
from vtprune import tiny
from vtprune.methods import fastv


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_fastv_under_sdpa_selects_what_eager_attention_selects(model_factory, family):
    sdpa = model_factory(family, "sdpa")
    eager = model_factory(family, "eager")
    inputs = tiny.batch(family, [0, 1, 2])
    k_layer = 2
    with torch.no_grad():
        out = eager(**inputs, output_attentions=True)
    attn = out.attentions[k_layer - 1]  # [B, H, L, L] probabilities at layer K-1 (0-indexed)
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
        vis_slots = visual[b].nonzero().squeeze(1).tolist()
        kept = sorted(vis_slots.index(int(s)) for s in layout[b] if s >= 0 and int(s) in vis_slots)
        assert kept == want[b].tolist(), f"sample {b}"
    assert sdpa.config.text_config._attn_implementation == "sdpa"


def test_llava_vision_signal_equals_eager_clip_attention(model_factory):
    from vtprune.hooks.base import SignalStore
    from vtprune.hooks.llava import LlavaAdapter
    from vtprune.methods.base import VisionSignal

    model = model_factory("llava", "sdpa")
    eager = model_factory("llava", "eager")
    pixels = tiny.batch("llava", [0, 1])["pixel_values"]
    store = SignalStore()
    handles = LlavaAdapter(model).install_vision_signals(
        {"mean": VisionSignal("feature", "mean"), "cls": VisionSignal(0, "cls")}, store)
    try:
        with torch.no_grad():
            model.model.vision_tower(pixels)
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad():
        ref = eager.model.vision_tower(pixels, output_attentions=True).attentions
    n_layers = len(ref)
    feature = n_layers - 2  # vision_feature_layer=-2 -> hidden_states[-2] is the output of layer n-2
    want_mean = ref[feature].mean(1).mean(1)[:, 1:]  # heads, all query rows; CLS key dropped
    want_cls = ref[0].mean(1)[:, 0, 1:]
    got = store.read()
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
