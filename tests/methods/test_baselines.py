import pytest
import torch

from vtprune.methods import fastv, pool, random
from vtprune.methods.base import PruneConfig


def test_random_is_deterministic_sorted_unique_and_batch_free():
    a = random.select(20, 6, seed=3)
    assert a.tolist() == sorted(set(a.tolist())) and len(a) == 6 and 0 <= a.min() and a.max() < 20
    assert torch.equal(a, random.select(20, 6, seed=3))
    assert not torch.equal(a, random.select(20, 6, seed=4))
    assert random.select(5, 9).tolist() == [0, 1, 2, 3, 4]


def test_random_draws_the_documented_subset_of_the_image_tokens():
    """The first keep entries of randperm(n) from the seed (so that published subsets can be redrawn), n
    the image's token count (not its feature size); every int64 seed is taken, negative ones included."""
    from vtprune.methods.base import ImageTokens

    image = ImageTokens(torch.randn(20, 7), None, 6)  # 20 tokens of 7 features
    for seed in (0, 3, -1, -2**63):
        want = torch.randperm(20, generator=torch.Generator().manual_seed(seed))[:6].sort().values
        assert torch.equal(random.select(20, 6, seed=seed), want), seed
        assert torch.equal(random.Random(random.RandomConfig(keep=6, seed=seed)).select(image).indices, want), seed
    with pytest.raises(ValueError, match="seed"):
        random.RandomConfig(keep=6, seed=-2**63 - 1)


@pytest.mark.parametrize("h, w, keep, want", [
    (24, 24, 64, (8, 8)), (24, 24, 144, (12, 12)), (24, 24, 288, (16, 16)),
    (4, 8, 2, (1, 2)), (4, 4, 4, (2, 2)), (2, 10, 3, (1, 3)), (1, 1, 1, (1, 1)),
])
def test_pooled_grid_keeps_aspect_within_budget(h, w, keep, want):
    assert pool.pooled_grid(h, w, keep) == want
    hp, wp = want
    assert hp * wp <= keep


def test_pool_hand_case_means_and_topleft_indices():
    feats = torch.arange(16.0).view(16, 1)  # 4x4 grid, value = raster index
    tokens, idx, grid = pool.pool(feats, (4, 4), keep=4)
    assert grid == (2, 2) and idx.tolist() == [0, 2, 8, 10]
    assert tokens.squeeze(1).tolist() == [2.5, 4.5, 10.5, 12.5]  # means of the 2x2 windows


def test_fastv_select_ties_go_to_lowest_index():
    scores = torch.tensor([[0.0, 0.5, 0.5, 0.1, 0.5, 0.2]])
    visual = torch.tensor([[False, True, True, True, True, True]])
    # visual scores [0.5, 0.5, 0.1, 0.5, 0.2]; keep 2 -> the first two 0.5s
    assert fastv.select(scores, visual, torch.tensor([2]))[0].tolist() == [0, 1]
    assert fastv.select(scores, visual, torch.tensor([4]))[0].tolist() == [0, 1, 3, 4]


@pytest.mark.parametrize("n, ratio, want", [(576, 0.111, 64), (576, 0.25, 144), (3, 0.1, 1), (10, 1.0, 10),
                                             (10, 0.33, 3), (10, 0.25, 2)])
def test_budget_rule(n, ratio, want):
    # keep = max(1, round(ratio * N)) (specs/README.md): 3.3 -> 3 (not the ceiling), 2.5 -> 2 (Python's round,
    # half to even)
    assert PruneConfig(ratio=ratio).budget(n) == want
    assert PruneConfig(keep=64).budget(n) == min(n, 64)
