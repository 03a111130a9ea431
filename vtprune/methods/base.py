"""What every strategy shares: the config base, the budget rule, the data a method is handed and
returns, and the `Method` base class. Nothing here knows about model classes."""
from __future__ import annotations

import dataclasses
import operator
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
    # videos: "frame" = each frame keeps its own budget; "clip" = a video's frames share the sum of their
    # budgets and the strategy chooses across all of them (frames that repeat others give up their tokens)
    video_budget: str = "frame"
    # the options that set the budget: an explicit one replaces all of them from a config file
    budget_fields: ClassVar[tuple[str, ...]] = ("keep", "ratio")

    def __post_init__(self):
        self._check_flags()
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

    def _check_flags(self):
        check_bool("keep_positions", self.keep_positions)
        if self.video_budget not in ("frame", "clip"):
            raise ValueError(f"video_budget must be 'frame' or 'clip', got {self.video_budget!r}")

    def budget(self, n: int) -> int:
        """Tokens kept for an image of `n` visual tokens: min(n, keep) or max(1, round(ratio * n))."""
        if self.keep is not None:
            return min(n, self.keep)
        return min(n, max(1, round(self.ratio * n)))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class InLLMConfig(PruneConfig):
    """Options of a strategy that drops tokens inside the decoder only: the tokens it keeps keep their
    original positions (renumbering them per layer group, as some authors' code does, is not implemented)."""

    keep_positions: bool = True  # always True: tokens dropped inside the LLM keep their original positions

    def __post_init__(self):
        super().__post_init__()
        if self.keep_positions is not True:
            raise NotImplementedError("keep_positions=False (renumbering the kept tokens inside the decoder) is not "
                                      "implemented: tokens dropped inside the LLM keep their original positions")


def check_real(name: str, value, low: float | None = None, high: float | None = None, *, low_open: bool = False
               ) -> float:
    """`value` as a float: a finite real number (not a bool) with low <= value <= high (low < value with
    low_open); a TypeError / ValueError naming the option otherwise."""
    import math

    span = (f" in {'(' if low_open else '['}{low}, {high}]" if low is not None and high is not None else
            f" {'>' if low_open else '>='} {low}" if low is not None else f" <= {high}" if high is not None else "")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number{span}, got {value!r}")
    try:
        v = float(value)
    except OverflowError:  # an int beyond float range
        v = math.inf
    if not math.isfinite(v) or (low is not None and (v <= low if low_open else v < low)) or (high is not None and v > high):
        raise ValueError(f"{name} must be a finite number{span}, got {value!r}")
    return v


def check_int(name: str, value, low: int | None = None, high: int | None = None) -> int:
    """`value` if it is an int (not a bool) in [low, high]; a TypeError / ValueError naming the option otherwise."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        span = f">= {low}" if high is None else f"<= {high}" if low is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be an int {span}, got {value!r}")
    return value


def is_grid(value, rank: int) -> bool:
    """`value` is a grid: a tuple, list or torch.Size of `rank` integers >= 1 (Python, numpy or 0-dim
    integer tensor values; not bools)."""
    return (isinstance(value, (tuple, list)) and len(value) == rank
            and all(_integer(x) is not None and _integer(x) >= 1 for x in value))


def as_grid(value) -> tuple:
    """A grid accepted by is_grid as a tuple of Python ints."""
    return tuple(_integer(x) for x in value)


def _integer(x) -> int | None:
    """x as a Python int where it is an integer (operator.index: int, numpy integers, 0-dim integer
    tensors), else None (bools, floats, anything else)."""
    if isinstance(x, bool) or (isinstance(x, torch.Tensor) and x.dtype == torch.bool):
        return None  # (numpy bools refuse operator.index themselves)
    try:
        return operator.index(x)
    except TypeError:
        return None


def check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool (True or False), got {value!r}")
    return value


# OpenAI CLIP's image normalisation (the processors of LLaVA-1.5 and Qwen2-VL / 2.5-VL use it)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
REDUCES = ("mean", "cls", "cls_else_mean", "context", "entropy")


@dataclass
class VisionSignal:
    """Attention inside the vision encoder that a pre-LLM method needs, as one float32 score per
    LLM-side token of each image (Qwen-VL: averaged over the 2x2 patches merged into a token).

    layer: 0-based encoder layer (negative counts from the end); "feature" = the layer whose output
    feeds the projector (Qwen-VL: the last block); "object" = the adapter's middle layer for object
    scores (CLIP-L/336: layer 9 of 24, 1-indexed; Qwen-VL: the middle block).
    reduce (all averaged over heads, softmax over the image's keys):
      "mean"  attention each token receives, averaged over all query rows;
      "cls"   the CLS row's attention (encoders with a CLS token only);
      "cls_else_mean"  "cls" where the encoder has a CLS token, else "mean";
      "context"  VFlowOpt's map: with c = the "mean" scores, the context rows S = {j: c_j > threshold *
                 mean(c)} (or {argmax c} if empty); the attention each token receives, averaged over S;
      "entropy"  not attention: the Shannon entropy (bits, 256 bins) of the grey-level pixels (0-255)
                 under each token, from the raw image (the layer is ignored).
    The CLS key column is always dropped from the result.
    """

    layer: int | str
    reduce: str = "mean"
    threshold: float | None = None  # "context" only
    # "entropy" only: the processor's per-channel normalisation, undone to recover 0-255 pixels
    pixel_mean: tuple = CLIP_MEAN
    pixel_std: tuple = CLIP_STD
    option: str | None = None  # the strategy's option that set `layer` (errors about the layer name it)

    def __post_init__(self):
        if self.reduce not in REDUCES:
            raise ValueError(f"reduce must be one of {REDUCES}, got {self.reduce!r}")
        if (self.reduce == "context") != (self.threshold is not None):
            raise ValueError("threshold is required with reduce='context' and only allowed there")

    def named_layer(self) -> str:
        """`layer` as errors name it: by the strategy's option that set it, where one did."""
        return f"{self.option}={self.layer!r}" if self.option is not None else f"vision layer {self.layer!r}"

    def layer_error(self, name: str, n_layers: int, where: str) -> ValueError:
        """The error for a layer outside [-n_layers, n_layers) (`where` says what those layers are)."""
        if self.option is not None:
            return ValueError(f"{self.named_layer()}: must be an int in [{-n_layers}, {n_layers}) ({where})")
        return ValueError(f"vision signal {name!r}: its layer must be 'feature', 'object' or an int in "
                          f"[{-n_layers}, {n_layers}) ({where}), got {self.layer!r}")


@dataclass
class ImageTokens:
    """One image (or video frame) as a pre-LLM method sees it.

    features: [N, D] projected visual tokens (the LLM input embeddings of the image's slots).
    grid: (t, h, w) of those tokens on the LLM-side grid, or None when unknown.
    keep: the resolved budget for this image (< N; images with keep >= N never reach a method).
    signals: name -> [N] float32 scores requested through `Method.vision_signals`.
    base: for a multi-grid (anyres) image, LongTensor of the indices of its base (thumbnail) grid's
      tokens, ascending; None for a single-grid image.
    """

    features: torch.Tensor
    grid: tuple[int, int, int] | None
    keep: int
    signals: dict[str, torch.Tensor] = field(default_factory=dict)
    base: torch.Tensor | None = None


def frame_grid(image: ImageTokens, method: str) -> tuple[int, int]:
    """(h, w) of a single-frame image's token grid; a clear error when the adapter could not tell it."""
    if image.grid is None:
        raise ValueError(f"{method} needs the image's token grid, which this model's adapter could not determine")
    t, h, w = image.grid
    if t != 1:
        raise ValueError(f"{method} works per frame; got a grid with t={t}")
    return h, w


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
    importance: torch.Tensor | None = None  # optional float [k] per kept token, handed on to the llm stage
    # as LayerTokens.state["importance"]


@dataclass
class LayerTokens:
    """The sequence after decoder layer `layer`, as an `llm`-stage method sees it.

    hidden: [B, L, D] the layer's output; visual: BoolTensor [B, L] current visual slots;
    mask: BoolTensor [B, L] real (non-pad) slots; keep: LongTensor [B] the user's budget per sample
      (the sum of its images' budgets); before: LongTensor [B] visual tokens the sample had on entering
      the model (before any pruning); keep >= before means the user asked for nothing to be pruned.
    unit: LongTensor [B, L] the image (or video frame) each current visual slot belongs to, an index
      into `images`, (sample, tokens on entering the model, budget) of each image of the batch (what
      `vtprune.stats(model).images` reports); -1 at other slots. Budgets are per image: `top_per_image`.
    attention: callable(query_rows) -> float32 [B, L], attention each key receives at this layer,
      averaged over heads and the given query rows (BoolTensor [B, L]; None = all real rows);
      available when the method lists the layer in `attention_layers`.
    attention_next: the same for layer `layer + 1`, computed from `hidden` with that layer's input norm
      and q/k projections (the layer has not run yet); available at drop layers (a method that reads it
      sets `reads_next_attention`).
    structural: BoolTensor [B, L] placeholder slots in no image (LLaVA-OneVision's closing newline after a
      video): never pruned, and not text either; None = none.
    state: per-forward scratch shared by all hooks of one prefill. Tensors of shape [B, L] in it are
      re-gathered by the runtime whenever tokens are dropped, so they stay aligned with `hidden`.
      A pre-LLM `Selection.importance` arrives here as state["importance"] (0 for text slots).
    """

    layer: int  # 0-based decoder layer that just ran
    hidden: torch.Tensor
    visual: torch.Tensor
    mask: torch.Tensor
    keep: torch.Tensor
    before: torch.Tensor | None = None
    unit: torch.Tensor | None = None
    images: tuple = ()
    structural: torch.Tensor | None = None
    num_layers: int = 0  # decoder layers in the model
    attention: object = None
    attention_next: object = None
    state: dict = field(default_factory=dict)


def ranking(scores: torch.Tensor) -> torch.Tensor:
    """Indices ordering `scores` (1-D) from highest to lowest, ties to the lowest index (float32)."""
    return torch.sort(scores.float(), descending=True, stable=True).indices


def top_visual(scores: torch.Tensor, visual: torch.Tensor, keep) -> list[torch.Tensor]:
    """Per sample: ascending indices, into that sample's visual slots in order, of its keep[b] highest
    scores (ties to the lower index). scores [B, L]; visual BoolTensor [B, L]; keep: ints or LongTensor [B]."""
    return [ranking(scores[b][visual[b]])[: int(keep[b])].sort().values for b in range(scores.shape[0])]


def top_per_image(scores: torch.Tensor, tokens: LayerTokens, count) -> list[torch.Tensor]:
    """Per sample: ascending indices, into its current visual slots in order, of the highest `scores`
    within each image (or frame), ties to the lower index. An image with `present` tokens left, budget
    `keep` and `before` tokens on entering the model keeps min(present, count(present, keep, before)) of
    them, or all of them when keep >= before (nothing is pruned for an image within its budget). The
    images of the whole batch are found with two host syncs (not two per sample)."""
    visual = tokens.visual
    rows, slots = visual.nonzero().unbind(1)
    per_row = visual.sum(1)
    place = torch.arange(rows.numel(), device=rows.device) - (per_row.cumsum(0) - per_row)[rows]  # in its sample
    units = len(tokens.images) + 1
    key = rows * units + tokens.unit[rows, slots] + 1  # (sample, image) pairs, in that order
    keys, sizes = torch.unique(key, return_counts=True)
    groups = torch.argsort(key, stable=True)  # each pair's slots together, in slot order
    keys, sizes = torch.stack([keys, sizes]).tolist() if keys.numel() else ([], [])
    picks: list[list[torch.Tensor]] = [[] for _ in range(visual.shape[0])]
    for k, present, members in zip(keys, sizes, groups.split(sizes)):
        b, u = divmod(k, units)
        if u < 1:
            raise RuntimeError("a visual slot belongs to no image")
        _, before, keep = tokens.images[u - 1]
        n = present if keep >= before else max(0, min(present, int(count(present, keep, before))))
        picks[b].append(place[members][ranking(scores[b, slots[members]])[:n]])
    return [torch.cat(p).sort().values if p else torch.zeros(0, dtype=torch.long, device=visual.device) for p in picks]


def question_rows(tokens: LayerTokens) -> torch.Tensor:
    """BoolTensor [B, L]: real text slots after each sample's last visual slot (the question); a structural
    placeholder (a video's closing newline) is neither visual nor question."""
    image = tokens.visual if tokens.structural is None else tokens.visual | tokens.structural
    idx = torch.arange(image.shape[1], device=image.device)
    last = torch.where(image, idx, -1).max(dim=1).values
    return tokens.mask & ~image & (idx[None] > last[:, None]) & (last[:, None] >= 0)


class Method:
    """Base class of a strategy. Subclasses set `stage`, `Config` and implement its hook:

    - stage "vision" / "projector": `select(image: ImageTokens) -> Selection`, once per image before
      the language model;
    - inside the decoder (stage "llm", or a pre-LLM method with a second, in-LLM phase):
      `drop_layers(num_layers) -> list[int]` (decoder layers after which tokens are dropped) and
      `select_in_llm(tokens: LayerTokens) -> list[LongTensor]` (per sample, ascending indices into
      that sample's current visual slots, in sequence order; may be empty to drop them all).
      `observe_layers` / `observe` read the decoder layers' sub-module inputs and outputs on the way.

    The in-LLM phase runs on a prefill only when some image is over its budget (keep >= N prunes
    nothing, at any stage), unless `llm_phase_always` is set.
    """

    name: ClassVar[str] = ""
    stage: ClassVar[str] = ""
    Config: ClassVar[type[PruneConfig]] = PruneConfig
    paper: ClassVar[str] = ""
    # multi-grid images (LLaVA-NeXT / OneVision anyres: base tile + crop grid): "" = the method sees the
    # whole image at once; "select" / "merge" = it runs on each grid separately (vtprune.hooks.anyres)
    per_grid: ClassVar[str] = ""
    # the method calls LayerTokens.attention_next at its drop layers: layer p + 1 must have attention (a hybrid
    # model's linear-attention layer is refused when the method is patched on, not at the first forward)
    reads_next_attention: ClassVar[bool] = False
    # the in-LLM phase runs on every prefill with images, all of them within budget too (todre stage1=False:
    # stage 2 alone, with every token entering the LLM); set per instance (a property) or per class
    llm_phase_always: bool = False

    def __init__(self, config: PruneConfig):
        self.config = config

    def budget(self, n: int, grid: tuple[int, int, int] | None) -> int:
        """Tokens this method keeps for an image of `n` tokens laid out on `grid` (default: the config's rule)."""
        return self.config.budget(n)

    def merged_grid(self, h: int, w: int, keep: int) -> tuple[int, int]:
        """per_grid "merge" methods: the (h', w') grid a (h, w) grid is merged to with budget `keep`."""
        raise NotImplementedError(f"{self.name} does not merge grids")

    # vision / projector stage -------------------------------------------------------------
    def vision_signals(self) -> dict[str, VisionSignal]:
        """Vision-encoder attention this method needs, by name (delivered in ImageTokens.signals)."""
        return {}

    def select(self, image: ImageTokens) -> Selection:
        raise NotImplementedError

    def select_batch(self, images: list[ImageTokens]) -> list[Selection]:
        """`select` for images of one shape (same N, grid and keep), e.g. a ViT batch. The default calls
        `select` per image; a method whose selection runs batched (one kernel launch for all) overrides it
        and must return exactly what `select` returns for each image."""
        return [self.select(image) for image in images]

    # llm stage ----------------------------------------------------------------------------
    def drop_layers(self, num_layers: int) -> list[int]:
        return []

    def attention_layers(self, num_layers: int) -> list[int]:
        """Decoder layers whose attention this method reads (queries/keys are captured there)."""
        return []

    def select_in_llm(self, tokens: LayerTokens) -> list[torch.Tensor]:
        raise NotImplementedError

    def observe_layers(self, num_layers: int) -> list[int]:
        """Decoder layers whose sub-module inputs/outputs `observe` is given during the prefill."""
        return []

    def observe(self, tokens: LayerTokens, io: dict[str, torch.Tensor]) -> None:
        """Called after each observed layer (before a drop at that layer). io holds [B, L, D] tensors:
        attn_in (the normalised input of self-attention), attn_out (its output, before the residual),
        mlp_in, mlp_out. Accumulate what is needed into `tokens.state`."""
