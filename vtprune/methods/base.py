"""What every strategy shares: the config base, the budget rule, the data a method is handed and
returns, and the `Method` base class. Nothing here knows about model classes."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar

import torch

STAGES = ("vision", "projector", "llm")


@dataclass
class PruneConfig:
    """Options every strategy accepts. Exactly one of `keep` and `ratio` is given."""

    keep: int | None = None  # visual tokens kept per image (per video frame)
    ratio: float | None = None  # fraction of each image's visual tokens kept, in (0, 1]
    keep_positions: bool = False  # 1-D RoPE models: keep original positions (gaps) instead of renumbering

    def __post_init__(self):
        if (self.keep is None) == (self.ratio is None):
            raise ValueError("give exactly one of keep= (tokens kept per image) or ratio= (fraction kept, in (0, 1])")
        if self.keep is not None:
            if isinstance(self.keep, bool) or not isinstance(self.keep, int):
                raise TypeError(f"keep must be an int >= 1, got {self.keep!r}")
            if self.keep < 1:
                raise ValueError(f"keep must be >= 1, got {self.keep}")
        if self.ratio is not None:
            if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)):
                raise TypeError(f"ratio must be a float in (0, 1], got {self.ratio!r}")
            if not 0.0 < float(self.ratio) <= 1.0:
                raise ValueError(f"ratio must be in (0, 1], got {self.ratio}")

    def budget(self, n: int) -> int:
        """Tokens kept for an image of `n` visual tokens: min(n, keep) or max(1, round(ratio * n))."""
        if self.keep is not None:
            return min(n, self.keep)
        return min(n, max(1, round(self.ratio * n)))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class VisionSignal:
    """Attention inside the vision encoder that a `vision`-stage method needs.

    layer: 0-based encoder layer (negative counts from the end), or "feature" for the layer whose
    output feeds the projector. reduce: "mean" = attention each token receives, averaged over heads
    and all query rows; "cls" = the CLS row's attention (encoders with a CLS token only).
    """

    layer: int | str
    reduce: str = "mean"


@dataclass
class ImageTokens:
    """One image (or video frame) as a pre-LLM method sees it.

    features: [N, D] projected visual tokens (the LLM input embeddings of the image's slots).
    grid: (t, h, w) of those tokens on the LLM-side grid, or None when unknown.
    keep: the resolved budget for this image (< N; images with keep >= N never reach a method).
    signals: name -> [N] float32 scores requested through `Method.vision_signals`.
    """

    features: torch.Tensor
    grid: tuple[int, int, int] | None
    keep: int
    signals: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class Selection:
    """What a pre-LLM method returns for one image.

    indices: LongTensor[k], ascending, into the image's N tokens; the kept slots.
    tokens: optional [k, D] replacement embeddings for those slots (merging methods).
    grid: optional (t, h, w) of merged tokens laid out as a coarser grid, row-major (merging methods);
      M-RoPE models then give them coarse-grid positions.
    """

    indices: torch.Tensor
    tokens: torch.Tensor | None = None
    grid: tuple[int, int, int] | None = None


@dataclass
class LayerTokens:
    """The sequence after decoder layer `layer`, as an `llm`-stage method sees it.

    hidden: [B, L, D] the layer's output; visual: BoolTensor [B, L] current visual slots;
    mask: BoolTensor [B, L] real (non-pad) slots; keep: LongTensor [B] visual tokens to keep per sample;
    attention: callable(query_rows) -> float32 [B, L], attention each key receives at this layer,
      averaged over heads and the given query rows (BoolTensor [B, L]; None = all real rows);
      available when the method lists the layer in `attention_layers`.
    """

    layer: int
    hidden: torch.Tensor
    visual: torch.Tensor
    mask: torch.Tensor
    keep: torch.Tensor
    attention: object = None


class Method:
    """Base class of a strategy. Subclasses set `stage`, `Config` and implement one hook:

    - stage "vision" / "projector": `select(image: ImageTokens) -> Selection`
    - stage "llm": `drop_layers(num_layers) -> list[int]` (decoder layers after which tokens are
      dropped) and `select_in_llm(tokens: LayerTokens) -> list[LongTensor]` (per sample, ascending
      indices into that sample's current visual slots, in sequence order).
    """

    name: ClassVar[str] = ""
    stage: ClassVar[str] = ""
    Config: ClassVar[type[PruneConfig]] = PruneConfig
    paper: ClassVar[str] = ""

    def __init__(self, config: PruneConfig):
        self.config = config

    # vision / projector stage -------------------------------------------------------------
    def vision_signals(self) -> dict[str, VisionSignal]:
        """Vision-encoder attention this method needs, by name (delivered in ImageTokens.signals)."""
        return {}

    def select(self, image: ImageTokens) -> Selection:
        raise NotImplementedError

    # llm stage ----------------------------------------------------------------------------
    def drop_layers(self, num_layers: int) -> list[int]:
        return []

    def attention_layers(self, num_layers: int) -> list[int]:
        """Decoder layers whose attention this method reads (queries/keys are captured there)."""
        return []

    def select_in_llm(self, tokens: LayerTokens) -> list[torch.Tensor]:
        raise NotImplementedError
