"""LLaVA-NeXT-Video (`LlavaNextVideoForConditionalGeneration`): LLaVA-NeXT's anyres images, and videos whose
frames each go through the tower, are pooled by the model's `vision_resampler` (a stride-s average or max
pool of the patch grid: 24x24 -> 12x12 for the released 7B/34B) and projected; the frames follow each other
with no separator.

Images are one unit each, as in LLaVA-NeXT (see llava_next.py). Each video frame is a unit of its own with
its pooled (h, w) grid, so budgets count per frame (specs/README.md) and grid strategies (pool,
token_shuffle, HiPrune, VFlowOpt) work on videos. Vision-encoder scores of a frame are pooled as its patches
are: averaged (or max-pooled, for spatial_pool_mode="max") over each s x s cell; a learned `conv` resampler
has no score counterpart, so its cells average their patches' scores.

LLaVA-OneVision (llava_onevision.py) shares this: its frames are pooled after the projector and one newline
closes each video.
"""
from __future__ import annotations

import torch

from .llava_next import LlavaNextAdapter
from .runtime import Unit
from .sequence import runs


class LlavaNextVideoAdapter(LlavaNextAdapter):
    closing = 0  # structural placeholder tokens after a video's frames (OneVision: one newline), never pruned

    def __init__(self, model):
        super().__init__(model)
        self.video_token_id = model.config.video_token_id
        self.frame_grid = self._frame_grid()

    def _frame_grid(self) -> tuple[int, int]:
        stride = self.model.config.spatial_pool_stride  # AvgPool2d / MaxPool2d / Conv2d, kernel = stride: floor
        return self.tile_side // stride, self.tile_side // stride

    def frame_scores(self, scores):
        """One frame's per-patch scores [side * side] pooled to its tokens, as the vision_resampler pools them."""
        cfg = self.model.config
        grid = scores.reshape(1, 1, self.tile_side, self.tile_side)
        pool = torch.nn.functional.max_pool2d if cfg.spatial_pool_mode == "max" else torch.nn.functional.avg_pool2d
        return pool(grid, cfg.spatial_pool_stride).flatten()

    def visual_token_ids(self):
        return [self.image_token_id, self.video_token_id]

    def read_call(self, kwargs):
        out = super().read_call(kwargs)
        enc = kwargs.get("mm_encoder_outputs") or {}
        pixels, encoded = kwargs.get("pixel_values_videos"), enc.get("video")
        out["visual_input"] = out["visual_input"] or pixels is not None or encoded is not None
        # one video's placeholder tokens (a batch's clips have one frame count): back-to-back videos, with no
        # text between them, are one run of placeholders that this splits
        gh, gw = self.frame_grid
        out["video_len"] = None
        if pixels is not None and pixels.dim() == 5:
            out["video_len"] = pixels.shape[1] * gh * gw + self.closing
        elif isinstance(getattr(encoded, "pooler_output", None), torch.Tensor) and encoded.pooler_output.dim() == 3:
            out["video_len"] = encoded.pooler_output.shape[1]  # generate() encodes first: [videos, tokens, d]
        return out

    def units(self, scratch, visual, positions):
        shape = visual.shape
        images = self.token_mask(scratch, self.image_token_id, shape)
        video = self.token_mask(scratch, self.video_token_id, shape)
        if images is None or video is None:
            raise ValueError(f"{type(self.model).__name__} pruning needs the call's input_ids or placeholder embeddings")
        units = self.image_units(images, scratch.get("n_images"))
        gh, gw = self.frame_grid
        per_frame = gh * gw
        videos = 0
        length = scratch.get("video_len")
        for b, sample_runs in enumerate(runs(video)):
            for run in (clip for whole in sample_runs for clip in _videos(whole, length)):
                frames, extra = divmod(run.numel() - self.closing, per_frame)
                if extra or frames < 1:
                    tail = f" + {self.closing} newline" if self.closing else ""
                    raise ValueError(f"a video of {run.numel()} tokens is not frames x {per_frame}{tail}")
                block, videos = len(units), videos + 1
                units += [Unit(b, frame, (1, gh, gw), block=block, video=videos - 1)
                          for frame in run[:run.numel() - self.closing].split(per_frame)]
        return units


def _videos(run: torch.Tensor, length: int | None) -> list:
    """A run of video placeholders as its videos: back-to-back videos of `length` tokens each, split."""
    if not length:
        return [run]
    if run.numel() % length:
        raise ValueError(f"a run of {run.numel()} video placeholder tokens is not a whole number of this call's "
                         f"clips of {length} tokens (text inside a clip's placeholders?)")
    return list(run.split(length))
