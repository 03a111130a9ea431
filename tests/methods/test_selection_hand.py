"""Hand-worked cases with exact expected indices for every seed strategy's pure core."""
import math

import pytest
import torch
import torch.nn.functional as F

from vtprune.methods import divprune, hiprune, todre, token_shuffle, transprune, vflowopt
from vtprune.methods.base import LayerTokens, top_visual


def _unit(*degrees, scale=None):
    """2-D points on the unit circle at the given angles (optionally with different lengths)."""
    rad = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
    x = torch.stack([rad.cos(), rad.sin()], 1).float()
    return x if scale is None else x * torch.tensor(scale)[:, None]


# Points at 0, 10, 90 and 180 degrees. Cosine distances: d(0,10)=0.015, d(0,90)=1, d(0,180)=2,
# d(10,90)=0.826, d(10,180)=1.985, d(90,180)=1.
POINTS = _unit(0, 10, 90, 180)


@pytest.mark.parametrize("keep, want", [(1, [3]), (2, [0, 3]), (3, [0, 2, 3]), (4, [0, 1, 2, 3])])
def test_divprune_maxmin_on_points_on_a_circle(keep, want):
    # nearest-neighbour distances 0.015, 0.015, 0.826, 1 -> token 3 first; then 0 (distance 2), then 2
    assert divprune.select(POINTS[None], keep)[0].tolist() == want


def test_divprune_ignores_lengths_and_dtype():
    scaled = POINTS * torch.tensor([3.0, 0.5, 7.0, 1.0])[:, None]
    assert divprune.select(scaled[None], 3)[0].tolist() == [0, 2, 3]
    assert divprune.select(POINTS[None].to(torch.bfloat16), 3)[0].tolist() == [0, 2, 3]


def test_divprune_exact_duplicates_are_never_picked_twice():
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    # 0 and 1 coincide (nearest distance 0); 2 is most isolated; then 0 and 1 tie -> lower index
    assert divprune.select(x[None], 2)[0].tolist() == [0, 2]
    assert divprune.select(x[None], 3)[0].tolist() == [0, 1, 2]


def test_cosine_gram_is_the_cosine_of_each_pair():
    """rows normalised over the feature axis: (3, 4), (1, 0), (0, 2) have cosines 0.6, 0.8 and 0."""
    from vtprune.kernels.greedy_torch import cosine_gram

    x = torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, 2.0]])
    want = torch.tensor([[1.0, 0.6, 0.8], [0.6, 1.0, 0.0], [0.8, 0.0, 1.0]])
    torch.testing.assert_close(cosine_gram(x[None])[0], want)


def test_divprune_most_isolated_ties_go_to_the_lowest_index():
    # tokens 0 and 1 coincide (nearest at distance 0); 2, 3 and 4 are orthogonal to everything else
    # (nearest at distance 1): the first pick is the lowest of those, 2
    a, b, c, d = torch.eye(4)
    x = torch.stack([a, a, b, c, d])[None]
    assert divprune.select(x, 1)[0].tolist() == [2]
    assert divprune.select(torch.eye(3)[None], 1)[0].tolist() == [0]


def test_selected_tokens_are_excluded_even_when_they_tie():
    """The pivot and every pick are masked out, not left to lose on score. Max-sum on [e1, e2, -e1] from
    pivot 0: -e1 first (sum -1), then e1 and e2 both sum to 0 -- the lowest index is e1, chosen already,
    so e2. A copy of the pivot at distance 0 ties with the pivot's own self-distance in max-min."""
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])[None]
    assert todre.select(x, 3, torch.tensor([0]), rule="maxsum")[0].tolist() == [0, 1, 2]
    copies = torch.tensor([[1.0, 0.0], [1.0, 0.0]])[None]
    for rule in ("maxmin", "maxsum"):
        assert todre.select(copies, 2, torch.tensor([0]), rule=rule)[0].tolist() == [0, 1], rule


def test_copies_of_one_token_tie_to_the_lowest_index():
    """Token 0 and four exact copies of another: the second pick is the first copy, for DivPrune and both
    ToDRE rules, on the CPU reference as in the Triton kernel (the reference's matrix product rounded one
    copy's column differently, so the pick went to whichever copy rounded lowest: [0, 4] for some seeds)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # (the BLAS path that showed it)
    try:
        for seed in range(60):
            g = torch.Generator().manual_seed(seed)
            u, v = torch.randn(2, 64, generator=g)
            x = torch.stack([u, v, v, v, v])[None]
            assert divprune.select(x, 2)[0].tolist() == [0, 1], seed
            for rule in ("maxmin", "maxsum"):
                assert todre.select(x, 2, torch.tensor([0]), rule=rule)[0].tolist() == [0, 1], (seed, rule)
            # a near-duplicate of v (within 1e-5, not a copy) ahead of the copies: they still tie among
            # themselves by index (the near-duplicate is another token, the kernel's pick as well)
            d = torch.randn(64, generator=g)
            w = v - 1e-6 * d / d.norm() * v.norm()
            x = torch.stack([u, w, v, v, v, v])[None]
            assert divprune.select(x, 2)[0].tolist() in ([0, 1], [0, 2]), seed
    finally:
        torch.set_num_threads(previous)


def test_todre_maxmin_starts_from_the_pivot():
    # from 1: distances [0.015, -, 0.826, 1.985] -> 3; then min with d(3,.) = [0.015, -, 0.826, -] -> 2
    assert todre.select(POINTS[None], 3, torch.tensor([1]))[0].tolist() == [1, 2, 3]
    assert todre.select(POINTS[None], 1, torch.tensor([2]))[0].tolist() == [2]


def test_todre_maxsum_adds_the_least_similar_to_the_sum():
    # sims to 1: [0.985, -, 0.174, -0.985] -> 3; sums with 3: [-0.015, -, 0.174, -] -> 0
    assert todre.select(POINTS[None], 3, torch.tensor([1]), rule="maxsum")[0].tolist() == [0, 1, 3]


def test_todre_batch_with_different_pivots():
    x = torch.stack([POINTS, POINTS.flip(0)])
    out = todre.select(x, 2, torch.tensor([1, 2]))
    # sample 1 is reversed: its pivot 2 is the 10-degree point, whose farthest point (180) is at index 0
    assert out.tolist() == [[1, 3], [0, 2]]


def test_greedy_rejects_bad_input():
    with pytest.raises(ValueError):
        divprune.select(POINTS, 2)  # not batched
    with pytest.raises(ValueError):
        divprune.select(POINTS[None], 5)
    with pytest.raises(ValueError):
        divprune.select(POINTS[None], 0)
    with pytest.raises(ValueError):
        todre.select(POINTS[None], 2, torch.tensor([4]))
    with pytest.raises(ValueError):
        todre.select(POINTS[None], 2, torch.tensor([-1]))  # not the last token, counted from the end
    with pytest.raises(ValueError):
        todre.select(POINTS[None], 2, torch.tensor([0]), rule="kcenter")
    for pivot in (torch.tensor([1.9]), torch.tensor([True])):  # not truncated or cast to index 1
        with pytest.raises(TypeError, match="integer"):
            todre.select(POINTS[None], 2, pivot)
    assert todre.select(POINTS[None], 2, [1]).tolist() == todre.select(POINTS[None], 2, torch.tensor([1])).tolist()


# HiPrune on a 4x4 grid -------------------------------------------------------------------------
#  0  1  2  3
#  4  5  6  7
#  8  9 10 11
# 12 13 14 15

def test_hiprune_edge_anchor_drops_out_of_grid_neighbours():
    obj = torch.zeros(16)
    obj[4] = 1.0  # anchor on the left edge: its left neighbour does not exist (no wrap to token 3)
    deep = torch.tensor([9.0, 0, 0, 5, 9, 9, 0, 5, 9, 0, 0, 0, 0, 0, 0, 1])
    # keep 8, alpha .625 -> round(8 * .625 / 5) = 1 anchor; A = {4, 5 (right), 0 (up), 8 (down)}
    # registers: top-4 deep outside A: 3 and 7 (5), 15 (1), then the lowest-index 0-score token 1
    out = hiprune.select(obj[None], deep[None], (4, 4), 8, alpha=0.625)
    assert out[0].tolist() == [0, 1, 3, 4, 5, 7, 8, 15]


def test_hiprune_corner_anchor_and_no_anchor_budget():
    obj = torch.zeros(16)
    obj[15] = 2.0
    deep = torch.arange(16.0).flip(0)  # prefers low indices
    out = hiprune.select(obj[None], deep[None], (4, 4), 5, alpha=1.0)
    # round(5 * 1 / 5) = 1 anchor at 15: buffers 14 (left), 11 (up); right/down are outside -> 3 fixed
    assert out[0].tolist() == [0, 1, 11, 14, 15]
    # alpha 0.1, keep 5 -> round(0.1) = 0 anchors: registers only
    assert hiprune.select(obj[None], deep[None], (4, 4), 5)[0].tolist() == [0, 1, 2, 3, 4]


def test_hiprune_anchor_count_rounds_like_python_and_shrinks_to_fit():
    assert hiprune.n_anchors(64, 0.1) == 1 and hiprune.n_anchors(125, 0.1) == 2  # round(2.5) == 2
    obj = torch.zeros(16)
    obj[5] = 1.0
    # keep 3, alpha 1 -> round(0.6) = 1 anchor whose 4 buffers would exceed 3: no anchors then
    out = hiprune.select(obj[None], torch.arange(16.0)[None], (4, 4), 3, alpha=1.0)
    assert out[0].tolist() == [13, 14, 15]


def test_hiprune_ties_go_to_the_lowest_index():
    flat = torch.ones(1, 16)
    assert hiprune.select(flat, flat, (4, 4), 3)[0].tolist() == [0, 1, 2]


@pytest.mark.parametrize("grid, alpha, exc, words", [
    ((-4, -4), 0.1, ValueError, "grid must be two ints"),  # its product is 16: it chose tokens with no neighbours
    ((4.0, 4.0), 0.1, ValueError, "grid must be two ints"),  # (an IndexError deep inside)
    ((4, 4, 1), 0.1, ValueError, "grid must be two ints"),
    ((True, 16), 0.1, ValueError, "grid must be two ints"),
    ((4, 4), "0.1", TypeError, "alpha must be a number"),
    ((4, 4), True, TypeError, "alpha must be a number"),  # (read as 1.0)
    ((4, 4), float("nan"), ValueError, "alpha must be a finite number"),
])
def test_hiprune_select_checks_grid_and_alpha(grid, alpha, exc, words):
    scores = torch.rand(1, 16)
    with pytest.raises(exc, match=words):
        hiprune.select(scores, scores, grid, 6, alpha=alpha)


# token_shuffle ---------------------------------------------------------------------------------

def test_token_shuffle_2x2_windows_means_and_rescale():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).repeat(8, 1)  # alternate columns: e1, e2, e1, e2 ...
    tokens, idx, grid = token_shuffle.merge(x, (4, 4), s=2, rescale=False)
    assert idx.tolist() == [0, 2, 8, 10] and grid == (2, 2)
    torch.testing.assert_close(tokens, torch.full((4, 2), 0.5))
    tokens, _, _ = token_shuffle.merge(x, (4, 4), s=2)  # members all have norm 1
    torch.testing.assert_close(tokens, torch.full((4, 2), 0.5 ** 0.5))


def test_token_shuffle_rescales_to_the_members_mean_norm():
    x = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 1.0], [0.0, 1.0]])  # norms 1, 3, 1, 1: mean 1.5 (RMS 2)
    tokens, _, _ = token_shuffle.merge(x, (2, 2), s=2)
    torch.testing.assert_close(tokens.norm(dim=-1), torch.tensor([1.5]))


def test_token_shuffle_positions_option_sets_the_coarse_grid():
    """positions="grid" (default): the merged tokens take the coarse grid's RoPE positions; "topleft": each
    its window's first token's (no grid)."""
    from vtprune.methods.base import ImageTokens
    from vtprune.methods.registry import build_method

    image = ImageTokens(torch.randn(16, 4), (1, 4, 4), 4, {})
    assert build_method("token_shuffle", {"s": 2}).select(image).grid == (1, 2, 2)
    assert build_method("token_shuffle", {"s": 2, "positions": "topleft"}).select(image).grid is None


def test_token_shuffle_partial_edge_windows():
    x = torch.arange(9.0)[:, None]
    tokens, idx, grid = token_shuffle.merge(x, (3, 3), s=2, rescale=False)
    assert grid == (2, 2) and idx.tolist() == [0, 2, 6, 8]
    assert tokens[:, 0].tolist() == [(0 + 1 + 3 + 4) / 4, (2 + 5) / 2, (6 + 7) / 2, 8.0]


@pytest.mark.parametrize("h, w, keep", [(5, 7, 6), (4, 8, 2), (6, 6, 9), (3, 5, 4)])
def test_token_shuffle_budget_mode_equals_adaptive_pooling(h, w, keep):
    x = torch.randn(h * w, 3, generator=torch.Generator().manual_seed(h * w))
    tokens, idx, (hp, wp) = token_shuffle.merge(x, (h, w), keep=keep, rescale=False)
    want = F.adaptive_avg_pool2d(x.T.reshape(1, 3, h, w), (hp, wp)).reshape(3, -1).T
    torch.testing.assert_close(tokens, want)
    assert hp * wp <= keep and len(idx) == hp * wp


# TransPrune --------------------------------------------------------------------------------------

def test_transprune_transition_magnitude_and_direction():
    x = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [5.0, 5.0]]])
    y = torch.tensor([[[0.0, 2.0], [3.0, 0.0], [1.0, 1.0]]])
    valid = torch.tensor([[True, True, False]])
    out = transprune.transition(x, y, valid)
    # magnitudes 2 and 3; 1 - cos = 1 and 0 -> softmax over the valid tokens: e/(e+1), 1/(e+1)
    e = math.e
    torch.testing.assert_close(out, torch.tensor([[2 * e / (e + 1), 3 / (e + 1), 0.0]]))
    out_abs = transprune.transition(x, -y, valid, abs_cos=True)
    torch.testing.assert_close(out_abs, out)


def test_transprune_schedule_alone_keeps_int_of_its_last_fraction():
    """transprune.md: a schedule keeps int(N * fraction) at every stage; alone, its last stage rounded
    (round(0.35 * 10) = 4, round(0.3 * 576) = 173 where int gives 3 and 172)."""
    cfg = transprune.TransPruneConfig(schedule=[(6, 0.875), (8, 0.65), (11, 0.35)])
    assert [cfg.budget(n) for n in (10, 576, 2)] == [3, 201, 1]
    assert transprune.TransPruneConfig(schedule=[(11, 0.3)]).budget(576) == 172
    assert transprune.TransPruneConfig(schedule=[(11, 0.3)], ratio=0.35).budget(10) == 4  # a ratio of its own: round
    assert transprune.TransPruneConfig(schedule=[(11, 0.3)], keep=5).budget(10) == 5
    again = transprune.TransPruneConfig(**cfg.to_dict())  # a config file holds the ratio the schedule set
    assert again.budget(10) == 3


def test_transprune_without_a_budget_runs_the_papers_high_setting():
    """transprune.md: the default is the paper's "High" setting, int(N * 0.875), int(N * 0.625), int(N * 0.125);
    without keep / ratio its last fraction is the budget, truncated as the earlier stages are (588 tokens: 73,
    where round gives 74); the same ratio given explicitly is that setting too, another ratio rounds."""
    cfg = transprune.TransPruneConfig()
    assert cfg.ratio == 0.125 and cfg.schedule is None
    assert [cfg.budget(n) for n in (576, 588, 4)] == [72, 73, 1]
    assert transprune.TransPruneConfig(ratio=0.125).budget(588) == 73
    assert transprune.TransPruneConfig(ratio=0.2).budget(588) == 118  # round(117.6)
    assert transprune.TransPruneConfig(keep=80).budget(588) == 80
    assert transprune.TransPruneConfig(**cfg.to_dict()).budget(588) == 73  # as a config file holds it


def test_transprune_default_schedule():
    assert transprune.default_schedule(32) == [(6, 0.875), (8, 0.625), (11, 0.125)]
    assert transprune.default_schedule(28) == [(6, 0.875), (8, 0.625), (11, 0.125)]
    assert transprune.default_schedule(4) == [(0, 0.625), (1, 0.125)]
    assert transprune.default_schedule(13) == [(6, 0.875), (8, 0.625), (11, 0.125)]  # the paper's layers from 13 on
    assert transprune.default_schedule(12) == [(2, 0.625), (3, 0.125)]  # scaled: a layer must follow the last drop


def test_hiprune_neighbours_on_a_grid_that_is_not_square():
    # 2 x 3 grid:  0 1 2 / 3 4 5 -- the anchor 2's in-grid neighbours are 1 (left) and 5 (below)
    assert hiprune.anchors_and_buffers(torch.tensor([2]), (2, 3), 6).nonzero().flatten().tolist() == [1, 2, 5]


def test_pool_window_starts_are_adaptive_pooling_floors():
    from vtprune.methods.pool import window_starts

    assert window_starts(5, 3).tolist() == [0, 1, 3]  # floor(i * 5 / 3)


def test_pool_on_a_grid_that_is_not_square():
    from vtprune.methods.pool import pool

    tokens, idx, grid = pool(torch.arange(8.0)[:, None], (2, 4), keep=2)  # rows 0 1 2 3 / 4 5 6 7
    assert grid == (1, 2) and idx.tolist() == [0, 2] and tokens[:, 0].tolist() == [2.5, 4.5]


def test_pooled_grid_is_exact_where_the_float_scale_rounds_down():
    """sqrt(144 / 289) * 17 is 11.999... in floating point: 12 x 12 fits 144 exactly (and 13 x 13, 169)."""
    from vtprune.methods.pool import pooled_grid

    assert pooled_grid(17, 17, 144) == (12, 12) and pooled_grid(15, 15, 169) == (13, 13)


def test_in_llm_layers_of_fastv_and_todre():
    from vtprune.methods.fastv import FastV, FastVConfig

    fastv = FastV(FastVConfig(keep=4))  # K = 2: layers 0 and 1 see every token, the drop follows layer 1
    assert fastv.drop_layers(32) == fastv.attention_layers(32) == [1]
    stage2 = todre.ToDRE(todre.ToDREConfig(keep=4))
    assert stage2.drop_layers(32) == [28] and stage2.drop_layers(28) == [24]  # floor(7L/8)
    assert stage2.drop_layers(4) == [2]  # floor(28/8) = 3 is the last layer: clamped to L - 2


def test_todre_stage2_layer_edges():
    """min(floor(7L/8), L - 2): L = 10 gives 8 = L - 2 itself (not clamped further), L = 2 the first layer,
    L = 1 none (no layer follows). An explicit stage2_layer is taken as given, refused where no layer
    follows it; stage2=False reads and drops at no layer."""
    def layers(num_layers, **options):
        method = todre.ToDRE(todre.ToDREConfig(keep=4, **options))
        assert method.drop_layers(num_layers) == method.attention_layers(num_layers)
        return method.drop_layers(num_layers)

    assert layers(10) == [8] and layers(9) == [7] and layers(8) == [6]
    assert layers(2) == [0] and layers(1) == []
    assert layers(32, stage2_layer=5) == [5] and layers(32, stage2_layer=30) == [30]
    with pytest.raises(ValueError, match="stage2_layer=31"):
        layers(32, stage2_layer=31)
    assert layers(32, stage2=False) == []


def test_todre_rule_option_reaches_the_selection():
    """ToDRE's `rule` option decides the greedy rule, in select and select_batch alike; the default is
    max-min. POINTS with the pivot signal highest at token 1: max-min [1, 2, 3], max-sum [0, 1, 3] (the
    hand-worked cases above)."""
    from vtprune.methods.base import ImageTokens
    from vtprune.methods.registry import build_method

    image = ImageTokens(POINTS, None, 3, {"pivot": torch.tensor([0.1, 0.9, 0.3, 0.2])})
    for options, want in (({}, [1, 2, 3]), ({"rule": "maxmin"}, [1, 2, 3]), ({"rule": "maxsum"}, [0, 1, 3])):
        method = build_method("todre", {"keep": 3, "stage2": False, **options})
        assert method.select(image).indices.tolist() == want, options
        assert [s.indices.tolist() for s in method.select_batch([image, image])] == [want, want], options


def test_vflowopt_drop_counts_round_half_to_even_as_the_authors():
    """5 tokens present, R2 = 0.5: drop round(2.5) = 2 (Python's, as the authors' code), keep the 3 most
    important."""
    from vtprune.methods.base import LayerTokens

    n = 5
    tokens = LayerTokens(layer=vflowopt.llm_layers(28)[0], hidden=torch.zeros(1, n, 2),
                         visual=torch.ones(1, n, dtype=torch.bool), mask=torch.ones(1, n, dtype=torch.bool),
                         keep=torch.tensor([2]), before=torch.tensor([10]), unit=torch.zeros(1, n, dtype=torch.long),
                         images=((0, 10, 2),), num_layers=28,
                         state={"importance": torch.tensor([[5.0, 4, 3, 2, 1]])})
    method = vflowopt.VFlowOpt(vflowopt.VFlowOptConfig(keep=2, r2=0.5, r3=0.5))
    assert method.select_in_llm(tokens)[0].tolist() == [0, 1, 2]


def test_top_per_image_keeps_an_image_within_its_budget_whole():
    from vtprune.methods.base import LayerTokens, top_per_image

    n = 5
    tokens = LayerTokens(layer=0, hidden=torch.zeros(1, n, 2), visual=torch.ones(1, n, dtype=torch.bool),
                         mask=torch.ones(1, n, dtype=torch.bool), keep=torch.tensor([5]), before=torch.tensor([5]),
                         unit=torch.zeros(1, n, dtype=torch.long), images=((0, 5, 5),))
    assert top_per_image(torch.zeros(1, n), tokens, lambda *_: 0)[0].tolist() == [0, 1, 2, 3, 4]



def _top_per_image_sample_by_sample(scores, tokens, count):
    """The plain per-sample, per-image loop that `top_per_image` does for the batch at once."""
    from vtprune.methods.base import ranking

    out = []
    for b in range(scores.shape[0]):
        vis = tokens.visual[b]
        uid, s = tokens.unit[b][vis], scores[b][vis]
        picks = []
        for u in torch.unique(uid).tolist():
            members = (uid == u).nonzero().squeeze(1)
            _, before, keep = tokens.images[u]
            present = members.numel()
            k = present if keep >= before else max(0, min(present, int(count(present, keep, before))))
            picks.append(members[ranking(s[members])[:k]])
        out.append(torch.cat(picks).sort().values if picks else torch.zeros(0, dtype=torch.long))
    return out


def test_top_per_image_hand_case_and_parity_with_a_per_sample_loop():
    """Sample 0: image 0 (slots 1-3, budget 1 of 4 before) then image 1 (slots 5-6, budget 1 of 2); sample 1:
    text only; sample 2: image 2 (slots 0-2, within budget: kept whole). Ties go to the lower slot."""
    from vtprune.methods.base import LayerTokens, top_per_image

    visual = torch.tensor([[0, 1, 1, 1, 0, 1, 1], [0] * 7, [1, 1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    unit = torch.tensor([[-1, 0, 0, 0, -1, 1, 1], [-1] * 7, [2, 2, 2, -1, -1, -1, -1]])
    scores = torch.tensor([[9.0, 0.1, 0.7, 0.7, 9, 0.3, 0.2], [1.0] * 7, [0.0] * 7])
    images = ((0, 4, 1), (0, 2, 1), (2, 3, 3))
    tokens = LayerTokens(layer=0, hidden=torch.zeros(3, 7, 2), visual=visual, mask=torch.ones(3, 7, dtype=torch.bool),
                         keep=torch.tensor([2, 0, 3]), before=torch.tensor([6, 0, 3]), unit=unit, images=images)
    got = top_per_image(scores, tokens, lambda present, keep, before: keep)
    assert [x.tolist() for x in got] == [[1, 3], [], [0, 1, 2]]  # into sample 0's visual slots 1, 2, 3, 5, 6
    g = torch.Generator().manual_seed(0)
    for _ in range(30):
        b, n = 4, 12
        unit = torch.full((b, n), -1)
        images = []
        for i in range(b):
            cuts = sorted(torch.randperm(n, generator=g)[:3].tolist())
            for lo, hi in zip(cuts, cuts[1:]):  # 0-2 images per sample, with gaps between
                if torch.rand(1, generator=g) < 0.7:
                    unit[i, lo:hi] = len(images)
                    before = hi - lo + int(torch.randint(0, 3, (1,), generator=g))
                    images.append((i, before, int(torch.randint(0, before + 1, (1,), generator=g))))
        tokens = LayerTokens(layer=0, hidden=torch.zeros(b, n, 2), visual=unit >= 0, mask=torch.ones(b, n, dtype=torch.bool),
                             keep=torch.zeros(b, dtype=torch.long), before=torch.zeros(b, dtype=torch.long), unit=unit,
                             images=tuple(images))
        scores = torch.randint(0, 4, (b, n), generator=g).float()  # many ties
        count = lambda present, keep, before: keep - 1 + present % 3  # noqa: E731
        assert [x.tolist() for x in top_per_image(scores, tokens, count)] == \
            [x.tolist() for x in _top_per_image_sample_by_sample(scores, tokens, count)]


def test_top_per_image_refuses_a_visual_slot_of_no_image():
    from vtprune.methods.base import LayerTokens, top_per_image

    visual = torch.tensor([[1, 1, 1]], dtype=torch.bool)
    tokens = LayerTokens(layer=0, hidden=torch.zeros(1, 3, 2), visual=visual, mask=visual, keep=torch.tensor([1]),
                         before=torch.tensor([3]), unit=torch.tensor([[0, -1, 0]]), images=((0, 3, 1),))
    with pytest.raises(RuntimeError, match="a visual slot belongs to no image"):
        top_per_image(torch.zeros(1, 3), tokens, lambda *a: 1)

def test_top_visual_picks_within_visual_slots():
    scores = torch.tensor([[9.0, 0.2, 0.5, 0.5, 0.1, 7.0]])
    visual = torch.tensor([[False, True, True, True, True, False]])
    assert [t.tolist() for t in top_visual(scores, visual, [2])] == [[1, 2]]  # 0.5 tie -> slot 2 first


# VFlowOpt ------------------------------------------------------------------------------------------

def test_vflowopt_prune_recycle_on_a_4x4_grid():
    x = torch.randn(16, 3, generator=torch.Generator().manual_seed(0))
    imp = torch.arange(16.0)  # token 15 most important; cells of side 2: {0,1,4,5} {2,3,6,7} {8,9,12,13} {10,11,14,15}
    idx, tokens, kept_imp = vflowopt.prune_recycle(x, imp, (4, 4), 6, 2.0)
    # keep 15, 14 outright; each cell recycles its pruned tokens at its most important one: 5, 7, 13, 11
    assert idx.tolist() == [5, 7, 11, 13, 14, 15]
    assert kept_imp.tolist() == [5.0, 7.0, 11.0, 13.0, 14.0, 15.0]
    torch.testing.assert_close(tokens[4:], x[[14, 15]])
    want11 = (10 * x[10] + 11 * x[11]) / 21
    torch.testing.assert_close(tokens[2], want11)
    want5 = (0 * x[0] + 1 * x[1] + 4 * x[4] + 5 * x[5]) / 10
    torch.testing.assert_close(tokens[0], want5)


def test_vflowopt_prune_recycle_with_autograd_on_warns_nothing_and_passes_gradients():
    """A patched model's plain forward (no torch.no_grad) warned 'Converting a tensor with requires_grad=True
    to a scalar' from the recycling weights' check."""
    import warnings

    x = torch.randn(16, 3, generator=torch.Generator().manual_seed(0), requires_grad=True)
    imp = torch.arange(16.0).requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, tokens, _ = vflowopt.prune_recycle(x, imp, (4, 4), 6, 2.0)
    tokens.sum().backward()
    assert x.grad is not None and imp.grad is not None  # the recycling weights stay in the graph


def test_vflowopt_prune_recycle_counts_and_fallback():
    x = torch.randn(16, 3, generator=torch.Generator().manual_seed(1))
    imp = torch.arange(16.0)
    idx, _, _ = vflowopt.prune_recycle(x, imp, (4, 4), 9, 2.0)
    assert idx.tolist() == [5, 7, 9, 10, 11, 12, 13, 14, 15]  # 11..15 kept, cells recycle at 5, 7, 9, 10
    idx, tokens, _ = vflowopt.prune_recycle(x, imp, (4, 4), 3, 2.0)  # 3 < 4 cells: plain top-3
    assert idx.tolist() == [13, 14, 15] and torch.equal(tokens, x[[13, 14, 15]])
    idx, tokens, _ = vflowopt.prune_recycle(x, imp, (4, 4), 16, 2.0)
    assert idx.tolist() == list(range(16)) and torch.equal(tokens, x)


def test_vflowopt_cells_with_a_fractional_side():
    # side 2.5 on a 5-wide row: columns 0-2 -> cell 0 (floor(c / 2.5)), 3-4 -> cell 1
    assert vflowopt.cells((1, 5), 2.5).tolist() == [0, 0, 0, 1, 1]


def test_vflowopt_entropy_and_importance():
    px = torch.tensor([[0, 0, 255, 255], [7, 7, 7, 7], [0, 1, 2, 3]])
    torch.testing.assert_close(vflowopt.patch_entropy(px), torch.tensor([1.0, 0.0, 2.0]))
    att = torch.tensor([0.5, 0.25, 0.25])
    torch.testing.assert_close(vflowopt.importance(att), att)
    h = torch.tensor([1.0, 0.0, 2.0])
    torch.testing.assert_close(vflowopt.importance(att, h, 0.5), att + 0.5 * torch.softmax(h, 0))


def test_vflowopt_llm_layers():
    assert vflowopt.llm_layers(28) == [8, 17]  # drops before layers 9 and 18
    assert vflowopt.llm_layers(32) == [9, 20]
    assert vflowopt.llm_layers(4) == [0, 2]


def test_vflowopt_recycling_keeps_exactly_keep():
    # importance 4 > 3 > 2 > 1 on a 2 x 2 grid in cells of one token: keeping k outright leaves 4 - k cells
    # with a pruned token, so k + (4 - k) = 4 tokens for every k, never 3: no recycling, the top 3
    idx, _, _ = vflowopt.prune_recycle(torch.eye(4), torch.tensor([4.0, 3.0, 2.0, 1.0]), (2, 2), 3, 1.0)
    assert idx.tolist() == [0, 1, 2]


def test_batched_selection_equals_one_image_at_a_time():
    """select_batch (one launch for a ViT batch) returns what select returns for each image; ToDRE with
    each image's own pivot, an anyres base grid included."""
    from vtprune.methods.base import ImageTokens
    from vtprune.methods.registry import build_method

    g = torch.Generator().manual_seed(0)
    feats = torch.randn(4, 16, 8, generator=g)
    pivot = torch.rand(4, 16, generator=g)
    base = [None, None, torch.arange(4, 8), None]  # image 2: the pivot from tokens 4..7 only
    images = [ImageTokens(feats[i], (1, 4, 4), 5, {"pivot": pivot[i]}, base[i]) for i in range(4)]
    for name, options in (("divprune", {}), ("todre", {"stage2": False}), ("todre", {"stage2": False, "rule": "maxsum"}),
                          ("random", {})):
        method = build_method(name, {"keep": 5, **options})
        one = [method.select(im).indices.tolist() for im in images]
        assert [s.indices.tolist() for s in method.select_batch(images)] == one, (name, options)
    assert int(pivot[2, 4:8].argmax()) + 4 in build_method("todre", {"keep": 5}).select(images[2]).indices.tolist()


# Cases that a maintainer's slip would break while every other test passed (found by mutating the code)

def test_hiprune_anchor_count_rounds_up_above_half():
    """round(), not floor: keep 192 (a standard benchmark budget), alpha 0.1 -> round(3.84) = 4."""
    assert hiprune.n_anchors(192, 0.1) == 4
    assert hiprune.n_anchors(3, 1.0) == 1


def test_hiprune_anchors_and_buffers_filling_the_budget_exactly_are_kept():
    """1 interior anchor + 4 buffers = 5 = keep: they fit, nothing is shrunk."""
    obj = torch.zeros(16)
    obj[5] = 1.0
    out = hiprune.select(obj[None], torch.arange(16.0)[None], (4, 4), 5, alpha=1.0)
    assert out[0].tolist() == [1, 4, 5, 6, 9]


def test_vflowopt_cells_on_a_grid_not_divisible_by_the_side():
    """per-row cell count is ceil(w / a): a 2x5 grid with a = 2 has 3 cells per row of cells."""
    assert vflowopt.cells((3, 5), 2.0).tolist() == [0, 0, 1, 1, 2,
                                                    0, 0, 1, 1, 2,
                                                    3, 3, 4, 4, 5]


def test_vflowopt_recycling_ignores_negative_importance():
    """negative importance (alpha < 0 in the tuner's range) counts as weight 0 in the recycled mean."""
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [5.0, 5.0], [7.0, 7.0]])
    s = torch.tensor([-1.0, 3.0, 10.0, 9.0])  # cells of side 2 on a 1x4 grid: {0, 1}, {2, 3}
    idx, tok, _ = vflowopt.prune_recycle(x, s, (1, 4), 3, 2.0)
    # keep 2 and 3 outright; cell {0, 1} recycles at 1 with weights (0, 1)
    assert idx.tolist() == [1, 2, 3]
    torch.testing.assert_close(tok[0], torch.tensor([0.0, 1.0]))


def _vf_tokens(layer, num_layers, n=10):
    return LayerTokens(layer=layer, hidden=torch.zeros(1, n, 2), visual=torch.ones(1, n, dtype=torch.bool),
                       mask=torch.ones(1, n, dtype=torch.bool), keep=torch.tensor([2]), before=torch.tensor([20]),
                       unit=torch.zeros(1, n, dtype=torch.long), images=((0, 20, 2),), num_layers=num_layers,
                       state={"importance": torch.arange(n, 0, -1).float()[None]})


def test_vflowopt_first_drop_uses_r2_second_r3():
    """the first in-LLM drop keeps R2 of the tokens present, the second R3."""
    m = vflowopt.VFlowOpt(vflowopt.VFlowOptConfig(keep=2, r2=0.8, r3=0.3))
    l1, l2 = vflowopt.llm_layers(28)
    assert len(m.select_in_llm(_vf_tokens(l1, 28))[0]) == 8
    assert len(m.select_in_llm(_vf_tokens(l2, 28))[0]) == 3


def test_vflowopt_two_layer_decoder_applies_both_fractions_at_once():
    """a 2-layer decoder has one drop layer, keeping R2 * R3."""
    m = vflowopt.VFlowOpt(vflowopt.VFlowOptConfig(keep=2, r2=0.5, r3=0.4))
    assert vflowopt.llm_layers(2) == [0]
    assert len(m.select_in_llm(_vf_tokens(0, 2))[0]) == 2  # 10 - round(10 * 0.8) = 2


def test_vflowopt_entropy_counts_all_256_grey_levels_in_bits():
    """256 bins of one grey level each: 0..255 once each is log2(256) = 8 bits, and 254 vs 255 (merged by a
    bin too few) is 1 bit; uint8 input (what the hooks give) reads the same."""
    torch.testing.assert_close(vflowopt.patch_entropy(torch.arange(256)[None]), torch.tensor([8.0]))
    px = torch.tensor([[254, 255, 254, 255], [0, 255, 255, 255]], dtype=torch.uint8)
    h34 = -(0.25 * math.log2(0.25) + 0.75 * math.log2(0.75))  # 0.811 bits
    torch.testing.assert_close(vflowopt.patch_entropy(px), torch.tensor([1.0, h34]))


def test_vflowopt_negative_alpha_subtracts_the_entropy_term():
    """The tuner searches alpha in [-1, 1]: a negative weight is applied, not ignored."""
    att, h = torch.tensor([0.5, 0.25, 0.25]), torch.tensor([1.0, 0.0, 2.0])
    torch.testing.assert_close(vflowopt.importance(att, h, -0.5), att - 0.5 * torch.softmax(h, 0))


def test_vflowopt_recycling_a_cell_with_no_positive_weight_is_the_plain_mean():
    """cells of side 2 on a 1x4 grid: {0, 1} all negative -> uniform weights 1/2 each (not 1 each), at the
    slot of the less negative token 0, which it carries; 2 is kept, 3 alone in its cell stays itself."""
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [5.0, 5.0], [7.0, 7.0]])
    s = torch.tensor([-1.0, -2.0, 10.0, 9.0])
    idx, tok, imp = vflowopt.prune_recycle(x, s, (1, 4), 3, 2.0)
    assert idx.tolist() == [0, 2, 3] and imp.tolist() == [-1.0, 10.0, 9.0]
    torch.testing.assert_close(tok, torch.tensor([[0.5, 0.5], [5.0, 5.0], [7.0, 7.0]]))


def test_vflowopt_prune_recycle_returns_the_features_dtype():
    """tokens come back in the input dtype (documented), the float32 merge rounded once."""
    x = torch.randn(16, 3, generator=torch.Generator().manual_seed(0)).bfloat16()
    _, tokens, _ = vflowopt.prune_recycle(x, torch.arange(16.0), (4, 4), 6, 2.0)
    _, want, _ = vflowopt.prune_recycle(x.float(), torch.arange(16.0), (4, 4), 6, 2.0)
    assert tokens.dtype == torch.bfloat16 and torch.equal(tokens, want.bfloat16())


@pytest.mark.parametrize("alpha, entropy, want", [
    (1.0, [0.0, 0.0, 8.0, 0.0], 2),  # I = att + softmax(H) ~ [.300, .200, 1.249, .250]
    (-1.0, [8.0, 0.0, 0.0, 0.0], 2),  # ~ [-.699, .200, .250, .250]: the tie 2 / 3 to the lower index
    (0.0, [0.0, 0.0, 8.0, 0.0], 0),  # entropy off: the attention alone
])
def test_vflowopt_select_ranks_by_attention_plus_alpha_entropy_softmax(alpha, entropy, want):
    """VFlowOpt.select scores with its config's alpha. Cells of side 1 never recycle (k + (4 - k) = 4 > 1):
    keep 1 is the plain top-1, carrying its importance."""
    from vtprune.methods.base import ImageTokens

    att, h = torch.tensor([0.30, 0.20, 0.25, 0.25]), torch.tensor(entropy)
    method = vflowopt.VFlowOpt(vflowopt.VFlowOptConfig(keep=1, a=1.0, alpha=alpha))
    sel = method.select(ImageTokens(torch.eye(4), (1, 2, 2), 1, {"context": att, "entropy": h}))
    assert sel.indices.tolist() == [want]
    torch.testing.assert_close(sel.importance, (att + alpha * torch.softmax(h, 0))[[want]])
    torch.testing.assert_close(sel.tokens, torch.eye(4)[[want]])


def test_vflowopt_asks_for_the_context_map_at_t_and_the_entropy_only_with_alpha():
    from vtprune.methods.base import VisionSignal

    sig = vflowopt.VFlowOpt(vflowopt.VFlowOptConfig(keep=4, t=7.0, a=3.0)).vision_signals()
    assert sig == {"context": VisionSignal("feature", "context", threshold=7.0)}
    cfg = vflowopt.VFlowOptConfig(keep=4, t=2.0, alpha=-0.5, pixel_mean=(0.5, 0.4, 0.3), pixel_std=(0.2, 0.1, 0.3))
    sig = vflowopt.VFlowOpt(cfg).vision_signals()
    assert sig == {"context": VisionSignal("feature", "context", threshold=2.0),
                   "entropy": VisionSignal("feature", "entropy", pixel_mean=(0.5, 0.4, 0.3), pixel_std=(0.2, 0.1, 0.3))}


def test_vflowopt_presets_and_defaults_are_the_released_ones():
    """The spec's table of the authors' released LLaVA-OV-7B configurations; the defaults are the 25 % one
    with the entropy term off."""
    assert vflowopt.PRESETS == {
        10: dict(ratio=0.1166, r2=1.0, r3=0.6011, t=39.26, a=17.39),
        25: dict(ratio=0.2651, r2=0.9833, r3=0.8773, t=34.76, a=15.58),
        50: dict(ratio=0.7233, r2=0.7487, r3=0.487, t=28.68, a=11.76),
    }
    cfg = vflowopt.VFlowOptConfig(keep=4)
    assert (cfg.r2, cfg.r3, cfg.t, cfg.a, cfg.alpha) == (0.9833, 0.8773, 34.76, 15.58, 0.0)


def test_top_visual_returns_ascending_indices():
    """indices ascending (sequence order), not by score."""
    scores = torch.tensor([[0.5, 0.1, 0.9]])
    assert top_visual(scores, torch.ones(1, 3, dtype=torch.bool), [2])[0].tolist() == [0, 2]


def test_todre_visual_share_is_a_fraction_of_all_attention():
    """share = visual mass / total mass."""
    s = torch.tensor([[0.5, 0.25, 0.25]])
    v = torch.tensor([[True, False, False]])
    torch.testing.assert_close(todre.visual_share(s, v), torch.tensor([0.5]))
    torch.testing.assert_close(todre.visual_share(s * 4, v), torch.tensor([0.5]))  # mass 4: still half


def test_transprune_normalise_only_over_visual_slots():
    """scores are restricted to visual slots before they are scaled to sum 1."""
    s = torch.tensor([[1.0, 1.0, 2.0]])
    v = torch.tensor([[True, True, False]])
    torch.testing.assert_close(transprune.normalise(s, v), torch.tensor([[0.5, 0.5, 0.0]]))


def _tp_tokens(state=None):
    n = 4
    return LayerTokens(layer=0, hidden=torch.zeros(1, n, 3), visual=torch.ones(1, n, dtype=torch.bool),
                       mask=torch.ones(1, n, dtype=torch.bool), keep=torch.tensor([2]),
                       state={} if state is None else state)


def test_transprune_observe_sums_attention_and_mlp_transitions_over_layers():
    """TTV = attn + MLP transitions, accumulated over the observed layers."""
    g = torch.Generator().manual_seed(0)
    io1 = {k: torch.randn(1, 4, 3, generator=g) for k in ("attn_in", "attn_out", "mlp_in", "mlp_out")}
    io2 = {k: torch.randn(1, 4, 3, generator=g) for k in ("attn_in", "attn_out", "mlp_in", "mlp_out")}
    m = transprune.TransPrune(transprune.TransPruneConfig(keep=2))
    tok = _tp_tokens()
    m.observe(tok, io1)
    m.observe(tok, io2)
    valid = tok.mask
    want = sum(transprune.transition(io[a], io[b], valid) for io in (io1, io2)
               for a, b in (("attn_in", "attn_out"), ("mlp_in", "mlp_out")))
    torch.testing.assert_close(tok.state["ttv"], want)


def _attention_of(A, mask):
    """attention(rows) over a fixed [L, L] row-stochastic map: the mean of the selected rows."""
    def att(rows):
        rows = mask if rows is None else rows
        w = rows.float() / rows.float().sum(1, keepdim=True)
        return w @ A
    return att


def _tp_layer(layer, A, budget=4):
    # slots: 0 text (system), 1..6 visual (one image, 6 tokens, budget 4), 7, 8 question
    L = 9
    visual = torch.zeros(1, L, dtype=torch.bool)
    visual[0, 1:7] = True
    mask = torch.ones(1, L, dtype=torch.bool)
    unit = torch.where(visual, 0, -1)
    return LayerTokens(layer=layer, hidden=torch.zeros(1, L, 3), visual=visual, mask=mask,
                       keep=torch.tensor([budget]), before=torch.tensor([6]), unit=unit, images=((0, 6, budget),),
                       num_layers=4, attention_next=_attention_of(A, mask),
                       state={"ttv": torch.zeros(1, L)})


def test_transprune_early_drop_never_goes_below_the_budget():
    """before the last drop, max(budget, int(N * fraction)) tokens of an image stay."""
    m = transprune.TransPrune(transprune.TransPruneConfig(keep=4, schedule=[(0, 0.5), (1, 0.25)]))
    A = torch.full((9, 9), 1 / 9)
    assert len(m.select_in_llm(_tp_layer(0, A))[0]) == 4  # int(6 * 0.5) = 3 < budget 4


def test_transprune_iga_reads_the_question_rows_only():
    """IGA is the attention of the question (text after the image), not of every row."""
    m = transprune.TransPrune(transprune.TransPruneConfig(keep=1, schedule=[(0, 1 / 6)], alpha=0.0))
    A = torch.zeros(9, 9)
    A[:, 1] = 1.0  # every row looks at visual slot 1 ...
    A[7:, 1], A[7:, 5] = 0.0, 1.0  # ... except the question rows, which look at slot 5
    assert m.select_in_llm(_tp_layer(0, A, budget=1))[0].tolist() == [4]  # the 5th visual token


def test_question_rows_leave_right_padding_out():
    """pad slots after the question are not question rows."""
    from vtprune.methods.base import question_rows

    visual = torch.tensor([[False, True, True, False, False, False]])
    mask = torch.tensor([[True, True, True, True, False, False]])
    t = LayerTokens(layer=0, hidden=torch.zeros(1, 6, 2), visual=visual, mask=mask, keep=torch.tensor([1]))
    assert question_rows(t).tolist() == [[False, False, False, True, False, False]]


def test_question_rows_start_after_a_structural_placeholder():
    """A video's closing newline (structural: in no image, never pruned) after the last visual slot is neither
    visual nor question: the question is the text after it."""
    from vtprune.methods.base import question_rows

    visual = torch.tensor([[False, True, True, False, False, False], [True, False, False, True, False, False]])
    structural = torch.tensor([[False, False, False, True, False, False], [False, True, False, False, False, False]])
    mask = torch.ones(2, 6, dtype=torch.bool)
    t = LayerTokens(layer=0, hidden=torch.zeros(2, 6, 2), visual=visual, mask=mask, keep=torch.tensor([1, 1]),
                    structural=structural)
    assert question_rows(t).tolist() == [[False, False, False, False, True, True],
                                         [False, False, False, False, True, True]]


def test_todre_pivot_is_the_highest_scoring_token():
    """the pivot (first pick) is the argmax of the pivot signal."""
    from vtprune.methods.base import ImageTokens

    m = todre.ToDRE(todre.ToDREConfig(keep=1))
    im = ImageTokens(features=torch.randn(4, 3, generator=torch.Generator().manual_seed(0)), grid=None, keep=1,
                     signals={"pivot": torch.tensor([0.1, 0.9, 0.3, 0.2])})
    assert m.select(im).indices.tolist() == [1]


def test_todre_stage2_keeps_tokens_of_a_sample_with_no_question():
    """a sample whose visual tokens come last has no question rows: stage 2 must not empty it."""
    L = 5
    visual = torch.tensor([[False, False, True, True, True]])
    mask = torch.ones(1, L, dtype=torch.bool)
    t = LayerTokens(layer=6, hidden=torch.zeros(1, L, 2), visual=visual, mask=mask, keep=torch.tensor([2]),
                    before=torch.tensor([6]), unit=torch.where(visual, 0, -1), images=((0, 6, 2),), num_layers=8,
                    attention=lambda rows: rows.float() @ torch.full((L, L), 1 / L) / rows.float().sum().clamp_min(1))
    m = todre.ToDRE(todre.ToDREConfig(keep=2))
    assert m.select_in_llm(t)[0].tolist() == [0, 1, 2]


def test_todre_stage2_drops_a_sample_only_strictly_below_tau():
    """Per sample: its visual tokens all go when its question rows (the text after the image, not the rows
    before it) give the visual keys less than tau of their attention. A share equal to tau keeps them;
    so does an image within its budget; the other samples of the batch are left alone."""
    B, L = 4, 6  # slot 0 system text, 1..3 the image, 4..5 the question
    visual = torch.zeros(B, L, dtype=torch.bool)
    visual[:, 1:4] = True
    A = torch.zeros(B, L, L)
    A[:, 0, 0] = 1.0
    A[:, 1:4, 1] = 1.0  # the image's own rows look at the image only (a share of 1, were they counted)
    A[:, 4:] = torch.tensor([[0.5, 0.25, 0.125, 0.125, 0, 0],  # share 0.5: kept
                             [0.9375, 0.0625, 0, 0, 0, 0],  # 0.0625 < tau: dropped
                             [0.875, 0.125, 0, 0, 0, 0],  # exactly tau: kept
                             [0.9375, 0.0625, 0, 0, 0, 0]])[:, None]  # below tau, but within its budget

    def attention(rows):
        rows = torch.ones(B, L, dtype=torch.bool) if rows is None else rows
        w = rows.float() / rows.float().sum(1, keepdim=True)
        return torch.einsum("bl,blk->bk", w, A)

    t = LayerTokens(layer=6, hidden=torch.zeros(B, L, 2), visual=visual, mask=torch.ones(B, L, dtype=torch.bool),
                    keep=torch.tensor([1, 1, 1, 3]), before=torch.tensor([3, 3, 3, 3]),
                    unit=torch.where(visual, torch.arange(B)[:, None], -1),
                    images=((0, 3, 1), (1, 3, 1), (2, 3, 1), (3, 3, 3)), num_layers=8, attention=attention)
    m = todre.ToDRE(todre.ToDREConfig(keep=1, tau=0.125))
    assert [s.tolist() for s in m.select_in_llm(t)] == [[0, 1, 2], [], [0, 1, 2], [0, 1, 2]]
    never = todre.ToDRE(todre.ToDREConfig(keep=1, tau=0.0))  # (tau is in [0, 1]: 0 never drops)
    assert [s.tolist() for s in never.select_in_llm(t)] == [[0, 1, 2]] * 4


def test_token_shuffle_window_budget_counts_merged_tokens():
    """with s=2 a 4x4 grid keeps 2x2 = 4 tokens (a budget of N would read as 'prune nothing')."""
    m = token_shuffle.TokenShuffle(token_shuffle.TokenShuffleConfig(s=2))
    assert m.budget(16, (1, 4, 4)) == 4 and m.budget(15, (1, 3, 5)) == 6


# More cases found by mutating hiprune / transprune (each fails on a one-line slip that every test above passed)

def test_hiprune_top_left_corner_anchor_wraps_to_no_other_row():
    """4x4 grid, the anchor at 0: only 1 (right) and 4 (down) are its buffers. A left neighbour read as
    index -1 would wrap to 15, an upper one (-4) to 12; deep scores rank both last so neither can come
    back as a register and hide the slip (in the edge-anchor case above, the wrapped 3 is a register)."""
    obj = torch.zeros(16)
    obj[0] = 1.0
    deep = torch.arange(16.0).flip(0)  # prefers low indices: 15 and 12 are the least wanted
    # keep 5, alpha 1 -> round(1) = 1 anchor; A = {0, 1, 4}; registers = the 2 lowest others: 2, 3
    assert hiprune.select(obj[None], deep[None], (4, 4), 5, alpha=1.0)[0].tolist() == [0, 1, 2, 3, 4]


def test_hiprune_anchors_that_do_not_fit_are_dropped_one_at_a_time():
    """keep 8, alpha 1 -> round(1.6) = 2 anchors, 5 (interior: 1 4 6 9) and 14 (bottom row: 10 13 15),
    9 tokens > 8: the weaker anchor goes, the stronger one stays with its 4 buffers (not zero anchors)."""
    obj = torch.zeros(16)
    obj[5], obj[14] = 2.0, 1.0
    deep = torch.arange(16.0).flip(0)
    out = hiprune.select(obj[None], deep[None], (4, 4), 8, alpha=1.0)
    assert out[0].tolist() == [0, 1, 2, 3, 4, 5, 6, 9]  # A = {1, 4, 5, 6, 9} + registers 0, 2, 3


def test_hiprune_method_reads_the_grid_as_rows_then_columns():
    """ImageTokens.grid is (t, h, w): on a 2 x 4 grid (0 1 2 3 / 4 5 6 7) the anchor 1's buffers are 0, 2
    (same row) and 5 (below). Read as 4 x 2 (0 1 / 2 3 / 4 5 / 6 7) they would be 0 and 3."""
    from vtprune.methods.base import ImageTokens

    obj = torch.zeros(8)
    obj[1] = 1.0
    deep = torch.arange(8.0).flip(0)  # registers: the lowest indices left
    m = hiprune.HiPrune(hiprune.HiPruneConfig(keep=5, alpha=1.0))
    im = ImageTokens(features=torch.randn(8, 4), grid=(1, 2, 4), keep=5, signals={"object": obj, "deep": deep})
    # 1 anchor; A = {0, 1, 2, 5}; 1 register: 3
    assert m.select(im).indices.tolist() == [0, 1, 2, 3, 5]


def test_hiprune_default_alpha_is_a_tenth():
    """alpha = 0.1 (hiprune.md) in both the function and the config: keep 30 -> round(0.6) = 1 anchor.
    6 x 6 grid; the object scores' top two are 7 (r1 c1) and 2; deep scores prefer high indices.
    1 anchor: A = {7, 1, 6, 8, 13}; registers = the 25 highest of the other 31 (all but 0 2 3 4 5 9).
    (alpha 0.3 -> 2 anchors would keep 2 and 3; alpha 0 no anchor would keep 6..35.)"""
    from vtprune.methods.base import ImageTokens

    obj = torch.zeros(36)
    obj[7], obj[2] = 2.0, 1.0
    deep = torch.arange(36.0)
    want = [1, 6, 7, 8] + list(range(10, 36))
    assert hiprune.select(obj[None], deep[None], (6, 6), 30)[0].tolist() == want
    m = hiprune.HiPrune(hiprune.HiPruneConfig(keep=30))
    im = ImageTokens(features=torch.randn(36, 4), grid=(1, 6, 6), keep=30, signals={"object": obj, "deep": deep})
    assert m.select(im).indices.tolist() == want


def test_transprune_early_drop_keeps_int_of_its_fraction():
    """transprune.md: earlier stages keep int(N * fraction): int(6 * 0.625) = int(3.75) = 3, not 4."""
    m = transprune.TransPrune(transprune.TransPruneConfig(keep=1, schedule=[(0, 0.625), (1, 1 / 6)]))
    assert len(m.select_in_llm(_tp_layer(0, torch.full((9, 9), 1 / 9), budget=1))[0]) == 3


def test_transprune_accumulates_from_the_first_drop_through_the_last():
    """TTV accumulates over layers 7..12 (1-indexed) = 6..11 with the paper's schedule: the last drop
    layer's own transitions count; accumulate_from moves the start, up to the last drop itself."""
    tp = lambda **kw: transprune.TransPrune(transprune.TransPruneConfig(keep=4, **kw))  # noqa: E731
    assert tp().observe_layers(32) == [6, 7, 8, 9, 10, 11]
    assert tp(schedule=[(3, 0.5), (5, 0.25)]).observe_layers(8) == [3, 4, 5]
    assert tp(schedule=[(3, 0.5), (5, 0.25)], accumulate_from=1).observe_layers(8) == [1, 2, 3, 4, 5]
    assert tp(schedule=[(3, 0.5), (5, 0.25)], accumulate_from=5).observe_layers(8) == [5]
    assert tp(accumulate_from=11).observe_layers(32) == [11]  # the default schedule's last drop


def test_transprune_observe_uses_abs_cos_and_the_valid_tokens_for_both_sub_modules():
    """abs_cos applies to the attention and the MLP transitions alike; each softmax runs over the sample's
    valid tokens (text included), not over its visual ones alone."""
    g = torch.Generator().manual_seed(1)
    io = {k: torch.randn(1, 5, 3, generator=g) for k in ("attn_in", "attn_out", "mlp_in", "mlp_out")}
    io["mlp_out"] = -io["mlp_in"] * 2 + 0.1 * io["mlp_out"]  # cos near -1: |cos| and cos differ a lot
    visual = torch.tensor([[False, True, True, True, False]])
    mask = torch.ones(1, 5, dtype=torch.bool)
    tok = LayerTokens(layer=0, hidden=torch.zeros(1, 5, 3), visual=visual, mask=mask, keep=torch.tensor([2]), state={})
    transprune.TransPrune(transprune.TransPruneConfig(keep=2, abs_cos=True)).observe(tok, io)
    want = (transprune.transition(io["attn_in"], io["attn_out"], mask, abs_cos=True)
            + transprune.transition(io["mlp_in"], io["mlp_out"], mask, abs_cos=True))
    torch.testing.assert_close(tok.state["ttv"], want)
    assert not torch.allclose(want, transprune.transition(io["attn_in"], io["attn_out"], mask, abs_cos=True)
                              + transprune.transition(io["mlp_in"], io["mlp_out"], mask))
    assert not torch.allclose(want, transprune.transition(io["attn_in"], io["attn_out"], visual, abs_cos=True)
                              + transprune.transition(io["mlp_in"], io["mlp_out"], visual, abs_cos=True))


def test_transprune_mixes_ttv_and_iga_after_normalising_each():
    """score = 0.5 * TTV / sum + 0.5 * IGA / sum over the visual tokens. TTV (raw sum 100) is 0.6 on the
    3rd and 0.4 on the 4th visual token; the question pays 0.15 to the 4th, 0.85 to text, so IGA is 1 there.
    Scores 0.3 vs 0.2 + 0.5 = 0.7: the 4th wins. Mixing raw values would pick the 3rd (30 vs 20.075,
    or with raw IGA 0.3 vs 0.275)."""
    m = transprune.TransPrune(transprune.TransPruneConfig(keep=1, schedule=[(0, 1 / 6)]))
    A = torch.full((9, 9), 1 / 9)
    A[7:] = 0.0
    A[7:, 0], A[7:, 4] = 0.85, 0.15  # question rows (slots 7, 8): system text and visual slot 4
    tok = _tp_layer(0, A, budget=1)
    tok.state["ttv"][0, 3], tok.state["ttv"][0, 4] = 60.0, 40.0  # visual slots 3, 4 = the 3rd and 4th tokens
    assert m.select_in_llm(tok)[0].tolist() == [3]


def test_vflowopt_any_nonzero_alpha_needs_the_entropy():
    """a negative weight needs the entropy as much as a positive one; alpha 0 never reads it."""
    att = torch.tensor([0.5, 0.25, 0.25])
    for alpha in (0.5, -0.5):
        with pytest.raises(ValueError, match="alpha != 0 needs the patch entropy"):
            vflowopt.importance(att, None, alpha)
    torch.testing.assert_close(vflowopt.importance(att, None, 0.0), att)
