"""Dose-response sweeps of every method on the selection proxies (``proxies``), without generation.

For each method, from its selected (best filtered) component's direction, the refusal proxy (bypass
score on the harmful validation prompts) and the KL (harmless prompts) as functions of:

* ``strength``: the removal strength lambda at every layer in scope (per-layer weights all lambda,
  ``interventions.Removal.layer_alpha``: the writes of every layer in scope and the first block input
  get x - lambda U Wᵀ (x - b); lambda = 1 is the removal, 0 the model itself), LEACE affine and not;
* ``reflection``: the reflection alpha of ``--reflection-mode`` (R = alpha P + (1 - alpha) I);
* ``k`` (INLP): the leading k = 1, 2, 4, ... directions of P and the component's own k, lambda = 1;
* ``actadd`` (diff-in-means, INLP): ActAdd at the component's layer subtracting m ||r_best|| r̂;

each (but ActAdd) at every scope of ``SweepGrid.scopes`` (one, top:<f>, all, window:<n>). A record
is a dict: method, family, scope, value (lambda, alpha, k or m), affine, k, layers, refusal, kl.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .directions.base import DirectionSet
from .interventions import ActAdd, Intervention, removal_for
from .proxies import ProxyScorer
from .scopes import Scope
from .selection import MethodSelection

FAMILIES = ("strength", "reflection", "k", "actadd")


@dataclass(frozen=True)
class SweepGrid:
    """The values a sweep visits (``RunConfig``'s ``sweep_*`` settings and ``reflection_mode``)."""

    weights: tuple[float, ...]
    alphas: tuple[float, ...]
    multipliers: tuple[float, ...]
    scopes: tuple[str, ...]
    reflection_mode: str = "reference"

    @classmethod
    def from_config(cls, config: Any) -> "SweepGrid":
        """The grid of a ``RunConfig``."""
        return cls(tuple(config.sweep_weights), tuple(config.sweep_alphas), tuple(config.sweep_multipliers),
                   tuple(config.sweep_scopes), config.reflection_mode)

    def settings(self) -> dict[str, Any]:
        """What the sweep's artifact key hashes."""
        return {"weights": list(self.weights), "alphas": list(self.alphas), "multipliers": list(self.multipliers),
                "scopes": list(self.scopes), "reflection_mode": self.reflection_mode}


def inlp_k_values(k: int) -> list[int]:
    """1, 2, 4, ... below ``k``, then ``k`` itself (the leading directions of INLP's P)."""
    values, v = [], 1
    while v < k:
        values.append(v)
        v *= 2
    return values + [k]


@dataclass(frozen=True)
class SweepPoint:
    """One configuration of a sweep: what it is (the record's fields) and its intervention."""

    family: str
    scope: str
    value: float
    affine: bool
    k: int | None
    layers: tuple[int, ...]
    intervention: Intervention

    def record(self, method: str, refusal: float, kl: float) -> dict[str, Any]:
        return {"method": method, "family": self.family, "scope": self.scope, "value": self.value,
                "affine": self.affine, "k": self.k, "layers": list(self.layers), "refusal": refusal, "kl": kl}


def sweep_points(directions: DirectionSet, sel: MethodSelection, grid: SweepGrid, pool: int, n_layers: int,
                 norm: float) -> list[SweepPoint]:
    """Every configuration of ``grid`` for one method (module docstring); ``pool``: the top-fraction
    pool (``selection.pool_size``); ``norm``: ||r_best|| of the ActAdd coefficients."""
    method, best = directions.method, sel.best
    k_best = best.k if method == "inlp" else None
    points: list[SweepPoint] = []
    for text in grid.scopes:
        scope = Scope.parse(text)
        layers = tuple(scope.layers(sel.ranked, pool, n_layers))

        def removal(k: int | None = k_best, affine: bool = True, **kw: Any) -> Intervention:
            return removal_for(directions, best.pos_index, best.layer, layers, k, affine=affine, **kw)

        for affine in ((True, False) if method == "leace" else (True,)):
            points += [SweepPoint("strength", scope.label, w, affine, k_best, layers,
                                  removal(affine=affine, weights=[w] * len(layers))) for w in grid.weights]
        points += [SweepPoint("reflection", scope.label, a, True, k_best, layers,
                              removal(alpha=a, mode=grid.reflection_mode)) for a in grid.alphas]
        if method == "inlp":
            points += [SweepPoint("k", scope.label, float(k), True, k, layers, removal(k=k)) for k in inlp_k_values(best.k)]
    if method != "leace":  # LEACE steers along r̂, as diff-in-means (the plan's rule)
        unit = directions.direction[best.pos_index, best.layer].float()
        points += [SweepPoint("actadd", "one", m, True, None, (best.layer,), ActAdd(-m * norm * unit, best.layer))
                   for m in grid.multipliers]
    return points


def run_sweep(scorer: ProxyScorer, directions: DirectionSet, sel: MethodSelection, grid: SweepGrid, pool: int,
              n_layers: int, norm: float) -> list[dict[str, Any]]:
    """The records of every configuration of ``grid`` for one method, scored by ``scorer`` (stacked)."""
    points = sweep_points(directions, sel, grid, pool, n_layers, norm)
    proxies = scorer.score([p.intervention for p in points])
    return [p.record(directions.method, x.refusal, x.kl) for p, x in zip(points, proxies)]

