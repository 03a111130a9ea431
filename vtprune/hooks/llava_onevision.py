"""LLaVA-OneVision (`LlavaOnevisionForConditionalGeneration`): a SigLIP tower (no CLS token; all
patches are features), anyres-max images laid out as in LLaVA-NeXT (base tile, unpadded and possibly
downsampled crops, one newline per row) and videos: each frame's patch grid is 2x2 bilinear-pooled,
the frames follow each other, and one newline token closes the video.

Images are one unit each, as in LLaVA-NeXT (see llava_next.py for what that supports; crop grids
that anyres-max downsampled get their vision scores downsampled the same way). Each video frame is a
unit of its own with its pooled (h, w) grid, so budgets count per frame and grid strategies (pool,
token_shuffle) work on videos; the closing newline belongs to no frame and is kept. Vision-encoder
scores of a frame are pooled exactly as its features are (the model's `apply_pooling`).
"""
from __future__ import annotations

import math

from .llava_next import LlavaNextAdapter
from .runtime import Unit
from .sequence import runs


class LlavaOnevisionAdapter(LlavaNextAdapter):
    def __init__(self, model):
        super().__init__(model)
        cfg = model.config
        self.video_token_id = cfg.video_token_id
        side = cfg.vision_config.image_size // cfg.vision_config.patch_size
        self.frame_grid = (math.ceil(side / 2), math.ceil(side / 2))  # apply_pooling's output

    def _pack_features(self, maps, sizes, newline):
        return self.model.model.pack_image_features([maps], sizes, image_newline=newline,
                                                    vision_aspect_ratio=self.model.config.vision_aspect_ratio)

    def frame_scores(self, scores):
        return self.model.model.apply_pooling(scores[None, :, None])[0, :, 0]  # the frames' 2x2 bilinear pooling

    def visual_token_ids(self):
        return [self.image_token_id, self.video_token_id]

    def read_call(self, kwargs):
        out = super().read_call(kwargs)
        enc = kwargs.get("mm_encoder_outputs") or {}
        videos = kwargs.get("pixel_values_videos") is not None or enc.get("video") is not None
        out["visual_input"] = out["visual_input"] or videos
        return out

    def units(self, scratch, visual, positions):
        shape = visual.shape
        images = self.token_mask(scratch, self.image_token_id, shape)
        video = self.token_mask(scratch, self.video_token_id, shape)
        if images is None or video is None:
            raise ValueError("LLaVA-OneVision pruning needs the call's input_ids or placeholder embeddings")
        units = self.image_units(images, scratch.get("n_images"))
        gh, gw = self.frame_grid
        per_frame = gh * gw
        for b, sample_runs in enumerate(runs(video)):
            for run in sample_runs:
                frames, extra = divmod(run.numel() - 1, per_frame)
                if extra or frames < 1:
                    raise ValueError(f"a video of {run.numel()} tokens is not frames x {per_frame} + 1 newline")
                block = len(units)
                units += [Unit(b, frame, (1, gh, gw), block=block) for frame in run[:-1].split(per_frame)]
        return units
