from __future__ import annotations

import numpy as np
import pytest

from refusal_directions.evaluation.stats import bootstrap_ci, includes, mcnemar_test, paired_bootstrap_test


def _pairs(n11: int, n10: int, n01: int, n00: int) -> tuple[list[bool], list[bool]]:
    a = [True] * n11 + [True] * n10 + [False] * n01 + [False] * n00
    b = [True] * n11 + [False] * n10 + [True] * n01 + [False] * n00
    return a, b


def test_mcnemar_exact_on_a_known_table():
    # discordant 10 vs 2: p = 2 * P(X <= 2 | n=12, 1/2) = 2 * (1 + 12 + 66) / 4096
    a, b = _pairs(30, 10, 2, 8)
    result = mcnemar_test(a, b)
    assert (result["n11"], result["n10"], result["n01"], result["n00"]) == (30, 10, 2, 8)
    assert result["p_value"] == pytest.approx(158 / 4096, rel=1e-12)
    assert result["difference"] == pytest.approx((32 - 40) / 50)


def test_mcnemar_chi_square_variant():
    a, b = _pairs(30, 10, 2, 8)
    corrected = mcnemar_test(a, b, exact=False)
    assert corrected["statistic"] == pytest.approx(49 / 12)
    assert corrected["p_value"] == pytest.approx(0.0433, abs=2e-4)  # chi2.sf(49/12, df=1)
    plain = mcnemar_test(a, b, exact=False, correction=False)
    assert plain["statistic"] == pytest.approx(64 / 12)


def test_mcnemar_no_discordant_pairs_and_symmetry():
    a, b = _pairs(5, 0, 0, 5)
    assert mcnemar_test(a, b)["p_value"] == 1.0
    a, b = _pairs(0, 3, 3, 0)
    assert mcnemar_test(a, b)["p_value"] == 1.0
    a, b = _pairs(0, 7, 1, 0)
    assert mcnemar_test(a, b)["p_value"] == pytest.approx(mcnemar_test(b, a)["p_value"])
    assert mcnemar_test(a, b)["p_value"] == pytest.approx(2 * 9 / 256)


def test_bootstrap_interval_contains_the_mean_and_is_reproducible():
    rng = np.random.default_rng(1)
    outcomes = rng.random(200) < 0.3
    ci = bootstrap_ci(outcomes, seed=7)
    assert ci["low"] <= ci["estimate"] <= ci["high"]
    assert ci["estimate"] == pytest.approx(outcomes.mean())
    assert 0.10 < ci["high"] - ci["low"] < 0.16  # about 2 * 1.96 * sqrt(.3 * .7 / 200) = 0.127
    assert bootstrap_ci(outcomes, seed=7) == ci
    assert bootstrap_ci(outcomes, seed=8) != ci
    assert includes(ci, ci["estimate"]) and not includes(ci, 0.9)


def test_weighted_bootstrap_is_token_weighted():
    doc_losses = np.array([2.0, 3.0, 4.0])
    tokens = np.array([10, 1, 1])
    ci = bootstrap_ci(doc_losses, weights=tokens, n_boot=500)
    assert ci["estimate"] == pytest.approx((20 + 3 + 4) / 12)


def test_paired_bootstrap_detects_a_shift_and_not_noise():
    rng = np.random.default_rng(0)
    base = rng.normal(2.0, 0.5, size=300)
    shifted = base + 0.1 + rng.normal(0, 0.05, size=300)
    result = paired_bootstrap_test(base, shifted, seed=3)
    assert result["difference"] == pytest.approx(np.mean(shifted - base))
    assert result["low"] < result["difference"] < result["high"]
    assert result["low"] > 0 and result["p_value"] <= 1 / 2000 + 1e-12
    same = paired_bootstrap_test(base, base)
    assert same["difference"] == 0 and same["p_value"] == 1.0
    noise = paired_bootstrap_test(base, base + rng.normal(0, 0.01, size=300), seed=3)
    assert noise["p_value"] > 0.01
    assert paired_bootstrap_test(base, shifted, seed=3) == result
