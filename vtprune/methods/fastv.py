"""`fastv` baseline (FastV, ECCV 2024): after decoder layer K, keep the visual tokens that received
the most attention at layer K-1, averaged over heads and all query rows (llm stage)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import InLLMConfig, LayerTokens, Method, top_per_image, top_visual
from .registry import register


def select(scores: torch.Tensor, visual: torch.Tensor, keep: torch.Tensor) -> list[torch.Tensor]:
    """Per sample: ascending indices (into that sample's visual slots, in order) of the `keep[b]`
    highest-scoring visual tokens; ties go to the lower index. (One image per sample: with several,
    the method keeps each image's own budget, `top_per_image`.)

    scores: float [B, L] attention received per slot; visual: BoolTensor [B, L]; keep: LongTensor [B].
    """
    return top_visual(scores, visual, keep)


@dataclass
class FastVConfig(InLLMConfig):
    layer: int = 2  # K: tokens are dropped after decoder layer K-1 (0-indexed); layers 0..K-1 see all tokens

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 1:
            raise ValueError(f"layer must be an int >= 1, got {self.layer!r}")


@register("fastv")
class FastV(Method):
    """FastV: drop visual tokens inside the LLM by the attention they receive at layer K-1 (baseline)."""

    stage = "llm"
    Config = FastVConfig
    paper = "Chen et al., An Image is Worth 1/2 Tokens After Layer 2, ECCV 2024 (arXiv 2403.06764)"

    def _check(self, num_layers: int) -> int:
        if self.config.layer >= num_layers:
            raise ValueError(f"fastv layer={self.config.layer} must be < the model's {num_layers} decoder layers")
        return self.config.layer - 1

    def drop_layers(self, num_layers: int) -> list[int]:
        return [self._check(num_layers)]

    def attention_layers(self, num_layers: int) -> list[int]:
        return [self._check(num_layers)]

    def select_in_llm(self, tokens: LayerTokens) -> list[torch.Tensor]:
        scores = tokens.attention(None)  # all real query rows
        return top_per_image(scores, tokens, lambda present, keep, before: keep)
