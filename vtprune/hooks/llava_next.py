"""LLaVA-NeXT (`LlavaNextForConditionalGeneration`): anyres images = a base tile + crops, unpadded to
the image's aspect ratio, one `image_newline` token per crop row; all of them are image-token slots.

Each image is one unit holding all its tokens (base, crops and newlines), so budgets count the whole
image (specs/README.md) and global strategies (DivPrune, random, FastV, TransPrune) choose across
crops. Not supported yet, with a clear error: strategies that need a per-crop token grid (pool,
token_shuffle, HiPrune, VFlowOpt's cells) or vision-encoder attention (HiPrune, ToDRE's pivot,
VFlowOpt), which would have to be mapped through the crop/unpad/newline layout.
"""
from __future__ import annotations

from .llava import LlavaAdapter
from .runtime import Unit


class LlavaNextAdapter(LlavaAdapter):
    def read_call(self, kwargs):
        out = super().read_call(kwargs)
        pixels = kwargs.get("pixel_values")
        if pixels is not None and pixels.dim() == 5:  # [images, tiles, 3, H, W]
            out["n_images"] = pixels.shape[0]
        return out

    def units(self, scratch, visual, positions):
        units = []
        for b in range(visual.shape[0]):
            slots = visual[b].nonzero().squeeze(1)
            if slots.numel() == 0:
                continue
            breaks = (slots[1:] != slots[:-1] + 1).nonzero().squeeze(1) + 1
            runs = [r for r in slots.tensor_split(breaks.tolist())]
            units += [Unit(b, run, None, block=j) for j, run in enumerate(runs)]
        n_images = scratch.get("n_images")
        if n_images is not None and n_images != len(units):
            raise ValueError(f"LLaVA-NeXT: {n_images} images but {len(units)} runs of image tokens; images must be "
                             "separated by text so that vtprune can tell them apart")
        return units

    def install_vision_signals(self, signals, store):
        raise NotImplementedError(
            "LLaVA-NeXT: strategies that read vision-encoder attention (hiprune, todre's pivot, vflowopt) are not "
            "supported on anyres images yet; use divprune, random, fastv or transprune")
