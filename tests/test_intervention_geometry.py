"""Intervention geometry on a planted two-cluster example, against hand-computed values.

Harmful activations sit at +m e1, harmless at -m e1, each with the same symmetric spread
±s along e2 and ±u along e3 (s > u), so mu_h = +m e1, mu_b = -m e1 exactly, the basis is (e1, e2)
and the probe's boundary is the hyperplane x1 = 0.
"""

from __future__ import annotations

import math

import pytest
import torch

from refusal_directions.directions.base import erase
from refusal_directions.intervention_geometry import (
    axis_position, class_means, fit_probe, geometry_numbers, project, projection_basis, verdict,
)

M, S, U, D = 2.0, 0.5, 0.1, 6
E1 = torch.eye(D, dtype=torch.float64)[0]


def _cluster(centre: float) -> torch.Tensor:
    """[8, D]: centre·e1 plus the four sign combinations of (±S e2, ±U e3), twice."""
    rows = []
    for a in (S, -S):
        for b in (U, -U):
            row = torch.zeros(D, dtype=torch.float64)
            row[0], row[1], row[2] = centre, a, b
            rows.append(row)
    return torch.stack(rows * 2)


HARMFUL, HARMLESS = _cluster(M), _cluster(-M)
SPREAD = math.sqrt(S**2 + U**2)  # every point's distance from its own cluster's mean


def _removal(x: torch.Tensor, alpha: float) -> torch.Tensor:
    """The package's eraser arithmetic removing (alpha 1) or reflecting (alpha 2) e1, linear."""
    return erase(x, E1[:, None], E1[:, None], None, alpha)


@pytest.fixture(scope="module")
def probe():
    return fit_probe(HARMFUL, HARMLESS)


def test_basis_is_the_mean_difference_then_the_top_spread():
    basis = projection_basis(HARMFUL, HARMLESS)
    assert basis.shape == (2, D)
    torch.testing.assert_close(basis @ basis.T, torch.eye(2, dtype=torch.float64))
    torch.testing.assert_close(basis[0], E1)  # harmful minus harmless: +e1
    torch.testing.assert_close(basis[1], torch.eye(D, dtype=torch.float64)[1])  # S > U: e2, sign positive
    coords = project(HARMFUL, basis)
    torch.testing.assert_close(coords[:, 0], torch.full((8,), M, dtype=torch.float64))
    torch.testing.assert_close(coords[:, 1].abs(), torch.full((8,), S, dtype=torch.float64))


def test_basis_with_a_given_direction_and_bad_input():
    tilted = E1 + torch.eye(D, dtype=torch.float64)[2]
    basis = projection_basis(HARMFUL, HARMLESS, tilted)
    torch.testing.assert_close(basis[0], tilted / math.sqrt(2))
    assert abs(float(basis[0] @ basis[1])) < 1e-12
    with pytest.raises(ValueError, match="non-zero"):
        projection_basis(HARMFUL, HARMLESS, torch.zeros(D))
    with pytest.raises(ValueError, match="equal d"):
        projection_basis(HARMFUL, HARMLESS[:, :3])
    with pytest.raises(ValueError, match="do not vary"):
        projection_basis(torch.ones(3, D), -torch.ones(3, D))


def test_axis_positions_of_the_means_and_the_midpoint():
    mu_h, mu_b = class_means(HARMFUL, HARMLESS)
    points = torch.stack([mu_h, mu_b, torch.zeros(D, dtype=torch.float64), -3 * mu_h])
    torch.testing.assert_close(axis_position(points, mu_h, mu_b), torch.tensor([0.0, 1.0, 0.5, 2.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="coincide"):
        axis_position(points, mu_h, mu_h)


def test_identity_stays_in_the_harmful_cluster(probe):
    n = geometry_numbers(HARMFUL, HARMLESS, HARMFUL, probe)
    assert n["n"] == 8 and n["fraction_called_harmless"] == 0.0
    assert n["axis_position"] == pytest.approx(0.0, abs=1e-12) and n["verdict"] == "own cluster"
    assert n["distance_to_harmful_mean"] == pytest.approx(SPREAD)
    assert n["distance_to_harmless_mean"] == pytest.approx(math.sqrt(4 * M**2 + SPREAD**2))
    assert n["distance_to_harmful_mean_normalised"] == pytest.approx(SPREAD / (2 * M))


def test_projection_lands_between_the_clusters(probe):
    n = geometry_numbers(HARMFUL, HARMLESS, _removal(HARMFUL, 1.0), probe)
    assert n["axis_position"] == pytest.approx(0.5) and n["axis_position_median"] == pytest.approx(0.5)
    assert n["verdict"] == "between"
    halfway = math.sqrt(M**2 + SPREAD**2)
    assert n["distance_to_harmful_mean"] == pytest.approx(halfway)
    assert n["distance_to_harmless_mean"] == pytest.approx(halfway)
    assert n["distance_to_harmless_mean_normalised"] == pytest.approx(halfway / (2 * M))


def test_reflection_lands_in_the_opposite_cluster(probe):
    n = geometry_numbers(HARMFUL, HARMLESS, _removal(HARMFUL, 2.0), probe)
    assert n["axis_position"] == pytest.approx(1.0) and n["verdict"] == "opposite cluster"
    assert n["fraction_called_harmless"] == 1.0
    assert n["distance_to_harmless_mean"] == pytest.approx(SPREAD)
    assert n["distance_to_harmful_mean"] == pytest.approx(math.sqrt(4 * M**2 + SPREAD**2))


@pytest.mark.parametrize("multiplier, position, called, word", [
    (2.0, 1.0, 1.0, "opposite cluster"),   # subtract 2m e1: onto the harmless mean
    (0.6, 0.3, 0.0, "between"),            # still on the harmful side of x1 = 0
    (6.0, 3.0, 1.0, "opposite cluster"),   # far past the harmless cluster
])
def test_actadd_moves_along_the_axis(probe, multiplier, position, called, word):
    moved = HARMFUL - multiplier * M * E1
    n = geometry_numbers(HARMFUL, HARMLESS, moved, probe)
    assert n["axis_position"] == pytest.approx(position)
    assert n["fraction_called_harmless"] == called and n["verdict"] == word


def test_actadd_on_harmless_prompts_counts_from_the_harmless_side(probe):
    n = geometry_numbers(HARMFUL, HARMLESS, HARMLESS + 2 * M * E1, probe, source="harmless")
    assert n["axis_position"] == pytest.approx(0.0, abs=1e-12)
    assert n["moved_towards_opposite"] == pytest.approx(1.0) and n["verdict"] == "opposite cluster"
    assert n["fraction_called_harmless"] == 0.0
    clean = geometry_numbers(HARMFUL, HARMLESS, HARMLESS, probe, source="harmless")
    assert clean["fraction_called_harmless"] == 1.0 and clean["verdict"] == "own cluster"


def test_projection_with_unequal_clusters_stays_on_the_harmful_side():
    """Harmless around -3m: removing e1 puts harmful at x1 = 0, a quarter of the way, on the
    harmful side of the probe's boundary (the midpoint x1 = -m)."""
    harmless = _cluster(-3 * M)
    probe = fit_probe(HARMFUL, harmless)
    n = geometry_numbers(HARMFUL, harmless, _removal(HARMFUL, 1.0), probe)
    assert n["axis_position"] == pytest.approx(0.25)
    assert n["fraction_called_harmless"] == 0.0
    assert bool(probe.calls_harmless(torch.stack([-1.01 * M * E1, -0.99 * M * E1])).tolist() == [True, False])


def test_probe_and_numbers_refuse_bad_input(probe):
    with pytest.raises(ValueError, match="positive"):
        fit_probe(HARMFUL, HARMLESS, l2=0.0)
    with pytest.raises(ValueError, match="source"):
        geometry_numbers(HARMFUL, HARMLESS, HARMFUL, probe, source="both")
    with pytest.raises(ValueError, match="intervened"):
        geometry_numbers(HARMFUL, HARMLESS, HARMFUL[:, :3], probe)


def test_verdict_thresholds():
    assert [verdict(t) for t in (-0.2, 0.24, 0.25, 0.74, 0.75, 1.8)] == \
        ["own cluster", "own cluster", "between", "between", "opposite cluster", "opposite cluster"]
