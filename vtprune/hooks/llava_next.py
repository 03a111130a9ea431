"""LLaVA-NeXT (`LlavaNextForConditionalGeneration`): anyres images = a base tile + crops, unpadded to
the image's aspect ratio, one `image_newline` token per crop row; all of them are image-token slots.

Each image is one unit holding all its tokens (base, crops and newlines), so budgets count the whole
image (specs/README.md) and global strategies (DivPrune, ToDRE, random, FastV, TransPrune) choose
across crops. Strategies that work on a token grid run on the base grid and the crop grid (pool,
token_shuffle) or each crop tile's part of it (HiPrune, VFlowOpt) separately (vtprune.hooks.anyres).
The layout, tiles included, comes from the model's own `pack_image_features` (fed all-ones tiles, then
the tile numbers), with the image sizes recorded when the model encodes images (and carried by the
features it returns, for features handed back later as mm_encoder_outputs), and vision signals
are computed per tile and packed the same way (newline slots score 0).
"""
from __future__ import annotations

import torch

from .anyres import Layout
from .base import PerThread, attach, call_arguments, encode_order, wrap_method
from .llava import LlavaAdapter
from .runtime import Unit
from .sequence import runs


class LlavaNextAdapter(LlavaAdapter):
    IMAGES = "_vtprune_images"  # on an image-features output: the (tiles, size) per image of its encode

    def __init__(self, model):
        super().__init__(model)
        vc = model.config.vision_config
        self.tile_side = vc.image_size // vc.patch_size  # tokens per side of one tile
        self.encode = PerThread()  # (each thread's own: its last encode's images)
        self._layouts: dict = {}

    @property
    def images(self) -> list[tuple[int, tuple[int, int]]] | None:
        """(tiles, (h, w)) per image of the calling thread's last encode."""
        return getattr(self.encode, "images", None)

    @images.setter
    def images(self, value):
        self.encode.images = value

    def read_call(self, kwargs):
        out = super().read_call(kwargs)
        pixels = kwargs.get("pixel_values")
        if pixels is not None and pixels.dim() == 5:  # [images, tiles, 3, H, W]
            out["n_images"] = pixels.shape[0]
        elif pixels is not None and kwargs.get("image_sizes") is not None:  # 4-D: all images' tiles stacked
            out["n_images"] = len(kwargs["image_sizes"])
        if pixels is None:  # images (if any) encoded before this call: the layout their encode recorded, if any
            self.images = getattr((kwargs.get("mm_encoder_outputs") or {}).get("image"), self.IMAGES, None)
        return out

    # image sizes: recorded where the model encodes images (generate() encodes them before the forward)
    def install_hooks(self):
        return [wrap_method(self.model.model, "get_image_features", self._record_sizes)]

    def _record_sizes(self, original, *args, **kwargs):
        bound = call_arguments(original, args, kwargs)
        sizes = bound.get("image_sizes")
        self.images = None if sizes is None else self.tiles(sizes, bound.get("batch_num_images"))
        out = original(*args, **kwargs)
        attach(out, self.IMAGES, self.images)  # features handed back later bring their own layout
        return out

    def tiles(self, sizes, batch_num_images=None) -> list[tuple[int, tuple[int, int]]]:
        """(tiles the model encodes, (h, w)) per image, by the model's own rule."""
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        cfg = self.model.config
        sizes = [tuple(int(v) for v in s) for s in torch.as_tensor(sizes).tolist()]
        crops = [True] * len(sizes) if batch_num_images is None else \
            [int(n) == 1 for n in torch.as_tensor(batch_num_images).tolist() for _ in range(int(n))]  # OneVision
        return [(image_size_to_num_patches(s, cfg.image_grid_pinpoints, cfg.vision_config.image_size) if c else 1, s)
                for s, c in zip(sizes, crops)]

    def pack(self, maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """One image's per-tile maps [tiles, side*side, C] laid out as its tokens [N, C] (zero newlines)."""
        packed, _ = self._pack_features(maps, torch.tensor([size]), maps.new_zeros(maps.shape[-1]))
        return packed[0] if isinstance(packed, (list, tuple)) else packed

    def _pack_features(self, maps, sizes, newline):
        """The model's own pack_image_features on one image (its signature differs per family)."""
        return self.model.model.pack_image_features([maps], sizes, self.select_strategy, image_newline=newline)

    def layout(self, tiles: int, size: tuple[int, int]) -> Layout:
        key = (tiles, size)
        if key not in self._layouts:
            ones = torch.ones(tiles, self.tile_side ** 2, 1)
            numbers = torch.arange(1, tiles + 1, dtype=torch.float32)[:, None, None].expand(tiles, self.tile_side ** 2, 1)
            self._layouts[key] = Layout.from_map(self.pack(ones, size)[:, 0], self.tile_side ** 2).with_tiles(
                self.pack(numbers, size)[:, 0])
        return self._layouts[key]

    def layout_hint(self):
        return (" (anyres images: run the model on pixel_values with image_sizes, so that vtprune can read "
                "each image's crop layout)")

    def image_units(self, mask: torch.Tensor, n_images: int | None) -> list[Unit]:
        """One unit per image = one run of image tokens (base tile, crops and newlines together), with
        its anyres layout when the image sizes of the last encode match."""
        units = []
        for b, sample_runs in enumerate(runs(mask)):
            units += [Unit(b, run, None, block=len(units)) for run in sample_runs]
        if n_images is not None and n_images != len(units):
            raise ValueError(f"{type(self.model).__name__}: {n_images} images but {len(units)} runs of image tokens; "
                             "images must be separated by text so that vtprune can tell them apart")
        order = None if self.images is None else encode_order(units, len(self.images))
        for u, j in zip(units, order or ()):
            lay = self.layout(*self.images[j])
            u.layout = lay if lay.n == len(u.slots) else None
        return units

    def units(self, scratch, visual, positions):
        return self.image_units(visual, scratch.get("n_images"))

    def frame_scores(self, scores: torch.Tensor) -> torch.Tensor:
        """One video frame's per-patch scores laid out as its tokens (LLaVA-OneVision)."""
        raise NotImplementedError(f"{type(self.model).__name__} has no video input")

    def unit_signals(self, store, units):
        """Per-tile vision scores packed into each image's token layout (newline slots score 0), and
        per-frame scores pooled as the frames are. The encoder runs on the images' tiles first, then
        on the video frames (images' units come first too)."""
        scores = store.read()
        out = [{} for _ in units]
        if not scores:
            return out
        images = [i for i, u in enumerate(units) if u.grid is None]
        frames = [i for i, u in enumerate(units) if u.grid is not None]
        encoded = self.images if images else []  # a video-only call encodes no images
        image_order = None if encoded is None else encode_order([units[i] for i in images], len(encoded))
        if image_order is None or any(units[i].layout is None for i in images):
            raise NotImplementedError(
                f"{type(self.model).__name__}: vision-encoder signals need the images encoded by the model from "
                "pixel_values with image_sizes (not precomputed features)")
        starts = [0]
        for tiles, _ in encoded:
            starts.append(starts[-1] + tiles)
        for name, per_tile in scores.items():
            frame_order = encode_order([units[i] for i in frames], len(per_tile) - starts[-1])
            if frame_order is None:
                raise RuntimeError(f"vision signal {name!r}: {len(per_tile)} tiles or frames scored, "
                                   f"{starts[-1]} image tiles and {len(frames)} frames in the batch")
            packed = {}  # per encoded image (generate()'s beams repeat them)
            for i, j in zip(images, image_order):
                if j not in packed:
                    maps = torch.stack([s.float() for s in per_tile[starts[j]:starts[j + 1]]])[..., None]
                    packed[j] = self.pack(maps, encoded[j][1])[:, 0]
                out[i][name] = packed[j]
            for i, j in zip(frames, frame_order):
                out[i][name] = self.frame_scores(per_tile[starts[-1] + j].float())
        return out
