"""Pruned generate() with a static (compileable) KV cache, and the compiled path `vtprune.compile_llm`.

With a static cache, generate() prepares 4-D masks for the unpruned layout before the model runs; the
runtime rebuilds the 2-D mask, prunes, and prepares the masks of the pruned layout (notes §3(b))."""
import pytest
import torch

import vtprune
from vtprune import tiny
from vtprune.hooks.runtime import _cache_kwarg, padding_mask

FAMILIES = ["llava", "qwen2_vl", "qwen3_vl", "llava_next", "qwen3_5"]
GEN = dict(max_new_tokens=5, output_scores=True, return_dict_in_generate=True, **tiny.GEN)


def _max_score_diff(a, b) -> float:
    """Largest difference of the generated steps' scores (suppressed tokens are -inf in both)."""
    out = 0.0
    for x, y in zip(a.scores, b.scores):
        assert torch.equal(torch.isfinite(x), torch.isfinite(y))
        f = torch.isfinite(x)
        out = max(out, (x[f] - y[f]).abs().max().item())
    return out


def test_padding_mask_recovers_the_2d_mask_from_prepared_masks():
    am = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    kv = 6  # a static cache longer than the prompt
    causal = torch.arange(kv)[None, :] <= torch.arange(4)[:, None]  # [q, kv]
    real = torch.nn.functional.pad(am, (0, kv - 4)).bool()  # [B, kv]
    bool4d = (causal[None] & real[:, None])[:, None]  # [B, 1, q, kv]
    float4d = torch.zeros(bool4d.shape).masked_fill(~bool4d, torch.finfo(torch.float32).min)
    sliding = bool4d & (torch.arange(kv)[None, :] > torch.arange(4)[:, None] - 2)  # a window of 2: the last row
    # sees keys 2 and 3 only (Mistral's one model-wide window: it was read as padding before them)
    for prepared in (bool4d, float4d, {"full_attention": bool4d}, torch.nn.functional.pad(am, (0, 2)), sliding,
                     {"sliding_attention": sliding}, {"sliding_attention": sliding, "full_attention": bool4d}):
        got = padding_mask(prepared, 4)
        assert got.dtype == torch.long and torch.equal(got, am)
    assert padding_mask(None, 4) is None
    with pytest.raises(ValueError, match="no full- or sliding-attention mask"):
        padding_mask({"chunked_attention": bool4d}, 4)
    with pytest.raises(ValueError, match="covers 3 of 4"):
        padding_mask(am[:, :3], 4)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method, budget", [("divprune", dict(keep=4)), ("token_shuffle", dict(ratio=0.25))])
def test_static_cache_generate_equals_dynamic(model_factory, family, method, budget):
    model = model_factory(family)
    inputs = tiny.batch(family, [0, 1, 2])  # left padding: the masks matter
    with torch.no_grad():
        unpatched = model.generate(**inputs, cache_implementation="static", **GEN)
        vtprune.patch(model, method, **budget)
        dynamic = model.generate(**inputs, **GEN)
        static = model.generate(**inputs, cache_implementation="static", **GEN)
        after = vtprune.stats(model).visual_after
        again = model.generate(**inputs, cache_implementation="static", **GEN)
    assert after == vtprune.stats(model).visual_after and max(after) < min(vtprune.stats(model).visual_before)
    assert torch.equal(static.sequences, dynamic.sequences)
    assert _max_score_diff(static, dynamic) < 1e-5
    assert torch.equal(again.sequences, static.sequences) and _max_score_diff(again, static) == 0.0
    assert _max_score_diff(static, unpatched) > 1e-2  # the static path did prune


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_static_cache_on_a_model_wide_sliding_window_equals_dynamic(attn):
    """A Mistral-style LM (one sliding window for every layer, shorter than the prompts): the padding recovered
    from the prepared sliding mask took every token before the last window for padding."""
    model = tiny.build("llava", attn, sliding_window=6)
    vtprune.patch(model, "divprune", keep=4)
    inputs = tiny.batch("llava", [1, 0])
    with torch.no_grad():
        dynamic = model.generate(**inputs, **GEN)
        static = model.generate(**inputs, cache_implementation="static", **GEN)
    assert torch.equal(static.sequences, dynamic.sequences) and _max_score_diff(static, dynamic) < 1e-5


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_static_cache_with_eager_attention_float_masks(model_factory, family):
    model = model_factory(family, attn="eager")
    inputs = tiny.batch(family, [0, 1, 2])
    vtprune.patch(model, "divprune", keep=4)
    with torch.no_grad():
        dynamic = model.generate(**inputs, **GEN)
        static = model.generate(**inputs, cache_implementation="static", **GEN)
    assert torch.equal(static.sequences, dynamic.sequences) and _max_score_diff(static, dynamic) < 1e-5


@pytest.mark.parametrize("method, options", [("fastv", {}), ("todre", {})])  # todre: its stage 2 is in the decoder
def test_static_cache_refuses_strategies_that_prune_inside_the_decoder(model_factory, method, options):
    model = model_factory("llava")
    vtprune.patch(model, method, keep=4, **options)
    with pytest.raises(NotImplementedError, match="static"):
        model.generate(**tiny.batch("llava", [0, 1]), cache_implementation="static", **GEN)


def test_static_cache_with_todre_stage1_only(model_factory):
    model = model_factory("llava")
    inputs = tiny.batch("llava", [0, 1, 2])
    vtprune.patch(model, "todre", keep=4, stage2=False)
    with torch.no_grad():
        dynamic = model.generate(**inputs, **GEN)
        static = model.generate(**inputs, cache_implementation="static", **GEN)
    assert torch.equal(static.sequences, dynamic.sequences) and _max_score_diff(static, dynamic) < 1e-5


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_compile_llm_gives_the_plain_path_tokens_and_undoes_cleanly(model_factory, family, monkeypatch):
    model = model_factory(family)
    lm = model.model.language_model
    inputs = tiny.batch(family, [0, 1, 2])
    gc = model.generation_config
    before = (gc.cache_implementation, gc.disable_compile)
    monkeypatch.setattr(model, "_previous_max_cache_length", 1, raising=False)  # generate()'s static-cache length
    with torch.no_grad():
        plain = model.generate(**inputs, **GEN)
        vtprune.patch(model, "divprune", keep=4)
        pruned = model.generate(**inputs, **GEN)
        vtprune.compile_llm(model, mode=None, backend="eager")  # dynamo traces; no code generation on the CPU
        vtprune.compile_llm(model, mode=None, backend="eager")  # again: replaces, does not stack
        assert (gc.cache_implementation, gc.disable_compile) == ("static", True)
        first = model.generate(**inputs, **GEN)
        second = model.generate(**inputs, **GEN)
        # the cache was allocated before the compiled prefill, so CUDA graphs see static addresses
        assert all(getattr(t, "_dynamo_static_input_type", None) for layer in first.past_key_values.layers
                   for t in (layer.keys, layer.values))
        vtprune.unpatch(model)
        compiled_plain = model.generate(**inputs, **GEN)
        assert vars(model)["_previous_max_cache_length"] > 1  # (the compiled runs' static cache) ...
        vtprune.uncompile_llm(model)
    assert "forward" not in vars(lm) and not hasattr(lm, "_vtprune_compiled")
    assert vars(model)["_previous_max_cache_length"] == 1  # ... forgotten: the length from before is back
    assert (gc.cache_implementation, gc.disable_compile) == before
    for out in (first, second):
        assert torch.equal(out.sequences, pruned.sequences) and _max_score_diff(out, pruned) < 1e-5
    assert torch.equal(compiled_plain.sequences, plain.sequences) and _max_score_diff(compiled_plain, plain) < 1e-5
    vtprune.uncompile_llm(model)  # a no-op when not compiled


def test_a_static_cache_reset_and_reused_forgets_the_last_pruning(model_factory):
    from transformers import StaticCache

    model = model_factory("llava")
    inputs = tiny.batch("llava", [0, 1, 2])
    cache = StaticCache(config=model.config.get_text_config(decoder=True), max_cache_len=64)
    arg = {_cache_kwarg(model.forward): cache}  # `cache=` from transformers 5.24, `past_key_values=` before
    with torch.no_grad():
        unpatched = model.generate(**inputs, **GEN)
        vtprune.patch(model, "divprune", keep=4)
        model.generate(**inputs, **arg, **GEN)
        cache.reset()
        vtprune.patch(model, "divprune", keep=10_000)  # keeps every token: no new record on the cache
        out = model.generate(**inputs, **arg, **GEN)
    assert torch.equal(out.sequences, unpatched.sequences) and _max_score_diff(out, unpatched) < 1e-5


def test_a_static_cache_follows_reset_and_crop_without_reading_its_length(model_factory):
    """Decode steps on a static cache count what they add instead of reading its length (a host sync): its
    reset() forgets the pruned record (a one-token prompt after it is a prompt, not a decode step of the last
    one), crop(-k) takes k decoded positions off (the same tokens fed again give the same logits), a crop into
    the pruned prompt is refused, and a deep copy or a pickle follows its own."""
    import copy
    import pickle

    from transformers import StaticCache

    model = model_factory("llava")
    inputs = tiny.batch("llava", [0])
    cache = StaticCache(config=model.config.get_text_config(decoder=True), max_cache_len=64)
    arg = {_cache_kwarg(model.forward): cache}
    n = inputs["input_ids"].shape[1]
    ids, one = torch.tensor([[5, 6, 7]]), torch.tensor([[9]])
    with torch.no_grad():
        fresh = model(input_ids=one, attention_mask=torch.ones_like(one)).logits
        vtprune.patch(model, "divprune", keep=4)
        model(**inputs, use_cache=True, **arg)
        steps = []
        for j in range(3):
            mask = torch.ones(1, n + j + 1, dtype=torch.long)
            steps.append(model(input_ids=ids[:, j:j + 1], attention_mask=mask, use_cache=True, **arg).logits)
        twin, pickled = copy.deepcopy(cache), pickle.loads(pickle.dumps(cache))
        cache.crop(-2)
        for j in (1, 2):
            mask = torch.ones(1, n + j + 1, dtype=torch.long)
            again = model(input_ids=ids[:, j:j + 1], attention_mask=mask, use_cache=True, **arg).logits
            torch.testing.assert_close(again, steps[j], rtol=0, atol=1e-6)
        with pytest.raises(NotImplementedError, match=r"crop\(-4\) of a static cache holding a pruned prefill would "
                                                      "cut into the prompt or more: 3 positions were decoded since"):
            cache.crop(-4)
        mask = torch.ones(1, n + 4, dtype=torch.long)  # the twin: 3 decoded, its own count
        after = model(input_ids=torch.tensor([[8]]), attention_mask=mask, use_cache=True,
                      **{_cache_kwarg(model.forward): twin}).logits
        pickled.crop(-1)  # (its own count: 3, then 2 after this)
        pickled_after = model(input_ids=torch.tensor([[7]]), attention_mask=torch.ones(1, n + 3, dtype=torch.long),
                              use_cache=True, **{_cache_kwarg(model.forward): pickled}).logits
        dynamic = model(**inputs, use_cache=True).past_key_values  # the same on a dynamic cache
        for j, token in enumerate([5, 6, 7, 8]):
            out = model(input_ids=torch.tensor([[token]]), attention_mask=torch.ones(1, n + j + 1, dtype=torch.long),
                        use_cache=True, **{_cache_kwarg(model.forward): dynamic})
        cache.reset()
        got = model(input_ids=one, attention_mask=torch.ones_like(one), use_cache=True, **arg).logits
    torch.testing.assert_close(got, fresh, rtol=0, atol=1e-6)
    torch.testing.assert_close(after, out.logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(pickled_after, steps[2], rtol=0, atol=1e-6)


def test_kv_cache_is_found_under_either_transformers_name():
    """transformers 5.24 renamed the KV cache argument and output field `past_key_values` -> `cache`."""
    from types import SimpleNamespace

    from transformers import DynamicCache

    from vtprune.hooks.runtime import kv_cache

    a, b = DynamicCache(), DynamicCache()  # empty caches are falsy (len 0): found all the same
    assert kv_cache({"cache": a}) is a and kv_cache({"past_key_values": b}) is b
    assert kv_cache({"cache": a, "past_key_values": b}) is a and kv_cache({"cache": None, "past_key_values": b}) is b
    assert kv_cache({}) is None and kv_cache(SimpleNamespace()) is None
    assert kv_cache(SimpleNamespace(cache=None, past_key_values=b)) is b and kv_cache(SimpleNamespace(cache=a)) is a


def test_uncompile_restores_a_forward_set_on_the_instance_before(model_factory):
    """A forward already on the language-model instance (accelerate's device hooks put one there) is
    compiled through and comes back on uncompile_llm (it used to be deleted with compile_llm's)."""
    model = model_factory("llava")
    lm = model.model.language_model
    calls = []
    plain = lm.forward

    def hooked(*args, **kwargs):
        calls.append(1)
        return plain(*args, **kwargs)

    lm.forward = hooked
    inputs = tiny.batch("llava", [0])
    with torch.no_grad():
        vtprune.compile_llm(model, mode=None, backend="eager")
        model(**inputs)
        assert calls  # compiled through the instance forward
        vtprune.uncompile_llm(model)
        assert vars(lm)["forward"] is hooked
        calls.clear()
        model(**inputs)
    assert calls == [1]


def test_compile_llm_defaults_to_cuda_graphs_and_lifts_dynamo_s_recompile_limit(model_factory, monkeypatch):
    """torch.compile is given mode "reduce-overhead" (CUDA graphs) unless told otherwise, and each compiled call runs
    with recompile_limit at RECOMPILE_LIMIT: past dynamo's 8 (all prompt lengths and mask kinds count together: one
    shared decorator frame), calls fell back to eager without a word. Outside the call, dynamo's own limit stands."""
    from vtprune.patching import RECOMPILE_LIMIT

    default = torch._dynamo.config.recompile_limit
    assert RECOMPILE_LIMIT > default
    given, limits = [], []

    def compile_(fn, **options):
        given.append(options)

        def run(*args, **kwargs):
            limits.append((torch._dynamo.config.recompile_limit, torch._dynamo.config.skip_nnmodule_hook_guards))
            return fn(*args, **kwargs)

        return run

    monkeypatch.setattr(torch, "compile", compile_)
    model = model_factory("llava")
    vtprune.compile_llm(model)
    vtprune.compile_llm(model, mode=None, backend="eager")
    assert [{"mode": None, **g} for g in given] == [{"mode": "reduce-overhead"}, {"mode": None, "backend": "eager"}]
    with torch.no_grad():
        model(**tiny.batch("llava", [0]))
    assert limits == [(RECOMPILE_LIMIT, False)] and torch._dynamo.config.recompile_limit == default
    assert torch._dynamo.config.skip_nnmodule_hook_guards  # (dynamo's default, outside the call)


def test_patching_after_compile_llm_recompiles_the_hooked_layers():
    """Decoder-layer hooks run inside the compiled language model; dynamo skips hook guards by default, so a graph
    traced before patching was reused: Qwen3-VL lost its deepstack features (the text-only graph), fastv pruned
    nothing (the hook-free graph)."""
    qwen = tiny.build("qwen3_vl")
    image = tiny.batch("qwen3_vl", [0])
    gen = dict(max_new_tokens=3, output_scores=True, return_dict_in_generate=True, **tiny.GEN)
    with torch.no_grad():
        want = vtprune.patch(qwen, "divprune", keep=4).generate(**image, **gen)
        vtprune.unpatch(qwen)
        vtprune.compile_llm(qwen, mode=None, backend="eager")
        for n in (9, 14):  # text-only prompts of two lengths: a graph with no deepstack inputs, dynamic in length
            ids = torch.tensor([[tiny.BOS, *range(10, 9 + n)]])
            qwen.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **dict(gen, max_new_tokens=1))
        got = vtprune.patch(qwen, "divprune", keep=4).generate(**image, **gen)
    assert torch.equal(got.sequences, want.sequences) and _max_score_diff(got, want) < 1e-5
    llava = tiny.build("llava")
    inputs = tiny.batch("llava", [0])
    with torch.no_grad():
        want = vtprune.patch(llava, "fastv", keep=4)(**inputs).logits
        vtprune.unpatch(llava)
        vtprune.compile_llm(llava, mode=None, backend="eager")
        llava(**inputs)  # traced with no hooks on the decoder's layers
        got = vtprune.patch(llava, "fastv", keep=4)(**inputs).logits
    assert vtprune.stats(llava).visual_after == [4]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
