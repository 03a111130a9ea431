"""The public verbs: patch, unpatch, pruned, stats."""
from __future__ import annotations

import contextlib

from .hooks import adapter_for
from .hooks.runtime import PatchState, Stats
from .methods.registry import build_method

_ATTR = "_vtprune"


def patch(model, method: str, **options):
    """Prune visual tokens in `model` with strategy `method`; returns the same model object.

    Options are the method's config fields: exactly one of `keep` (tokens per image) or `ratio`
    (fraction kept, in (0, 1]), plus the method's own options (see `vtprune methods`).
    Patching an already-patched model replaces the previous configuration.
    """
    built = build_method(method, options)  # validates name and options before touching the model
    adapter = adapter_for(model)
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
    return model


def unpatch(model):
    """Remove every hook `patch` installed; the model then behaves exactly as never patched."""
    state = getattr(model, _ATTR, None)
    if state is None:
        return model
    state.remove()
    delattr(model, _ATTR)
    return model


@contextlib.contextmanager
def pruned(model, method: str, **options):
    """`with vtprune.pruned(model, "random", ratio=0.25): ...` patches inside the block only.

    A configuration already on the model is restored on exit."""
    previous = getattr(model, _ATTR, None)
    prev_args = (previous.method_name, previous.options) if previous is not None else None
    patch(model, method, **options)
    try:
        yield model
    finally:
        unpatch(model)
        if prev_args is not None:
            patch(model, prev_args[0], **prev_args[1])


def stats(model) -> Stats:
    """Figures of the last forward that pruned (visual tokens before/after per sample, selection ms)."""
    state = getattr(model, _ATTR, None)
    if state is None:
        raise ValueError("model is not patched; call vtprune.patch(model, method, keep=...) first")
    return state.last_stats
