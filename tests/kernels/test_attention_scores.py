import pytest
import torch

from vtprune.kernels import attention_scores, attention_scores_torch


def naive(q, k, scale, rows, causal, key_mask, window=None):
    """Materialise the whole attention map, one sample and head at a time."""
    b, hq, nq, _ = q.shape
    hk, nk = k.shape[1], k.shape[2]
    out = torch.zeros(b, nk, dtype=torch.float64)
    for bi in range(b):
        sel = [i for i in range(nq) if rows is None or rows[bi, i]]
        for h in range(hq):
            kh = k[bi, h // (hq // hk)].double()
            for i in sel:
                logits = (q[bi, h, i].double() @ kh.T) * scale
                allowed = torch.ones(nk, dtype=torch.bool)
                if causal:
                    allowed &= torch.arange(nk) <= i + nk - nq
                if window is not None:  # the last `window` positions up to the row's own
                    allowed &= torch.arange(nk) > i + nk - nq - window
                if key_mask is not None:
                    allowed &= key_mask[bi]
                p = torch.softmax(logits.masked_fill(~allowed, float("-inf")), -1)
                out[bi] += p / (len(sel) * hq)
    return out.float()


@pytest.mark.parametrize("hq, hk", [(4, 4), (4, 2), (6, 1)], ids=lambda v: str(v))
@pytest.mark.parametrize("causal, window", [(False, None), (True, None), (True, 3)], ids=["full", "causal", "window3"])
@pytest.mark.parametrize("nq, nk", [(7, 7), (3, 9)], ids=["square", "tail-queries"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_matches_naive_softmax(hq, hk, causal, window, nq, nk, dtype):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, hq, nq, 8, generator=g).to(dtype)
    k = torch.randn(2, hk, nk, 8, generator=g).to(dtype)
    key_mask = torch.ones(2, nk, dtype=torch.bool)
    key_mask[1, :2] = False  # left padding in sample 1
    rows = torch.ones(2, nq, dtype=torch.bool)
    rows[1, :2] = False  # padding rows are never averaged (with causal masking they see no key)
    got = attention_scores(q, k, 0.3, rows, causal=causal, key_mask=key_mask, window=window)
    want = naive(q.float(), k.float(), 0.3, rows, causal, key_mask, window)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_query_index_forms_agree():
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(2, 2, 5, 4, generator=g), torch.randn(2, 2, 5, 4, generator=g)
    by_list = attention_scores_torch(q, k, 0.5, torch.tensor([0, 3]))
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[:, [0, 3]] = True
    assert torch.equal(by_list, attention_scores_torch(q, k, 0.5, mask))
    assert torch.equal(by_list, attention_scores_torch(q, k, 0.5, torch.tensor([[0, 3], [0, 3]])))
    assert torch.equal(by_list, attention_scores_torch(q, k, 0.5, [0, 3]))  # a plain list of rows
    with pytest.raises(TypeError, match="integer row indices"):  # 1.7 was read as row 1
        attention_scores_torch(q, k, 0.5, torch.tensor([0.0, 3.0]))
    # no rows at all, as a list ([] is float32 to torch.as_tensor) or a LongTensor: all-zero scores
    empty = attention_scores_torch(q, k, 0.5, torch.tensor([], dtype=torch.long))
    assert torch.equal(empty, torch.zeros(2, 5)) and torch.equal(attention_scores_torch(q, k, 0.5, []), empty)


def test_rows_average_to_a_distribution():
    q, k = torch.randn(3, 4, 6, 8), torch.randn(3, 2, 6, 8)
    s = attention_scores(q, k, 0.35, causal=True)
    torch.testing.assert_close(s.sum(1), torch.ones(3))


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="incompatible"):
        attention_scores(torch.randn(1, 3, 4, 8), torch.randn(1, 2, 4, 8), 1.0)
    with pytest.raises(ValueError, match=r"\[B, H, N, d\]"):
        attention_scores(torch.randn(3, 4, 8), torch.randn(3, 4, 8), 1.0)
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="window .* needs causal=True"):
        attention_scores(q, q, 1.0, window=2)
    for bad in (0, 2.0, True):
        with pytest.raises(ValueError, match="window must be an int >= 1 or None"):
            attention_scores(q, q, 1.0, causal=True, window=bad)


def test_a_window_of_one_leaves_each_row_its_own_key():
    # window=1: row i attends only to key i (probability 1), so each key receives 1/Nq of the average
    q, k = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 5, 8)
    torch.testing.assert_close(attention_scores(q, k, 0.5, causal=True, window=1), torch.full((2, 5), 0.2))


def test_attention_row_chunks_agree_with_one_block(monkeypatch):
    """The reference computes 256 query rows at a time: blocks of 4 rows give the one-block answer (no test had more
    than 130 rows, so an offset bug in the blocks after the first went unseen; every real prefill has more)."""
    import importlib

    scores_torch = importlib.import_module("vtprune.kernels.attention_scores_torch")  # (the module, not the function)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4, 11, 8, generator=g), torch.randn(2, 2, 13, 8, generator=g)
    rows = torch.ones(2, 11, dtype=torch.bool)
    rows[1, :3] = False
    mask = torch.ones(2, 13, dtype=torch.bool)
    mask[1, :2] = False
    for causal in (False, True):
        want = scores_torch.attention_scores_torch(q, k, 0.3, rows, causal=causal, key_mask=mask)
        monkeypatch.setattr(scores_torch, "_ROW_CHUNK", 4)
        got = scores_torch.attention_scores_torch(q, k, 0.3, rows, causal=causal, key_mask=mask)
        monkeypatch.setattr(scores_torch, "_ROW_CHUNK", 256)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_integer_key_mask_reads_nonzero_as_attend():
    """A Hugging Face attention_mask (0/1 integers, 1 = a real token) masks what the bool mask masks (this
    was checked only in the Triton test file, which is skipped where Triton is not installed)."""
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(2, 2, 4, 8, generator=g), torch.randn(2, 1, 6, 8, generator=g)
    hf = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    want = naive(q, k, 0.4, None, False, hf.bool())
    assert want[0, :2].abs().max() == 0 and want[1, :2].min() > 0
    for mask in (hf, hf.to(torch.uint8), hf.bool()):
        torch.testing.assert_close(attention_scores_torch(q, k, 0.4, key_mask=mask), want, atol=1e-6, rtol=1e-5)
