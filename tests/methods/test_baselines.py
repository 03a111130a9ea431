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


@pytest.mark.parametrize("n, ratio, want", [(576, 0.111, 64), (576, 0.25, 144), (3, 0.1, 1), (10, 1.0, 10)])
def test_budget_rule(n, ratio, want):
    assert PruneConfig(ratio=ratio).budget(n) == want
    assert PruneConfig(keep=64).budget(n) == min(n, 64)
