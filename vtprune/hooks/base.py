"""Adapter base: what a model family must tell the runtime. One small subclass per family."""
from __future__ import annotations

import functools
import inspect
import threading

import torch

from ..kernels import attention_scores
from ..methods.base import VisionSignal


class Adapter:
    """Paths and token bookkeeping for one model family. Knows nothing about strategies."""

    mrope = False  # True: 3-row (t, h, w) rotary positions (Qwen-VL)
    has_cls = False  # the vision encoder has a CLS token

    def __init__(self, model):
        self.model = model

    # module paths ---------------------------------------------------------------------------
    def inner(self):
        return self.model.model

    def language_model(self):
        return self.model.model.language_model

    # per call -------------------------------------------------------------------------------
    def read_call(self, kwargs) -> dict:
        """What the runtime needs from a `*Model.forward` call (token ids, grids, pixels present)."""
        raise NotImplementedError

    def visual_token_ids(self) -> list[int]:
        raise NotImplementedError

    def visual_mask(self, scratch: dict, embeds: torch.Tensor) -> torch.Tensor | None:
        """BoolTensor [B, L] of visual placeholder slots, or None when the call's tokens are unknown."""
        masks = [self.token_mask(scratch, tid, embeds.shape[:2]) for tid in self.visual_token_ids()]
        if any(m is None for m in masks):
            return None
        out = masks[0]
        for m in masks[1:]:
            out = out | m
        return out

    def token_mask(self, scratch: dict, token_id: int, shape) -> torch.Tensor | None:
        """Where `token_id` sits, from input_ids or else from the placeholder embeddings."""
        ids = scratch.get("input_ids")
        if ids is not None:
            return ids == token_id if tuple(ids.shape) == tuple(shape) else None
        raw = scratch.get("inputs_embeds")
        if raw is None or tuple(raw.shape[:2]) != tuple(shape):
            return None
        row = self.model.get_input_embeddings().weight[token_id].to(raw.dtype)
        return (raw == row).all(-1)

    def units(self, scratch: dict, visual: torch.Tensor, positions: torch.Tensor | None) -> list:
        """The images / frames in this call, in the order the vision encoder processed them.

        positions: the position ids the language model received (M-RoPE grids are read from them,
        since generate() encodes images before the forward and does not pass the grids on)."""
        raise NotImplementedError

    def deepstack_layers(self) -> int:
        """Decoder layers that receive extra visual features at the visual slots (Qwen3-VL deepstack)."""
        return 0

    def default_positions(self, batch: int, length: int, device) -> torch.Tensor:
        pos = torch.arange(length, device=device).expand(batch, length)
        return pos[None].expand(3, -1, -1) if self.mrope else pos

    def install_hooks(self) -> list:
        """Hooks the adapter itself needs on every patched model (e.g. to record image sizes). Returns handles."""
        return []

    def layout_hint(self) -> str:
        """Appended to the error raised when a per-grid strategy meets an image without a known grid."""
        return ""

    # vision signals ---------------------------------------------------------------------------
    def install_vision_signals(self, signals: dict[str, VisionSignal], store: "SignalStore") -> list:
        """Register hooks that add per-unit float32 score vectors to `store`. Returns handles."""
        raise NotImplementedError(f"{type(self).__name__} does not provide vision-encoder signals")

    def unit_signals(self, store: "SignalStore", units: list) -> list[dict]:
        out = [{} for _ in units]
        for name, per_unit in store.read().items():
            order = encode_order(units, len(per_unit))
            if order is None:
                raise RuntimeError(f"vision signal {name!r}: {len(per_unit)} images scored, {len(units)} in the batch")
            for i, j in enumerate(order):
                scores = per_unit[j]
                if scores.numel() != len(units[i].slots):
                    raise RuntimeError(
                        f"vision signal {name!r}: {scores.numel()} scores for an image of {len(units[i].slots)} tokens"
                    )
                out[i][name] = scores
        return out

    def object_layer(self, n_layers: int) -> int:
        """Default 0-based encoder layer for "object" signals: the middle block."""
        return max(0, (n_layers - 1) // 2)  # round(n / 2) - 1 took the lower of two for n = 5, 9, ...

    def resolve_layer(self, sig, n_layers: int, feature_layer: int, name: str = "") -> int:
        """The 0-based encoder layer a VisionSignal `sig` reads."""
        layer = sig.layer
        if layer == "feature":
            return feature_layer
        if layer == "object":
            return min(self.object_layer(n_layers), feature_layer)
        if isinstance(layer, bool) or not isinstance(layer, int) or not -n_layers <= layer < n_layers:
            raise sig.layer_error(name, n_layers, f"this vision encoder has {n_layers} layers")
        return layer % n_layers


class Restore:
    """Hook handle that undoes an instance attribute about to be set over a method (make it first): the
    instance attribute that was there before (a user's own wrapper, accelerate's device hooks) comes
    back, or else the class's method shows through again. (A flag, not a sentinel object: a deep copy or
    pickle of the model copies a sentinel into a new object, which then went back as the attribute.)"""

    def __init__(self, obj, name):
        self.obj, self.name = obj, name
        self.had_previous = name in obj.__dict__
        self.previous = obj.__dict__.get(name)

    def remove(self):
        if self.had_previous:
            self.obj.__dict__[self.name] = self.previous
        else:
            self.obj.__dict__.pop(self.name, None)


class PerThread(threading.local):
    """Attributes each thread sees its own of: a patched model's per-call state (what a hook leaves for the
    next one, the run in progress, the last figures), so that threads running one model at once (a web
    server's workers) each prune their own forward; `vars(obj)` is the calling thread's dict. Subclasses
    set their defaults in __init__, which runs in each thread at its first access. A deep copy or pickle
    starts empty."""

    def __reduce__(self):
        return type(self), ()


class LeafHook:
    """A forward hook on the module at `parent.<name>` (a q/k projection) that moves with the attribute: call
    `follow()` before the parent runs. A module put there after patching gets the hook, and the one it
    replaced loses it: PEFT's LoRA layers (get_peft_model, model.load_adapter) wrap the projection and call
    the old module as their base_layer, whose output lacks the adapter's term; a hook left there read
    attention scores from it silently. merge_and_unload() puts the base module back, and the hook follows.
    A swap that carries the old module's hooks over (torch.ao.quantization's quantize_dynamic / swap_module) left
    a copy of the hook there: the hook moves onto it without a second, and `remove` takes it off too."""

    def __init__(self, parent, name: str, hook):
        self.parent, self.name, self.hook = parent, name, hook
        self.module = getattr(parent, name)
        self.handle = self.module.register_forward_hook(hook)

    def follow(self):
        module = getattr(self.parent, self.name)
        if module is not self.module:
            self.handle.remove()
            _drop_copies(module, self.hook)
            self.module, self.handle = module, module.register_forward_hook(self.hook)

    def remove(self):
        self.handle.remove()
        _drop_copies(getattr(self.parent, self.name, None), self.hook)


def _drop_copies(module, hook):
    """Take `hook` off `module`'s forward hooks wherever it was registered (by something other than us)."""
    hooks = getattr(module, "_forward_hooks", None)
    if not isinstance(module, torch.nn.Module) or not hooks:
        return
    for key in [key for key, fn in hooks.items() if fn is hook]:
        del hooks[key]
        module._forward_hooks_with_kwargs.pop(key, None)
        module._forward_hooks_always_called.pop(key, None)


def follow_leaves(leaves, *_):
    """A forward pre-hook (as a partial) for the parent of `leaves`: each follows its attribute."""
    for leaf in leaves:
        leaf.follow()


def wrap_method(owner, name: str, hook) -> Restore:
    """Put `hook(original, *args, **kwargs)` in place of `owner.<name>` (an instance attribute, with the
    original's signature, which generate() reads to pass its arguments); returns the handle that removes it.

    A partial of bound methods, not a closure: copy.deepcopy of the model rebinds both to the copy (and
    its pickle works), where a closure would keep calling the original model."""
    handle = Restore(owner, name)
    original = getattr(owner, name)
    wrapper = functools.partial(hook, original)
    sig = inspect.signature(original)  # without annotations (a ForwardRef in one stops a pickle of the model)
    wrapper.__signature__ = sig.replace(parameters=[p.replace(annotation=p.empty) for p in sig.parameters.values()],
                                        return_annotation=sig.empty)
    setattr(owner, name, wrapper)
    return handle


def attach(output, name: str, value) -> None:
    """Put what an encoder run recorded (scores, anyres layouts) on the output object it returned, so that
    the output handed back later (mm_encoder_outputs) brings it along; a tuple (return_dict=False) cannot
    carry it."""
    try:
        setattr(output, name, value)
    except (AttributeError, TypeError):
        pass


def call_arguments(fn, args: tuple, kwargs: dict) -> dict:
    """{parameter name: value} of a call `fn(*args, **kwargs)` (what a wrap_method hook was handed)."""
    return inspect.signature(fn).bind_partial(*args, **kwargs).arguments


def encode_order(units: list, encoded: int) -> list[int] | None:
    """For each unit (image or frame of this forward), the index of the one the vision encoder produced it
    from, out of `encoded` in encode order; None where they cannot be matched.

    Normally unit i is item i. generate() with num_beams or num_return_sequences k encodes the prompts'
    images once and then repeats each prompt k times in a row, each copy with its prompt's images
    (`_expand_inputs_for_generation`): the units of sample b are then those of prompt b // k, and the first
    copies' units (b % k == 0), in order, are the encoded ones."""
    if len(units) == encoded:
        return list(range(encoded))
    if encoded <= 0 or len(units) % encoded:
        return None
    k = len(units) // encoded
    seen: dict[int, int] = {}
    keys = []
    for u in units:
        seen[u.sample] = seen.get(u.sample, -1) + 1
        keys.append((u.sample, seen[u.sample]))  # (sample, rank of the unit in its sample)
    first = {key: i for i, key in enumerate(key for key in keys if key[0] % k == 0)}
    order = [first.get((b - b % k, j)) for b, j in keys]
    return None if len(first) != encoded or None in order else order


def grey_levels(pixels: torch.Tensor, mean, std) -> torch.Tensor:
    """Normalised RGB [..., 3, ...] (channel dim -3) -> uint8 grey levels (ITU-R 601-2 luma, as PIL's "L")."""
    shape = [1] * pixels.dim()
    shape[-3] = 3
    m = torch.tensor(mean, dtype=torch.float32, device=pixels.device).view(shape)
    s = torch.tensor(std, dtype=torch.float32, device=pixels.device).view(shape)
    rgb = (pixels.float() * s + m) * 255.0
    r, g, b = rgb.unbind(-3)
    return (0.299 * r + 0.587 * g + 0.114 * b).round().clamp(0, 255).to(torch.uint8)


def reduce_attention(q: torch.Tensor, k: torch.Tensor, scale: float, signal: VisionSignal, has_cls: bool) -> torch.Tensor:
    """One VisionSignal from a layer's queries and keys [B, H, T, d] -> float32 [B, T] (CLS column kept)."""
    if signal.reduce == "cls" or (signal.reduce == "cls_else_mean" and has_cls):
        if not has_cls:
            raise ValueError("a 'cls' vision signal needs a CLS token; this encoder's features have none")
        return attention_scores(q, k, scale, torch.tensor([0], device=q.device))
    received = attention_scores(q, k, scale)
    if signal.reduce in ("mean", "cls_else_mean"):
        return received
    context = received > signal.threshold * received.mean(1, keepdim=True)
    empty = ~context.any(1)
    if bool(empty.any()):
        context[empty, received[empty].argmax(1)] = True
    return attention_scores(q, k, scale, context)


class SignalStore(PerThread):
    """Vision-encoder scores, one entry per image / frame, by signal name.

    Signal hooks `add` scores while the tower runs. Each get_{image,video}_features call is a run: `tag`
    attaches the scores added during it to the output object it returns. A forward handed encoder
    outputs (generate() encodes first; features the user computed and reuses) takes those outputs'
    scores (`use`), whatever ran in between; a forward that encodes its own pixels takes the scores
    added during it (`reset` before).

    Scores are computed without autograd: they pick tokens, and gradients reach the kept tokens. (A graph
    left on the model by a training forward kept the vision tower's alive, and deep copies refused it;
    vflowopt's recycling weights are therefore constants to autograd, as patch_vit's scores are.)
    Each thread has its own scores (PerThread)."""

    ATTR = "_vtprune_signals"  # on an encoder output: {name: per-unit scores} of the run that returned it

    def __init__(self):
        self.scores: dict[str, list] = {}
        self.fresh = False  # scores added since the last forward read them

    def add(self, name: str, per_unit: list):
        if not self.fresh:
            self.scores, self.fresh = {}, True
        self.scores.setdefault(name, []).extend(per_unit)

    def counts(self) -> dict[str, int]:
        return {name: len(v) for name, v in self.scores.items()} if self.fresh else {}

    def tag(self, output, start: dict[str, int]):
        """Attach the scores added since `start` (counts() before the run) to the run's `output`. A run
        nested in another (Qwen3-VL's video features call its image features) is part of the outer one."""
        if self.fresh:
            attach(output, self.ATTR, {name: v[start.get(name, 0):] for name, v in self.scores.items()})

    def use(self, outputs: dict) -> bool:
        """The scores attached to a forward's encoder outputs ({"image": ..., "video": ...}: images' units
        come first) become its scores; True if any carried some. Outputs that carry none (features computed
        before patching) get none, whatever ran just before: the forward then raises a clear error.
        (generate()'s prefill chunks get sliced copies: the runtime hands `use` generate's own outputs.)"""
        runs = [getattr(outputs.get(key), self.ATTR, None) for key in ("image", "video")]
        runs = [run for run in runs if run is not None]
        if runs:
            self.scores = {}
            for run in runs:
                for name, values in run.items():
                    self.scores.setdefault(name, []).extend(values)
        else:  # features computed before patching, or a copy that lost them: none (a clear error follows)
            self.scores = {}
        self.fresh = False
        return bool(runs)

    def reset(self):
        """An encoder run is about to start inside a forward: nothing before it belongs to that forward."""
        self.scores, self.fresh = {}, False

    def read(self) -> dict[str, list]:
        self.fresh = False
        return self.scores

    def __bool__(self):
        return bool(self.scores)
