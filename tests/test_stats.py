from __future__ import annotations

import json

import numpy as np
import pytest

from refusal_directions.evaluation.stats import (bootstrap_ci, holm, mcnemar_test, paired_bootstrap_test,
                                                 wilson_interval)
from refusal_directions.evaluation.summary import adjust_p_values, binary_cell, loss_cell

Z = 1.959963984540054  # the 0.975 quantile of the standard normal
Z2 = Z * Z


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
    assert ci["low"] <= ci["estimate"] <= ci["high"] and not ci["low"] <= 0.9 <= ci["high"]


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


def test_wilson_interval_exact_values():
    # k = 0 and k = n: the bounds are z^2 / (n + z^2) and n / (n + z^2), the other end exactly 0 or 1
    assert wilson_interval(0, 32) == (0.0, pytest.approx(Z2 / (32 + Z2), abs=1e-15))
    assert wilson_interval(0, 32)[1] == pytest.approx(0.1071791983, abs=1e-10)
    assert wilson_interval(32, 32) == (pytest.approx(32 / (32 + Z2), abs=1e-15), 1.0)
    assert wilson_interval(32, 32)[0] == pytest.approx(0.8928208017, abs=1e-10)
    # k = n/2: centre exactly 1/2, half-width z * sqrt(1/128 + z^2/4096) / (1 + z^2/32)
    half = Z * np.sqrt(1 / 128 + Z2 / 4096) / (1 + Z2 / 32)
    assert wilson_interval(16, 32) == pytest.approx((0.5 - half, 0.5 + half), abs=1e-15)
    assert wilson_interval(16, 32) == pytest.approx((0.3363088287, 0.6636911713), abs=1e-10)
    # 1/10, the textbook example (Newcombe 1998): 0.0179 to 0.4042
    assert wilson_interval(1, 10) == pytest.approx((0.0179, 0.4042), abs=5e-5)
    assert wilson_interval(0, 32, confidence=0.99)[1] > wilson_interval(0, 32)[1]
    with pytest.raises(ValueError):
        wilson_interval(0, 0)
    with pytest.raises(ValueError):
        wilson_interval(5, 4)


def test_binary_cell_interval_is_not_degenerate_at_zero_and_one():
    none = binary_cell([False] * 32, None, seed=0)
    assert none["value"] == 0.0 and none["ci"] == [0.0, pytest.approx(0.1071791983, abs=1e-10)]
    assert none["ci_method"] == "wilson" and none["n"] == 32 and none["p_vs_baseline"] is None
    every = binary_cell([True] * 32, [False] * 32, seed=0)
    assert every["ci"] == [pytest.approx(0.8928208017, abs=1e-10), 1.0]
    assert every["p_vs_baseline"] == pytest.approx(2 / 2**32) and every["test"] == "mcnemar"
    assert binary_cell([True] * 16 + [False] * 16, None, seed=0)["ci"] == pytest.approx([0.3363088287, 0.6636911713], abs=1e-10)
    assert loss_cell([2.0, 3.0], [1, 3], None, seed=0)["ci_method"] == "bootstrap"


def test_holm_exact_values():
    # sorted 0.005, 0.01, 0.03, 0.04 (m = 4) -> 4*0.005, 3*0.01, max(2*0.03, ...), max(1*0.04, 0.06)
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02], abs=1e-15)
    # capped at 1; ties get the same adjusted value
    assert holm([0.5, 0.6]) == [1.0, 1.0]
    assert holm([0.01, 0.01, 0.02]) == pytest.approx([0.03, 0.03, 0.03], abs=1e-15)
    # None and NaN are not tests: left alone and not counted in m (m = 2 here)
    out = holm([0.02, None, float("nan"), 0.01])
    assert out[0] == pytest.approx(0.02, abs=1e-15) and out[1] is None and np.isnan(out[2]) and out[3] == pytest.approx(0.02, abs=1e-15)
    assert holm([]) == [] and holm([0.3]) == [0.3]


def test_adjust_p_values_over_a_whole_table():
    def ok(p):
        return {"status": "ok", "value": 0.5, "ci": [0.4, 0.6], "n": 32, "p_vs_baseline": p, "test": "mcnemar" if p is not None else None}

    results = {
        "baseline": {"a": ok(None), "b": ok(None)},
        "x": {"a": ok(0.01), "b": ok(0.04), "c": {"status": "not run", "reason": "no judge"}},
        "y": {"a": ok(0.03), "b": ok(0.005), "c": ok(float("nan"))},
    }
    info = adjust_p_values(results)
    assert info == {"method": "holm", "m": 4, "family": "every non-baseline intervention x metric with a paired test"}
    adjusted = {(n, m): c["p_vs_baseline"] for n, row in results.items() for m, c in row.items() if "p_raw" in c}
    assert adjusted == pytest.approx({("x", "a"): 0.03, ("x", "b"): 0.06, ("y", "a"): 0.06, ("y", "b"): 0.02}, abs=1e-15)
    assert [results["x"]["a"]["p_raw"], results["x"]["b"]["p_raw"], results["y"]["a"]["p_raw"], results["y"]["b"]["p_raw"]] == \
        [0.01, 0.04, 0.03, 0.005]
    assert "p_raw" not in results["baseline"]["a"] and results["baseline"]["a"]["p_vs_baseline"] is None
    assert results["x"]["c"] == {"status": "not run", "reason": "no judge"}
    assert "p_raw" not in results["y"]["c"] and np.isnan(results["y"]["c"]["p_vs_baseline"])
    before = json.dumps(results)
    assert adjust_p_values(results)["m"] == 4 and json.dumps(results) == before  # a second call changes nothing
