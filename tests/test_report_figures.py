"""The report's figures: the select stage's heatmaps."""

from __future__ import annotations

from report_fixtures import METHODS, N_LAYERS, PNG_MAGIC, POSITIONS, make_selection

from refusal_directions.report import plot_selection


def test_plot_selection_writes_one_png_per_method_and_metric(tmp_path):
    selections = {m: make_selection(m, fallback=(m == "leace")) for m in METHODS}
    paths = plot_selection(selections, N_LAYERS, POSITIONS, tmp_path / "plots")
    assert sorted(p.name for p in paths) == sorted(f"{m}_{k}.png" for m in METHODS for k in ("bypass", "steering", "kl"))
    for path in paths:
        data = path.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 2000
    assert not [p for p in (tmp_path / "plots").iterdir() if p.name.startswith(".")]  # no temporary files left
