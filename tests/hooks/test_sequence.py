import torch

from vtprune.hooks.sequence import compact_index, compact_text_positions, dropped_before, take


def test_compact_index_right_aligns_hand_case():
    keep = torch.tensor([[1, 0, 1, 1, 0], [1, 1, 1, 1, 1], [0, 0, 0, 1, 0]], dtype=torch.bool)
    assert compact_index(keep).tolist() == [[-1, -1, 0, 2, 3], [0, 1, 2, 3, 4], [-1, -1, -1, -1, 3]]


def test_take_fills_new_pads_and_carries_leading_dims():
    index = torch.tensor([[-1, 0, 2], [0, 1, 2]])
    x = torch.arange(6).view(2, 3) + 10
    assert take(x, index, 1, fill=0).tolist() == [[0, 10, 12], [13, 14, 15]]
    rows = torch.stack([x, x + 100, x + 200])  # [3, B, L] like M-RoPE positions
    out = take(rows, index, 2, fill=-1)
    assert out[:, 0].tolist() == [[-1, 10, 12], [-1, 110, 112], [-1, 210, 212]]
    emb = torch.arange(12.0).view(2, 3, 2)
    assert take(emb, index, 1)[0].tolist() == [[0.0, 0.0], [0.0, 1.0], [4.0, 5.0]]


def test_dropped_before_and_text_positions():
    keep = torch.tensor([[1, 0, 0, 1, 1]], dtype=torch.bool)
    assert dropped_before(keep).tolist() == [[0, 0, 1, 2, 2]]
    assert compact_text_positions(torch.tensor([[0, 0, 1, 1, 1]])).tolist() == [[0, 0, 0, 1, 2]]
