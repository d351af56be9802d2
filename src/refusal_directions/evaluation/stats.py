"""Uncertainty and paired tests for evaluation results (pure numpy, seeded).

* ``bootstrap_ci``: percentile-bootstrap interval for a rate (binary outcomes) or a mean, optionally
  token-weighted (a ratio of sums, e.g. cross-entropy over documents of different lengths).
* ``mcnemar_test``: exact McNemar test for paired binary outcomes (the same prompts or questions
  under two conditions): a two-sided binomial test on the discordant pairs; the chi-square
  variant (with continuity correction) is available with ``exact=False``.
* ``paired_bootstrap_test``: the difference of two paired means (losses, accuracies), its
  percentile interval, and a two-sided bootstrap p-value.
* ``wilson_interval``: Wilson score interval of a binomial rate (valid at 0 and n successes,
  where a bootstrap interval collapses to a point).
* ``holm``: Holm's step-down adjustment of a family of p-values (family-wise error control).

Every function takes a ``seed`` and gives the same answer for the same inputs and seed.
"""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import Sequence

import numpy as np

DEFAULT_N_BOOT = 2000


def _as_1d(values: Sequence[float] | np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64).reshape(-1)
    if array.size == 0:
        raise ValueError(f"{name} is empty")
    return array


def _resample_indices(rng: np.random.Generator, n: int, n_boot: int) -> np.ndarray:
    """``[n_boot, n]`` indices drawn with replacement."""
    return rng.integers(0, n, size=(n_boot, n))


def _weighted_means(values: np.ndarray, weights: np.ndarray | None, idx: np.ndarray, chunk: int = 256) -> np.ndarray:
    """Mean (or ``sum(v*w)/sum(w)``) of every bootstrap resample, in chunks to bound memory."""
    out = np.empty(idx.shape[0])
    for start in range(0, idx.shape[0], chunk):
        rows = idx[start : start + chunk]
        if weights is None:
            out[start : start + chunk] = values[rows].mean(axis=1)
        else:
            w = weights[rows]
            out[start : start + chunk] = (values[rows] * w).sum(axis=1) / np.maximum(w.sum(axis=1), 1e-300)
    return out


def bootstrap_ci(
    values: Sequence[float] | np.ndarray,
    *,
    weights: Sequence[float] | np.ndarray | None = None,
    n_boot: int = DEFAULT_N_BOOT,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict:
    """Percentile-bootstrap interval of a mean (a rate when ``values`` are 0/1).

    Args:
        values: ``[n]`` per-item values (booleans for rates).
        weights: optional ``[n]`` non-negative weights; the statistic is then ``sum(v*w)/sum(w)``
            (e.g. per-document mean losses weighted by token counts = the token-weighted mean).
        n_boot: resamples (items drawn with replacement, the same ``n``).
        confidence: central coverage of the interval.
        seed: numpy ``default_rng`` seed.

    Returns:
        ``{"estimate", "low", "high", "confidence", "n", "n_boot", "seed"}``; the estimate is the
        statistic on the original sample (always inside [low, high] up to resampling noise).
    """
    v = _as_1d(values, "values")
    w = None if weights is None else _as_1d(weights, "weights")
    if w is not None and w.shape != v.shape:
        raise ValueError(f"weights {w.shape} and values {v.shape} differ in shape")
    estimate = float(v.mean() if w is None else (v * w).sum() / w.sum())
    rng = np.random.default_rng(seed)
    stats = _weighted_means(v, w, _resample_indices(rng, v.size, n_boot))
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(stats, [alpha, 1.0 - alpha])
    return {
        "estimate": estimate,
        "low": float(low),
        "high": float(high),
        "confidence": confidence,
        "n": int(v.size),
        "n_boot": n_boot,
        "seed": seed,
    }


def _binomial_two_sided_p(k: int, n: int) -> float:
    """Exact two-sided binomial test of ``k`` successes in ``n`` trials with p = 1/2.

    With p = 1/2 the distribution is symmetric, so the two-sided p-value is
    ``min(1, 2 * P(X <= min(k, n - k)))``.
    """
    if n == 0:
        return 1.0
    k = min(k, n - k)
    # log-space sum of C(n, i) / 2^n for i <= k, stable for large n
    log_terms = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - n * math.log(2) for i in range(k + 1)]
    top = max(log_terms)
    tail = math.exp(top) * sum(math.exp(t - top) for t in log_terms)
    return min(1.0, 2.0 * tail)


def _chi2_sf_1df(x: float) -> float:
    """Survival function of a chi-square with one degree of freedom: ``erfc(sqrt(x/2))``."""
    return math.erfc(math.sqrt(max(x, 0.0) / 2.0))


def mcnemar_test(
    a: Sequence[bool] | np.ndarray,
    b: Sequence[bool] | np.ndarray,
    *,
    exact: bool = True,
    correction: bool = True,
) -> dict:
    """McNemar's test for paired binary outcomes ``a[i]``, ``b[i]`` of the same item.

    The 2x2 table counts (a, b) = (1, 1), (1, 0), (0, 1), (0, 0). Only the discordant cells
    ``n10`` (a true, b false) and ``n01`` (a false, b true) carry information.

    ``exact=True``: two-sided binomial test of ``n10`` successes in ``n10 + n01`` trials, p = 1/2.
    ``exact=False``: chi-square statistic ``(|n10 - n01| - 1)^2 / (n10 + n01)`` (without the
    ``- 1`` when ``correction=False``), one degree of freedom.

    Returns ``{"n", "n11", "n10", "n01", "n00", "rate_a", "rate_b", "difference" (rate_b - rate_a),
    "statistic", "p_value", "method"}``. With no discordant pairs the p-value is 1.
    """
    x = np.asarray(a, dtype=bool).reshape(-1)
    y = np.asarray(b, dtype=bool).reshape(-1)
    if x.shape != y.shape:
        raise ValueError(f"paired outcomes differ in length: {x.size} vs {y.size}")
    if x.size == 0:
        raise ValueError("no outcomes")
    n11 = int(np.sum(x & y))
    n10 = int(np.sum(x & ~y))
    n01 = int(np.sum(~x & y))
    n00 = int(np.sum(~x & ~y))
    discordant = n10 + n01
    if exact:
        statistic = float(min(n10, n01))
        p_value = _binomial_two_sided_p(n10, discordant)
        method = "exact binomial"
    else:
        if discordant == 0:
            statistic, p_value = 0.0, 1.0
        else:
            diff = abs(n10 - n01) - (1.0 if correction else 0.0)
            statistic = max(diff, 0.0) ** 2 / discordant
            p_value = _chi2_sf_1df(statistic)
        method = "chi-square" + (" (continuity corrected)" if correction else "")
    return {
        "n": int(x.size),
        "n11": n11,
        "n10": n10,
        "n01": n01,
        "n00": n00,
        "rate_a": float(x.mean()),
        "rate_b": float(y.mean()),
        "difference": float(y.mean() - x.mean()),
        "statistic": statistic,
        "p_value": float(p_value),
        "method": method,
    }


def paired_bootstrap_test(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    *,
    weights: Sequence[float] | np.ndarray | None = None,
    n_boot: int = DEFAULT_N_BOOT,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict:
    """Paired bootstrap for the difference of means ``mean(b) - mean(a)`` over the same items.

    Items (rows) are resampled with replacement, keeping each item's pair together. With
    ``weights`` (e.g. token counts per document, identical for both conditions) each mean is
    ``sum(x*w)/sum(w)``, i.e. a token-weighted loss.

    The p-value is two-sided: twice the smaller fraction of resampled differences on either side
    of zero (at least ``1/n_boot`` when nothing crosses), capped at 1. It tests "no difference".

    Returns ``{"mean_a", "mean_b", "difference", "low", "high", "p_value", "confidence", "n",
    "n_boot", "seed"}``.
    """
    x = _as_1d(a, "a")
    y = _as_1d(b, "b")
    if x.shape != y.shape:
        raise ValueError(f"paired values differ in length: {x.size} vs {y.size}")
    w = None if weights is None else _as_1d(weights, "weights")
    if w is not None and w.shape != x.shape:
        raise ValueError("weights must have one entry per pair")
    d = y - x
    if w is None:
        mean_a, mean_b = float(x.mean()), float(y.mean())
    else:
        mean_a, mean_b = float((x * w).sum() / w.sum()), float((y * w).sum() / w.sum())
    rng = np.random.default_rng(seed)
    stats = _weighted_means(d, w, _resample_indices(rng, d.size, n_boot))
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(stats, [alpha, 1.0 - alpha])
    if np.all(d == 0):
        p_value = 1.0
    else:
        below = float(np.mean(stats <= 0.0))
        above = float(np.mean(stats >= 0.0))
        p_value = min(1.0, max(2.0 * min(below, above), 1.0 / n_boot))
    return {
        "mean_a": mean_a,
        "mean_b": mean_b,
        "difference": mean_b - mean_a,
        "low": float(low),
        "high": float(high),
        "p_value": p_value,
        "confidence": confidence,
        "n": int(x.size),
        "n_boot": n_boot,
        "seed": seed,
    }


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion ``successes / n``.

    With ``z`` the two-sided normal quantile of ``confidence`` and ``p = successes / n``, the bounds
    are ``(p + z²/2n ± z·sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n)``. Unlike a bootstrap or Wald interval
    it stays informative at the edges: 0/n gives ``[0, z²/(n + z²)]`` (0/32: [0, 0.1072]), n/n gives
    ``[n/(n + z²), 1]``. The bounds at 0 and n successes are exactly 0 and 1.

    Raises ``ValueError`` for ``n < 1`` or ``successes`` outside ``[0, n]``.
    """
    if n < 1:
        raise ValueError("no outcomes")
    if not 0 <= successes <= n:
        raise ValueError(f"successes {successes} outside [0, {n}]")
    z = NormalDist().inv_cdf(0.5 + confidence / 2.0)
    p = successes / n
    z2n = z * z / n
    centre = (p + z2n / 2.0) / (1.0 + z2n)
    half = z * math.sqrt(p * (1.0 - p) / n + z2n / (4.0 * n)) / (1.0 + z2n)
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return low, high


def holm(p_values: Sequence[float | None]) -> list[float | None]:
    """Holm's step-down adjustment: adjusted p-values controlling the family-wise error rate.

    The ``m`` finite p-values sorted ascending, ``p_(1) <= ... <= p_(m)``, are adjusted to
    ``max_{j <= i} min(1, (m - j + 1) p_(j))``; rejecting where the adjusted value is below alpha is
    Holm's procedure at level alpha. Entries that are None or NaN (no test) are not part of the family
    and come back unchanged; the output is in the input's order.
    """
    finite = [(p, i) for i, p in enumerate(p_values) if p is not None and math.isfinite(p)]
    m = len(finite)
    out: list[float | None] = list(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(sorted(finite)):
        running = max(running, min(1.0, (m - rank) * p))
        out[i] = running
    return out
