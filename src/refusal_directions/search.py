"""Pareto search over per-layer removal kernels: multi-objective TPE (Optuna) on the proxies.

Objectives, both minimised: the refusal proxy and the KL of ``proxies.ProxyScorer``. A trial is a
per-layer weight kernel of the method's removal along its selected component's direction (INLP
with k as a parameter), Heretic's parameterisation in our own form (``kernel_weights``):

    w_l = max_w - (max_w - min_w) |l - peak| / width   where |l - peak| <= width, else 0,

``peak`` in [0, L - 1] (continuous), ``max_w`` in [0, ``MAX_WEIGHT``], ``min_w = fraction * max_w``
with ``fraction`` in [0, 1], ``width`` in [0.5, L]; INLP's ``k`` in [1, the component's k].

Seeded and resumable: the study lives in an SQLite file (the run folder's ``optimize/<method>.db``)
and trial i (counting complete trials) is sampled by a fresh ``TPESampler(seed=seed + i)``, so a
study killed after n trials and resumed samples what the uninterrupted study would have: each
trial depends only on the seed, its index and the trials before it. Trials left running by a
killed process are marked failed on resume and sampled again. Every trial is scored one per
forward, so its values do not depend on how trials were batched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from .directions.base import DirectionSet
from .interventions import Intervention, removal_for
from .proxies import ProxyScorer
from .selection import MethodSelection

MAX_WEIGHT = 1.5


def kernel_weights(n_layers: int, peak: float, max_weight: float, min_weight: float, width: float) -> list[float]:
    """The weight of every layer 0..L-1 (module docstring); 0 outside the window |l - peak| <= width."""
    if width <= 0:
        raise ValueError(f"The kernel's width must be positive, not {width}.")
    out = []
    for layer in range(n_layers):
        distance = abs(layer - peak)
        out.append(max_weight - (max_weight - min_weight) * distance / width if distance <= width else 0.0)
    return out


@dataclass(frozen=True)
class SearchSpace:
    """The parameters of one method's trials: ``n_layers`` and INLP's largest k (None: no k)."""

    n_layers: int
    max_k: int | None = None

    def sample(self, trial: Any) -> dict[str, Any]:
        """The parameters of an Optuna trial (``suggest_*`` calls, always in this order)."""
        params = {"peak": trial.suggest_float("peak", 0.0, float(self.n_layers - 1)),
                  "max_weight": trial.suggest_float("max_weight", 0.0, MAX_WEIGHT),
                  "min_fraction": trial.suggest_float("min_fraction", 0.0, 1.0),
                  "width": trial.suggest_float("width", 0.5, float(self.n_layers))}
        if self.max_k is not None:
            params["k"] = trial.suggest_int("k", 1, self.max_k)
        return params

    def layers_and_weights(self, params: dict[str, Any]) -> tuple[tuple[int, ...], tuple[float, ...]]:
        """The layers a trial edits (weight > 0) and their weights."""
        weights = kernel_weights(self.n_layers, params["peak"], params["max_weight"],
                                 params["min_fraction"] * params["max_weight"], params["width"])
        kept = [(l, w) for l, w in enumerate(weights) if w > 0]
        return tuple(l for l, _ in kept), tuple(w for _, w in kept)


def space_for(directions: DirectionSet, sel: MethodSelection, n_layers: int) -> SearchSpace:
    """The search space of a method: INLP searches k up to its selected component's k."""
    return SearchSpace(n_layers, sel.best.k if directions.method == "inlp" else None)


def trial_intervention(directions: DirectionSet, sel: MethodSelection, space: SearchSpace,
                       params: dict[str, Any]) -> Intervention | None:
    """The removal a trial's parameters describe (None: no layer has a positive weight)."""
    layers, weights = space.layers_and_weights(params)
    if not layers:
        return None
    best = sel.best
    k = params.get("k", best.k if directions.method == "inlp" else None)
    return removal_for(directions, best.pos_index, best.layer, layers, k, weights=weights)


def search_settings(config: Any) -> dict[str, Any]:
    """What a search's artifact key hashes (a ``RunConfig``'s budget, random trials and seed)."""
    return {"trials": config.search_trials, "startup": config.search_startup_trials, "seed": config.search_seed,
            "max_weight": MAX_WEIGHT}


def open_study(path: Path, name: str, fresh: bool = False) -> Any:
    """The study ``name`` in the SQLite file ``path`` (created if absent; ``fresh``: deleted first),
    two objectives minimised."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fresh:
        try:
            optuna.delete_study(study_name=name, storage=f"sqlite:///{path}")
        except KeyError:
            pass
    return optuna.create_study(storage=f"sqlite:///{path}", study_name=name, load_if_exists=True,
                               directions=["minimize", "minimize"])


def _complete(study: Any) -> list[Any]:
    from optuna.trial import TrialState

    return sorted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), key=lambda t: t.number)


def run_search(study: Any, scorer: ProxyScorer, directions: DirectionSet, sel: MethodSelection, n_layers: int,
               trials: int, startup: int, seed: int, stop_after: int | None = None) -> list[dict[str, Any]]:
    """Run ``study`` until it has ``trials`` complete trials (``stop_after``: stop once this many
    trials ran in this call, as a kill would; tests); returns ``trial_records``."""
    import optuna
    from optuna.trial import TrialState

    for stale in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study.tell(stale.number, state=TrialState.FAIL)  # left by a killed process
    space = space_for(directions, sel, n_layers)
    ran = 0
    while len(_complete(study)) < trials and (stop_after is None or ran < stop_after):
        index = len(_complete(study))
        study.sampler = optuna.samplers.TPESampler(seed=seed + index, n_startup_trials=startup)
        trial = study.ask()
        params = space.sample(trial)
        proxy = scorer.score([trial_intervention(directions, sel, space, params)])[0]
        study.tell(trial, [proxy.refusal, proxy.kl])
        ran += 1
    return trial_records(study, space)


def trial_records(study: Any, space: SearchSpace) -> list[dict[str, Any]]:
    """Every complete trial, in order: index, params, layers, weights, refusal, kl."""
    out = []
    for index, t in enumerate(_complete(study)):
        layers, weights = space.layers_and_weights(t.params)
        out.append({"index": index, "params": dict(t.params), "layers": list(layers), "weights": list(weights),
                    "refusal": float(t.values[0]), "kl": float(t.values[1])})
    return out


def pareto_front(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records no other record dominates on (refusal, kl), both lower-is-better, by KL; of equal
    points the first (lowest index) is kept."""
    front = []
    for r in records:
        dominated = any((o["refusal"] <= r["refusal"] and o["kl"] <= r["kl"]) and
                        (o["refusal"] < r["refusal"] or o["kl"] < r["kl"] or o["index"] < r["index"])
                        for o in records if o is not r)
        if not dominated:
            front.append(r)
    return sorted(front, key=lambda r: (r["kl"], r["refusal"]))


FAR_FACTOR = 2.0  # a chosen point whose KL is off its level by more than this factor is flagged


def matched_damage(front: Sequence[dict[str, Any]], levels: Sequence[float]) -> dict[float, dict[str, Any] | None]:
    """Per KL level, the front record whose KL is nearest on a log scale (None: empty front), with
    ``far`` set when its KL differs from the level by more than ``FAR_FACTOR`` times."""
    out: dict[float, dict[str, Any] | None] = {}
    for level in levels:
        if not front:
            out[level] = None
            continue
        chosen = min(front, key=lambda r: (abs(math.log(max(r["kl"], 1e-12) / level)), r["index"]))
        ratio = max(chosen["kl"], 1e-12) / level
        out[level] = {**chosen, "level": level, "far": not (1 / FAR_FACTOR <= ratio <= FAR_FACTOR)}
    return out
