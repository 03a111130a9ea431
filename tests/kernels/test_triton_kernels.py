"""The Triton kernels against their plain-torch references. On a machine without CUDA they run in
Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1), with small shapes that still cross
block boundaries (N not a power of two, N > one 64-wide block), batch > 1, ties, keep=1 and keep=N."""
import pytest
import torch

pytest.importorskip("triton")

from vtprune.kernels import attention_scores_torch, greedy_select_torch  # noqa: E402
from vtprune.kernels.attention_triton import attention_scores_triton  # noqa: E402
from vtprune.kernels.greedy_torch import cosine_gram, greedy_from_gram_torch, most_isolated  # noqa: E402
from vtprune.kernels.greedy_triton import (cosine_gram_triton, greedy_from_gram_triton,  # noqa: E402
                                           greedy_select_triton, most_isolated_triton)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def rand(*shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype).to(DEVICE)


# Greedy selection ------------------------------------------------------------------------------

@pytest.mark.parametrize("n, keep", [(1, 1), (5, 1), (5, 5), (63, 20), (65, 64), (130, 33), (130, 130)])
@pytest.mark.parametrize("rule", ["maxmin", "maxsum"])
def test_greedy_select_matches_reference(n, keep, rule):
    x = rand(3, n, 20, seed=n + keep)
    want = greedy_select_torch(x, keep, None, rule)
    got = greedy_select_triton(x, keep, None, rule)
    assert got.dtype == torch.long and torch.equal(got, want)
    pivot = torch.tensor([0, n // 2, n - 1], device=DEVICE)
    assert torch.equal(greedy_select_triton(x, keep, pivot, rule), greedy_select_torch(x, keep, pivot, rule))


@pytest.mark.parametrize("rule", ["maxmin", "maxsum"])
def test_greedy_steps_bit_identical_on_a_tied_gram(rule):
    # A Gram matrix rounded to one decimal: many exact ties at every step; the picks (in selection
    # order) must be the reference's, lowest index first on ties.
    x = rand(4, 70, 6, seed=3)
    sim = (cosine_gram(x) * 10).round() / 10
    first = torch.tensor([0, 5, 69, 33], device=DEVICE)
    for keep in (1, 2, 17, 70):
        want = greedy_from_gram_torch(sim, keep, first, rule)
        assert torch.equal(greedy_from_gram_triton(sim, keep, first, rule), want)
    assert torch.equal(most_isolated_triton(sim), most_isolated(sim))


def test_ties_go_to_the_lowest_index():
    # Orthonormal tokens: every unselected token is at distance 1 from everything, so max-min takes
    # them in index order after the seed; duplicates (rows 5 and 6 equal to 1 and 2) come last.
    eye = torch.eye(5)
    x = torch.cat([eye, eye[1:3]])[None].to(DEVICE)
    picks = greedy_from_gram_triton(cosine_gram_triton(x), 5, torch.tensor([3], device=DEVICE))
    assert picks.tolist() == [[3, 0, 1, 2, 4]]
    # most isolated: tokens 0, 3 and 4 have no duplicate (nearest at distance 1): the lowest wins
    assert most_isolated_triton(cosine_gram_triton(x)).tolist() == [0]
    assert greedy_select_triton(x, 7).tolist() == greedy_select_torch(x, 7).tolist() == [list(range(7))]


def test_duplicate_tokens_tie_exactly_in_both_backends():
    """Max-min on tokens [a, b, a, b] (random, not unit length): once a and b are chosen, the copies 2
    and 3 are both at distance 0 -- a true tie, so 2 must win. Without snapping self-similarities to 1,
    rounding picked 3 for some draws (in either backend). (Max-sum's tie here, 1 + cos(a, b) against
    cos(b, a) + 1, rests on two dot products at different places of the matrix and is not exact.)"""
    for seed in range(24):
        ab = rand(2, 37, seed=seed)
        x = ab[[0, 1, 0, 1]][None]
        for select in (greedy_select_torch, greedy_select_triton):
            assert select(x, 3, torch.tensor([0], device=DEVICE)).tolist() == [[0, 1, 2]], (seed, select.__name__)
            # every token has a copy at distance 0: the most isolated is the first
            assert select(x, 3).tolist() == [[0, 1, 2]], (seed, select.__name__)


def test_identical_tokens_in_different_tiles_have_identical_gram_columns():
    """A copy of token 40 at 70 (another 64-wide tile): the reference's columns 40 and 70 are equal, so
    ties go to 40. The kernel scaled (dot * inv_row) * inv_col, whose rounding depends on which token
    is the row, so some rows differed by an ulp and it kept 70 for some draws."""
    for seed in range(40):
        x = rand(1, 80, 16, seed=seed)
        x[0, 70] = x[0, 40]
        g = cosine_gram_triton(x)
        assert torch.equal(g[0, :, 40], g[0, :, 70]) and torch.equal(g[0], g[0].T), seed
        for rule in ("maxmin", "maxsum"):
            assert torch.equal(greedy_select_triton(x, 20, torch.tensor([0], device=DEVICE), rule),
                               greedy_select_torch(x, 20, torch.tensor([0], device=DEVICE), rule)), (seed, rule)


def test_copies_behind_a_near_duplicate_pick_alike_in_both_backends():
    """Tokens [u, w, v, v, v, v], w within 1e-5 of v but not a copy: the reference took the first token within
    SAME as the copies' representative only if it was a copy, so here the copies kept BLAS-rounded columns
    and it picked copy 4 where the kernel picked copy 2 (seed 34, one thread). Each backend's second pick is
    w or the first copy."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for seed in range(40):
            g = torch.Generator().manual_seed(seed)
            u, v, d = torch.randn(3, 64, generator=g)
            w = v - 1e-6 * d / d.norm() * v.norm()
            x = torch.stack([u, w, v, v, v, v])[None].to(DEVICE)
            g0 = cosine_gram(x)[0]
            assert torch.equal(g0[:, 2], g0[:, 5]) and torch.equal(g0[2], g0[5]), seed
            for rule in ("maxmin", "maxsum"):  # (w against v is a near-tie, which rounding may decide either way)
                for select in (greedy_select_torch, greedy_select_triton):
                    assert select(x, 2, None, rule)[0, 1] in (1, 2), (seed, rule, select.__name__)
    finally:
        torch.set_num_threads(previous)


@pytest.mark.filterwarnings("ignore:(overflow|invalid value) encountered:RuntimeWarning")
def test_a_row_whose_squared_norm_overflows_counts_as_zero_in_both_backends():
    # (the interpreter's numpy warns about the overflow this test makes on purpose)
    x = rand(1, 5, 16, seed=1)
    x[0, 1] *= 1e21  # its float32 squared norm is inf: the row's similarities are all 0, never NaN
    for gram in (cosine_gram, cosine_gram_triton):
        sim = gram(x)
        assert not bool(sim.isnan().any()) and bool((sim[0, 1] == 0).all()) and bool((sim[0, :, 1] == 0).all())
    assert greedy_select_triton(x, 3).tolist() == greedy_select_torch(x, 3).tolist()


@pytest.mark.filterwarnings("ignore:(overflow|invalid value) encountered:RuntimeWarning")
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("rule", ["maxmin", "maxsum"])
def test_a_row_with_a_non_finite_entry_counts_as_zero_in_both_backends(bad, rule):
    # a projector that overflowed: the torch reference used to keep NaN similarities (argmax takes NaN as the
    # maximum) where the kernel read 0, so the two picked other tokens ([0, 1, 2] vs [0, 2, 4] here)
    x = rand(2, 6, 8, seed=0)
    x[0, 2, 3] = bad
    zeroed = x.clone()
    zeroed[0, 2] = 0
    for gram in (cosine_gram, cosine_gram_triton):
        sim = gram(x)
        assert not bool(sim.isnan().any())
        torch.testing.assert_close(sim, gram(zeroed), atol=0, rtol=0)
    want = greedy_select_torch(zeroed, 3, None, rule)
    assert greedy_select_torch(x, 3, None, rule).tolist() == want.tolist()
    assert greedy_select_triton(x, 3, None, rule).tolist() == want.tolist()


@pytest.mark.parametrize("rule", ["maxmin", "maxsum"])
def test_opposite_tokens_tie_exactly_in_both_backends(rule):
    # a, then -a, -2a, -3a, -5a: from token 0 the other four are all at cosine -1 (distance 2); rounding made
    # -1 +- an ulp, so the second pick went to 1, 3 or 4 by seed and backend (an audit: 3 / 9 of 30 seeds wrong)
    for seed in range(30):
        a = torch.randn(16, generator=torch.Generator().manual_seed(seed))
        x = torch.stack([a, -a, -2 * a, -3 * a, -5 * a])[None].to(DEVICE)
        for gram in (cosine_gram, cosine_gram_triton):
            sim = gram(x)[0]
            assert sim[0, 1:].tolist() == [-1.0] * 4 and sim[1:, 1:].eq(1).all(), (seed, gram.__name__)
        for select in (greedy_select_torch, greedy_select_triton):
            assert select(x, 2, torch.tensor([0], device=DEVICE), rule).tolist() == [[0, 1]], (seed, rule)


@pytest.mark.parametrize("rule", ["maxmin", "maxsum"])
def test_a_row_of_norm_below_1e_12_counts_as_zero_in_both_backends(rule):
    # 1e-25 * randn: the reference divided by 1e-12 and kept tiny similarities where the kernel's squared norms
    # underflowed to exact zeros, and the two picked different tokens (maxsum [0,2,10,14,18,19] vs [0,1,...,5])
    x = rand(1, 20, 16, seed=5) * 1e-25
    x[0, 3] = rand(16, seed=6)  # one ordinary row among them
    for gram in (cosine_gram, cosine_gram_triton):
        sim = gram(x)[0]
        assert sim[3, 3] == 1 and sim.count_nonzero() == 1, gram.__name__
    assert greedy_select_triton(x, 6, None, rule).tolist() == greedy_select_torch(x, 6, None, rule).tolist()


def test_gram_matches_reference_with_zero_rows_and_low_precision():
    x = rand(2, 70, 37, seed=5)
    x[1, 4] = 0  # zero rows stay zero
    torch.testing.assert_close(cosine_gram_triton(x), cosine_gram(x), atol=2e-6, rtol=1e-5)
    xb = x.to(torch.bfloat16)  # bf16 products are exact in float32: only the summation order differs
    torch.testing.assert_close(cosine_gram_triton(xb), cosine_gram(xb), atol=2e-6, rtol=1e-5)
    strided = rand(2, 37, 70, seed=6).transpose(1, 2)  # non-contiguous input
    torch.testing.assert_close(cosine_gram_triton(strided), cosine_gram(strided), atol=2e-6, rtol=1e-5)


def test_bad_arguments_raise_like_the_reference():
    x = rand(1, 4, 3)
    with pytest.raises(ValueError, match="keep"):
        greedy_select_triton(x, 5)
    with pytest.raises(ValueError, match="rule"):
        greedy_select_triton(x, 2, rule="minmax")
    with pytest.raises(ValueError, match="first/pivot"):
        greedy_select_triton(x, 2, torch.tensor([4]))


@pytest.mark.parametrize("select", [greedy_select_torch, greedy_select_triton])
def test_own_seeds_are_not_checked_on_the_host(select, monkeypatch):
    """DivPrune's seed (the most isolated token) went through the caller-argument check: two host syncs
    (`bool(...any())`) between the Gram and the greedy launches, where the whole selection should take
    ~0.08 ms. A caller's seeds are still checked."""
    x, calls, real = rand(2, 70, 16, seed=3), [], torch.Tensor.__bool__
    want = select(x, 9)
    monkeypatch.setattr(torch.Tensor, "__bool__", lambda t: calls.append(1) or real(t))
    assert torch.equal(select(x, 9), want) and calls == []
    with pytest.raises(ValueError, match="first/pivot"):
        select(x, 9, torch.tensor([0, 70], device=DEVICE))


# Attention scores ------------------------------------------------------------------------------

@pytest.mark.parametrize("hq, hk", [(4, 4), (4, 2), (3, 1)], ids=lambda v: str(v))
@pytest.mark.parametrize("causal, window", [(False, None), (True, None), (True, 40)], ids=["full", "causal", "window40"])
@pytest.mark.parametrize("nq, nk", [(7, 7), (3, 9), (70, 130), (130, 70)], ids=["square", "tail", "blocks", "more-q"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_attention_scores_match_reference(hq, hk, causal, window, nq, nk, dtype):
    q, k = rand(2, hq, nq, 12, seed=nq, dtype=dtype), rand(2, hk, nk, 12, seed=nk + 1, dtype=dtype)
    key_mask = torch.ones(2, nk, dtype=torch.bool, device=DEVICE)
    key_mask[1, :2] = False  # left padding in sample 1
    rows = torch.ones(2, nq, dtype=torch.bool, device=DEVICE)
    rows[1, :2] = False
    want = attention_scores_torch(q, k, 0.3, rows, causal=causal, key_mask=key_mask, window=window)
    got = attention_scores_triton(q, k, 0.3, rows, causal=causal, key_mask=key_mask, window=window)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_attention_scores_with_a_wide_head_not_a_power_of_two(dtype):
    # head dim 80 -> 128-wide tiles with masked columns; 45 rows/keys cross the fp32 (16 x 32) and bf16 (64 x 32)
    # tiles; grouped keys (4 query heads over 2 key heads)
    q, k = rand(2, 4, 45, 80, seed=3, dtype=dtype), rand(2, 2, 45, 80, seed=4, dtype=dtype)
    key_mask = torch.ones(2, 45, dtype=torch.bool, device=DEVICE)
    key_mask[0, :5] = False
    for index, causal in [(None, False), (torch.tensor([44, 40], device=DEVICE), True)]:
        want = attention_scores_torch(q, k, 80 ** -0.5, index, causal=causal, key_mask=key_mask)
        got = attention_scores_triton(q, k, 80 ** -0.5, index, causal=causal, key_mask=key_mask)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_attention_query_index_forms_and_no_mask():
    q, k = rand(2, 4, 66, 16, seed=1), rand(2, 2, 66, 16, seed=2)
    for index in (None, torch.tensor([65]), torch.tensor([[0, 64], [3, 65]])):
        want = attention_scores_torch(q, k, 0.25, index)
        torch.testing.assert_close(attention_scores_triton(q, k, 0.25, index), want, atol=1e-6, rtol=1e-5)


def test_attention_rows_with_no_allowed_key_contribute_nothing():
    q, k = rand(1, 2, 5, 16, seed=4), rand(1, 2, 5, 16, seed=5)
    key_mask = torch.tensor([[False, False, True, True, True]], device=DEVICE)
    # causal: rows 0 and 1 see only masked keys -> their probabilities are 0, as in the reference
    want = attention_scores_torch(q, k, 1.0, causal=True, key_mask=key_mask)
    got = attention_scores_triton(q, k, 1.0, causal=True, key_mask=key_mask)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    assert got[0, :2].tolist() == [0.0, 0.0]


def test_attention_key_mask_is_checked_and_broadcast_alike():
    # a [1, Nk] mask for a batch of 2 made the kernel read past the mask (image 1 got garbage or zeros), a
    # float mask of 0.5 masked every key there (int8 cast) but none in the reference, a wrong Nk passed silently
    q, k = rand(2, 2, 5, 8, seed=7), rand(2, 1, 5, 8, seed=8)
    row = torch.tensor([True, True, False, True, True], device=DEVICE)
    want = attention_scores_torch(q, k, 0.3, key_mask=row.expand(2, 5).clone())
    # an integer 0/1 mask (a Hugging Face attention_mask) and a numpy one read as nonzero = attend
    for mask in (row, row[None], row.long(), row.to(torch.uint8)[None], row.cpu().numpy()):
        for f in (attention_scores_torch, attention_scores_triton):
            torch.testing.assert_close(f(q, k, 0.3, key_mask=mask), want, atol=1e-6, rtol=1e-5)
    for f in (attention_scores_torch, attention_scores_triton):
        with pytest.raises(ValueError, match=r"key_mask must be \[B, Nk\] = \[2, 5\]"):
            f(q, k, 0.3, key_mask=torch.ones(2, 8, dtype=torch.bool, device=DEVICE))
        with pytest.raises(ValueError, match="key_mask must be"):
            f(q, k, 0.3, key_mask=torch.ones(2, 1, 5, dtype=torch.bool, device=DEVICE))
        with pytest.raises(TypeError, match=r"key_mask must be a bool \(or 0/1 integer\) tensor"):
            f(q, k, 0.3, key_mask=torch.full((2, 5), 0.5, device=DEVICE))
        with pytest.raises(TypeError, match="got str"):
            f(q, k, 0.3, key_mask="all")


# The benchmark script and the GPU-only low-precision paths ---------------------------------------

def test_kernel_benchmark_quick_run(tmp_path, benchmark_script):
    import json

    out = tmp_path / "k.json"
    benchmark_script("kernels").main(["--quick", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["greedy"] and all(r["same_indices"] for r in result["greedy"])
    assert result["attention"] and all(r["max_rel_diff"] < 1e-5 for r in result["attention"])
    assert result["command"].endswith(f"--out {out}")
    assert result["tower"][0]["method"] == "hiprune" and result["e2e"][0]["method"] == "divprune"
    tower, e2e = result["tower"][0], result["e2e"][0]
    assert tower["unpatched_tower_ms"] > 0 and tower["tower_time_ratio"] > 0  # the tower alone, beside the prefill
    assert e2e["selection_ms"] > 0 and e2e["greedy_kernel_ms"] > 0  # the strategy's own selection, and the kernel


@pytest.mark.parametrize("section", ["greedy", "attention"])
def test_kernel_benchmark_writes_each_row_as_it_goes(tmp_path, benchmark_script, monkeypatch, section):
    """Each section writes its rows as they are measured (a deadline cut the greedy section after its last
    case only: 63 rows measured and none written)."""
    import json

    module = benchmark_script("kernels")
    out, real, calls = tmp_path / "k.json", getattr(module, f"bench_{section}"), []

    def second_case_stops(cases, *a):
        calls.append(cases)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(cases, *a)

    monkeypatch.setattr(module, f"bench_{section}", second_case_stops)
    with pytest.raises(KeyboardInterrupt):
        module.main(["--quick", "--sections", section, "--out", str(out)])
    record = json.loads(out.read_text())
    assert len(record[section]) == 1 and record["complete"] is False


def test_kernel_benchmark_runs_as_a_script(tmp_path):
    """As benchmarks/gpu_figures.sh runs it: `python benchmarks/kernels.py` puts benchmarks/ on the path,
    where this file would shadow the `kernels` package that transformers imports (the tower section
    builds a transformers model)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "k.json"
    # as the README gives it: no TRITON_INTERPRET (the script takes the interpreter itself on a CPU; it
    # failed with "0 active drivers" before)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "benchmarks/kernels.py", "--quick", "--sections", "tower,greedy", "--out", str(out)],
                   cwd=root, env=env, check=True, capture_output=True, timeout=600)
    record = json.loads(out.read_text())
    assert record["tower"][0]["method"] == "hiprune" and record["greedy"]


@pytest.mark.gpu
def test_bf16_tensor_core_paths_on_gpu():
    x = torch.randn(2, 577, 1024, device="cuda").to(torch.bfloat16)
    torch.testing.assert_close(cosine_gram_triton(x), cosine_gram(x), atol=1e-5, rtol=1e-4)
    assert torch.equal(greedy_select_triton(x, 64), greedy_select_torch(x, 64))
    q = torch.randn(2, 16, 577, 64, device="cuda").to(torch.bfloat16)
    k = torch.randn(2, 16, 577, 64, device="cuda").to(torch.bfloat16)
    torch.testing.assert_close(attention_scores_triton(q, k, 0.125), attention_scores_torch(q, k, 0.125),
                               atol=1e-6, rtol=1e-5)


# Found by mutating the kernels: left padding over a whole key block, per-image query rows in different
# blocks, and what the interpreter cannot see (input precision, tile legality, the tie-break a GPU applies)

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_attention_left_padding_longer_than_a_key_block(dtype, causal):
    # sample 1 is left-padded by 40 keys: more than one key block (16 fp32 / 32 bf16), so its rows see
    # only masked keys in the first block(s) -- as in any batched prefill with different prompt lengths
    q, k = rand(2, 2, 12, 16, seed=1, dtype=dtype), rand(2, 1, 50, 16, seed=2, dtype=dtype)
    key_mask = torch.ones(2, 50, dtype=torch.bool, device=DEVICE)
    key_mask[1, :40] = False
    want = attention_scores_torch(q, k, 0.25, causal=causal, key_mask=key_mask)
    got = attention_scores_triton(q, k, 0.25, causal=causal, key_mask=key_mask)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    if not causal:  # (causal: rows 0 and 1 of sample 1 see only padding)
        torch.testing.assert_close(got.sum(1), torch.ones(2, device=DEVICE))


def test_attention_query_rows_in_different_blocks_per_image():
    # image 0 averages rows of the first query block only, image 1 rows of the second (a question at a
    # different position in each prompt): each image's own rows decide which blocks are computed
    q, k = rand(2, 2, 40, 16, seed=3), rand(2, 2, 40, 16, seed=4)
    rows = torch.zeros(2, 40, dtype=torch.bool, device=DEVICE)
    rows[0, :10] = True
    rows[1, 30:] = True
    for causal in (False, True):
        want = attention_scores_torch(q, k, 0.3, rows, causal=causal)
        got = attention_scores_triton(q, k, 0.3, rows, causal=causal)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(got.sum(1), torch.ones(2, device=DEVICE))
    index = torch.tensor([[1, 2], [33, 38]], device=DEVICE)
    torch.testing.assert_close(attention_scores_triton(q, k, 0.3, index), attention_scores_torch(q, k, 0.3, index),
                               atol=1e-6, rtol=1e-5)


class _Spy:
    """Stands in for a kernel: records the launch's keyword arguments (the constexprs) and, under "dtypes",
    its tensor arguments' dtypes; runs nothing."""

    def __init__(self, calls):
        self.calls = calls

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append(
            {**kwargs, "dtypes": [a.dtype for a in args if isinstance(a, torch.Tensor)]})


def test_gpu_launches_keep_float32_in_ieee_and_tiles_legal(monkeypatch):
    # The interpreter ignores input_precision (np.matmul in float32 whatever IEEE says) and accepts dots
    # narrower than 16, so what a GPU launch is given is checked on the arguments, with the launchers told
    # they are on a GPU: float32 (and mixed-dtype) inputs must keep IEEE dots -- TF32 would change cosines
    # in the 4th digit and flip selections -- and the head-dim tile must be >= 16 for tl.dot.
    from vtprune.kernels import attention_triton, greedy_triton, launch

    calls = []
    monkeypatch.setattr(launch, "compiled", lambda t: True)
    for name in ("_gram_kernel",):
        monkeypatch.setattr(greedy_triton, name, _Spy(calls))
    for name in ("_row_stats_kernel", "_column_kernel"):
        monkeypatch.setattr(attention_triton, name, _Spy(calls))
    greedy_triton.cosine_gram_triton(torch.randn(1, 70, 32))
    assert [c["IEEE"] for c in calls] == [True]
    calls.clear()
    greedy_triton.cosine_gram_triton(torch.randn(1, 70, 32).to(torch.bfloat16))
    assert [c["IEEE"] for c in calls] == [False]  # tensor cores for bf16 on the GPU
    calls.clear()
    greedy_triton.cosine_gram_triton(torch.randn(1, 70, 32).half())
    assert [(c["IEEE"], c["dtypes"][0]) for c in calls] == [(False, torch.float16)]  # and for fp16
    calls.clear()
    greedy_triton.cosine_gram_triton(torch.randn(1, 70, 32, dtype=torch.float64))
    # float64 goes in as float32, as the reference computes (a float64 tile did not compile on a GPU)
    assert [(c["IEEE"], c["BK"], c["dtypes"][0]) for c in calls] == [(True, 16, torch.float32)]
    for qd, kd, ieee in [(torch.float32, torch.float32, True), (torch.bfloat16, torch.float32, True),
                         (torch.float32, torch.bfloat16, True), (torch.bfloat16, torch.bfloat16, False)]:
        for d in (8, 12, 64, 80):
            calls.clear()
            q, k = torch.randn(1, 2, 20, d).to(qd), torch.randn(1, 2, 20, d).to(kd)
            attention_triton.attention_scores_triton(q, k, 0.1)
            assert len(calls) == 2 and all(c["IEEE"] is ieee for c in calls), (qd, kd, d, calls)
            assert all(c["BD"] >= max(16, d) for c in calls), (d, calls)
    for qd, kd in [(torch.float64, torch.float64), (torch.float64, torch.bfloat16)]:
        calls.clear()
        attention_triton.attention_scores_triton(torch.randn(1, 2, 20, 64).to(qd), torch.randn(1, 2, 20, 64).to(kd), 0.1)
        assert len(calls) == 2 and all(c["IEEE"] for c in calls)
        assert all(t in (torch.float32, torch.bfloat16, torch.int8) for c in calls for t in c["dtypes"]), calls


@pytest.mark.parametrize("rule", ["maxmin", "maxsum"])
def test_greedy_ties_do_not_rest_on_the_interpreter(monkeypatch, rule):
    # The interpreter's argmax/argmin always return the leftmost index, whatever tie_break_left says; on a GPU
    # tie_break_left=False is "fast": any tied index. Here the "fast" combines prefer the rightmost index, as a
    # GPU may, so the kernel must ask for the lowest index itself.
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    if DEVICE == "cuda":
        pytest.skip("on a GPU the real tie-break is what the other greedy tests see")
    if not (hasattr(interpreter, "ReduceOps") and hasattr(tl.standard, "_argmax_combine_tie_break_fast")):
        pytest.skip("this Triton's interpreter has other internals (written against Triton 3.x's ReduceOps)")
    fast = {tl.standard._argmax_combine_tie_break_fast: (np.nanmax, np.nanargmax),
            tl.standard._argmin_combine_tie_break_fast: (np.nanmin, np.nanargmin)}
    plain = interpreter.ReduceOps.apply_impl

    def apply_impl(self, input):
        if self.combine_fn not in fast:
            return plain(self, input)
        value_op, index_op = fast[self.combine_fn]
        values = input[0][0] if isinstance(input[0], tuple) else input[0]
        data = values.handle.data
        last = data.shape[self.axis] - 1  # the rightmost of tied indices, as a GPU's "fast" tie-break may give
        index = last - index_op(np.flip(data, axis=self.axis), axis=self.axis, keepdims=self.keep_dims)
        return (self.to_tensor(value_op(data, axis=self.axis, keepdims=self.keep_dims), values.dtype),
                self.to_tensor(index.astype(np.int32), tl.int32))

    monkeypatch.setattr(interpreter.ReduceOps, "apply_impl", apply_impl)
    from vtprune.kernels.greedy_triton import cosine_gram_triton, greedy_from_gram_triton
    from vtprune.kernels.greedy_torch import greedy_from_gram_torch

    eye = torch.eye(6)
    x = torch.cat([eye, eye[1:3]])[None].to(DEVICE)  # orthonormal tokens and two copies: ties at every step
    sim = cosine_gram_triton(x)
    first = torch.tensor([3], device=DEVICE)
    assert torch.equal(greedy_from_gram_triton(sim, 8, first, rule), greedy_from_gram_torch(sim, 8, first, rule))


def test_triton_takes_a_callers_seeds_as_a_list_or_int32():
    # the checked seeds (a LongTensor on the features' device) reach the kernel, not the caller's object
    x = rand(3, 9, 5, seed=1)
    want = greedy_select_torch(x, 4, torch.tensor([0, 4, 8], device=DEVICE))
    assert torch.equal(greedy_select_triton(x, 4, [0, 4, 8]), want)
    assert torch.equal(greedy_select_triton(x, 4, torch.tensor([0, 4, 8], dtype=torch.int32, device=DEVICE)), want)


# Found by a second mutation pass: layouts the other tests never pass, and the CUDA dispatch (on a CPU every
# public call takes the reference, so a wrong argument on the Triton branch went unseen)

@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_attention_takes_strided_inputs(causal):
    # what the decoder hook passes: q/k projections [B, N, H, d] transposed to [B, H, N, d] (heads not outermost);
    # a key tensor whose head dim is not unit-stride; masks that are transposes of [N, B] (the kernels read the
    # weights and the key mask at b * N + i, so they must be made contiguous); 20 rows, 24 keys: two fp32 blocks each
    q = rand(2, 20, 4, 16, seed=11).transpose(1, 2)
    for k in (rand(2, 24, 2, 16, seed=12).transpose(1, 2), rand(2, 2, 16, 24, seed=13).transpose(2, 3)):
        key_mask = torch.ones(24, 2, dtype=torch.bool, device=DEVICE)
        key_mask[:5, 1] = False
        rows = torch.ones(20, 2, dtype=torch.bool, device=DEVICE)
        rows[:7, 0] = False
        rows[12:, 1] = False
        assert not (q.is_contiguous() or k.is_contiguous() or key_mask.T.is_contiguous() or rows.T.is_contiguous())
        want = attention_scores_torch(q.contiguous(), k.contiguous(), 0.3, rows.T.contiguous(), causal=causal,
                                      key_mask=key_mask.T.contiguous())
        torch.testing.assert_close(attention_scores_torch(q, k, 0.3, rows.T, causal=causal, key_mask=key_mask.T), want,
                                   atol=1e-6, rtol=1e-5)
        got = attention_scores_triton(q, k, 0.3, rows.T, causal=causal, key_mask=key_mask.T)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("rule", ["maxmin", "maxsum"])
def test_greedy_steps_read_rows_of_the_gram_in_any_layout(rule):
    # an asymmetric matrix tells a row from a column (the steps read row `pick`, as the reference does), and
    # its transpose (column stride 1, not row stride) must be read as the matrix it is, not as its storage
    g = torch.Generator().manual_seed(4)
    sim = (torch.rand(2, 37, 37, generator=g) * 2 - 1).to(DEVICE)
    first = torch.tensor([3, 36], device=DEVICE)
    for m in (sim, sim.transpose(1, 2)):
        want = greedy_from_gram_torch(m, 12, first, rule)
        assert torch.equal(greedy_from_gram_triton(m, 12, first, rule), want)
    assert not torch.equal(greedy_from_gram_torch(sim, 12, first, rule), want)  # (rows and columns pick differently)


def test_dispatch_takes_the_kernels_for_cuda_tensors_where_triton_is():
    from types import SimpleNamespace

    import vtprune.kernels as kernels

    assert kernels.triton_available()  # (this file is skipped without Triton)
    cuda, cpu = SimpleNamespace(is_cuda=True), SimpleNamespace(is_cuda=False)
    assert kernels._use_triton(cuda) and not kernels._use_triton(cpu)


def test_dispatch_keeps_the_references_on_cuda_without_triton(monkeypatch):
    from types import SimpleNamespace

    import vtprune.kernels as kernels

    monkeypatch.setattr(kernels.importlib.util, "find_spec", lambda name, *a: None)  # (macOS, a CPU-only wheel)
    assert not kernels.triton_available() and not kernels._use_triton(SimpleNamespace(is_cuda=True))


@pytest.mark.parametrize("rule", ["maxmin", "maxsum"])
def test_the_cuda_branch_hands_every_argument_to_the_kernels(monkeypatch, rule):
    # the public functions' Triton branch, run here in the interpreter (the device context a no-op on a CPU):
    # each slice of a batch over GRAM_BYTES with its own seeds, the rule, the query rows, causal and the key mask
    import contextlib

    import vtprune.kernels as kernels
    from vtprune.kernels import attention_triton, greedy_triton

    if DEVICE == "cpu":
        monkeypatch.setattr(kernels, "_use_triton", lambda t: True)
        monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())
    calls = []
    for module, name in ((greedy_triton, "greedy_select_triton"), (attention_triton, "attention_scores_triton")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _real=real, **kw: calls.append(_real.__name__) or _real(*a, **kw))
    monkeypatch.setattr(kernels, "GRAM_BYTES", 2 * 4 * 9 * 9)  # two images' Gram matrices per launch
    x = rand(3, 9, 5, seed=2)
    want = greedy_select_torch(x, 4, torch.tensor([8, 0, 4], device=DEVICE), rule)
    assert torch.equal(kernels.greedy_select(x, 4, [8, 0, 4], rule), want)
    q, k = rand(2, 4, 6, 8, seed=3), rand(2, 2, 6, 8, seed=4)
    key_mask = torch.ones(2, 6, dtype=torch.bool, device=DEVICE)
    key_mask[1, :2] = False
    index = torch.tensor([[1, 3], [4, 5]], device=DEVICE)
    want = attention_scores_torch(q, k, 0.3, index, causal=True, key_mask=key_mask)
    torch.testing.assert_close(kernels.attention_scores(q, k, 0.3, index, causal=True, key_mask=key_mask), want,
                               atol=1e-6, rtol=1e-5)
    assert calls == ["greedy_select_triton"] * 2 + ["attention_scores_triton"]
