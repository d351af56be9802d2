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


# ---------------------------------------------------------------------- the pipeline step, on a tiny model
TINY = {
    "device": "cpu", "preset": "quick", "n_train": 16, "n_val": 6, "n_test": 3, "positions": [-2, -1],
    "filter_train": False, "actadd_multipliers": [1.0], "reflection_alphas": [2.0], "methods": ["diff_in_means", "leace"],
    "safety_judge": "none", "batch_size": 4, "select_only": True,
}


@pytest.fixture(scope="module")
def geometry_run(tmp_path_factory, data_dir):
    from refusal_directions import pipeline as P
    from refusal_directions.config import build_config
    from tiny import save_tiny_model

    model = save_tiny_model(tmp_path_factory.mktemp("model") / "tiny", "llama", n_layers=3, d_model=32)
    out = tmp_path_factory.mktemp("runs")
    config, _ = build_config({**TINY, "model": str(model), "output_dir": str(out), "data_dir": str(data_dir)})
    run = P.run_command("run", config)
    assert not run.path("evaluate", "intervention_geometry.json").exists()  # select-only: no geometry yet
    events = []
    run = P.run_command("geometry", config, on_event=lambda step, r, result: events.append((step, result)))
    return run, events


def test_geometry_command_writes_numbers_points_and_plots(geometry_run):
    from refusal_directions.artifacts import read_json
    from refusal_directions.pipeline import load_selection

    run, events = geometry_run
    result = read_json(run.path("evaluate", "intervention_geometry.json"))
    assert [step for step, _ in events] == ["open", "geometry"] and events[1][1] == result
    assert result["key"] == run.stage_key("select")
    best = load_selection(run)["diff_in_means"].best
    assert result["settings"]["position"] == best.position
    assert result["settings"]["layers"] == sorted({best.layer, load_selection(run)["leace"].best.layer, 2})
    names = [e["name"] for e in result["interventions"]]
    assert names == [s["name"] for s in result["settings"]["plan"] if s["kind"] != "baseline"]
    assert any(".actadd-" in n for n in names) and any(".reflection-a2" in n for n in names)
    for entry in result["interventions"]:
        for layer in map(str, result["settings"]["layers"]):
            for cls in ("harmful", "harmless"):
                cell = entry["layers"][layer][cls]
                assert cell["n"] == 6 and len(cell["points"]) == 6 and 0.0 <= cell["fraction_called_harmless"] <= 1.0
    clean = result["clean"][str(result["settings"]["layers"][0])]
    assert clean["harmful"]["axis_position"] == pytest.approx(0.0, abs=1e-9)
    assert clean["harmless"]["axis_position"] == pytest.approx(1.0, abs=1e-9)
    pngs = sorted(p.name for p in run.path("evaluate", "intervention_geometry").glob("*.png"))
    assert pngs == sorted(f"layer{l}.png" for l in result["settings"]["layers"])


def test_actadd_translates_every_activation_at_its_layer(geometry_run):
    """ActAdd adds one vector at its layer's block input: every prompt's point moves by the same 2-D
    shift there, opposite for harmful (refusal removed) and harmless prompts (refusal induced)."""
    from refusal_directions.artifacts import read_json

    run, _ = geometry_run
    result = read_json(run.path("evaluate", "intervention_geometry.json"))
    entry = next(e for e in result["interventions"] if e["name"] == "diff_in_means.actadd-x1")
    layer = str(entry["selected_layer"])
    shifts = {}
    for cls in ("harmful", "harmless"):
        moved = torch.tensor(entry["layers"][layer][cls]["points"])
        shift = moved - torch.tensor(result["clean"][layer][cls]["points"])
        torch.testing.assert_close(shift, shift[:1].expand_as(shift), atol=2e-3, rtol=0)
        shifts[cls] = shift[0]
    assert float(shifts["harmful"].norm()) > 0.01
    torch.testing.assert_close(shifts["harmful"], -shifts["harmless"], atol=2e-3, rtol=0)


def test_geometry_is_reused_and_redone_when_its_settings_change(geometry_run):
    import dataclasses

    from refusal_directions import pipeline as P

    run, _ = geometry_run
    path = run.path("evaluate", "intervention_geometry.json")
    before = path.stat().st_mtime_ns
    P.run_command("geometry", run.config, adapter=run.adapter)
    assert path.stat().st_mtime_ns == before
    changed = dataclasses.replace(run.config, geometry_probe_l2=0.5)
    P.run_command("geometry", changed, adapter=run.adapter)
    from refusal_directions.artifacts import read_json

    assert path.stat().st_mtime_ns != before and read_json(path)["settings"]["probe_l2"] == 0.5


def test_report_shows_the_geometry_table_and_plots(geometry_run):
    from refusal_directions.report import write_report

    run, _ = geometry_run
    html, md = write_report(run.dir)
    from refusal_directions.artifacts import read_json

    result = read_json(run.path("evaluate", "intervention_geometry.json"))
    text = md.read_text()
    assert "## Geometry of interventions" in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and " | " in line]
    for entry in result["interventions"]:
        for layer, cell in entry["layers"].items():
            h = cell["harmful"]
            assert any(r.startswith(f"| {entry['name']} | {layer} | {h['axis_position']:.3f} | "
                                    f"{h['fraction_called_harmless']:.3f} |") and h["verdict"] in r for r in rows)
    assert any(r.startswith("| baseline | ") and "| 0.000 |" in r and "own cluster" in r for r in rows)
    for layer in result["settings"]["layers"]:
        assert (run.dir / "report" / f"intervention_geometry_layer{layer}.png").exists()
    page = html.read_text()
    assert all(f"layer {layer}: clean (pale) and intervened (dark)" in page for layer in result["settings"]["layers"])
