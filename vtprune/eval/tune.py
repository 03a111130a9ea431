"""Flow-guided hyperparameter search for VFlowOpt (`vtprune tune --method vflowopt`).

Objective (label-free, as the paper): the mean over calibration samples of cos(h, h~), the final
hidden state of the last prefill token without and with pruning. Searched: R1 (the ratio entering
the LLM, within [budget, 1.5 x budget]), R2, t, a, alpha, by Gaussian-process Bayesian optimisation
(optuna's GPSampler, seeded); R3 is solved from the layer-averaged budget
    (R1 * n1 + R1 * R2 * n2 + R1 * R2 * R3 * n3) / L = budget,
with n1, n2, n3 the decoder layers before, between and after the two in-LLM drops (a decoder too
shallow for two drops makes both at once: n2 = 0). A trial whose R3 would
have to leave [R3_MIN, 1], or whose options the model refuses, is infeasible; the written config meets
the budget exactly."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..methods.vflowopt import PRESETS, llm_layers

SPACE = {"r2": (0.5, 1.0), "t": (0.0, 50.0), "a": (3.0, 24.0), "alpha": (-1.0, 1.0)}  # the authors' ranges
R3_MIN = 0.01
INFEASIBLE = -1.0  # a trial's score when its options cannot meet the budget (below any cosine)


def layer_split(num_layers: int) -> tuple[int, int, int]:
    """Decoder layers (n1, n2, n3) seeing R1, R1 * R2 and R1 * R2 * R3 of the tokens. A decoder with one
    drop point makes both drops there (VFlowOpt.select_in_llm), so none sees R1 * R2 alone: n2 = 0."""
    layers = llm_layers(num_layers)
    p1, p2 = layers[0], layers[-1]
    return p1 + 1, p2 - p1, num_layers - p2 - 1


def solve_r3(budget: float, r1: float, r2: float, num_layers: int) -> float | None:
    """R3 meeting the layer-averaged budget exactly; None when it would have to leave [R3_MIN, 1]."""
    n1, n2, n3 = layer_split(num_layers)
    r3 = (budget * num_layers - r1 * n1 - r1 * r2 * n2) / (n3 * r1 * r2)
    if r3 < R3_MIN or r3 > 1.0 + 1e-9:
        return None
    return min(1.0, r3)


def last_hidden(model, inputs) -> torch.Tensor:
    """Final-layer (post-norm) hidden state of each sample's last prefill token, float32 [B, D]."""
    out = model(**inputs, output_hidden_states=True, use_cache=False, logits_to_keep=1)  # no [B, T, vocab] logits
    return out.hidden_states[-1][:, -1].float()


def objective(model, batches, reference, options) -> float:
    """Mean cosine similarity between pruned and unpruned last hidden states (NaN counts as 0)."""
    import vtprune

    sims = []
    with vtprune.pruned(model, "vflowopt", **options), torch.no_grad():
        for inputs, ref in zip(batches, reference):
            cos = torch.nn.functional.cosine_similarity(last_hidden(model, inputs), ref, dim=-1)
            sims.append(torch.nan_to_num(cos, nan=0.0))
    return float(torch.cat(sims).mean())


def check_budget(budget: float) -> float:
    """A layer-averaged kept fraction in (0, 1): 1 keeps every token (no search point is feasible but the
    unpruned edge r1 = r2 = 1, which the sampler never draws)."""
    if not 0 < budget <= 1:  # (nan too)
        raise ValueError(f"budget must be in (0, 1), got {budget}")
    if budget == 1:
        raise ValueError("budget 1 keeps every visual token: nothing to tune (use vtprune unpatched, or a budget < 1)")
    return budget


def require_optuna():
    """optuna (the tuner's optimiser), or an ImportError saying how to install it."""
    try:
        import optuna
    except ImportError:
        raise ImportError("vtprune tune needs optuna: pip install 'vtprune[tune]' (or optuna scipy)") from None
    return optuna


def tune(model, batches: list[dict], budget: float, iterations: int = 50, seed: int = 0, progress: bool = True,
         fixed: dict | None = None) -> dict:
    """Search VFlowOpt's options for `model` at a layer-averaged `budget` in (0, 1); returns the config
    dict `vtprune.patch(model, config=...)` accepts, with the search record under "tuned". `fixed`: options
    every trial runs with and the config keeps, not searched (the processor's pixel_mean / pixel_std)."""
    optuna = require_optuna()
    check_budget(budget)
    fixed = dict(fixed or {})
    searched = {"ratio", "r2", "r3", "t", "a", "alpha"} & set(fixed)
    if searched:
        raise ValueError(f"fixed options {sorted(searched)} are the ones searched")
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    num_layers = len(model.model.language_model.layers)
    with torch.no_grad():
        reference = [last_hidden(model, b) for b in batches]
    r1_range = (budget, min(1.0, 1.5 * budget))

    def options_of(p):
        r3 = solve_r3(budget, p["r1"], p["r2"], num_layers)
        if r3 is None:
            return None
        return dict(ratio=p["r1"], r2=p["r2"], r3=r3, t=p["t"], a=p["a"], alpha=p["alpha"], **fixed)

    def run(trial):
        p = {"r1": trial.suggest_float("r1", *r1_range)}
        p.update({k: trial.suggest_float(k, *rng) for k, rng in SPACE.items()})
        opts = options_of(p)
        if opts is None:
            return INFEASIBLE
        try:
            return objective(model, batches, reference, opts)
        except ValueError as e:  # e.g. an anyres budget below its newlines + grids: this point is infeasible
            refused.append(str(e))
            return INFEASIBLE

    refused = []  # why the model refused trials, for the error when none was feasible
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.GPSampler(seed=seed))
    nearest = PRESETS[min(PRESETS, key=lambda pct: abs(pct / 100 - budget))]  # start from a released preset
    start = {"r1": min(max(nearest["ratio"], r1_range[0]), r1_range[1]), "r2": max(nearest["r2"], SPACE["r2"][0]),
             "t": nearest["t"], "a": nearest["a"], "alpha": 0.0}
    study.enqueue_trial(start)
    study.optimize(run, n_trials=iterations, show_progress_bar=progress)
    best = options_of(study.best_params) if study.best_value > INFEASIBLE else None
    if best is None:
        if refused:  # the model, not the search, ruled them out: say why (it may take a higher budget)
            raise ValueError(f"no feasible configuration found: the model refused {len(refused)} of {iterations} "
                             f"trials, the last with: {refused[-1]}")
        raise ValueError("no feasible configuration found; raise --iterations, or lower the budget if it is near 1")
    if abs(_retention(best, num_layers) - budget) > 1e-6:
        raise RuntimeError(f"internal error: retention {_retention(best, num_layers)} != budget {budget}")
    start_value = study.trials[0].value
    return {
        "method": "vflowopt",
        "options": best,
        "tuned": {
            "budget": budget,
            "objective": study.best_value,
            "start_objective": start_value if start_value > INFEASIBLE else None,  # None: the preset is infeasible here
            "layer_averaged_retention": _retention(best, num_layers),
            "samples": sum(int(b["input_ids"].shape[0]) for b in batches),
            "iterations": iterations,
            "seed": seed,
            "optimiser": f"optuna {optuna.__version__} GPSampler",
        },
    }


def _retention(options: dict, num_layers: int) -> float:
    n1, n2, n3 = layer_split(num_layers)
    r1, r2, r3 = options["ratio"], options["r2"], options["r3"]
    return (r1 * n1 + r1 * r2 * n2 + r1 * r2 * r3 * n3) / num_layers


def write(config: dict, path: str):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")


__all__ = ["tune", "solve_r3", "layer_split", "objective", "write"]
