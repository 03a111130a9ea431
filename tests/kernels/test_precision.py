"""Float32 arithmetic whatever the caller's autocast: selections and scores inside
`torch.autocast(..., bfloat16)` equal those outside it, bit for bit."""
import torch

from vtprune.kernels import attention_scores
from vtprune.kernels.greedy_torch import cosine_gram
from vtprune.methods import divprune, todre, token_shuffle

BF16 = dict(device_type="cpu", dtype=torch.bfloat16)


def test_selection_and_scores_ignore_autocast():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(4, 64, 96, generator=g)
    q, k = torch.randn(2, 4, 40, 16, generator=g), torch.randn(2, 2, 40, 16, generator=g)
    plain = (cosine_gram(feats), divprune.select(feats, 16), todre.select(feats, 16, torch.tensor([3, 1, 4, 1]),
             "maxsum"), attention_scores(q, k, 0.25), token_shuffle.merge(feats[0], (8, 8), s=2)[0])
    with torch.autocast(**BF16):
        cast = (cosine_gram(feats), divprune.select(feats, 16), todre.select(feats, 16, torch.tensor([3, 1, 4, 1]),
                "maxsum"), attention_scores(q, k, 0.25), token_shuffle.merge(feats[0], (8, 8), s=2)[0])
        raw = feats @ feats.transpose(1, 2)  # what autocast does to a float32 matmul
    for a, b in zip(plain, cast):
        assert a.dtype == b.dtype and torch.equal(a, b)
    assert plain[0].dtype == plain[3].dtype == torch.float32
    assert raw.dtype == torch.bfloat16
