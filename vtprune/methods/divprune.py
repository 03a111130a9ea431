"""DivPrune (CVPR 2025): keep the max-min diverse subset of each image's projected tokens."""
from __future__ import annotations

import torch

from ..kernels import greedy_select
from .base import ImageTokens, Method, PruneConfig, Selection
from .registry import register


def select(features: torch.Tensor, keep: int) -> torch.Tensor:
    """LongTensor[B, keep], ascending: greedy max-min diversity under cosine distance.

    features [B, N, D] (any float dtype; computed in float32). The first pick is the most isolated
    token (largest distance to its nearest neighbour); each next pick maximises the distance to its
    nearest selected token. Ties go to the lowest index; picked tokens are excluded explicitly.
    """
    return greedy_select(features, keep, None, "maxmin")


@register("divprune")
class DivPrune(Method):
    """Max-min diversity over each image's projected tokens (text-agnostic, before the LLM)."""

    stage = "projector"
    Config = PruneConfig
    paper = "Alvar et al., DivPrune: Diversity-based Visual Token Pruning for LMMs, CVPR 2025 (arXiv 2503.02175)"

    def select(self, image: ImageTokens) -> Selection:
        return Selection(select(image.features[None], image.keep)[0])

    def select_batch(self, images: list[ImageTokens]) -> list[Selection]:
        picks = select(torch.stack([im.features for im in images]), images[0].keep)
        return [Selection(row) for row in picks]
