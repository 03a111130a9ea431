"""LLaVA-OneVision (`LlavaOnevisionForConditionalGeneration`): a SigLIP tower (no CLS token; all
patches are features), anyres-max images laid out as in LLaVA-NeXT (base tile, unpadded and possibly
downsampled crops, one newline per row) and videos: each frame's patch grid is 2x2 bilinear-pooled,
the frames follow each other, and one newline token closes the video.

Images are one unit each, as in LLaVA-NeXT (see llava_next.py for what that supports; crop grids
that anyres-max downsampled get their vision scores downsampled the same way). Each video frame is a
unit of its own with its pooled (h, w) grid, as in LLaVA-NeXT-Video (llava_next_video.py), so budgets
count per frame and grid strategies (pool, token_shuffle) work on videos; the closing newline belongs
to no frame and is kept. Vision-encoder scores of a frame are pooled exactly as its features are (the
model's `apply_pooling`).
"""
from __future__ import annotations

import math

from .llava_next_video import LlavaNextVideoAdapter


class LlavaOnevisionAdapter(LlavaNextVideoAdapter):
    closing = 1  # the newline after a video's frames

    def _frame_grid(self):
        return math.ceil(self.tile_side / 2), math.ceil(self.tile_side / 2)  # apply_pooling's output

    def _pack_features(self, maps, sizes, newline):
        return self.model.model.pack_image_features([maps], sizes, image_newline=newline,
                                                    vision_aspect_ratio=self.model.config.vision_aspect_ratio)

    def frame_scores(self, scores):
        return self.model.model.apply_pooling(scores[None, :, None])[0, :, 0]  # the frames' 2x2 bilinear pooling
