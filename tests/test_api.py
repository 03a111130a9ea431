"""The public contract: registry, option validation, errors, patch/unpatch/pruned, stats."""
import dataclasses
import subprocess
import sys

import pytest
import torch

import vtprune
from vtprune import tiny
from vtprune.methods.registry import build_method


def test_available_lists_baselines_sorted():
    names = vtprune.available()
    assert {"random", "pool", "fastv"} <= set(names)
    assert names == sorted(names)


def test_import_is_light():
    code = ("import sys, vtprune; heavy = [m for m in ('triton', 'timm', 'open_clip', 'lmms_eval', 'transformers') "
            "if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("kwargs, exc, words", [
    (dict(ratio=0.0), ValueError, ["ratio", "(0, 1]"]),
    (dict(ratio=1.5), ValueError, ["ratio", "(0, 1]"]),
    (dict(ratio=-0.1), ValueError, ["ratio"]),
    (dict(keep=0), ValueError, ["keep", ">= 1"]),
    (dict(keep=2.5), TypeError, ["keep"]),
    (dict(keep=4, ratio=0.5), ValueError, ["exactly one", "keep", "ratio"]),
    (dict(), ValueError, ["exactly one"]),
    (dict(keep=4, bogus=1), TypeError, ["bogus", "allowed", "seed"]),
])
def test_bad_options_raise_clear_errors(model_factory, kwargs, exc, words):
    model = model_factory("llava")
    with pytest.raises(exc) as err:
        vtprune.patch(model, "random", **kwargs)
    for w in words:
        assert w in str(err.value)
    assert not hasattr(model, "_vtprune")


def test_unknown_method_lists_available(model_factory):
    model = model_factory("llava")
    with pytest.raises(ValueError) as err:
        vtprune.patch(model, "nope", keep=4)
    assert "nope" in str(err.value) and "random" in str(err.value) and "fastv" in str(err.value)


def test_unsupported_model_lists_supported():
    model = torch.nn.Linear(2, 2)
    with pytest.raises(TypeError) as err:
        vtprune.patch(model, "random", keep=4)
    assert "Linear" in str(err.value) and "LlavaForConditionalGeneration" in str(err.value)
    assert "Qwen2VLForConditionalGeneration" in str(err.value)


def test_a_torch_compiled_model_is_refused_with_the_model_to_pass():
    """torch.compile(model)'s wrapper got the generic 'does not support OptimizedModule'."""
    model = tiny.build("llava")
    for verb in (lambda m: vtprune.patch(m, "random", keep=4), vtprune.compile_llm):
        with pytest.raises(TypeError, match=r"not torch.compile's wrapper \(OptimizedModule\): pass model._orig_mod "
                                            r"\(the LlavaForConditionalGeneration\)"):
            verb(torch.compile(model))
    assert not hasattr(model, "_vtprune")


def test_method_option_validation():
    with pytest.raises(ValueError, match="positions"):
        vtprune.patch(tiny.build("llava"), "pool", keep=4, positions="middle")
    with pytest.raises(ValueError, match="layer"):
        vtprune.patch(tiny.build("llava"), "fastv", keep=4, layer=0)
    for method in ("fastv", "transprune"):  # in-LLM drops keep original positions; renumbering is not built
        assert build_method(method, {"keep": 4}).config.keep_positions is True
        with pytest.raises(NotImplementedError, match="keep_positions=False"):
            vtprune.patch(tiny.build("llava"), method, keep=4, keep_positions=False)


@pytest.mark.parametrize("method, options, exc, words", [
    ("divprune", dict(keep=4, keep_positions="false"), TypeError, "keep_positions must be a bool"),
    ("fastv", dict(keep=4, keep_positions=1), TypeError, "keep_positions must be a bool"),
    ("token_shuffle", dict(s=2, keep_positions=0), TypeError, "keep_positions must be a bool"),
    ("transprune", dict(keep=4, abs_cos="no"), TypeError, "abs_cos must be a bool"),
    ("transprune", dict(keep=4, accumulate_from="2"), TypeError, "accumulate_from must be an int"),
    ("transprune", dict(keep=4, accumulate_from=True), TypeError, "accumulate_from must be an int"),
    ("transprune", dict(keep=4, schedule=[(1, 0.5), (2, 0.25)], accumulate_from=3), ValueError, "after the last drop"),
    ("transprune", dict(keep=4, schedule=[(1, "abc")]), TypeError, "schedule fraction must be a number"),
    ("transprune", dict(keep=4, schedule=[(1, "0.5")]), TypeError, "schedule fraction must be a number"),
    ("transprune", dict(keep=4, schedule=[(True, 0.5)]), TypeError, "schedule layer must be an int"),
    ("transprune", dict(keep=4, schedule=[5]), ValueError, "pairs"),
    ("transprune", dict(keep=4, schedule=[(1, float("nan"))]), ValueError, "schedule fraction must be a finite"),
    ("todre", dict(keep=4, stage2=False, stage2_layer=2), ValueError, "needs stage2=True"),
    ("todre", dict(keep=4, stage2=False, tau=0.3), ValueError, "tau is stage 2's threshold; it needs stage2=True"),
    ("vflowopt", dict(keep=4, t=float("nan")), ValueError, "t must be a finite number >= 0.0"),
    ("vflowopt", dict(keep=4, t=float("inf")), ValueError, "t must be a finite"),
    ("vflowopt", dict(keep=4, t=10**400), ValueError, "t must be a finite"),
    ("vflowopt", dict(keep=4, alpha=float("nan")), ValueError, "alpha must be a finite number"),
    ("vflowopt", dict(keep=4, pixel_mean=(0.5,)), ValueError, "pixel_mean must be 3 numbers"),
    ("vflowopt", dict(keep=4, pixel_std=(0.2, 0.0, 0.2)), ValueError, r"pixel_std\[1\] must be a finite number > 0.0"),
    ("random", dict(keep=4, seed=2**64), ValueError, "seed must be an int in"),
    ("hiprune", dict(keep=4, object_layer=7), ValueError, r"object_layer=7: must be an int in \[-3, 3\)"),
    ("hiprune", dict(keep=4, deep_layer=-4), ValueError, r"deep_layer=-4: must be an int in \[-3, 3\)"),
])
def test_option_errors_name_the_option_at_patch_time(model_factory, method, options, exc, words):
    model = model_factory("llava")
    with pytest.raises(exc, match=words):
        vtprune.patch(model, method, **options)
    assert not hasattr(model, "_vtprune")


def test_transprune_schedule_alone_sets_every_drop_and_the_budget(model_factory):
    """A schedule with no keep/ratio: each drop keeps its fraction, the last one as the budget (spec:
    the schedule overrides everything); with a keep, the last drop keeps that keep."""
    model = model_factory("llava")
    inputs = tiny.batch("llava", [0])
    with torch.no_grad():
        vtprune.patch(model, "transprune", schedule=[(1, 0.5), (2, 0.25)])
        model(**inputs)
        alone = vtprune.stats(model).layer_tokens
        vtprune.patch(model, "transprune", schedule=[(1, 0.5), (2, 0.25)], keep=6)
        model(**inputs)
        with_keep = vtprune.stats(model).layer_tokens
    text = alone[0][0] - 16
    assert [n[0] - text for n in alone] == [16, 16, 8, 4]
    assert [n[0] - text for n in with_keep] == [16, 16, 8, 6]


@pytest.mark.parametrize("options, words", [
    (dict(stage1=False, ratio=0.5), "keep / ratio set stage 1's budget"),
    (dict(stage1=False, keep=8), "keep / ratio set stage 1's budget"),
    (dict(stage1=False, stage2=False), "prune nothing"),
    (dict(stage1=0), "stage1"),
])
def test_todre_stage2_alone_takes_no_budget(options, words):
    from vtprune.methods.todre import ToDREConfig

    with pytest.raises((ValueError, TypeError), match=words):
        ToDREConfig(**options)
    assert ToDREConfig(stage1=False).ratio == ToDREConfig(stage1=False, ratio=1.0).ratio == 1.0


def test_transprune_without_any_budget_runs_the_papers_high_setting(model_factory):
    """No keep, ratio or schedule: the paper's "High" setting, its layers scaled to the 4-layer decoder
    (default_schedule(4): after layers 0 and 1, int(16 * 0.625) = 10 then int(16 * 0.125) = 2 of 16 tokens)."""
    model = model_factory("llava")
    with torch.no_grad():
        vtprune.patch(model, "transprune")
        model(**tiny.batch("llava", [0, 1]))
    st = vtprune.stats(model)
    text = [n - 16 for n in st.layer_tokens[0]]
    assert [[n - t for n, t in zip(ns, text)] for ns in st.layer_tokens] == [[16, 16], [10, 10], [2, 2], [2, 2]]
    assert st.visual_after == [2, 2] and st.images == [(0, 16, 2), (1, 16, 2)]


def test_config_typos_and_an_explicit_budget_over_a_files_s(model_factory):
    model = model_factory("llava")
    with pytest.raises(ValueError, match="'option': did you mean 'options'"):
        vtprune.patch(model, config={"method": "vflowopt", "option": {"r2": 0.5}}, ratio=0.25)
    vtprune.patch(model, config={"method": "token_shuffle", "options": {"s": 3}, "tuned": {"note": 1}}, keep=4)
    assert model._vtprune.method.config.s is None and model._vtprune.method.config.keep == 4


def test_fastv_layer_beyond_depth_leaves_model_unpatched(model_factory):
    model = model_factory("llava")
    n = len(model.model.language_model.layers)
    hooks_before = _hook_count(model)
    with pytest.raises(ValueError, match="decoder layers"):
        vtprune.patch(model, "fastv", keep=4, layer=n)
    assert not hasattr(model, "_vtprune") and _hook_count(model) == hooks_before


def _hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_failed_repatch_keeps_previous_config(model_factory):
    model = model_factory("llava")
    vtprune.patch(model, "random", ratio=0.5)
    hooks = _hook_count(model)
    with pytest.raises(ValueError):
        vtprune.patch(model, "random", ratio=2.0)
    assert model._vtprune.method_name == "random" and _hook_count(model) == hooks


def test_a_repatch_whose_install_fails_leaves_the_previous_pruning_working(model_factory, monkeypatch):
    """The new configuration is built, the old one removed, then the new one's hooks fail to install: the old
    one is installed again, hooks and all (it was named on the model with no hooks left: silently unpruned)."""
    from vtprune.hooks import adapter_for

    model, inputs = model_factory("llava"), tiny.batch("llava", [0])
    vtprune.patch(model, "random", keep=4)
    hooks = _hook_count(model)
    cls, calls = type(adapter_for(model)), []
    real = cls.install_hooks

    def failing_once(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("install failed")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(cls, "install_hooks", failing_once)
    with pytest.raises(RuntimeError, match="install failed"):
        vtprune.patch(model, "pool", keep=4)
    assert model._vtprune.method_name == "random" and _hook_count(model) == hooks
    with torch.no_grad():
        model(**inputs)
    assert vtprune.stats(model).visual_after == [4]


def test_patch_returns_same_object_and_repatch_replaces(model_factory):
    model = model_factory("llava")
    untouched = _hook_count(model)
    assert vtprune.patch(model, "random", ratio=0.5) is model
    hooks = _hook_count(model)
    vtprune.patch(model, "pool", ratio=0.25)
    assert _hook_count(model) == hooks  # replaced, not stacked
    assert model._vtprune.method_name == "pool"
    vtprune.unpatch(model)
    assert _hook_count(model) == untouched and not hasattr(model, "_vtprune")


@pytest.mark.parametrize("family, task", [("llava", None), ("qwen2_vl", None), ("llava", "CAUSAL_LM")])
def test_a_peft_model_is_patched_through_the_model_it_wraps(family, task):
    """patch, pruned, stats, unpatch and compile_llm take a PeftModel (get_peft_model, PeftModel.from_pretrained)
    and act on the model it wraps, whose forward and generate() it runs; patch refused it before ("does not
    support PeftModel"). Its pruned outputs are those of the merged model's, and unpatch is bit-identical."""
    import copy

    from peft import LoraConfig, get_peft_model

    from vtprune.patching import compiled_options

    model = tiny.build(family)
    torch.manual_seed(1)
    lora = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "qkv"], init_lora_weights=False,
                                            task_type=task)).eval()  # (CAUSAL_LM: its own generate())
    merged = copy.deepcopy(lora).merge_and_unload()
    inputs = tiny.batch(family, [0, 1])
    gen = dict(max_new_tokens=3, **tiny.GEN)
    with torch.no_grad():
        plain = lora.generate(**inputs, **gen)
        assert vtprune.patch(lora, "divprune", keep=4) is lora
        got = lora.generate(**inputs, **gen)
        assert vtprune.stats(lora).visual_after == [4, 4]
        with vtprune.pruned(merged, "divprune", keep=4):
            assert torch.equal(got, merged.generate(**inputs, **gen))
        with vtprune.unpatched(lora) as same:
            assert same is lora and torch.equal(lora.generate(**inputs, **gen), plain)
        assert torch.equal(lora.generate(**inputs, **gen), got)
        assert vtprune.unpatch(lora) is lora and not hasattr(lora.get_base_model(), "_vtprune")
        assert torch.equal(lora.generate(**inputs, **gen), plain)
        with vtprune.pruned(lora, "random", keep=2) as same:
            assert same is lora and lora.get_base_model()._vtprune.method_name == "random"
        assert not hasattr(lora.get_base_model(), "_vtprune")
    assert vtprune.compile_llm(lora, mode=None, backend="eager") is lora
    assert compiled_options(lora) == {"mode": None, "backend": "eager"}
    assert vtprune.uncompile_llm(lora) is lora and compiled_options(lora) is None


@pytest.mark.parametrize("family", tiny.FAMILIES)
@pytest.mark.parametrize("method", ["random", "pool", "fastv", "vision_attn_test"])
def test_attn_implementation_never_changes(model_factory, family, method):
    model = model_factory(family)
    before = (model.config._attn_implementation, model.config.text_config._attn_implementation,
              model.config.vision_config._attn_implementation)
    vtprune.patch(model, method, ratio=0.5)
    with torch.no_grad():
        model(**tiny.batch(family, [0, 1]))
    after = (model.config._attn_implementation, model.config.text_config._attn_implementation,
             model.config.vision_config._attn_implementation)
    assert before == after == ("sdpa", "sdpa", "sdpa")


def test_pruned_context_restores(model_factory):
    model = model_factory("llava")
    vtprune.patch(model, "random", ratio=0.5, seed=3)
    with vtprune.pruned(model, "pool", ratio=0.25):
        assert model._vtprune.method_name == "pool"
    assert model._vtprune.method_name == "random" and model._vtprune.method.config.seed == 3
    vtprune.unpatch(model)
    with vtprune.pruned(model, "random", keep=2):
        pass
    assert not hasattr(model, "_vtprune")


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_stats_per_sample(model_factory, family):
    model = model_factory(family)
    vtprune.patch(model, "random", ratio=0.25)
    inputs = tiny.batch(family, [0, 1, 2])
    with torch.no_grad():
        model(**inputs)
    st = vtprune.stats(model)
    n_visual = (inputs["input_ids"] == tiny.IMG).sum(1).tolist()
    assert st.visual_before == n_visual
    assert st.visual_after == [max(1, round(0.25 * n)) for n in n_visual]
    assert st.selection_ms > 0 and st.method == "random"
    assert st.layout.shape[0] == 3


@pytest.mark.parametrize("method", ["divprune", "fastv"])  # before the LLM; inside it
def test_stats_of_a_forward_with_every_image_under_budget_say_all_kept(model_factory, method):
    """Nothing over budget: no selection runs, and the figures say every visual token stayed (visual_after
    left empty read as kept_fraction 0.0, "everything pruned")."""
    model = model_factory("llava")
    inputs = tiny.batch("llava", [0, 1])
    vtprune.patch(model, method, keep=10_000)
    with torch.no_grad():
        model(**inputs)
    st = vtprune.stats(model)
    n_visual = (inputs["input_ids"] == tiny.IMG).sum(1).tolist()
    assert st.visual_before == st.visual_after == n_visual and st.kept_fraction == 1.0


def test_selection_ms_is_in_milliseconds(model_factory, monkeypatch):
    """stats.selection_ms: the selection's wall time in ms; a selection that sleeps 50 ms reads >= 50 and no
    more than the whole forward took."""
    import time

    from vtprune.methods.registry import get_method

    cls = get_method("random")
    real = cls.select
    monkeypatch.setattr(cls, "select", lambda self, im: time.sleep(0.05) or real(self, im))
    model = model_factory("llava")
    vtprune.patch(model, "random", keep=4)
    inputs = tiny.batch("llava", [0])
    with torch.no_grad():
        t0 = time.perf_counter()
        model(**inputs)
        wall_ms = (time.perf_counter() - t0) * 1e3
    assert 50 <= vtprune.stats(model).selection_ms <= wall_ms


def test_selection_in_llm_ms_is_the_part_spent_inside_the_decoder(model_factory, monkeypatch):
    """ToDRE selects twice: stage 1 before the language model (50 ms here), stage 2 inside it (30 ms):
    selection_ms holds both, selection_in_llm_ms the second only (bench adds the rest to the prefill)."""
    import time

    from vtprune.methods.registry import get_method

    cls = get_method("todre")
    first, second = cls.select, cls.select_in_llm  # (one image: select, not select_batch)
    monkeypatch.setattr(cls, "select", lambda self, im: time.sleep(0.05) or first(self, im))
    monkeypatch.setattr(cls, "select_in_llm", lambda self, t: time.sleep(0.03) or second(self, t))
    model = model_factory("llava")
    vtprune.patch(model, "todre", keep=4)
    with torch.no_grad():
        model(**tiny.batch("llava", [0]))
    st = vtprune.stats(model)
    assert 30 <= st.selection_in_llm_ms < 50 <= st.selection_ms - st.selection_in_llm_ms
    vtprune.patch(model, "random", keep=4)
    with torch.no_grad():
        model(**tiny.batch("llava", [0]))
    assert vtprune.stats(model).selection_in_llm_ms == 0 < vtprune.stats(model).selection_ms


def test_stats_requires_patch(models):
    with pytest.raises(ValueError, match="not patched"):
        vtprune.stats(models("llava"))


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_text_only_inputs_pass_through(model_factory, family):
    model = model_factory(family)
    ids = torch.tensor([[tiny.BOS, 5, 6, 7, 8], [tiny.PAD, tiny.BOS, 9, 10, 11]])
    mask = (ids != tiny.PAD).long()
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
        ref_gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, **tiny.GEN)
        vtprune.patch(model, "random", ratio=0.25)
        out = model(input_ids=ids, attention_mask=mask).logits
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, **tiny.GEN)
    assert torch.equal(ref, out) and torch.equal(ref_gen, gen)


def test_configs_are_dataclasses_with_to_dict():
    from vtprune.methods.registry import get_method
    for name in ("random", "pool", "fastv"):
        cfg = get_method(name).Config(keep=8)
        assert dataclasses.is_dataclass(cfg) and cfg.to_dict()["keep"] == 8


def test_register_rejects_bad_names_and_duplicates():
    with pytest.raises(ValueError):
        vtprune.register("Bad Name")
    with pytest.raises(ValueError, match="already registered"):
        @vtprune.register("random")
        class Other(vtprune.Method):
            stage = "projector"
    for bad in ("bad name", "bad-name", "bad.name", "9bad", "_bad", "", 3):  # (a lowercase start is not enough)
        with pytest.raises(ValueError, match="lowercase identifiers"):
            vtprune.register(bad)

    class NoStage(vtprune.Method):
        stage = "encoder"

    class BadConfig(vtprune.Method):
        stage = "projector"
        Config = dict

    with pytest.raises(TypeError, match="subclass of vtprune.Method"):
        vtprune.register("not_a_method_test")(type("NotAMethod", (), {"stage": "projector"}))
    with pytest.raises(ValueError, match="stage 'encoder'"):
        vtprune.register("no_stage_test")(NoStage)
    with pytest.raises(TypeError, match="Config must subclass"):
        vtprune.register("bad_config_test")(BadConfig)
    assert not {"not_a_method_test", "no_stage_test", "bad_config_test"} & set(vtprune.available())
    from vtprune.methods.registry import get_method
    with pytest.raises(TypeError, match="must be a name"):
        get_method(vtprune.Method)


def test_option_help_takes_a_config_subclass_comment_over_its_base():
    from vtprune.methods.registry import option_help

    @dataclasses.dataclass
    class Config(vtprune.PruneConfig):
        keep: int | None = None  # this strategy's own words on keep

    class Strategy(vtprune.Method):
        stage = "projector"

    Strategy.Config = Config
    notes = {name: note for name, _, _, note in option_help(Strategy)}
    assert notes["keep"] == "this strategy's own words on keep"
    assert notes["ratio"] == "fraction of each image's visual tokens kept, in (0, 1]"  # (the base's)


def test_cli_methods_lists_stage_and_options():
    from vtprune.cli import main
    import io, contextlib
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["methods"]) == 0
    text = buf.getvalue()
    assert "fastv  (stage: llm)" in text and "pool  (stage: projector)" in text
    assert "seed: int = 0" in text and "layer: int = 2" in text
    # each option's help is the comment beside it in the config class
    assert "s: int | None = None  # window side; None with no keep/ratio means s=2" in text
    assert "tau: float = 0.1  # stage 2 drops" in text


def test_cli_methods_lists_a_strategy_registered_without_a_docstring(capsys):
    """`vtprune methods` failed (IndexError) on the first registered strategy with no docstring."""
    from vtprune.cli import main

    @vtprune.register("undocumented_test")
    class Undocumented(vtprune.Method):
        stage = "projector"

        def select(self, image):
            return vtprune.Selection(torch.arange(image.keep))

    assert main(["methods"]) == 0
    assert "undocumented_test  (stage: projector)\n" in capsys.readouterr().out


def test_mark_records_a_timing_event_on_the_tensors_stream(monkeypatch):
    from types import SimpleNamespace

    from vtprune.hooks import runtime

    made = []

    class Event:
        def __init__(self, enable_timing=False):
            self.enable_timing, self.stream = enable_timing, None
            made.append(self)

        def record(self, stream=None):
            self.stream = stream

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: f"stream of {device}")
    e = runtime.mark(SimpleNamespace(is_cuda=True, device="cuda:1"))
    assert made == [e] and e.enable_timing and e.stream == "stream of cuda:1"
    assert isinstance(runtime.mark(torch.zeros(1)), float) and len(made) == 1  # the CPU: perf_counter


def test_cuda_selection_spans_are_read_by_stats_with_no_sync_in_the_forward(model_factory, cuda_marks):
    """On CUDA the selection is timed by events: the forward never synchronises (a sync per selecting
    decoder layer stalled the launch queue); `vtprune.stats` waits for each span's stop event and sums
    them, once. ToDRE: stage 1 spans marks 0-1 (2 - 1 = 1 ms), stage 2 marks 2-3 (8 - 4 = 4 ms)."""
    from vtprune.hooks import runtime
    from vtprune.patching import _state

    cuda_marks.into(runtime)
    synced = cuda_marks.synced
    model = model_factory("llava")
    vtprune.patch(model, "todre", keep=4)
    with torch.no_grad():
        model(**tiny.batch("llava", [0]))
    assert synced == [] and len(_state(model).last_stats.pending) == 2
    st = vtprune.stats(model)
    assert [e.t for e in synced] == [2.0, 8.0]
    assert (st.selection_ms, st.selection_in_llm_ms) == (5.0, 4.0) and st.pending == []
    st = vtprune.stats(model)
    assert (st.selection_ms, st.selection_in_llm_ms) == (5.0, 4.0) and len(synced) == 2
