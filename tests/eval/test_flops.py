"""The analytic FLOPs convention (docs/flops.md) against torch's FlopCounterMode on tiny models."""
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import vtprune
from vtprune import tiny
from vtprune.eval import flops


@pytest.fixture(scope="module", params=[*tiny.FAMILIES, *tiny.ANYRES_FAMILIES])
def family_model(request):
    return request.param, tiny.build(request.param)


def counted(model, inputs) -> int:
    with FlopCounterMode(display=False) as fc, sdpa_kernel(SDPBackend.MATH), torch.no_grad():
        model(**inputs, logits_to_keep=1)
    return fc.get_total_flops()


@pytest.mark.parametrize("method, options", [(None, {}), ("random", {"ratio": 0.5}), ("divprune", {"keep": 3}),
                                             ("fastv", {"ratio": 0.25}), ("pool", {"keep": 4})],
                         ids=["unpatched", "random", "divprune", "fastv", "pool"])
def test_analytic_count_matches_the_flop_counter(family_model, method, options):
    family, model = family_model
    for i in (0, 1):  # batch 1: the counter would also count padding, which the convention does not
        inputs = tiny.batch(family, [i])
        r = flops.count(model, inputs, method, **options)
        if method is None:
            want = counted(model, inputs)
        else:
            with vtprune.pruned(model, method, **options):
                want = counted(model, inputs)
        got = r.vision_encoder + r.projector + r.selection + r.llm_prefill + r.lm_head
        assert got == pytest.approx(want, rel=0.02)
        if method != "fastv":  # everything but FastV's scoring pass is modelled exactly
            assert got == want


@pytest.mark.parametrize("family", tiny.VIDEO_FAMILIES)
@pytest.mark.parametrize("method, options", [(None, {}), ("random", {"ratio": 0.5}), ("divprune", {"keep": 2})],
                         ids=["unpatched", "random", "divprune"])
def test_analytic_count_with_a_video_matches_the_flop_counter(family, method, options):
    """An image and a clip in one sample: DivPrune's Gram matrices are per image and per frame."""
    model = tiny.build(family)
    inputs = tiny.batch(family, [1], videos=(1,))
    r = flops.count(model, inputs, method, **options)
    with vtprune.pruned(model, method or "random", **(options or {"keep": 10_000})):
        want = counted(model, inputs)
    assert r.vision_encoder + r.projector + r.selection + r.llm_prefill + r.lm_head == want


def test_formulas_by_hand():
    t = flops.TextDims(d=8, d_q=8, d_kv=4, m=16, layers=2, vocab=10)
    # 2*3*8*(16+8) + 6*3*8*16 + 4*9*8
    assert flops.layer_prefill(3, t) == 1152 + 2304 + 288
    assert flops.layer_prefill(3, t, causal=True) == 1152 + 2304 + 2 * 3 * 4 * 8
    assert flops.layer_decode(5, t) == 2 * 8 * 24 + 6 * 8 * 16 + 4 * 6 * 8
    mha = flops.TextDims(d=8, d_q=8, d_kv=8, m=16, layers=1, vocab=10)
    n = 5  # MHA check from the notes: 8nd^2 + 6ndm + 4n^2 d
    assert flops.layer_prefill(n, mha) == 8 * n * 64 + 6 * n * 8 * 16 + 4 * n * n * 8
    assert flops.fastv_layer_macs(n, mha) == 4 * n * 64 + 2 * n * n * 8 + 2 * n * 8 * 16


def test_per_layer_tokens_and_kv_bytes_follow_the_pruning():
    model = tiny.build("llava")
    inputs = tiny.batch("llava", [0, 1])  # padded batch: padding is not counted
    base = flops.count(model, inputs)
    real = inputs["attention_mask"].sum(1).tolist()
    assert base.tokens_per_layer == [real] * 4
    fv = flops.count(model, inputs, "fastv", keep=4, layer=2)
    visual = [int(((ids == tiny.IMG) & (m > 0)).sum()) for ids, m in zip(inputs["input_ids"], inputs["attention_mask"])]
    after = [r - v + 4 for r, v in zip(real, visual)]
    assert fv.tokens_per_layer == [real, real, after, after]  # dropped after layer K-1 = 1
    d_kv, b = model.config.text_config.num_key_value_heads * 16, 4  # head dim 16, float32
    assert base.kv_bytes == 2 * 4 * sum(real) * d_kv * b
    assert fv.kv_bytes == 2 * (2 * sum(real) + 2 * sum(after)) * d_kv * b
    assert fv.llm_prefill < base.llm_prefill and fv.fastv_macs < base.fastv_macs


def test_flops_command(capsys, tmp_path):
    import json

    from vtprune.cli import main

    out = tmp_path / "f.json"
    assert main(["flops", "--model", "tiny-test-qwen2-vl", "--keep", "4", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "LLM prefill (dense attention)" in text and "KV cache" in text
    data = json.loads(out.read_text())
    assert data["pruned"]["llm_prefill"] < data["unpatched"]["llm_prefill"]
    assert data["pruned"]["vision_encoder"] == data["unpatched"]["vision_encoder"]
    with pytest.raises(SystemExit):
        main(["flops", "--model", "tiny-test-llava"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:  # bad input: one line on stderr, exit status 2, no traceback
        main(["flops", "--model", "no-such-model", "--keep", "4"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("vtprune flops: error: --model must be") and "Traceback" not in err
    assert main(["flops", "--model", "tiny-test-qwen3-vl", "--keep", "4", "--method", "fastv"]) == 0


@pytest.mark.parametrize("family", [*tiny.FAMILIES, *tiny.ANYRES_FAMILIES])
def test_narrow_stand_in_counts_like_the_real_model(family):
    from vtprune.eval import configs

    real = tiny.build(family)
    stand_in = configs.surrogate(real.config)
    assert stand_in.config.get_text_config().num_attention_heads == 1
    inputs = tiny.batch(family, [0, 1])
    for method, options in ((None, {}), ("random", {"ratio": 0.5}), ("fastv", {"keep": 3}), ("transprune", {"keep": 2})):
        want = flops.count(real, inputs, method, **options)
        got = flops.count(stand_in, inputs, method, config=real.config, **options)
        assert got.tokens_per_layer == want.tokens_per_layer
        assert (got.vision_encoder, got.projector, got.llm_prefill, got.lm_head, got.decode_per_token) == \
            (want.vision_encoder, want.projector, want.llm_prefill, want.lm_head, want.decode_per_token)


def test_flops_of_a_full_scale_architecture_on_the_cpu(capsys):
    from vtprune.cli import main

    assert main(["flops", "--model", "qwen2-vl-7b", "--keep", "64", "--method", "fastv"]) == 0
    text = capsys.readouterr().out
    assert "tokens per layer" in text and "T" in text.split("LLM prefill (dense attention)")[1].split("\n")[0]
