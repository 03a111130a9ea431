"""`patch(..., config=FILE)` and VFlowOpt's flow-guided search (`vtprune tune`)."""
import json

import pytest
import torch

import vtprune
from vtprune import cli, tiny
from vtprune.eval import models as eval_models, tune


def test_patch_from_a_config_file_and_overrides(model_factory, tmp_path):
    model = model_factory("llava")
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"method": "vflowopt", "options": {"ratio": 0.5, "r2": 0.5, "t": 3.0}, "tuned": {}}))
    vtprune.patch(model, config=path)
    cfg = model._vtprune.method.config
    assert (model._vtprune.method_name, cfg.ratio, cfg.r2, cfg.t) == ("vflowopt", 0.5, 0.5, 3.0)
    vtprune.patch(model, config=str(path), keep=3, t=7.0)  # explicit budget replaces the file's ratio
    cfg = model._vtprune.method.config
    assert (cfg.keep, cfg.ratio, cfg.r2, cfg.t) == (3, None, 0.5, 7.0)
    vtprune.patch(model, "random", config={"options": {"keep": 2, "seed": 5}})
    assert model._vtprune.method.config.seed == 5
    with torch.no_grad():
        model(**tiny.batch("llava", [0]))
    assert vtprune.stats(model).visual_after == [2]


def test_config_errors(model_factory, tmp_path):
    model = model_factory("llava")
    with pytest.raises(ValueError, match="differs"):
        vtprune.patch(model, "random", config={"method": "vflowopt", "options": {"keep": 2}})
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        vtprune.patch(model, config=bad)
    with pytest.raises(TypeError, match="unknown option"):
        vtprune.patch(model, config={"method": "vflowopt", "options": {"keep": 2, "beta": 1}})
    with pytest.raises(TypeError, match="needs a method"):
        vtprune.patch(model)
    # an option beside "options" was read as a note (its value unused); a JSON list was "not a path or a dict"
    with pytest.raises(ValueError, match=r"config keys \['r2', 'ratio'\] are the method's options: put them under"):
        vtprune.patch(model, config={"method": "vflowopt", "ratio": 0.3, "r2": 0.5})
    with pytest.raises(ValueError, match=r"config keys \['keep'\]"):
        vtprune.patch(model, "random", config={"keep": 3})
    with pytest.raises(ValueError, match=r"config keys \['seed'\]"):  # the method named by the caller's options too
        vtprune.patch(model, "random", config={"options": {"ratio": 0.5}, "seed": 3})
    bad.write_text("[1, 2]")
    with pytest.raises(ValueError, match="holds a JSON list, not an object"):
        vtprune.patch(model, config=bad)
    assert not hasattr(model, "_vtprune")


@pytest.mark.parametrize("layers", [2, 4, 28, 32])
def test_solve_r3_meets_the_layer_averaged_budget(layers):
    n1, n2, n3 = tune.layer_split(layers)
    assert n1 + n2 + n3 == layers
    r1, r2, budget = 0.3, 0.9, 0.25
    r3 = tune.solve_r3(budget, r1, r2, layers)
    assert 0 < r3 <= 1
    assert abs((r1 * n1 + r1 * r2 * n2 + r1 * r2 * r3 * n3) / layers - budget) < 1e-12
    if layers == 2:  # both drops at once, after layer 0: layer 1 sees R1 * R2 * R3
        assert (n1, n2, n3) == (1, 0, 1)
    assert abs(tune._retention(dict(ratio=r1, r2=r2, r3=r3), layers) - budget) < 1e-12
    assert tune.solve_r3(0.05, 0.3, 1.0, layers) is None  # the budget is spent before the last drop
    assert tune.solve_r3(0.29, 0.3, 0.9, layers) is None  # it would need R3 > 1: infeasible, not capped at 1


def test_released_presets_meet_their_budgets_on_28_layers():
    from vtprune.methods.vflowopt import PRESETS
    for pct, p in PRESETS.items():  # (R1 * 9 + R1R2 * 9 + R1R2R3 * 10) / 28 ~ the advertised percentage
        assert abs(tune._retention(p, 28) - pct / 100) < 2e-3, pct


def test_solve_r3_refuses_an_r3_below_its_minimum():
    """28 layers split 9 / 9 / 10: R1 = 0.3, R2 = 1 spends 5.4 / 28 before the last drop; R3 = 0.005 (under
    R3_MIN = 0.01, or 0, which the config refuses) is infeasible, R3 = 0.02 is solved."""
    assert tune.layer_split(28) == (9, 9, 10)
    assert tune.solve_r3((5.4 + 0.3 * 0.005 * 10) / 28, 0.3, 1.0, 28) is None
    assert tune.solve_r3(5.4 / 28, 0.3, 1.0, 28) is None
    assert tune.solve_r3((5.4 + 0.3 * 0.02 * 10) / 28, 0.3, 1.0, 28) == pytest.approx(0.02, abs=1e-12)


def test_solve_r3_takes_a_budget_met_at_r3_one_despite_rounding():
    """R1 = 0.1, R2 = 0.9 on 28 layers: the budget of R3 = 1 solves to 1 + 4e-16 in floats; that is R3 = 1
    (capped: the config refuses R3 > 1), not an infeasible point."""
    budget = (0.1 * 9 + 0.1 * 0.9 * 9 + 0.1 * 0.9 * 10) / 28
    assert tune.solve_r3(budget, 0.1, 0.9, 28) == 1.0


def test_objective_is_the_mean_over_samples_of_each_samples_cosine(monkeypatch):
    """Hand-worked: batch 1 has cosines 1 and 0 (orthogonal), batch 2 a NaN state (counts as 0); the mean is
    over the 3 samples (1/3), each cosine over the hidden dimension, all under vtprune.pruned(options)."""
    import contextlib

    active, seen = [], []

    @contextlib.contextmanager
    def pruned(model, method, **options):
        seen.append((model, method, options))
        active.append(True)
        yield
        active.pop()

    monkeypatch.setattr(vtprune, "pruned", pruned)
    monkeypatch.setattr(tune, "last_hidden", lambda model, inputs: (inputs["h"] if active else pytest.fail("unpruned")))
    batches = [{"h": torch.tensor([[1.0, 0.0], [0.0, 1.0]])}, {"h": torch.tensor([[float("nan"), 0.0]])}]
    reference = [torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([[1.0, 0.0]])]
    opts = dict(ratio=0.5, r2=0.9, r3=0.8)
    assert tune.objective("m", batches, reference, opts) == pytest.approx(1 / 3, abs=1e-6)
    assert seen == [("m", "vflowopt", opts)]


def _score(options):
    """The stand-in objective of _fake_tune: a known function of the options, in (-1, 1)."""
    return 0.9 - abs(options["t"] - 10) / 100 - abs(options["a"] - 5) / 100


def _fake_tune(monkeypatch, budget, iterations, seed=0, calls=None, ranges=None, score=_score, fixed=None):
    """tune() on a stand-in 28-layer model whose objective is `score`: every evaluated option set goes to
    `calls`, every suggest_float (name, low, high, value) to `ranges`."""
    from types import SimpleNamespace

    import optuna

    calls = [] if calls is None else calls
    ranges = [] if ranges is None else ranges
    model = SimpleNamespace(model=SimpleNamespace(language_model=SimpleNamespace(layers=[None] * 28)))
    real = optuna.trial.Trial.suggest_float

    def suggest_float(self, name, low, high, **kw):
        value = real(self, name, low, high, **kw)
        ranges.append((name, low, high, value))
        return value

    monkeypatch.setattr(tune, "objective", lambda model_, batches, reference, options: calls.append(options) or score(options))
    monkeypatch.setattr(tune, "last_hidden", lambda model_, inputs: torch.zeros(1, 2))
    monkeypatch.setattr(optuna.trial.Trial, "suggest_float", suggest_float)
    batches = [{"input_ids": torch.zeros(2, 3, dtype=torch.long)}]
    return tune.tune(model, batches, budget, iterations=iterations, seed=seed, progress=False, fixed=fixed)


@pytest.mark.parametrize("budget, pct, ratio", [(0.1, 10, 0.1166), (0.25, 25, 0.2651), (0.4, 50, 0.6)])
def test_tune_starts_from_the_nearest_released_preset(monkeypatch, budget, pct, ratio):
    """The first trial is the preset nearest the budget (0.4: the 50 % one), R1 clamped into the band
    [budget, 1.5 budget] (0.7233 -> 0.6), entropy off, R3 solved for the budget."""
    from vtprune.methods.vflowopt import PRESETS

    p, calls = PRESETS[pct], []
    cfg = _fake_tune(monkeypatch, budget, 1, calls=calls)
    want = dict(ratio=ratio, r2=p["r2"], r3=tune.solve_r3(budget, ratio, p["r2"], 28), t=p["t"], a=p["a"], alpha=0.0)
    assert len(calls) == 1 and calls[0] == pytest.approx(want, abs=1e-12) and cfg["options"] == calls[0]
    assert cfg["tuned"]["start_objective"] == cfg["tuned"]["objective"] == _score(calls[0])


def test_tune_searches_the_declared_ranges_and_returns_the_best_trial(monkeypatch):
    calls, ranges = [], []
    cfg = _fake_tune(monkeypatch, 0.25, 8, calls=calls, ranges=ranges)
    want = {"r1": (0.25, 0.375), **tune.SPACE}
    assert len(ranges) == 8 * 5 and all((low, high) == want[name] for name, low, high, _ in ranges)
    drawn = [{name: v for name, _, _, v in ranges[i:i + 5]} for i in range(0, len(ranges), 5)]
    feasible = [d for d in drawn if tune.solve_r3(0.25, d["r1"], d["r2"], 28) is not None]
    assert len(calls) == len(feasible) >= 3  # the start and some feasible draws, each evaluated as drawn
    assert [(o["ratio"], o["r2"], o["t"], o["a"], o["alpha"]) for o in calls] == [
        (d["r1"], d["r2"], d["t"], d["a"], d["alpha"]) for d in feasible]
    for o in calls:  # every evaluated point is in its range and meets the budget
        assert 0.25 <= o["ratio"] <= 0.375 and 0.5 <= o["r2"] <= 1 and tune.R3_MIN <= o["r3"] <= 1
        assert 0 <= o["t"] <= 50 and 3 <= o["a"] <= 24 and -1 <= o["alpha"] <= 1
        assert tune._retention(o, 28) == pytest.approx(0.25, abs=1e-9)
    scores = [_score(o) for o in calls]
    assert len(set(scores)) > 1
    best = max(range(len(calls)), key=scores.__getitem__)
    assert cfg["options"] == calls[best] and cfg["tuned"]["objective"] == scores[best]
    assert cfg["tuned"]["start_objective"] == scores[0] and cfg["tuned"]["seed"] == 0
    assert cfg["tuned"]["samples"] == 2 and cfg["tuned"]["iterations"] == 8


@pytest.mark.parametrize("shift", [0.0, -1.2])  # scores in [0.31, 0.9] or [-0.89, -0.3]
def test_tune_scores_an_infeasible_start_below_any_cosine(monkeypatch, shift):
    """budget 0.3: the start (the 25 % preset, R1 raised to 0.3) would need R3 = 1.03, infeasible; it is not
    evaluated and reported as None, and the best feasible trial wins even when every cosine is negative."""
    calls = []
    cfg = _fake_tune(monkeypatch, 0.3, 8, calls=calls, score=lambda o: _score(o) + shift)
    assert tune.solve_r3(0.3, 0.3, 0.9833, 28) is None
    assert calls and all(o["t"] != 34.76 for o in calls) and cfg["tuned"]["start_objective"] is None
    assert cfg["options"] in calls and cfg["tuned"]["objective"] == max(_score(o) + shift for o in calls)


def test_tune_runs_every_trial_with_the_fixed_options_and_writes_them(monkeypatch):
    """`fixed` (the processor's pixel normalisation) is in every trial's options and the written config, and
    changes nothing the search draws."""
    norm = dict(pixel_mean=(0.5, 0.5, 0.5), pixel_std=(0.5, 0.5, 0.5))
    plain, fixed = [], []
    _fake_tune(monkeypatch, 0.25, 5, calls=plain)
    with monkeypatch.context() as mp:
        cfg = _fake_tune(mp, 0.25, 5, calls=fixed, fixed=norm)
    assert fixed == [{**o, **norm} for o in plain]
    assert {k: cfg["options"][k] for k in norm} == norm and cfg["options"] in fixed
    with pytest.raises(ValueError, match=r"fixed options \['r2', 't'\] are the ones searched"):
        _fake_tune(monkeypatch, 0.25, 2, fixed=dict(t=1.0, r2=0.9))


def test_tune_is_reproducible_by_its_seed(monkeypatch):
    runs = {}
    for key, seed in (("a", 3), ("b", 3), ("c", 4)):
        runs[key] = []
        with monkeypatch.context() as mp:
            _fake_tune(mp, 0.25, 6, seed=seed, calls=runs[key])
    assert runs["a"] == runs["b"]
    assert runs["a"][0] == runs["c"][0] and runs["a"][1:] != runs["c"][1:]  # the same start, other draws


def test_tune_r1_band_stops_at_one(monkeypatch):
    """budget 0.8: R1 is searched in [0.8, 1] (1.5 x 0.8 would keep more than every token); the only trial,
    the 50 % preset with R1 raised to 0.8, cannot reach the budget: nothing feasible."""
    calls, ranges = [], []
    with pytest.raises(ValueError, match="no feasible configuration found"):
        _fake_tune(monkeypatch, 0.8, 1, calls=calls, ranges=ranges)
    assert calls == [] and ranges[0][:3] == ("r1", 0.8, 1.0)


def test_objective_is_one_without_pruning_and_lower_with(models):
    model = models("qwen2_vl")
    batches = eval_models.calibration("tiny-prompts", model, None, 4, batch_size=2)
    with torch.no_grad():
        ref = [tune.last_hidden(model, b) for b in batches]
    keep_all = dict(ratio=1.0, r2=1.0, r3=1.0)
    assert tune.objective(model, batches, ref, keep_all) == pytest.approx(1.0, abs=1e-6)
    assert tune.objective(model, batches, ref, dict(ratio=0.25, r2=0.5, r3=0.5)) < 0.999
    assert not hasattr(model, "_vtprune")


def test_last_hidden_makes_no_full_logits(models):
    """Every trial of a tune ran the lm_head over every position ([B, T, vocab], gigabytes on a 7B model)
    for a state it reads at the last one."""
    model = models("llava")
    batch = eval_models.calibration("tiny-prompts", model, None, 2, batch_size=2)[0]
    seen = []
    handle = model.lm_head.register_forward_hook(lambda m, args, out: seen.append(out.shape[1]))
    with torch.no_grad():
        got = tune.last_hidden(model, batch)
        full = model(**batch, output_hidden_states=True, use_cache=False).hidden_states[-1][:, -1].float()
    handle.remove()
    assert seen[0] == 1 and seen[1] > 1
    assert torch.equal(got, full)


def test_tune_command_writes_a_config_patch_accepts(tmp_path, capsys):
    out = tmp_path / "vflowopt.json"
    rc = cli.main(["tune", "--method", "vflowopt", "--model", "tiny-test-llava", "--task", "tiny-prompts",
                   "--budget", "0.5", "--samples", "4", "--iterations", "4", "--out", str(out)])
    assert rc == 0
    cfg = json.loads(out.read_text())
    t = cfg["tuned"]
    assert cfg["method"] == "vflowopt" and t["budget"] == 0.5 and t["samples"] == 4 and t["iterations"] == 4
    assert abs(t["layer_averaged_retention"] - 0.5) < 1e-9
    assert t["objective"] >= t["start_objective"]
    assert 0.5 <= cfg["options"]["ratio"] <= 0.75
    model, _ = eval_models.load("tiny-test-llava")
    vtprune.patch(model, config=out)
    with torch.no_grad():
        model.generate(**tiny.batch("llava", [0, 1]), max_new_tokens=2, **tiny.GEN)
    assert "wrote" in capsys.readouterr().out


def test_a_trial_the_model_refuses_is_infeasible_not_fatal(models, monkeypatch):
    """One trial's options raising (e.g. an anyres budget below its newlines) scores as infeasible; the
    search goes on and the result meets the budget."""
    model = models("llava")
    batches = eval_models.calibration("tiny-prompts", model, None, 2, batch_size=2)
    calls, real = [], tune.objective

    def first_refused(*args):
        calls.append(1)
        if len(calls) == 1:
            raise ValueError("a budget of 6 is below the 7 that needs")
        return real(*args)

    monkeypatch.setattr(tune, "objective", first_refused)
    cfg = tune.tune(model, batches, 0.5, iterations=3, progress=False)
    assert len(calls) == 3 and cfg["tuned"]["start_objective"] is None
    assert abs(cfg["tuned"]["layer_averaged_retention"] - 0.5) < 1e-9


def test_a_budget_the_model_refuses_says_why(capsys):
    """Every trial refused by the model (anyres newlines need more than the budget) ended in "raise
    --iterations, or lower the budget": the opposite of what helps; the refusal is now the message."""
    with pytest.raises(SystemExit) as exit_:
        cli.main(["tune", "--method", "vflowopt", "--model", "tiny-test-llava-next", "--task", "tiny-prompts",
                  "--budget", "0.1", "--samples", "2", "--iterations", "3", "--out", "unused.json"])
    err = capsys.readouterr().err.splitlines()[-1]  # after optuna's progress bar
    assert exit_.value.code == 2 and err.startswith("vtprune tune: error: ")
    assert "the model refused 3 of 3 trials, the last with: vflowopt works per grid" in err
    assert "lower the budget" not in err


def test_tune_on_the_shapes_task_with_the_bundled_architecture(tmp_path):
    out = tmp_path / "v.json"
    assert cli.main(["tune", "--method", "vflowopt", "--model", "tiny-llava", "--random-weights", "--task", "shapes",
                     "--budget", "0.3", "--samples", "4", "--iterations", "2", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["tuned"]["task"] == "shapes"


def test_tune_writes_the_processors_pixel_normalisation_into_the_config(tmp_path, monkeypatch, siglip_normalised):
    """The entropy term undoes the processor's normalisation, and vflowopt's default is CLIP's: a checkpoint
    normalising by 0.5 / 0.5 is tuned with its own, and the written config carries them."""
    seen = []
    real = tune.objective
    monkeypatch.setattr(tune, "objective", lambda m, b, r, options: seen.append(options) or real(m, b, r, options))
    out = tmp_path / "v.json"
    assert cli.main(["tune", "--method", "vflowopt", "--model", "tiny-llava", "--random-weights", "--task", "shapes",
                     "--budget", "0.3", "--samples", "2", "--iterations", "2", "--out", str(out)]) == 0
    options = json.loads(out.read_text())["options"]
    assert options["pixel_mean"] == options["pixel_std"] == [0.5, 0.5, 0.5]
    assert seen and all(o["pixel_mean"] == o["pixel_std"] == (0.5, 0.5, 0.5) for o in seen)
    model, _ = siglip_normalised("tiny-llava", random_weights=True)
    vtprune.patch(model, config=out)
    assert model._vtprune.method.config.pixel_mean == (0.5, 0.5, 0.5)


def test_tune_rejects_what_it_cannot_do(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:  # a user error like the others: status 2, one line
        cli.main(["tune", "--method", "divprune", "--model", "tiny-llava", "--budget", "0.5", "--out", "x"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == "vtprune tune: error: only --method vflowopt has a tuner, got 'divprune'\n"
    with pytest.raises(SystemExit) as exit_:
        cli.main(["flops", "--model", "tiny-llava", "--keep", "4", "--ratio", "0.5"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == "vtprune flops: error: give exactly one of --keep and --ratio\n"
    # checked before the model loads (were found after it); a budget of 1 has nothing to tune
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(eval_models, "load", lambda *a, **k: pytest.fail("the model was loaded"))
        for budget, message in (("0", "budget must be in (0, 1), got 0.0"), ("nan", "budget must be in (0, 1)"),
                                ("1", "budget 1 keeps every visual token: nothing to tune")):
            with pytest.raises(SystemExit) as exit_:
                cli.main(["tune", "--method", "vflowopt", "--model", "tiny-llava", "--budget", budget,
                          "--out", str(tmp_path / "t.json")])
            assert exit_.value.code == 2 and message in capsys.readouterr().err
        with pytest.raises(SystemExit):
            cli.main(["tune", "--method", "vflowopt", "--model", "tiny-llava", "--budget", "0.5", "--seed", "-1",
                      "--out", str(tmp_path / "t.json")])
        assert "--seed: must be >= 0" in capsys.readouterr().err
        with pytest.raises(SystemExit) as exit_:  # the demo's ratios: both modes, before any model is built
            mp.setattr("vtprune.demo.run", lambda *a, **k: pytest.fail("the demo ran"))
            cli.main(["demo", "--plumbing", "--ratios", "0.5,0"])
        assert exit_.value.code == 2 and "--ratios: each must be in (0, 1], got 0.0" in capsys.readouterr().err
    with pytest.raises(ValueError, match="is for the test models"):
        eval_models.calibration("tiny-prompts", *eval_models.load("tiny-llava", random_weights=True), 2)
    with pytest.raises(ValueError, match="local model directory"):
        eval_models.load(str(tmp_path / "missing"))


def test_shapes_calibration_for_qwen2_5_vl_and_later():
    """`tune` (default --task shapes) on a Qwen2.5-VL or Qwen3-VL checkpoint failed: 'not a bundled tiny
    model family'. They take Qwen2-VL's prompt layout; here a tiny Qwen2.5-VL speaks the bundled processor's ids."""
    from vtprune.eval import tinyvlm

    proc = tinyvlm.processor("qwen2_vl")
    model = tiny.build("qwen2_5_vl").eval()
    for key, token in (("image_token_id", "<|image_pad|>"), ("vision_start_token_id", "<|vision_start|>")):
        setattr(model.config, key, proc.tokenizer.convert_tokens_to_ids(token))
        setattr(model.model.config, key, getattr(model.config, key))
    assert [tinyvlm.family_of(tiny.build(f)) for f in ("qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe")] == [
        "qwen2_vl"] * 4
    batches = [eval_models.to_model(b, model) for b in eval_models.calibration("shapes", model, proc, 4, batch_size=2)]
    assert [int((b["input_ids"] == model.config.image_token_id).sum()) for b in batches] == [
        int(b["image_grid_thw"].prod(-1).sum()) // 4 for b in batches]  # every image's tokens, 2x2 merged
    cfg = tune.tune(model, batches, 0.5, iterations=2, progress=False)
    assert abs(cfg["tuned"]["layer_averaged_retention"] - 0.5) < 1e-9


def test_shapes_calibration_never_reads_the_evaluation_split(monkeypatch):
    """tune's default calibration takes train-split scenes (and sizes): the eval split is what sweeps and the
    lmms-eval tasks score."""
    from vtprune.eval import shapes

    splits = []
    sample, size = shapes.sample, shapes.qwen_size
    monkeypatch.setattr(shapes, "sample", lambda split, *a, **k: (splits.append(split), sample(split, *a, **k))[1])
    monkeypatch.setattr(shapes, "qwen_size", lambda split, *a, **k: (splits.append(split), size(split, *a, **k))[1])
    for name in ("tiny-llava", "tiny-qwen2vl"):
        model, processor = eval_models.load(name, random_weights=True)
        assert [b["input_ids"].shape[0] for b in eval_models.calibration("shapes", model, processor, 3, batch_size=2)] == [2, 1]
    assert len(splits) == 3 + 3 * 2 and set(splits) == {"train"}

def test_a_command_line_preset_file_is_read_once(tmp_path, monkeypatch):
    """bench/flops --config FILE read the file twice (the method check, then the options): a file changing in
    between (a tune run still writing it) could give the method of one version and the options of another."""
    import builtins

    from vtprune import patching

    path = tmp_path / "p.json"
    path.write_text(json.dumps({"method": "fastv", "options": {"keep": 4, "layer": 2}}))
    opened = []
    monkeypatch.setattr(patching, "open", lambda *a, **k: (opened.append(a[0]), builtins.open(*a, **k))[1], raising=False)
    assert cli._preset(str(path), None, {}) == ("fastv", {"keep": 4, "layer": 2})
    assert opened == [str(path)]
