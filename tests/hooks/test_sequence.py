import pytest
import torch

from vtprune.hooks.sequence import compact_index, compact_text_positions, dropped_before, row_slots, runs, take


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


def _runs_row_by_row(mask):
    out = []
    for row in mask.tolist():
        slots, cur = [], []
        for i, on in enumerate(row):
            if on and cur and cur[-1] == i - 1:
                cur.append(i)
            elif on:
                cur = [i]
                slots.append(cur)
        out.append(slots)
    return out


def test_runs_hand_case_and_random_masks():
    mask = torch.tensor([[0, 1, 1, 0, 1], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 1, 0, 1]], dtype=torch.bool)
    got = [[r.tolist() for r in rs] for rs in runs(mask)]
    assert got == [[[1, 2], [4]], [], [[0, 1, 2, 3, 4]], [[0], [2], [4]]]
    assert runs(torch.zeros(3, 4, dtype=torch.bool)) == [[], [], []]
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        mask = torch.rand(5, 13, generator=g) < torch.rand(1, generator=g)
        assert [[r.tolist() for r in rs] for rs in runs(mask)] == _runs_row_by_row(mask)
        assert all(r.dtype == torch.long for rs in runs(mask) for r in rs)


def test_runs_and_row_slots_read_the_batch_back_a_fixed_number_of_times(host_syncs):
    for b in (1, 8):
        mask = torch.zeros(b, 12, dtype=torch.bool)
        mask[:, 2:5] = mask[:, 7:11] = True
        with host_syncs() as s:
            runs(mask)
        assert s.n == 3, b  # the slots, the run starts, their rows
        with host_syncs() as s:
            slots = row_slots(mask)
        assert s.n == 1 and [x.tolist() for x in slots] == [[2, 3, 4, 7, 8, 9, 10]] * b


def test_row_slots_hand_case():
    mask = torch.tensor([[0, 1, 1, 0], [0, 0, 0, 0], [1, 0, 0, 1]], dtype=torch.bool)
    assert [x.tolist() for x in row_slots(mask)] == [[1, 2], [], [0, 3]]


@pytest.mark.parametrize("method", ["random", "divprune", "fastv", "transprune"])
def test_a_llava_prefill_adds_no_host_sync_per_sample(model_factory, host_syncs, method):
    """The LLaVA adapter finds each sample's image tokens for the whole batch at once, the images' selections
    are checked together, and in-LLM drops rank every sample's images at once: a pruning forward reads back
    as often at batch 8 as at batch 2 (each sample's slots, checks and images were read on their own)."""
    import vtprune
    from vtprune import tiny
    unpatched = vtprune.unpatched  # (public)

    model = model_factory("llava")
    vtprune.patch(model, method, keep=4)
    counts = []
    for b in (2, 8):
        inputs = tiny.batch("llava", list(range(b)))
        with torch.no_grad(), host_syncs() as s:
            model(**inputs)
        with torch.no_grad(), unpatched(model), host_syncs() as base:
            model(**inputs)
        counts.append(s.n - base.n)
    assert counts[0] == counts[1] > 0


def test_checked_all_reads_every_selection_back_once_and_raises_the_first_failure(host_syncs):
    from vtprune.hooks.checks import check_indices_all, checked_all
    from vtprune.methods.base import Selection

    ok = torch.tensor([0, 2, 3])
    items = [(Selection(ok.clone()), 5, 3, 8, f"m{i}") for i in range(6)]
    with host_syncs() as s:
        out = checked_all(items)
    assert s.n == 1 and all(o.indices.tolist() == [0, 2, 3] for o in out)

    def item(sel, what):
        return (torch.tensor(sel), 5, 3, what, 1, False)

    cases = [
        ([item([0, 1], "a"), item([0, 7], "b"), item([2, 1], "c")], "b: indices out of range"),
        ([item([0, 1], "a"), item([2, 1], "b"), item([0, 9], "c")], "b: indices must be unique and ascending"),
        ([item([1, 1], "a"), item([0, 1, 2, 3], "b")], "a: indices must be unique and ascending"),  # before b's shape
        ([item([0, 1], "a"), item([0, 1, 2, 3], "b"), item([0, 9], "c")], r"b: expected 1..3 indices, got shape \(4,\)"),
        ([item([0], "a"), (torch.tensor([0.5]), 5, 3, "b", 1, False)], "b: indices must be an integer tensor"),
    ]
    for items, words in cases:
        with pytest.raises((RuntimeError, TypeError), match=words):
            check_indices_all(items)
    empty = (torch.tensor([], dtype=torch.long), 5, 3, "b", 0, False)  # least=0: keeping none is allowed
    assert [x.tolist() for x in check_indices_all([item([0, 4], "a"), empty])] == [[0, 4], []]


def test_host_syncs_script_writes_its_rows_and_command(benchmark_script, tmp_path, capsys):
    script = benchmark_script("host_syncs")
    out = tmp_path / "syncs.json"
    rows = script.main(["--families", "llava", "--methods", "random", "--batches", "2,8", "--out", str(out)])
    assert [(r["family"], r["method"], r["batch"]) for r in rows] == [("llava", "random", 2), ("llava", "random", 8)]
    assert rows[0]["added"] == rows[1]["added"] > 0 and rows[0]["unpatched"] > 0
    saved = __import__("json").loads(out.read_text())
    assert saved["rows"] == rows and saved["command"].startswith("python benchmarks/host_syncs.py --families llava")
    assert "| llava | random | 8 |" in capsys.readouterr().out


def test_decode_overhead_script_counts_each_row_s_calls_per_step_beside_unpatched(benchmark_script, tmp_path, capsys):
    script = benchmark_script("decode_overhead")
    out = tmp_path / "decode.json"
    rows = script.main(["--layers", "4", "--methods", "fastv", "--steps", "2", "--reps", "1", "--out", str(out)])
    assert [(r["method"], r["batch"], r["layers"]) for r in rows] == [("unpatched", 1, 4), ("fastv", 1, 4)]
    assert rows[0]["calls_added"] == 0 and rows[1]["calls_added"] > 0 and rows[0]["decode_ratio"] == 1
    assert rows[1]["calls_per_step"] == rows[0]["calls_per_step"] + rows[1]["calls_added"]
    assert rows[0]["prefill_ops_added"] == 0 and rows[1]["prefill_ops_added"] > 0  # (fastv's scoring, its masks)
    saved = __import__("json").loads(out.read_text())
    assert saved["rows"] == rows and saved["command"].startswith("python benchmarks/decode_overhead.py --layers 4")
    assert "| 1 | fastv |" in capsys.readouterr().out


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_decode_steps_on_a_pruned_static_cache_read_back_no_more_than_unpatched(model_factory, host_syncs, family):
    """generate() on a static cache (the compiled path's) reads nothing back per decode step, so the host queues
    the next step while the device runs this one. Four more new tokens add as many host reads patched as
    unpatched (none): the pruning record counts what was decoded instead of reading the cache's length, a device
    tensor (1 read per step on LLaVA, 2 on Qwen-VL before; 3 and 4 with the check for several new tokens)."""
    import vtprune
    from transformers import StaticCache

    from vtprune import tiny

    model = model_factory(family)
    inputs = tiny.batch(family, [0, 1])
    added = []
    for patched in (True, False):
        counts = []
        for new in (2, 6):
            with vtprune.pruned(model, "divprune", keep=4) if patched else vtprune.unpatched(model), torch.no_grad():
                cache = StaticCache(config=model.config, max_cache_len=64)
                with host_syncs() as s:
                    model.generate(**inputs, max_new_tokens=new, min_new_tokens=new, past_key_values=cache, **tiny.GEN)
                counts.append(s.n)
        added.append(counts[1] - counts[0])
    assert added[0] == added[1]
