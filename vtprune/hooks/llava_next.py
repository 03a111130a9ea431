"""LLaVA-NeXT (`LlavaNextForConditionalGeneration`): anyres images = a base tile + crops, unpadded to
the image's aspect ratio, one `image_newline` token per crop row; all of them are image-token slots.

Each image is one unit holding all its tokens (base, crops and newlines), so budgets count the whole
image (specs/README.md) and global strategies (DivPrune, random, FastV, TransPrune) choose across
crops. Not supported yet, with a clear error: strategies that need a per-crop token grid (pool,
token_shuffle, HiPrune, VFlowOpt's cells) or vision-encoder attention (HiPrune, ToDRE's pivot,
VFlowOpt), which would have to be mapped through the crop/unpad/newline layout.
"""
from __future__ import annotations

import torch

from .llava import LlavaAdapter
from .runtime import Unit
from .sequence import runs


class LlavaNextAdapter(LlavaAdapter):
    def read_call(self, kwargs):
        out = super().read_call(kwargs)
        pixels = kwargs.get("pixel_values")
        if pixels is not None and pixels.dim() == 5:  # [images, tiles, 3, H, W]
            out["n_images"] = pixels.shape[0]
        return out

    def image_units(self, mask: torch.Tensor, n_images: int | None) -> list[Unit]:
        """One unit per image = one run of image tokens (base tile, crops and newlines together)."""
        units = []
        for b, sample_runs in enumerate(runs(mask)):
            units += [Unit(b, run, None, block=len(units)) for run in sample_runs]
        if n_images is not None and n_images != len(units):
            raise ValueError(f"{type(self.model).__name__}: {n_images} images but {len(units)} runs of image tokens; "
                             "images must be separated by text so that vtprune can tell them apart")
        return units

    def units(self, scratch, visual, positions):
        return self.image_units(visual, scratch.get("n_images"))

    def install_vision_signals(self, signals, store):
        raise NotImplementedError(
            f"{type(self.model).__name__}: strategies that read vision-encoder attention (hiprune, todre's pivot, "
            "vflowopt) are not supported on anyres images yet; use divprune, random, fastv or transprune")
