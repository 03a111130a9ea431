"""TransPrune (arXiv 2507.20630, CVPR 2026): progressive drops inside the LLM, ranking visual tokens by
their token transition variation (TTV) accumulated over the middle layers plus the attention the
question pays them (instruction-guided attention, IGA) at the next layer (llm stage, prefill only)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import InLLMConfig, LayerTokens, Method, check_bool, check_int, check_real, question_rows, top_per_image
from .registry import register

# The paper's "High" setting for a 32-layer LLM: drops after layers 7, 9, 12 (1-indexed), keeping
# int(N * fraction) of the N visual tokens; TTV accumulates over layers 7..12.
HIGH = ((7, 0.875), (9, 0.625), (12, 0.125))
REFERENCE_LAYERS = 32


def transition(x: torch.Tensor, y: torch.Tensor, valid: torch.Tensor, abs_cos: bool = False) -> torch.Tensor:
    """Per-token transition variation of one sub-module: (‖y‖/‖x‖) * softmax over the sample's valid
    tokens of (1 - cos(x, y)). x: its (normalised) input [B, L, D]; y: its output before the residual
    add; valid: BoolTensor [B, L]. Returns float32 [B, L], 0 at invalid slots."""
    x, y = x.float(), y.float()
    nx, ny = x.norm(dim=-1), y.norm(dim=-1)
    magnitude = ny / nx.clamp_min(1e-12)
    cos = (x * y).sum(-1) / (nx * ny).clamp_min(1e-12)
    if abs_cos:
        cos = cos.abs()
    direction = torch.softmax((1.0 - cos).masked_fill(~valid, float("-inf")), dim=1)
    return torch.where(valid, magnitude * direction, 0.0)


def normalise(scores: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
    """Restrict [B, L] scores to visual slots and scale each sample's to sum 1 (0 elsewhere)."""
    s = torch.where(visual, scores.float(), 0.0)
    return s / s.sum(1, keepdim=True).clamp_min(1e-30)


def default_schedule(num_layers: int) -> list[tuple[int, float]]:
    """(0-based layer after which tokens drop, fraction of N kept): the paper's layers on >= 13-layer
    decoders; on smaller ones the layers scale with depth (duplicates merge into the later fraction)."""
    out: dict[int, float] = {}
    for layer, frac in HIGH:
        if num_layers > HIGH[-1][0]:
            p = layer - 1
        else:
            p = min(num_layers - 2, max(0, round(layer * num_layers / REFERENCE_LAYERS) - 1))
        out[p] = frac
    return sorted(out.items())


@dataclass
class TransPruneConfig(InLLMConfig):
    alpha: float = 0.5  # score = alpha * TTV + (1 - alpha) * IGA
    abs_cos: bool = False  # direction term 1 - |cos| (the paper's text) instead of 1 - cos (the authors' code)
    # [(0-based layer, fraction of N kept), ...]: the drops. Alone, the last fraction is the budget (ratio);
    # with keep/ratio, the last drop keeps that budget and no earlier one goes below it. None: the paper's
    # "High" setting (default_schedule), whose last fraction is the budget when no keep/ratio is given
    schedule: list | None = None
    accumulate_from: int | None = None  # first 0-based layer of TTV accumulation; None = the first drop layer

    def last_fraction(self) -> float:
        """The fraction of N the last drop keeps: the schedule's, else the "High" setting's (0.125)."""
        return float(self.schedule[-1][1]) if self.schedule is not None else HIGH[-1][1]

    def budget(self, n: int) -> int:
        """The schedule's own last fraction (the default's too) keeps int(N * fraction), as its earlier stages
        and the paper do; a keep / another ratio the usual rule."""
        if self.keep is None and float(self.ratio) == self.last_fraction():
            return min(n, max(1, int(n * float(self.ratio))))
        return super().budget(n)

    def __post_init__(self):
        if self.schedule is not None:
            self.schedule = _check_schedule(self.schedule)
        if self.keep is None and self.ratio is None:  # the schedule alone: its last stage is the budget
            self.ratio = self.last_fraction()
        super().__post_init__()
        check_real("alpha", self.alpha, 0.0, 1.0)
        check_bool("abs_cos", self.abs_cos)
        if self.accumulate_from is not None:
            check_int("accumulate_from", self.accumulate_from, 0)
            if self.schedule is not None and self.accumulate_from > self.schedule[-1][0]:
                raise ValueError(f"accumulate_from={self.accumulate_from} is after the last drop (layer "
                                 f"{self.schedule[-1][0]}): nothing would be accumulated")


def _check_schedule(schedule) -> list[list]:
    """[[layer, fraction], ...] with int layers >= 0, strictly increasing, and fractions in (0, 1]."""
    bad = f"schedule must be a non-empty list of (layer, fraction in (0, 1]) pairs, got {schedule!r}"
    if not isinstance(schedule, (list, tuple)) or not schedule:
        raise ValueError(bad)
    out = []
    for item in schedule:
        if not isinstance(item, (list, tuple)) or len(item) != 2:
            raise ValueError(bad)
        out.append([check_int("schedule layer", item[0], 0),
                    check_real("schedule fraction", item[1], 0.0, 1.0, low_open=True)])
    if [x[0] for x in out] != sorted({x[0] for x in out}):
        raise ValueError(f"schedule layers must be strictly increasing, got {schedule!r}")
    return out


@register("transprune")
class TransPrune(Method):
    """Progressive in-LLM drops by token transition variation + the question's attention."""

    stage = "llm"
    reads_next_attention = True
    Config = TransPruneConfig
    paper = "Li et al., TransPrune: Token Transition Pruning for Efficient LVLMs (arXiv 2507.20630)"

    def _schedule(self, num_layers: int) -> list[tuple[int, float]]:
        if self.config.schedule is not None:
            return [(int(p), float(f)) for p, f in self.config.schedule]
        return default_schedule(num_layers)

    def drop_layers(self, num_layers):
        return [p for p, _ in self._schedule(num_layers)]

    def observe_layers(self, num_layers):
        sched = self._schedule(num_layers)
        first = self.config.accumulate_from if self.config.accumulate_from is not None else sched[0][0]
        if first > sched[-1][0]:
            raise ValueError(f"accumulate_from={first} is after the last drop (layer {sched[-1][0]} of this "
                             f"{num_layers}-layer decoder): nothing would be accumulated")
        return list(range(first, sched[-1][0] + 1))

    def observe(self, tokens: LayerTokens, io: dict) -> None:
        valid = tokens.mask
        ttv = transition(io["attn_in"], io["attn_out"], valid, self.config.abs_cos)
        ttv = ttv + transition(io["mlp_in"], io["mlp_out"], valid, self.config.abs_cos)
        prev = tokens.state.get("ttv")
        tokens.state["ttv"] = ttv if prev is None else prev + ttv

    def select_in_llm(self, tokens: LayerTokens) -> list[torch.Tensor]:
        sched = self._schedule(tokens.num_layers)
        fraction = dict(sched)[tokens.layer]
        last = tokens.layer == sched[-1][0]
        ttv = tokens.state.get("ttv", torch.zeros_like(tokens.visual, dtype=torch.float32))
        iga = tokens.attention_next(question_rows(tokens))
        a = self.config.alpha
        score = a * normalise(ttv, tokens.visual) + (1 - a) * normalise(iga, tokens.visual)
        # per image of N tokens: the budget at the last stage, max(budget, int(N * fraction)) before it
        return top_per_image(score, tokens, lambda present, budget, n: budget if last else max(budget, int(n * fraction)))
