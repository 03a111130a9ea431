"""`random` baseline: a uniform random subset of each image's tokens (projector stage)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import ImageTokens, Method, PruneConfig, Selection, check_int
from .registry import register


def select(n: int, keep: int, seed: int = 0) -> torch.Tensor:
    """Ascending LongTensor[keep]: the first `keep` entries of randperm(n) drawn from `seed`.

    The draw depends only on (n, keep, seed), so an image gets the same subset alone or in a batch.
    """
    if keep >= n:
        return torch.arange(n)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randperm(n, generator=gen)[:keep].sort().values


@dataclass
class RandomConfig(PruneConfig):
    seed: int = 0  # seed of the subset draw; same seed and image size give the same subset

    def __post_init__(self):
        super().__post_init__()
        check_int("seed", self.seed, -2**63, 2**64 - 1)  # what torch.Generator.manual_seed takes


@register("random")
class Random(Method):
    """Uniform random subset of each image's visual tokens (baseline)."""

    stage = "projector"
    Config = RandomConfig

    def select(self, image: ImageTokens) -> Selection:
        n = image.features.shape[0]
        return Selection(select(n, image.keep, self.config.seed).to(image.features.device))
