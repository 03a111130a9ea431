"""Property tests (hypothesis) for the pure selection functions: unique, ascending, in range, exactly
`keep` long, deterministic, and the same whether an image is selected alone or inside a batch."""
import torch
from hypothesis import given, settings, strategies as st

from vtprune.methods import divprune, hiprune, todre, token_shuffle, vflowopt

SETTINGS = settings(max_examples=40, deadline=None)


@st.composite
def batches(draw, grid=False):
    b = draw(st.integers(1, 3))
    if grid:
        h, w = draw(st.integers(1, 6)), draw(st.integers(1, 6))
        n = h * w
    else:
        h = w = None
        n = draw(st.integers(1, 40))
    d = draw(st.integers(1, 8))
    keep = draw(st.integers(1, n))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, d, generator=g)
    if draw(st.booleans()) and n > 1:  # exact duplicate rows and a zero row: ties everywhere
        x[:, 1] = x[:, 0]
        x[:, -1] = 0
    return x, keep, (h, w), g


def _valid(out, b, n, keep):
    assert out.shape == (b, keep) and out.dtype == torch.long
    for row in out.tolist():
        assert row == sorted(set(row)), "unique and ascending"
        assert 0 <= row[0] and row[-1] < n


@SETTINGS
@given(batches())
def test_divprune_properties(data):
    x, keep, _, _ = data
    out = divprune.select(x, keep)
    _valid(out, x.shape[0], x.shape[1], keep)
    assert torch.equal(out, divprune.select(x, keep))
    for i in range(x.shape[0]):
        assert torch.equal(divprune.select(x[i:i + 1], keep)[0], out[i])


@SETTINGS
@given(batches(), st.sampled_from(["maxmin", "maxsum"]))
def test_todre_properties(data, rule):
    x, keep, _, g = data
    pivot = torch.randint(0, x.shape[1], (x.shape[0],), generator=g)
    out = todre.select(x, keep, pivot, rule)
    _valid(out, x.shape[0], x.shape[1], keep)
    assert all(int(p) in row for p, row in zip(pivot, out.tolist())), "the pivot is always kept"
    for i in range(x.shape[0]):
        assert torch.equal(todre.select(x[i:i + 1], keep, pivot[i:i + 1], rule)[0], out[i])


@SETTINGS
@given(batches(grid=True), st.floats(0.0, 1.0))
def test_hiprune_properties(data, alpha):
    x, keep, grid, g = data
    obj, deep = x[..., 0], x[..., -1]
    if torch.rand(1, generator=g) < 0.3:
        obj = obj.round()  # many ties
    out = hiprune.select(obj, deep, grid, keep, alpha)
    _valid(out, x.shape[0], x.shape[1], keep)
    for i in range(x.shape[0]):
        assert torch.equal(hiprune.select(obj[i:i + 1], deep[i:i + 1], grid, keep, alpha)[0], out[i])


@SETTINGS
@given(batches(grid=True), st.floats(0.5, 8.0))
def test_vflowopt_prune_recycle_properties(data, a):
    x, keep, grid, _ = data
    scores = x[0, :, 0].abs()
    idx, tokens, imp = vflowopt.prune_recycle(x[0], scores, grid, keep, a)
    _valid(idx[None], 1, x.shape[1], keep)
    assert tokens.shape == (keep, x.shape[2]) and imp.shape == (keep,)
    again = vflowopt.prune_recycle(x[0], scores, grid, keep, a)
    assert torch.equal(idx, again[0]) and torch.equal(tokens, again[1])


@SETTINGS
@given(batches(grid=True))
def test_token_shuffle_budget_properties(data):
    x, keep, grid, _ = data
    tokens, idx, (hp, wp) = token_shuffle.merge(x[0], grid, keep=keep)
    assert hp * wp <= keep and tokens.shape == (hp * wp, x.shape[2])
    _valid(idx[None], 1, x.shape[1], hp * wp)
