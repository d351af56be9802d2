"""Where an intervention moves activations, relative to the clean harmful and harmless clusters.

Pure tensor functions (no model, no run folder). Activations are ``[n, d]`` rows at one layer and
token position. The clean class means are ``mu_h`` (harmful) and ``mu_b`` (harmless, "benign").

* ``projection_basis``: a 2-D orthonormal basis for scatter plots: the unit diff-in-means direction
  (harmful minus harmless), then the top principal component of the pooled clean activations once
  that direction is removed.
* ``axis_position``: the position along the mean-difference axis,
  ``t = (x - mu_h)·(mu_b - mu_h) / ‖mu_b - mu_h‖²``: 0 at the harmful mean, 1 at the harmless mean,
  0.5 halfway. For intervened harmful activations, t near 0.5 is "between the clusters" and t near
  (or past) 1 is "in the opposite cluster" (Rocchetti & Ferrara 2026's two findings).
* ``fit_probe``: an L2-regularised logistic probe on clean activations (label 1 = harmless), fitted
  with INLP's Newton solver (``directions.inlp.fit_logistic_batched``) on centred features scaled to
  unit mean squared norm, so its regularisation does not depend on the layer's activation scale.
* ``geometry_numbers``: per intervened set, the fraction the probe calls harmless, the distances to
  both class means (Euclidean, and divided by ‖mu_b - mu_h‖) and the axis position.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .directions.inlp import fit_logistic_batched

# Verdict thresholds on the mean axis position t of intervened activations that started in one cluster,
# measured from that cluster (0) towards the other (1).
BETWEEN_FROM = 0.25  # t < 0.25: still in (or near) its own cluster
OPPOSITE_FROM = 0.75  # t >= 0.75: in (or past) the opposite cluster; 0.25 <= t < 0.75: between


def _check_pair(harmful: Tensor, harmless: Tensor) -> None:
    if harmful.dim() != 2 or harmless.dim() != 2 or harmful.shape[1] != harmless.shape[1]:
        raise ValueError(f"Expected [n, d] activations of equal d, got {tuple(harmful.shape)} and {tuple(harmless.shape)}.")
    if len(harmful) == 0 or len(harmless) == 0:
        raise ValueError("Both classes need at least one activation.")


def class_means(harmful: Tensor, harmless: Tensor) -> tuple[Tensor, Tensor]:
    """(mu_h, mu_b): the float64 means ``[d]`` of the clean harmful and harmless activations."""
    _check_pair(harmful, harmless)
    return harmful.double().mean(0), harmless.double().mean(0)


def projection_basis(harmful: Tensor, harmless: Tensor, direction: Tensor | None = None) -> Tensor:
    """Orthonormal ``[2, d]`` float64 basis: row 0 the unit ``direction`` (default: diff-in-means,
    mu_h - mu_b, so harmful lies to the right), row 1 the top principal component of the pooled
    activations ``[n_h + n_b, d]`` after removing row 0 (sign: its largest coordinate is positive).
    ``ValueError`` when the direction is zero or nothing varies off it."""
    mu_h, mu_b = class_means(harmful, harmless)
    first = (mu_h - mu_b) if direction is None else direction.double().flatten()
    if first.shape != mu_h.shape or float(first.norm()) == 0.0:
        raise ValueError("The basis direction must be a non-zero [d] vector.")
    first = first / first.norm()
    pooled = torch.cat([harmful, harmless]).double()
    centred = pooled - pooled.mean(0)
    rest = centred - (centred @ first)[:, None] * first
    _, s, vh = torch.linalg.svd(rest, full_matrices=False)
    if float(s[0]) <= 1e-12 * max(float(centred.norm()), 1.0):
        raise ValueError("The activations do not vary off the direction: no second axis.")
    second = vh[0] - (vh[0] @ first) * first
    second = second / second.norm()
    if second[second.abs().argmax()] < 0:
        second = -second
    return torch.stack([first, second])


def project(x: Tensor, basis: Tensor) -> Tensor:
    """Coordinates ``[n, 2]`` (float64) of activations ``x [n, d]`` in ``basis [2, d]``."""
    return x.double() @ basis.double().T


def axis_position(x: Tensor, mu_h: Tensor, mu_b: Tensor) -> Tensor:
    """``[n]`` positions along the mean-difference axis: 0 at mu_h, 1 at mu_b (float64)."""
    axis = (mu_b - mu_h).double()
    length2 = float(axis @ axis)
    if length2 == 0.0:
        raise ValueError("The class means coincide: there is no mean-difference axis.")
    return (x.double() - mu_h.double()) @ axis / length2


@dataclass(frozen=True)
class Probe:
    """A linear probe: P(harmless | x) = sigmoid(((x - centre) / scale)·weight + bias)."""

    weight: Tensor  # [d] float64
    bias: float
    centre: Tensor  # [d] float64
    scale: float

    def harmless_probability(self, x: Tensor) -> Tensor:
        """``[n]`` probabilities that ``x [n, d]`` is harmless."""
        return torch.sigmoid(((x.double() - self.centre) / self.scale) @ self.weight + self.bias)

    def calls_harmless(self, x: Tensor) -> Tensor:
        """``[n]`` bool: the probe's call (probability above 0.5)."""
        return self.harmless_probability(x) > 0.5


def fit_probe(harmful: Tensor, harmless: Tensor, l2: float = 1e-2) -> Probe:
    """Logistic probe (label 1 = harmless) on clean activations ``[n_h, d]`` and ``[n_b, d]``:
    minimises mean BCE + ``l2``·‖w‖² on features centred at the pooled mean and divided by their
    root mean squared norm."""
    _check_pair(harmful, harmless)
    if l2 <= 0:
        raise ValueError(f"The probe's L2 coefficient must be positive, got {l2}.")
    pooled = torch.cat([harmful, harmless]).double()
    centre = pooled.mean(0)
    scale = float((pooled - centre).pow(2).sum(1).mean().sqrt()) or 1.0
    features = ((pooled - centre) / scale)[None]
    y = torch.cat([torch.zeros(len(harmful)), torch.ones(len(harmless))]).double()
    w, b, _ = fit_logistic_batched(features, y, l2)
    return Probe(w[0], float(b[0]), centre, scale)


def verdict(position: float) -> str:
    """Where a mean axis position (0: own cluster, 1: opposite cluster) lands: "own cluster",
    "between" or "opposite cluster" (thresholds ``BETWEEN_FROM``, ``OPPOSITE_FROM``)."""
    if position < BETWEEN_FROM:
        return "own cluster"
    return "between" if position < OPPOSITE_FROM else "opposite cluster"


def geometry_numbers(clean_harmful: Tensor, clean_harmless: Tensor, intervened: Tensor, probe: Probe,
                     source: str = "harmful") -> dict[str, float | int | str]:
    """Numbers of ``intervened [n, d]`` activations of prompts of class ``source`` ("harmful" or
    "harmless") against the clean clusters ``[n_h, d]``, ``[n_b, d]``.

    Keys: n; fraction_called_harmless (the probe); distance_to_harmful_mean, distance_to_harmless_mean
    (mean Euclidean) and their ``_normalised`` forms (divided by ‖mu_b - mu_h‖); axis_position (mean t:
    0 harmful mean, 1 harmless mean) and axis_position_median; moved_towards_opposite (t measured from
    the source's own mean towards the other: t for harmful, 1 - t for harmless); verdict of that.
    """
    if source not in ("harmful", "harmless"):
        raise ValueError(f"source must be 'harmful' or 'harmless', got {source!r}.")
    mu_h, mu_b = class_means(clean_harmful, clean_harmless)
    if intervened.dim() != 2 or intervened.shape[1] != mu_h.shape[0] or len(intervened) == 0:
        raise ValueError(f"Expected intervened activations [n, {mu_h.shape[0]}], got {tuple(intervened.shape)}.")
    x = intervened.double()
    between = float((mu_b - mu_h).norm())
    t = axis_position(x, mu_h, mu_b)
    d_h, d_b = float((x - mu_h).norm(dim=1).mean()), float((x - mu_b).norm(dim=1).mean())
    moved = float(t.mean()) if source == "harmful" else 1.0 - float(t.mean())
    return {
        "n": len(x),
        "fraction_called_harmless": float(probe.calls_harmless(x).double().mean()),
        "distance_to_harmful_mean": d_h,
        "distance_to_harmless_mean": d_b,
        "distance_to_harmful_mean_normalised": d_h / between,
        "distance_to_harmless_mean_normalised": d_b / between,
        "axis_position": float(t.mean()),
        "axis_position_median": float(t.median()),
        "moved_towards_opposite": moved,
        "verdict": verdict(moved),
    }
