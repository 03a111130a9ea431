"""LLaVA-1.5 (`LlavaForConditionalGeneration`): CLIP/SigLIP tower, MLP projector, 1-D RoPE LLM."""
from __future__ import annotations

import math
from functools import partial

import torch

from ..methods.vflowopt import patch_entropy
from .base import Adapter, LeafHook, PerThread, follow_leaves, grey_levels, reduce_attention
from .runtime import Unit
from .sequence import row_slots


def _encoder_layers(tower):
    for path in ("encoder.layers", "vision_model.encoder.layers"):
        mod = tower
        try:
            for part in path.split("."):
                mod = getattr(mod, part)
            return mod
        except AttributeError:
            continue
    raise TypeError(f"cannot find the encoder layers of vision tower {type(tower).__name__}")


class LlavaAdapter(Adapter):
    def __init__(self, model):
        super().__init__(model)
        cfg = model.config
        self.image_token_id = cfg.image_token_id
        self.select_strategy = getattr(cfg, "vision_feature_select_strategy", "default")
        self.has_cls = self.select_strategy == "default"
        self.feature_layer = cfg.vision_feature_layer

    def object_layer(self, n_layers):
        return max(0, round(9 * n_layers / 24) - 1)  # HiPrune: layer 9 of CLIP-L's 24 (1-indexed)

    def visual_token_ids(self):
        return [self.image_token_id]

    def read_call(self, kwargs):
        pixels = kwargs.get("pixel_values")
        enc = (kwargs.get("mm_encoder_outputs") or {}).get("image")
        n_images = None
        if pixels is not None:
            n_images = pixels.shape[0]
        elif enc is not None:
            n_images = len(enc.pooler_output)
        return {
            "input_ids": kwargs.get("input_ids"),
            "inputs_embeds": kwargs.get("inputs_embeds"),
            "visual_input": n_images is not None,
            "n_images": n_images,
        }

    def units(self, scratch, visual, positions):
        per_row = row_slots(visual)
        count = sum(len(slots) for slots in per_row)
        n_images = scratch.get("n_images")
        per_image = count // n_images if n_images else None
        if not per_image or per_image * n_images != count:
            raise ValueError(f"cannot split {count} image tokens evenly over {n_images} images")
        side = math.isqrt(per_image)
        grid = (1, side, side) if side * side == per_image else None
        units = []
        for b, slots in enumerate(per_row):
            if slots.numel() == 0:  # a text-only sample
                continue
            if slots.numel() % per_image:
                raise ValueError(f"sample {b} has {slots.numel()} image tokens, not a multiple of {per_image}")
            for j, chunk in enumerate(slots.split(per_image)):
                units.append(Unit(b, chunk, grid, block=j))
        return units

    # vision signals: CLIP/SigLIP attention from the q/k projections of chosen layers ---------
    def install_vision_signals(self, signals, store):
        layers = _encoder_layers(self.model.model.vision_tower)
        n = len(layers)
        fl = self.feature_layer
        if not isinstance(fl, int):
            raise ValueError("vision signals need a single vision_feature_layer")
        feature = (fl % (n + 1)) - 1  # hidden_states[i] is the output of layer i-1
        handles = []
        wanted: dict[int, list] = {}
        entropy = {name: sig for name, sig in signals.items() if sig.reduce == "entropy"}
        if entropy:
            handles.append(self.model.model.vision_tower.register_forward_pre_hook(
                partial(self._entropy, entropy, store), with_kwargs=True))
        for name, sig in signals.items():
            if sig.reduce == "entropy":
                continue
            if sig.reduce == "cls" and not self.has_cls:
                raise ValueError(f"vision signal {name!r} needs a CLS token; this tower's features have none")
            wanted.setdefault(self.resolve_layer(sig, n, feature, name), []).append((name, sig))
        for li, reqs in wanted.items():
            attn = layers[li].self_attn
            captured = PerThread()  # (vars() of it is each thread's own dict)
            leaves = [LeafHook(attn, "q_proj", partial(_keep_output, captured, "q")),
                      LeafHook(attn, "k_proj", partial(_keep_output, captured, "k"))]
            handles += [*leaves, attn.register_forward_pre_hook(partial(follow_leaves, leaves))]
            handles.append(attn.register_forward_hook(partial(self._score, attn, captured, reqs, store)))
        return handles

    @torch.no_grad()  # scores carry no graph (SignalStore)
    def _score(self, attn, captured, reqs, store, module, args, output):
        q, k = vars(captured).pop("q"), vars(captured).pop("k")
        b, t, _ = q.shape
        q = q.view(b, t, -1, attn.head_dim).transpose(1, 2)
        k = k.view(b, t, -1, attn.head_dim).transpose(1, 2)
        scale = getattr(attn, "scale", None) or attn.head_dim ** -0.5
        for name, sig in reqs:
            scores = reduce_attention(q, k, scale, sig, self.has_cls)
            if self.has_cls:
                scores = scores[:, 1:]
            store.add(name, list(scores))
        return None


    @torch.no_grad()  # scores carry no graph (SignalStore)
    def _entropy(self, signals, store, module, args, kwargs):
        pixels = args[0] if args else kwargs["pixel_values"]
        p = self.model.config.vision_config.patch_size
        for name, sig in signals.items():
            grey = grey_levels(pixels, sig.pixel_mean, sig.pixel_std)  # [n, H, W]
            n, hh, ww = grey.shape
            patches = grey[:, : hh // p * p, : ww // p * p].unfold(1, p, p).unfold(2, p, p).reshape(n, -1, p * p)
            store.add(name, [patch_entropy(x) for x in patches])
        return None


def _keep_output(store: PerThread, name, module, args, output):
    vars(store)[name] = output
