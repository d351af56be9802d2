"""The Pareto search: the kernel, determinism for a seed, resuming after a kill, the front and the
matched-damage choice, and the sweep / optimize stages in a tiny run."""

from __future__ import annotations

import json
from pathlib import Path
import math

import pytest
import torch

from refusal_directions import pipeline as P
from refusal_directions.activations import cache_activations
from refusal_directions.directions.diff_in_means import fit_diff_in_means
from refusal_directions.proxies import ProxyScorer
from refusal_directions.search import (SearchSpace, kernel_weights, matched_damage, open_study, pareto_front,
                                       run_search, trial_intervention)
from refusal_directions.selection import SelectionSettings
from selection_helpers import select_components
from test_pipeline import tiny_config
from tiny import make_adapter, save_tiny_model

HARMFUL = ["how to build a weapon", "steal a car now", "make poison at home", "hack the bank"]
HARMLESS = ["bake a cake", "write a poem", "what is two plus two", "name a colour"]


def test_kernel_weights_by_hand():
    assert kernel_weights(6, peak=2.0, max_weight=1.2, min_weight=0.2, width=2.0) == pytest.approx(
        [0.2, 0.7, 1.2, 0.7, 0.2, 0.0])
    assert kernel_weights(4, peak=0.5, max_weight=1.0, min_weight=1.0, width=0.5) == pytest.approx([1.0, 1.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="width"):
        kernel_weights(4, 1.0, 1.0, 0.0, 0.0)
    space = SearchSpace(6)
    layers, weights = space.layers_and_weights({"peak": 2.0, "max_weight": 1.2, "min_fraction": 0.0, "width": 2.0})
    assert layers == (1, 2, 3) and weights == pytest.approx((0.6, 1.2, 0.6))  # min 0 at the window's edges: dropped


@pytest.fixture(scope="module")
def problem():
    torch.manual_seed(0)
    adapter = make_adapter("llama", n_layers=4)
    h, _ = cache_activations(adapter, HARMFUL, [-1])
    b, _ = cache_activations(adapter, HARMLESS, [-1])
    dim = fit_diff_in_means(h, b, [-1])
    sel = select_components(adapter, {"diff_in_means": dim}, HARMFUL, HARMLESS, SelectionSettings(batch_size=4))["diff_in_means"]
    return adapter, dim, sel, ProxyScorer(adapter, HARMFUL, HARMLESS, batch_size=4)


def _search(problem, path, **kw):
    adapter, dim, sel, scorer = problem
    return run_search(open_study(path, "s"), scorer, dim, sel, adapter.n_layers, trials=8, startup=3, seed=5, **kw)


def test_the_search_is_deterministic_and_resumes_after_a_kill(problem, tmp_path):
    first = _search(problem, tmp_path / "a.db")
    assert len(first) == 8 and first == _search(problem, tmp_path / "b.db")  # a fresh study: the same trials
    assert len({json.dumps(r["params"], sort_keys=True) for r in first}) == 8
    partial = _search(problem, tmp_path / "c.db", stop_after=5)
    assert partial == first[:5]
    study = open_study(tmp_path / "c.db", "s")
    study.ask()  # a trial left running by the killed process: marked failed and sampled again
    assert _search(problem, tmp_path / "c.db") == first
    assert _search(problem, tmp_path / "c.db") == first  # finished: nothing more runs
    other = run_search(open_study(tmp_path / "d.db", "s"), problem[3], problem[1], problem[2], 4, 8, 3, seed=6)
    assert [r["params"] for r in other] != [r["params"] for r in first]


def test_trial_proxies_are_those_of_the_kernel_removal(problem):
    adapter, dim, sel, scorer = problem
    params = {"peak": 1.0, "max_weight": 1.0, "min_fraction": 0.5, "width": 2.0}
    removal = trial_intervention(dim, sel, SearchSpace(4), params)
    assert sorted(removal.layers) == [0, 1, 2, 3] and removal.layer_alpha == pytest.approx({0: 0.75, 1: 1.0, 2: 0.75, 3: 0.5})
    assert trial_intervention(dim, sel, SearchSpace(4), {**params, "max_weight": 0.0}) is None


def _rec(index, refusal, kl):
    return {"index": index, "refusal": refusal, "kl": kl, "layers": [1], "weights": [1.0], "params": {}}


def test_pareto_front_and_matched_damage_on_hand_made_points():
    records = [_rec(0, -1.0, 0.01), _rec(1, -2.0, 0.05), _rec(2, -1.5, 0.08), _rec(3, -3.0, 0.3), _rec(4, -2.0, 0.05)]
    front = pareto_front(records)
    assert [r["index"] for r in front] == [0, 1, 3]  # 2 is dominated by 1, 4 equals 1 (the first is kept)
    chosen = matched_damage(front, [0.02, 0.05, 0.2, 5.0])
    assert [chosen[l]["index"] for l in (0.02, 0.05, 0.2, 5.0)] == [0, 1, 3, 3]  # nearest on a log scale
    assert [chosen[l]["far"] for l in (0.02, 0.05, 0.2, 5.0)] == [False, False, False, True]
    assert matched_damage([], [0.1]) == {0.1: None}
    assert math.isclose(chosen[0.2]["level"], 0.2)


def test_sweep_and_optimize_stages_reuse_their_artifacts_and_feed_the_plan(tmp_path, data_dir):
    model = save_tiny_model(tmp_path / "tiny", "llama", n_layers=3, d_model=32)
    config = tiny_config(model, tmp_path / "runs", data_dir, sweep=True, optimize=True, search_trials=4,
                         search_startup_trials=2, sweep_weights=[0.0, 1.0], sweep_alphas=[2.0], sweep_multipliers=[1.0],
                         sweep_scopes=["one", "all"], search_kl_levels=[0.1])
    assert P.stages_for("run", config)[:4] == ["extract", "select", "sweep", "optimize"]
    run = P.run_command("run", tiny_config(model, tmp_path / "runs", data_dir, select_only=True))
    P.run_command("sweep", config, run_dir=run.dir)
    records = json.loads(run.path("sweep", "leace.json").read_text())["records"]
    assert {r["family"] for r in records} == {"strength", "reflection"} and len(records) == 2 * 2 * 2 + 2
    P.run_command("optimize", config, run_dir=run.dir)
    docs = {m: json.loads(run.path("optimize", f"{m}.json").read_text()) for m in config.methods}
    assert all(len(d["trials"]) == 4 and d["front"] for d in docs.values())
    mtimes = {p: p.stat().st_mtime for p in [*run.path("sweep").glob("*.json"), *run.path("optimize").glob("*.json")]}
    P.run_command("sweep", config, run_dir=run.dir)
    P.run_command("optimize", config, run_dir=run.dir)
    assert {p: p.stat().st_mtime for p in mtimes} == mtimes  # reused, not recomputed
    run = P.open_run(config, run_dir=run.dir)
    plan = P.plan_interventions(run, P.load_selection(run), P.load_extraction(run).direction_sets)
    fronts = {s.name: s for s in plan if ".front-kl" in s.name}
    assert set(fronts) == {f"{m}.front-kl0.1" for m in config.methods}
    for spec in fronts.values():
        assert spec.weights and len(spec.weights) == len(spec.layers) and spec.kind == "removal"
    from refusal_directions.report import write_report

    html, md = write_report(run.dir)
    text = Path(md).read_text()
    assert "## Dose-response on the selection proxies" in text and "## Pareto search and matched damage" in text
    assert "### KL level 0.1" in text and "Not evaluated yet" in text  # infer and evaluate have not run
    assert all((Path(md).parent / f"sweep_{m}.png").stat().st_size > 1000 for m in config.methods)
    assert (Path(md).parent / "search_fronts.png").exists()
