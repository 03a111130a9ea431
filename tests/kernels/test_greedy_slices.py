"""greedy_select bounds the memory of its Gram matrices: a batch whose B x N x N float32 would pass
GRAM_BYTES is selected in slices, with the picks of the whole batch at once."""
import pytest
import torch

import vtprune.kernels as kernels


@pytest.mark.parametrize("rule", ["maxmin", "maxsum"])
@pytest.mark.parametrize("pivots", [False, True])
def test_a_batch_over_the_gram_budget_goes_in_slices_with_the_same_picks(monkeypatch, rule, pivots):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 7, 6, generator=g)
    x[3, 4] = x[3, 1]  # a duplicate: ties still go to the lowest index inside a slice
    first = [6, 0, 3, 1, 5] if pivots else None  # (a list: the dispatcher makes it a tensor to slice)
    want = kernels.greedy_select_torch(x, 3, None if first is None else torch.tensor(first), rule)

    seen, reference = [], kernels.greedy_select_torch

    def spy(features, keep, f=None, r="maxmin"):
        seen.append(features.shape[0])
        return reference(features, keep, f, r)

    monkeypatch.setattr(kernels, "greedy_select_torch", spy)
    monkeypatch.setattr(kernels, "GRAM_BYTES", 2 * 4 * 7 * 7)  # two images' Gram matrices
    assert torch.equal(kernels.greedy_select(x, 3, first, rule), want)
    assert seen == [2, 2, 1]

    seen.clear()
    monkeypatch.setattr(kernels, "GRAM_BYTES", 10)  # less than one image: one at a time, never none
    assert torch.equal(kernels.greedy_select(x, 3, first, rule), want)
    assert seen == [1] * 5

    seen.clear()
    monkeypatch.setattr(kernels, "GRAM_BYTES", 5 * 4 * 7 * 7)  # the whole batch fits: one call
    assert torch.equal(kernels.greedy_select(x, 3, first, rule), want)
    assert seen == [5]


def test_sliced_calls_still_check_their_arguments(monkeypatch):
    monkeypatch.setattr(kernels, "GRAM_BYTES", 10)
    x = torch.randn(3, 4, 2)
    with pytest.raises(ValueError, match="first/pivot"):
        kernels.greedy_select(x, 2, [0, 1, 4])
    with pytest.raises(ValueError, match="keep"):
        kernels.greedy_select(x, 5)
    with pytest.raises(ValueError, match=r"\[B, N, D\]"):
        kernels.greedy_select(x[0], 2)


def test_the_sliced_path_checks_the_seeds_of_the_whole_batch(monkeypatch):
    # slice by slice, 4 seeds for 3 images were taken (the 4th ignored) and gave picks
    monkeypatch.setattr(kernels, "GRAM_BYTES", 10)  # one image per slice
    x = torch.randn(3, 4, 2, generator=torch.Generator().manual_seed(0))
    for first in ([0, 1, 2, 3], torch.tensor([[0, 1, 2, 3]])):
        with pytest.raises(ValueError, match="first/pivot"):
            kernels.greedy_select(x, 2, first)


def test_the_budget_counts_the_n_by_n_gram_not_the_feature_width(monkeypatch):
    # 7 tokens of width 2 or 40: two images' 7 x 7 float32 Grams per call either way (a budget sized from D
    # gave 24 images per call -- past the budget where N > D, as in long video clips -- or one at a time)
    seen, reference = [], kernels.greedy_select_torch

    def spy(features, keep, f=None, r="maxmin"):
        seen.append(features.shape[0])
        return reference(features, keep, f, r)

    monkeypatch.setattr(kernels, "greedy_select_torch", spy)
    monkeypatch.setattr(kernels, "GRAM_BYTES", 2 * 4 * 7 * 7)
    for width in (2, 40):
        seen.clear()
        x = torch.randn(5, 7, width, generator=torch.Generator().manual_seed(width))
        assert torch.equal(kernels.greedy_select(x, 3), reference(x, 3))
        assert seen == [2, 2, 1], width
