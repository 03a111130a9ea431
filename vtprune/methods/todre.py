"""ToDRE (arXiv 2505.18757): greedy diversity seeded by a pivot token before the LLM (stage 1),
then, inside the LLM, dropping every visual token once the question stops looking at them (stage 2)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernels import greedy_select
from .base import (
    ImageTokens, LayerTokens, Method, PruneConfig, Selection, VisionSignal, check_bool, question_rows, ranking, top_per_image,
)
from .registry import register


def select(features: torch.Tensor, keep: int, pivot: torch.Tensor, rule: str = "maxmin") -> torch.Tensor:
    """LongTensor[B, keep], ascending. features [B, N, D]; pivot LongTensor[B] is picked first.

    rule "maxmin": add the token farthest (cosine distance) from its nearest selected token;
    "maxsum": add the token with the smallest summed cosine similarity to the selected tokens.
    float32 arithmetic, lowest-index ties, selected tokens excluded explicitly."""
    return greedy_select(features, keep, pivot, rule)


def visual_share(scores: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
    """float [B]: the share of the (row-averaged) attention mass that falls on visual keys."""
    total = scores.sum(1)
    return torch.where(visual, scores, 0).sum(1) / total.clamp_min(1e-30)


@dataclass
class ToDREConfig(PruneConfig):
    rule: str = "maxmin"  # "maxmin" (v1, greedy k-center) or "maxsum" (v2, greedy max-sum)
    stage1: bool = True  # False: stage 2 alone, every visual token entering the LLM (no keep / ratio then)
    stage2: bool = True  # drop all visual tokens inside the LLM when the question's attention to them < tau
    tau: float = 0.10  # stage 2 drops a sample's visual tokens when its question gives them < tau of its attention
    stage2_layer: int | None = None  # 0-based decoder layer whose attention decides; None = min(floor(7L/8), L-2)
    # (at most L-2, so that some layer follows)

    def __post_init__(self):
        check_bool("stage1", self.stage1)
        if not self.stage1:
            check_bool("stage2", self.stage2)
            if not self.stage2:
                raise ValueError("stage1=False and stage2=False prune nothing: turn one stage on")
            if self.keep is not None or self.ratio not in (None, 1, 1.0):
                raise ValueError("stage1=False lets every visual token into the LLM: keep / ratio set stage 1's "
                                 f"budget and do not apply (got keep={self.keep!r}, ratio={self.ratio!r})")
            self.ratio = 1.0
        super().__post_init__()
        if self.rule not in ("maxmin", "maxsum"):
            raise ValueError(f"rule must be 'maxmin' or 'maxsum', got {self.rule!r}")
        check_bool("stage2", self.stage2)
        if isinstance(self.tau, bool) or not isinstance(self.tau, (int, float)) or not 0 <= self.tau <= 1:
            raise ValueError(f"tau must be a float in [0, 1], got {self.tau!r}")
        if self.stage2_layer is not None and (isinstance(self.stage2_layer, bool) or not isinstance(self.stage2_layer, int)
                                              or self.stage2_layer < 0):
            raise ValueError(f"stage2_layer must be an int >= 0 or None, got {self.stage2_layer!r}")
        if self.stage2_layer is not None and not self.stage2:
            raise ValueError("stage2_layer sets where stage 2 runs; it needs stage2=True")
        if self.tau != type(self).tau and not self.stage2:
            raise ValueError("tau is stage 2's threshold; it needs stage2=True")


@register("todre")
class ToDRE(Method):
    """Pivot-seeded greedy diversity before the LLM; optional all-or-nothing visual drop inside it."""

    stage = "projector"
    Config = ToDREConfig
    paper = "ToDRE: Visual Token Pruning via Diversity and Task Awareness (arXiv 2505.18757)"

    @property
    def llm_phase_always(self) -> bool:
        """Stage 2 alone runs although every image is within its (whole) budget."""
        return not self.config.stage1

    def vision_signals(self):
        # the pivot: CLS->patch attention at the feature layer; encoders without CLS: attention received
        return {"pivot": VisionSignal("feature", "cls_else_mean")}

    @staticmethod
    def _pivot(image: ImageTokens) -> torch.Tensor:
        """LongTensor[1]: the highest-scoring token (anyres: of the base (thumbnail) grid only)."""
        pivot = image.signals["pivot"].float()
        if image.base is None:
            return ranking(pivot)[:1]
        base = image.base.to(pivot.device)
        return base[ranking(pivot[base])[:1]]

    def select(self, image: ImageTokens) -> Selection:
        first = self._pivot(image).to(image.features.device)
        return Selection(select(image.features[None], image.keep, first, self.config.rule)[0])

    def select_batch(self, images: list[ImageTokens]) -> list[Selection]:
        features = torch.stack([im.features for im in images])
        first = torch.cat([self._pivot(im) for im in images]).to(features.device)
        return [Selection(row) for row in select(features, images[0].keep, first, self.config.rule)]

    def _layer(self, num_layers: int) -> list[int]:
        if not self.config.stage2:
            return []
        p = self.config.stage2_layer if self.config.stage2_layer is not None else (7 * num_layers) // 8
        if p > num_layers - 2:
            if self.config.stage2_layer is not None:
                raise ValueError(f"todre stage2_layer={p} must be < {num_layers - 1} (a layer must follow it)")
            p = num_layers - 2
        return [p] if p >= 0 else []

    drop_layers = _layer
    attention_layers = _layer

    def select_in_llm(self, tokens: LayerTokens) -> list[torch.Tensor]:
        rows = question_rows(tokens)
        share = visual_share(tokens.attention(rows), tokens.visual)
        drop = (rows.any(1) & (share < self.config.tau)).tolist()  # per sample: its question looks away
        present = tokens.visual.sum(1).tolist()
        if not any(drop):
            return [torch.arange(int(n), device=tokens.visual.device) for n in present]
        # where it does, every image loses all its tokens, except one within its budget (keep >= N) unless stage 2
        # runs alone (every image is within its budget then)
        if self.config.stage1:
            emptied = top_per_image(torch.zeros(tokens.visual.shape, device=share.device), tokens, lambda *_: 0)
        else:
            emptied = [torch.zeros(0, dtype=torch.long, device=tokens.visual.device)] * len(present)
        return [emptied[b] if drop[b] else torch.arange(int(n), device=tokens.visual.device)
                for b, n in enumerate(present)]
