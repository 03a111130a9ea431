"""The public verbs: patch, unpatch, pruned, stats, and the opt-in compiled path compile_llm / uncompile_llm."""
from __future__ import annotations

import contextlib
import json
import os

from .hooks import adapter_class, adapter_for
from .hooks.base import Restore
from .hooks.runtime import PatchState, Stats, compileable, kv_cache
from .methods.registry import build_method

_ATTR = "_vtprune"
_COMPILED = "_vtprune_compiled"
RECOMPILE_LIMIT = 64  # compiled variants of the language model (prompt lengths x batch sizes x mask kinds)


def read_config(config):
    """A config file's JSON object (read once); anything else as given."""
    if isinstance(config, (str, os.PathLike)):
        path = os.fspath(config)
        with open(path) as f:
            try:
                config = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"config file {path!r} is not valid JSON: {e}") from None
        if not isinstance(config, dict):
            raise ValueError(f"config file {path!r} holds a JSON {type(config).__name__}, not an object "
                             '{"method": ..., "options": {...}}')
    return config


def load_config(config, method: str | None = None) -> tuple[str | None, dict]:
    """(method, options) from a config file path (JSON, as `vtprune tune` writes) or a dict:
    {"method": "vflowopt", "options": {"ratio": 0.26, "r2": 0.98, ...}, ...other keys ignored}.
    `method`: the strategy the caller names (its options are refused beside "options", as the file's)."""
    config = read_config(config)
    if not isinstance(config, dict):
        raise TypeError(f"config must be a path to a JSON file or a dict, got {type(config).__name__}")
    import difflib

    for key in config:  # other keys (e.g. "tuned") are notes; a near-miss of a meaningful one is a typo
        near = difflib.get_close_matches(key, ["method", "options", "label"], n=1, cutoff=0.7)
        if near and near[0] != key:
            raise ValueError(f"config key {key!r}: did you mean {near[0]!r}? (keys read: 'method', 'options'; "
                             "'label' by vtprune sweep)")
    options = config.get("options", {})
    if not isinstance(options, dict):
        raise ValueError("config 'options' must be a mapping of option names to values")
    named, method = method, config.get("method")
    if method is not None and not isinstance(method, str):
        raise ValueError(f"config 'method' must be a name, got {method!r}")
    from .methods.registry import available, get_method

    names = {"keep", "ratio"}  # an option beside "options" would be read as a note: its value silently unused
    for m in {named, method} & set(available()):
        import dataclasses

        names |= {f.name for f in dataclasses.fields(get_method(m).Config)}
    if misplaced := sorted(names & set(config)):
        raise ValueError(f"config keys {misplaced} are the method's options: put them under \"options\"")
    return method, dict(options)


def _resolve(method, config, options) -> tuple[str, dict]:
    if config is None:
        if method is None:
            raise TypeError("patch() needs a method name (or config=FILE naming one)")
        return method, options
    file_method, file_options = load_config(config, method)
    if method is not None and file_method is not None and method != file_method:
        raise ValueError(f"method {method!r} differs from the config's {file_method!r}")
    method = method or file_method
    if method is None:
        raise ValueError("the config names no method; pass one: patch(model, 'name', config=...)")
    from .methods.registry import get_method

    budget = get_method(method).Config.budget_fields  # keep, ratio (token_shuffle: and s)
    if options.keys() & set(budget):  # an explicit budget replaces the file's
        for name in budget:
            file_options.pop(name, None)
    return method, {**file_options, **options}


def patch(model, method: str | None = None, *, config=None, **options):
    """Prune visual tokens in `model` with strategy `method`; returns the same model object.

    Options are the method's config fields: exactly one of `keep` (tokens per image) or `ratio`
    (fraction kept, in (0, 1]), plus the method's own options (see `vtprune methods`); transprune with
    neither runs its paper's "High" schedule.
    `config` is a JSON file (e.g. written by `vtprune tune`) or dict giving the method and its
    options; keyword options override the file's (an explicit keep/ratio replaces its budget).
    Patching an already-patched model replaces the previous configuration. A PEFT model (get_peft_model,
    PeftModel.from_pretrained) patches the model it wraps.
    """
    method, options = _resolve(method, config, options)
    built = build_method(method, options)  # validates name and options before touching the model
    wrapper, model = model, _base(model)
    try:
        adapter = adapter_for(model)
    except TypeError as e:
        if _is_vit(model):
            raise TypeError(f"{e}. {type(model).__name__} is a vision transformer: use vtprune.patch_vit(model, "
                            f"{method!r}, ...), which prunes inside its blocks") from None
        raise
    state = PatchState(adapter, built, method, dict(options))
    previous = getattr(model, _ATTR, None)
    if previous is not None:
        unpatch(model)
    try:
        state.install()
    except BaseException:
        if previous is not None:  # leave the model as it was before this call
            previous.install()
            setattr(model, _ATTR, previous)
        raise
    setattr(model, _ATTR, state)
    return wrapper


def _base(model):
    """The model a PEFT wrapper runs (its forward and generate() call that model's), else `model`."""
    if type(model).__module__.startswith("peft.") and hasattr(model, "get_base_model"):
        return model.get_base_model()
    return model


def _state(model):
    """What patch / patch_vit attached to `model`; for an open_clip CLIP model, also its patched visual tower,
    and for an open_clip timm tower (or a CLIP model with one), its patched timm trunk."""
    model = _base(model)
    state = getattr(model, _ATTR, None)
    visual = getattr(model, "visual", None)
    for m in (visual, getattr(visual, "trunk", None), getattr(model, "trunk", None)):
        if state is None:
            state = getattr(m, "__dict__", {}).get(_ATTR)
    return state


def unpatch(model):
    """Remove every hook `patch` installed; the model then behaves exactly as never patched."""
    state = _state(model)
    if state is None:
        return model
    state.remove()
    base = _base(model)
    if base.__dict__.get(_ATTR) is state:  # (a ViT's state detaches itself)
        delattr(base, _ATTR)
    return model


@contextlib.contextmanager
def pruned(model, method: str | None = None, *, config=None, **options):
    """`with vtprune.pruned(model, "random", ratio=0.25): ...` patches inside the block only (a timm or
    open_clip ViT through `patch_vit`, which also takes `layer`).

    A configuration already on the model is restored on exit."""
    previous = _state(model)
    if _is_vit(model):
        if config is not None:
            raise ValueError("pruned: config files are for vision-language models; pass a ViT's options directly")
        from .vit import patch_vit

        patch_vit(model, method, **options)
    else:
        patch(model, method, config=config, **options)
    try:
        yield model
    finally:
        unpatch(model)
        _reinstall(model, previous)


@contextlib.contextmanager
def unpatched(model):
    """`with unpatched(model): ...` runs the block on the model as never patched (the eval harness's
    baseline rows); a configuration on the model is put back on exit."""
    previous = _state(model)
    unpatch(model)
    try:
        yield model
    finally:
        _reinstall(model, previous)


def _reinstall(model, previous) -> None:
    if previous is not None:
        previous.install()
        if _state(model) is not previous:  # (a ViT's state attaches itself)
            setattr(_base(model), _ATTR, previous)


def _is_vit(model) -> bool:
    """A model patch_vit handles (and `patch` does not)."""
    model = _base(model)
    if adapter_class(model) is not None:
        return False
    from .vit import tower

    try:
        tower(model)
    except TypeError:
        return False
    except ValueError:  # a ViT patch_vit refuses: let it say why
        pass
    return True


def stats(model) -> Stats:
    """Figures of the last forward that pruned (visual tokens before/after per sample, selection ms). On CUDA
    the selection is timed by events that this call reads, waiting for that forward's selection to finish."""
    state = _state(model)
    if state is None:
        raise ValueError("model is not patched; call vtprune.patch(model, method, keep=...) (a ViT: "
                         "vtprune.patch_vit) first")
    return state.last_stats.settle()


def check_compilable(model):
    """The language model `compile_llm` would compile; a ValueError for a model it does not support."""
    lm = adapter_for(_base(model)).language_model()
    if "linear_attention" in (getattr(lm.config, "layer_types", None) or ()):
        raise ValueError(f"compile_llm does not support {type(model).__name__}: its linear-attention layers would "
                         "allocate their states inside the compiled prefill, where CUDA graphs do not hold them "
                         "(run it uncompiled; a static cache works: generate(..., cache_implementation='static'))")
    return lm


def compile_llm(model, mode: str | None = "reduce-overhead", **compile_options):
    """Opt-in fast path for small batches, where transformers' Python loop over the decoder layers costs
    more than the pruned prefill itself: `torch.compile` the language model only (mode
    "reduce-overhead" records CUDA graphs) and make `generate()` use a static KV cache, so that decode
    steps keep one shape. Works patched or not, before or after `patch`; returns the same model.

    The pre-LLM pruning runs outside the compiled region (around the language model's call); hooks on the
    decoder's layers (in-LLM strategies, Qwen3-VL's deepstack) run inside it, guarded so that patching
    after compiling recompiles. generate()'s own auto-compile of the whole forward is switched off. The
    first calls at each new prompt length compile (seconds to minutes); a static cache does not shrink with
    pruning (it is sized for the unpruned prompt), and strategies that drop tokens inside the decoder (fastv,
    transprune, vflowopt, todre unless stage2=False) cannot use it. `uncompile_llm` undoes all of this.
    Extra keyword arguments go to `torch.compile` (`mode=None, backend="eager"` traces without
    generating code, e.g. on a CPU without a compiler)."""
    wrapper, model = model, _base(model)
    lm = check_compilable(model)
    uncompile_llm(model)
    gc = model.generation_config
    saved = {"cache_implementation": gc.cache_implementation, "disable_compile": gc.disable_compile}
    restore = Restore(lm, "forward")  # puts back a forward already on the instance (accelerate's device hooks)
    if mode is not None:
        compile_options["mode"] = mode
    lm.forward = _CompiledForward(lm, lm.forward, compile_options)
    # generate() sizes a static cache for the longest prompt since (kept on the model to avoid recompiling):
    # uncompile_llm puts back what was there before
    setattr(lm, _COMPILED, (saved, restore, cache_length(model), dict(compile_options)))
    gc.cache_implementation, gc.disable_compile = "static", True
    return wrapper


class _CompiledForward:
    """compile_llm's forward for a language model: `target` (its forward) compiled, with the static cache
    allocated first. copy.deepcopy / pickle give the copy its own, compiled again for the copied model
    (a closure would keep running the original's compiled forward)."""

    def __init__(self, lm, target, options: dict):
        import torch

        self.lm, self.target, self.options = lm, target, options
        self.compiled = torch.compile(target, **options)

    def __call__(self, *args, **kwargs):
        import torch

        _init_static_cache(self.lm, kwargs)
        # Every transformers model's forward shares one decorator frame, so dynamo's per-frame recompile
        # limit (8) counts all shapes and mask kinds together; past it, calls silently fall back to eager.
        # Hooks on the decoder's layers (in-LLM strategies, Qwen3-VL's deepstack) run inside the compiled
        # region: dynamo must not reuse a graph traced under other hooks (before patch, another strategy),
        # which it does by default (skip_nnmodule_hook_guards).
        with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT, skip_nnmodule_hook_guards=False):
            return self.compiled(*args, **kwargs)

    def __reduce__(self):
        return _CompiledForward, (self.lm, self.target, self.options)

    def __deepcopy__(self, memo):
        import copy

        return _CompiledForward(copy.deepcopy(self.lm, memo), copy.deepcopy(self.target, memo), self.options)


def _init_static_cache(lm, kwargs):
    """Allocate a static cache's tensors before the compiled prefill, not inside it: allocated while
    tracing they would not be marked as static addresses, and CUDA graphs would copy or skip them
    (transformers compiles only decode steps, so it never meets this)."""
    cache = kv_cache(kwargs)
    if not compileable(cache) or all(layer.is_initialized for layer in cache.layers):
        return
    x = kwargs.get("inputs_embeds")
    if x is None:
        x = kwargs["input_ids"]
    cfg = lm.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    weight = lm.get_input_embeddings().weight
    cache.early_initialization(x.shape[0], cfg.num_key_value_heads, head_dim, weight.dtype, x.device)


def uncompile_llm(model):
    """Undo `compile_llm`: the language model's own forward and the previous generation settings."""
    wrapper, model = model, _base(model)
    lm = adapter_for(model).language_model()
    record = getattr(lm, _COMPILED, None)
    if record is None:
        return wrapper
    saved, restore, length, _ = record
    restore.remove()
    for key, value in saved.items():
        setattr(model.generation_config, key, value)
    set_cache_length(model, length)
    delattr(lm, _COMPILED)
    return wrapper


def compiled_options(model) -> dict | None:
    """The options `compile_llm` was given for this model (mode included), or None if it is not compiled."""
    record = getattr(adapter_for(_base(model)).language_model(), _COMPILED, None)
    if record is None:
        return None
    return {"mode": None, **record[3]}


_CACHE_LENGTH = "_previous_max_cache_length"  # where generate() keeps the longest static-cache length so far


def cache_length(model) -> tuple[bool, int | None]:
    """(whether the model holds one, the length) of generate()'s remembered static-cache length."""
    return _CACHE_LENGTH in model.__dict__, model.__dict__.get(_CACHE_LENGTH)


def set_cache_length(model, length: tuple[bool, int | None]) -> None:
    """Put back what `cache_length` returned (removing the attribute if there was none)."""
    had, value = length
    if had:
        setattr(model, _CACHE_LENGTH, value)
    else:
        model.__dict__.pop(_CACHE_LENGTH, None)
