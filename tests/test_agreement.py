"""Judge agreement (evaluation.agreement): percent agreement and Cohen's kappa on hand-made verdicts."""

from __future__ import annotations

import pytest

from refusal_directions.evaluation.agreement import (
    agreement_matrices, agreement_pairs, cohen_kappa, disagreement, most_disputed, paired_verdicts,
)

T, F = True, False


def test_kappa_of_a_balanced_table_is_one_third():
    # (T,T) (T,F) (F,F) (F,F) (T,T) (F,T): p_o = 4/6, p_a = p_b = 1/2, p_e = 1/2 -> kappa = (2/3 - 1/2) / (1/2)
    result = cohen_kappa([T, T, F, F, T, F], [T, F, F, F, T, T])
    assert result == {"n": 6, "both_true": 2, "a_only": 1, "b_only": 1, "both_false": 2,
                      "agreement": pytest.approx(2 / 3), "kappa": pytest.approx(1 / 3), "kappa_undefined": None}


def test_kappa_of_an_unbalanced_table():
    # tt 2, a_only 1, b_only 1, ff 1: p_o = 0.6, p_a = p_b = 0.6, p_e = 0.36 + 0.16 = 0.52 -> 0.08 / 0.48 = 1/6
    result = cohen_kappa([T, T, T, F, F], [T, T, F, F, T])
    assert result["agreement"] == pytest.approx(0.6) and result["kappa"] == pytest.approx(1 / 6)


def test_perfect_agreement_and_perfect_disagreement():
    assert cohen_kappa([T, F, T], [T, F, T])["kappa"] == pytest.approx(1.0)
    opposite = cohen_kappa([T, F], [F, T])
    assert opposite["agreement"] == 0.0 and opposite["kappa"] == pytest.approx(-1.0)


def test_missing_verdicts_are_left_out_of_the_pair():
    assert paired_verdicts([T, None, T, F], [T, T, None, F]) == [(T, T), (F, F)]
    result = cohen_kappa([T, None, T, F], [T, T, None, F])
    assert result["n"] == 2 and result["agreement"] == 1.0 and result["kappa"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="length"):
        cohen_kappa([T], [T, F])


def test_kappa_is_undefined_only_when_both_judges_are_constant_and_equal():
    same = cohen_kappa([T, T, T], [T, T, T])
    assert same["agreement"] == 1.0 and same["kappa"] is None
    assert same["kappa_undefined"] == "both judges gave True on every completion (chance agreement is 1)"
    assert cohen_kappa([F, F], [F, F])["kappa_undefined"].startswith("both judges gave False")
    # one judge constant, the other not: p_o = p_e = 0.5 -> kappa 0, defined
    one_constant = cohen_kappa([T, T, T, T], [T, T, F, F])
    assert one_constant["kappa"] == 0.0 and one_constant["kappa_undefined"] is None and one_constant["agreement"] == 0.5
    # both constant, opposite: p_o = p_e = 0 -> kappa 0
    assert cohen_kappa([T, T], [F, F])["kappa"] == 0.0
    nothing = cohen_kappa([None, T], [F, None])
    assert nothing["n"] == 0 and nothing["agreement"] is None and nothing["kappa"] is None
    assert nothing["kappa_undefined"] == "no completion judged by both"


def test_pairs_and_matrices_over_three_judges():
    verdicts = {"a": [T, T, F, F, T, F], "b": [T, F, F, F, T, T], "c": [T, T, F, F, T, F]}
    pairs = agreement_pairs(verdicts)
    assert [(p["a"], p["b"]) for p in pairs] == [("a", "b"), ("a", "c"), ("b", "c")]
    assert [p["kappa"] for p in pairs] == pytest.approx([1 / 3, 1.0, 1 / 3])
    matrices = agreement_matrices(list(verdicts), pairs)
    assert matrices["kappa"][0][0] is None and matrices["kappa"][1][0] == matrices["kappa"][0][1] == pytest.approx(1 / 3)
    assert matrices["agreement"] == [[None, pytest.approx(2 / 3), 1.0], [pytest.approx(2 / 3), None, pytest.approx(2 / 3)],
                                     [1.0, pytest.approx(2 / 3), None]]


def test_most_disputed_completions_by_the_size_of_the_minority():
    assert disagreement([T, T, F]) == 1 and disagreement([T, F, None, F, T]) == 2 and disagreement([T, None, T]) == 0
    verdicts = {"a": [T, T, F, None], "b": [T, F, F, T], "c": [F, F, F, F], "d": [T, T, T, T]}
    # minorities: item 0 (T,T,F,T) 1, item 1 (T,F,F,T) 2, item 2 (F,F,F,T) 1, item 3 (T,F,T) 1
    assert most_disputed(verdicts, 10) == [1, 0, 2, 3]
    assert most_disputed(verdicts, 2) == [1, 0]
    assert most_disputed({"a": [T, F], "b": [T, F]}, 5) == []  # no dispute
