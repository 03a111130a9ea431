"""Qwen2-VL, Qwen2.5-VL, Qwen3-VL (and its mixture-of-experts models) and Qwen3.5: dynamic-resolution ViT with a
2x2 patch merger, M-RoPE language model. Images and video frames are units of their own (per-frame budgets).
Qwen3.5 is Qwen3-VL without deepstack, on a hybrid decoder (linear-attention layers: see the runtime).

Qwen2.5-VL's ViT runs most blocks on windows, in window order: vision signals come from its
full-attention blocks only and are put back in raster order. Qwen3-VL adds "deepstack" features of
intermediate ViT blocks into the first decoder layers at the visual slots; the runtime carries them
through the pruned layout (`Adapter.deepstack_layers`)."""
from __future__ import annotations

import sys
from functools import partial

import torch

from ..methods.vflowopt import patch_entropy
from .base import (Adapter, LeafHook, PerThread, call_arguments, follow_leaves, grey_levels, reduce_attention,
                   wrap_method)
from .runtime import Unit
from .sequence import runs


class QwenVLAdapter(Adapter):
    frame_runs = False  # Qwen3-VL: each video frame is a run of its own (timestamps in between)
    mrope = True
    has_cls = False

    def __init__(self, model):
        super().__init__(model)
        cfg = model.config
        self.image_token_id = cfg.image_token_id
        self.video_token_id = cfg.video_token_id
        self.merge = cfg.vision_config.spatial_merge_size

    def visual_token_ids(self):
        return [self.image_token_id, self.video_token_id]

    def read_call(self, kwargs):
        enc = kwargs.get("mm_encoder_outputs") or {}
        present = any(kwargs.get(k) is not None for k in ("pixel_values", "pixel_values_videos")) or any(
            enc.get(k) is not None for k in ("image", "video")
        )
        encoded = getattr(enc.get("video"), "pooler_output", None)  # generate() encodes first: one entry per video
        return {
            "input_ids": kwargs.get("input_ids"),
            "inputs_embeds": kwargs.get("inputs_embeds"),
            "visual_input": present,
            "image_grid_thw": kwargs.get("image_grid_thw"),
            "video_grid_thw": kwargs.get("video_grid_thw"),
            "encoded_video_tokens": [x.shape[0] for x in encoded] if isinstance(encoded, (list, tuple)) else None,
        }

    def units(self, scratch, visual, positions):
        """Images first, then video frames, each in token order: the order the ViT saw them.

        An image is a contiguous run of image tokens; its (h, w) grid is read off the M-RoPE
        positions (generate() does not pass image_grid_thw to the forward). Video runs split into
        frames where the temporal position changes."""
        if positions is None or positions.dim() != 3:
            raise ValueError("vtprune: Qwen-VL pruning needs the 3-D (t, h, w) position ids the model computes from "
                             "input_ids, and this call has none (e.g. inputs_embeds alone on a model that has not run "
                             "yet, or 2-D position_ids): pass input_ids")
        thw = positions[-3:]
        units = []
        block = 0  # ids unique over images and videos
        video = -1  # Qwen2/2.5-VL: the current video (one run each)
        for token_id in (self.image_token_id, self.video_token_id):
            mask = self.token_mask(scratch, token_id, visual.shape)
            if mask is None or not bool(mask.any()):
                continue
            # Qwen3-VL: each frame is a run of its own; each row's videos, by their token counts, group them
            rows = _row_videos(self._video_tokens(scratch), mask.sum(1).tolist()) if (
                token_id == self.video_token_id and self.frame_runs) else None
            for b, sample_runs in enumerate(runs(mask)):
                left, j = 0, -1  # Qwen3-VL: tokens left of the row's current video, and its index in the row
                for run in sample_runs:
                    if token_id == self.video_token_id and not self.frame_runs:
                        video += 1
                    h_all, w_all = thw[1, b, run], thw[2, b, run]
                    if (token_id == self.video_token_id and not self.frame_runs and len(run) > 1
                            and torch.equal(thw[0, b, run], h_all) and torch.equal(h_all, w_all)):
                        raise ValueError(
                            "vtprune: this Qwen-VL video's tokens carry text positions, not M-RoPE (t, h, w) ones "
                            "(transformers computes those from input_ids; a call with inputs_embeds alone gets "
                            "text positions), so its frames cannot be found and pruned per frame: pass input_ids")
                    starts = ((h_all == h_all[0]) & (w_all == w_all[0])).nonzero().squeeze(1)[1:]  # each frame starts top-left
                    frames = run.tensor_split(starts.tolist())
                    for frame in frames:
                        hw = thw[1:3, b, frame]
                        gh, gw = (hw.amax(1) - hw.amin(1) + 1).tolist()  # (one host sync for both)
                        grid = (1, gh, gw) if gh * gw == frame.numel() else None
                        of = -1  # an image
                        if token_id == self.video_token_id:
                            if not self.frame_runs:
                                of = video
                            else:
                                if rows is not None and left == 0:
                                    j += 1
                                    left = rows[b][j] if j < len(rows[b]) else 0
                                of = j if rows is not None and left >= frame.numel() else None  # None: unknown
                                left -= frame.numel() if of is not None else 0
                        units.append(Unit(b, frame, grid, block=block, video=of))
                    block += 1
        return units

    def _video_tokens(self, scratch) -> list[int] | None:
        """Each video's LLM tokens, in batch order: from its grid, or from its encoded features (read at the
        prefill only: the grid may be on the GPU, and decode steps carry it too)."""
        grid = scratch.get("video_grid_thw")
        if grid is not None:
            return [t * h * w // self.merge ** 2 for t, h, w in grid.tolist()]
        return scratch.get("encoded_video_tokens")

    # vision signals: attention inside chosen ViT blocks, per image, merged to LLM tokens -------
    def layout_hint(self):
        return (" (an image's grid is read off its M-RoPE positions, which transformers computes from input_ids: "
                "a call with inputs_embeds alone gets text positions; pass input_ids)")

    def install_vision_signals(self, signals, store):
        visual = self.model.model.visual
        blocks = visual.blocks
        n = len(blocks)
        handles = []
        call = PerThread()  # (hooks' scratch below: vars() of these is each thread's own dict)
        handles.append(visual.register_forward_pre_hook(partial(self._visual_pre, visual, call), with_kwargs=True))
        wanted: dict[int, list] = {}
        entropy = {name: sig for name, sig in signals.items() if sig.reduce == "entropy"}
        if entropy:
            raw = PerThread()  # the pixels as given: the model casts them to the tower's dtype (bf16) before the tower
            handles += [wrap_method(self.model.model, fn, partial(self._record_pixels, raw))
                        for fn in ("get_image_features", "get_video_features")]
            handles.append(visual.register_forward_pre_hook(partial(self._entropy, raw, entropy, store),
                                                            with_kwargs=True))
        for name, sig in signals.items():
            if sig.reduce == "entropy":
                continue
            if sig.reduce == "cls":
                raise ValueError(f"vision signal {name!r}: the Qwen-VL vision encoder has no CLS token")
            wanted.setdefault(self._signal_layer(visual, sig, n, name), []).append((name, sig))
        for li, names in wanted.items():
            attn = blocks[li].attn
            captured = PerThread()
            handles.append(attn.register_forward_pre_hook(partial(_keep_kwargs, captured), with_kwargs=True))
            leaf = LeafHook(attn, "qkv", partial(_keep_qkv, captured))
            handles += [leaf, attn.register_forward_pre_hook(partial(follow_leaves, [leaf]))]
            handles.append(attn.register_forward_hook(partial(self._score, attn, captured, names, call, store)))
        return handles

    def _signal_layer(self, visual, sig, n, name=""):
        """The ViT block a signal reads. Qwen2.5-VL: a full-attention block; "feature"/"object" move back
        to the nearest one at or before the default (the first one if none is), an explicit windowed
        block is refused (its attention only spans one window)."""
        layer, li = sig.layer, self.resolve_layer(sig, n, n - 1, name)
        full = sorted(getattr(visual, "fullatt_block_indexes", None) or [])
        if not full or li in full:
            return li
        if layer in ("feature", "object"):
            before = [f for f in full if f <= li]
            return before[-1] if before else full[0]
        raise ValueError(f"{sig.named_layer()} is a windowed block of this Qwen2.5-VL encoder; signals need one of "
                         f"its full-attention blocks {full}")

    def _visual_pre(self, visual, call, module, args, kwargs):
        call = vars(call)
        grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
        call["grid"] = grid
        call["window_index"] = None
        mod = sys.modules[type(visual).__module__]
        if hasattr(mod, "get_vision_window_index") and hasattr(visual, "window_size"):
            call["window_index"], _ = mod.get_vision_window_index(
                grid, spatial_merge_size=visual.spatial_merge_size, window_size=visual.window_size,
                patch_size=visual.patch_size, kwargs={},
            )
        return None

    @torch.no_grad()  # scores carry no graph (SignalStore)
    def _score(self, attn, captured, names, call, store, module, args, output):
        captured, call = vars(captured), vars(call)
        qkv, cu, (cos, sin) = captured.pop("qkv"), captured.pop("cu_seqlens"), captured.pop("pos")
        seq = qkv.shape[0]
        q, k, _ = qkv.reshape(seq, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb_vision
        q, k = rope(q, k, cos, sin)
        q, k = q.transpose(0, 1)[None], k.transpose(0, 1)[None]  # [1, H, seq, d]
        bounds = cu.tolist()
        sizes = []
        for t, h, w in call["grid"].tolist():
            sizes += [h * w // (self.merge * self.merge)] * t  # per frame
        order = None
        if call.get("window_index") is not None:
            order = torch.argsort(call["window_index"].to(q.device))
        for name, sig in names:
            per_patch = torch.empty(seq, dtype=torch.float32, device=q.device)
            for s, e in zip(bounds[:-1], bounds[1:]):
                per_patch[s:e] = reduce_attention(q[:, :, s:e], k[:, :, s:e], attn.scaling, sig, False)[0]
            per_token = per_patch.view(-1, self.merge * self.merge).mean(1)  # a merged token = 4 consecutive patches
            if order is not None:
                per_token = per_token[order]
            store.add(name, list(per_token.split(sizes)))
        return None


    def _record_pixels(self, raw: PerThread, original, *args, **kwargs):
        """Around the model's get_{image,video}_features: the pixel tensor it is given, while it runs."""
        raw = vars(raw)
        bound = call_arguments(original, args, kwargs)
        raw["pixels"] = bound.get("pixel_values", bound.get("pixel_values_videos"))
        try:
            return original(*args, **kwargs)
        finally:
            raw.pop("pixels", None)

    @torch.no_grad()  # scores carry no graph (SignalStore)
    def _entropy(self, raw, signals, store, module, args, kwargs):
        """Grey-level entropy under each LLM token: the 2x2 patches (first temporal slice) it merges,
        from the pixels as the caller gave them (not their bf16 cast)."""
        pixels = args[0] if args else kwargs["hidden_states"]
        given = vars(raw).get("pixels")
        if given is not None and given.shape == pixels.shape:
            pixels = given
        grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
        cfg = self.model.config.vision_config
        p, tp = cfg.patch_size, cfg.temporal_patch_size
        patches = pixels.view(pixels.shape[0], -1, tp, p, p)[:, :3, 0]  # [seq, 3, p, p]
        group = self.merge * self.merge
        sizes = []
        for t, h, w in grid.tolist():
            sizes += [h * w // group] * t
        for name, sig in signals.items():
            grey = grey_levels(patches, sig.pixel_mean, sig.pixel_std).reshape(-1, group * p * p)
            store.add(name, list(patch_entropy(grey).split(sizes)))
        return None


def _keep_kwargs(store: PerThread, module, args, kwargs):
    vars(store).update(cu_seqlens=kwargs["cu_seqlens"], pos=kwargs["position_embeddings"])
    return None


def _keep_qkv(store: PerThread, module, args, output):
    vars(store)["qkv"] = output


def _row_videos(tokens: list[int] | None, row_totals: list[int]) -> list[list[int]] | None:
    """Each row's videos (their token counts, in order), from every video's token count in batch order and
    each row's video tokens; None where they do not add up. generate() with beams or several sequences
    repeats a prompt's rows k times (adjacent copies); if the videos were listed once per prompt, each
    copy gets its prompt's."""
    if not tokens or sum(row_totals) % sum(tokens):
        return None
    k = sum(row_totals) // sum(tokens)
    if len(row_totals) % k:
        return None
    out, i = [], 0
    for b in range(0, len(row_totals), k):
        need, videos = row_totals[b], []
        while need > 0 and i < len(tokens):
            videos.append(tokens[i])
            need -= tokens[i]
            i += 1
        if need or any(row_totals[b + c] != row_totals[b] for c in range(k)):
            return None
        out += [videos] * k
    return out


class Qwen3VLAdapter(QwenVLAdapter):
    frame_runs = True

    def deepstack_layers(self):
        return len(getattr(self.model.config.vision_config, "deepstack_visual_indexes", None) or ())
