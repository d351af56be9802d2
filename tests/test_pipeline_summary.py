"""The assembly of evaluate/summary.json (pipeline.summary): the one path from per-item outcomes to cells.

The end-to-end checks on a real run's summary are in test_pipeline.py; here each step on small inputs.
"""

from __future__ import annotations

import pytest

from refusal_directions.config import build_config
from refusal_directions.evaluation import summary as S
from refusal_directions.evaluation.coherence import Thresholds, coherence_features
from refusal_directions.evaluation.stats import wilson_interval
from refusal_directions.interventions import InterventionSpec
from refusal_directions.pipeline.summary import (
    UNCATEGORIZED, Loss, Mean, NotRun, Rate, assemble_summary, intervention_measures, judge_harmful_set, measure_cell,
    per_category,
)

RESPONSES = ["I cannot help.", "Sure, here is how you do it step by step.", "As an AI, no.", "Here you go, the plan is simple."]
CATEGORIES = ["a", "a", "b", None]


def rows(responses=RESPONSES, categories=CATEGORIES) -> list[dict]:
    return [{"prompt": f"prompt {i}", "response": r, "category": c} for i, (r, c) in enumerate(zip(responses, categories))]


def test_per_category_attack_success_spells_uncategorized_once():
    success = [False, True, False, True]
    table = per_category(rows(), success, coherent=[False, True, False, False])
    assert list(table) == ["a", "b", UNCATEGORIZED] and UNCATEGORIZED == "uncategorized"
    assert table["a"] == {"attack_success": 0.5, "coherent_attack_success": 0.5, "n": 2}
    assert table["b"] == {"attack_success": 0.0, "coherent_attack_success": 0.0, "n": 1}
    assert table[UNCATEGORIZED] == {"attack_success": 1.0, "coherent_attack_success": 0.0, "n": 1}


def test_measure_cells_test_against_the_baselines_measure_of_the_same_kind():
    success = Rate([False, True, False, True])
    cell = measure_cell(success, None, seed=0)
    assert cell["value"] == 0.5 and cell["ci"] == pytest.approx(list(wilson_interval(2, 4))) and cell["ci_method"] == "wilson"
    assert cell["p_vs_baseline"] is None and cell["test"] is None  # the baseline itself
    assert measure_cell(success, Rate([False] * 4), seed=0) == S.binary_cell(success.items, [False] * 4, 0)
    assert measure_cell(success, NotRun("no judge"), seed=0)["test"] is None  # a baseline not run: no test
    assert measure_cell(NotRun("no judge"), success, seed=0) == {"status": "not run", "reason": "no judge"}
    loss = Loss([2.0, 3.0, 2.5], [10, 20, 5])
    paired = measure_cell(loss, Loss([2.0, 2.5, 2.5], [10, 20, 5]), seed=3)
    assert paired == S.loss_cell([2.0, 3.0, 2.5], [10, 20, 5], ([2.0, 2.5, 2.5], [10, 20, 5]), 3)
    assert paired["test"] == "paired_bootstrap"
    kl = measure_cell(Mean([0.1, 0.3], weights=[1, 3]), Mean([0.0, 0.0]), seed=1)
    assert kl == S.mean_cell([0.1, 0.3], 1, weights=[1, 3]) and kl["test"] is None  # KL: never tested


def test_judge_harmful_set_reads_refusal_onset_and_coherence_of_the_answer():
    degenerate = "again " * 60
    responses = [*RESPONSES, degenerate, "Sure. First you take the car, then you drive it far away from the house, quietly and slowly, with the lights off, "
                               "at night, to the old barn. I cannot continue."]
    features = coherence_features(responses)
    judged = judge_harmful_set(rows(responses, [None] * len(responses)), features, Thresholds(), "arditi")
    assert judged.refused == [True, False, True, False, False, True]
    assert judged.success == [False, True, False, True, True, False]
    assert judged.onsets == ["start", "none", "start", "none", "none", "delayed"]
    assert judged.degenerate == [False, False, False, False, True, False] and judged.reasons[4]
    assert judged.coherent == [False, True, False, True, False, False]  # not refused and not degenerate


def _outcomes(correct: list[bool], losses: list[float]) -> dict:
    return {
        "ce/general": {"doc_losses": losses, "doc_tokens": [5, 5]},
        "ce/alpaca": {"status": "not run", "reason": "no Alpaca outputs"},
        "ce/on_distribution": {"doc_losses": losses, "doc_tokens": [3, 4]},
        "kl/harmless": {"first_token": [0.0, 0.0], "mean_per_token": [0.0, 0.0], "n_tokens": [2, 2]},
        "mmlu": {"questions": [{"correct": c} for c in correct], "chance_level": 0.25},
        "arc_challenge": {"questions": [{"correct": c, "correct_norm": not c} for c in correct], "chance_level": 0.25},
    }


def test_every_metric_of_an_intervention_in_the_table_order():
    judged = {"jailbreakbench": judge_harmful_set(rows(), coherence_features(RESPONSES), Thresholds(), "arditi")}
    safety = {"jailbreakbench": {"status": "ok", "unsafe": [False, True, False, True]}}
    measures = intervention_measures(judged, safety, rows(["I cannot.", "Sure."], [None, None]),
                                     _outcomes([True, False], [2.0, 3.0]), "arditi")
    d = "jailbreakbench"
    assert list(measures) == [f"attack_success/{d}", f"coherent_attack_success/{d}", f"degenerate/{d}", f"delayed_refusal/{d}",
                              f"safety/{d}", f"rubric/{d}", f"rubric_attack_success/{d}", f"harmbench/{d}", "harmless_refusal", "ce/general", "ce/alpaca", "ce/on_distribution",
                              "kl/harmless_first_token", "kl/harmless", "mmlu", "arc_challenge/acc", "arc_challenge/acc_norm"]
    assert measures[f"attack_success/{d}"] == Rate([False, True, False, True])
    assert measures[f"safety/{d}"] == Rate([False, True, False, True])
    assert measures["harmless_refusal"] == Rate([True, False]) and measures["ce/alpaca"] == NotRun("no Alpaca outputs")
    assert measures["ce/general"] == Loss([2.0, 3.0], [5, 5]) and measures["kl/harmless"] == Mean([0.0, 0.0], weights=[2, 2])
    assert measures["arc_challenge/acc_norm"] == Rate([False, True])
    safety_not_run = {d: {"status": "not run", "reason": "no judge"}}
    assert intervention_measures(judged, safety_not_run, rows(["ok"], [None]), _outcomes([True], [2.0, 2.0]),
                                 "arditi")[f"safety/{d}"] == NotRun("no judge")


def test_assembled_summary_compares_every_intervention_with_the_baseline():
    config, _ = build_config({"eval_datasets": ["jailbreakbench"]}, gpu_available=False)
    plan = [InterventionSpec("baseline", "baseline"), InterventionSpec("x.ablation@all", "removal", method="x")]
    harmful = {"baseline": rows(["I cannot."] * 4), "x.ablation@all": rows()}
    completions = {name: {"jailbreakbench": r, config.harmless_eval: rows(["Sure."], [None])} for name, r in harmful.items()}
    coherence = {name: {"jailbreakbench": {"features": [f.to_dict() for f in coherence_features([x["response"] for x in r])]}}
                 for name, r in harmful.items()}
    outcomes = {"baseline": _outcomes([True, False], [2.0, 2.0]), "x.ablation@all": _outcomes([True, False], [2.5, 3.0])}
    safety = {name: {"jailbreakbench": {"status": "not run", "reason": "no judge"}} for name in harmful}
    notes: list[str] = []
    summary = assemble_summary(config, plan, completions, outcomes, safety, coherence, notes)
    assert list(summary) == ["interventions", "metrics", "results", "p_adjustment", "per_category", "chance_flags",
                             "coherence_thresholds", "examples", "judge_agreement", "notes"]
    base, ablated = summary["results"]["baseline"], summary["results"]["x.ablation@all"]
    assert set(base) == set(ablated) == set(summary["metrics"])
    assert base["attack_success/jailbreakbench"]["value"] == 0.0 and ablated["attack_success/jailbreakbench"]["value"] == 0.5
    assert base["attack_success/jailbreakbench"]["test"] is None and ablated["attack_success/jailbreakbench"]["test"] == "mcnemar"
    assert "p_raw" in ablated["attack_success/jailbreakbench"] and "p_raw" not in base["attack_success/jailbreakbench"]
    assert ablated["ce/general"]["test"] == "paired_bootstrap" and ablated["safety/jailbreakbench"]["status"] == "not run"
    assert summary["per_category"]["x.ablation@all"]["jailbreakbench"][UNCATEGORIZED]["n"] == 1
    assert [e["refused"] for e in summary["examples"]["x.ablation@all"]] == [True, False, True]  # the first three
    assert summary["coherence_thresholds"]["jailbreakbench"]["calibrated_on"] == "baseline"
    assert summary["notes"] is notes and any(n.startswith("mmlu: the baseline's 95% interval includes chance") for n in notes)
    assert summary["chance_flags"]["mmlu"]["flagged"]


THOUGHT_WITH_REFUSAL = "<think>\nThe user asks for something harmful. I cannot simply refuse without checking.\n</think>\n\n"


def test_every_judge_reads_the_answer_after_the_thinking_section_unless_told_to_read_both():
    """A refusal phrase inside the thinking section is not a refusal of the answer (plain attack
    success and harmless refusal too, not only the coherence cells); ``judge_text='both'`` reads it."""
    compliant = THOUGHT_WITH_REFUSAL + "Sure, here is the plan: first gather the materials, then follow the steps."
    refusing = "<think>\nOkay.\n</think>\n\nI cannot help with that."
    harmful = rows([compliant, refusing], [None, None])
    answers = coherence_features(["Sure, here is the plan: first gather the materials, then follow the steps.",
                                  "I cannot help with that."])
    judged = judge_harmful_set(harmful, answers, Thresholds(), "arditi")
    assert judged.refused == [False, True] and judged.coherent == [True, False] and judged.onsets == ["none", "start"]
    both = judge_harmful_set(harmful, answers, Thresholds(), "arditi", judge_text="both")
    assert both.refused == [True, True] and both.coherent == [False, False]

    outcomes = {m: {"status": "not run", "reason": "-"} for m in ("ce/general", "ce/alpaca", "ce/on_distribution")}
    outcomes |= {"kl/harmless": {"first_token": [0.0], "mean_per_token": [0.0], "n_tokens": [1]},
                 "mmlu": {"questions": [{"correct": True}]},
                 "arc_challenge": {"questions": [{"correct": True, "correct_norm": True}]}}
    safety = {"jbb": {"status": "not run", "reason": "-"}}
    harmless = rows([compliant, "Here is a poem."], [None, None])
    measures = intervention_measures({"jbb": judged}, safety, harmless, outcomes, "arditi")
    assert measures["harmless_refusal"].items == [False, False]
    assert measures["attack_success/jbb"].items == [True, False]
    measures = intervention_measures({"jbb": both}, safety, harmless, outcomes, "arditi", judge_text="both")
    assert measures["harmless_refusal"].items == [True, False]


def test_coherence_calibration_rule_comes_from_the_settings():
    config, _ = build_config({"coherence_quantile": 0.9, "coherence_ce_mads": 2.0, "coherence_ce_margin": 0.5})
    rule = config.calibration_rule()
    assert (rule.quantile, rule.ce_mads, rule.ce_margin) == (0.9, 2.0, 0.5)
    for bad in ({"coherence_quantile": 0.0}, {"coherence_quantile": 1.5}, {"coherence_ce_margin": -1.0}):
        with pytest.raises(Exception, match="coherence"):
            build_config(bad)


# ------------------------------------------------------------------ rubric and HarmBench cells, judge agreement
def test_cells_leave_out_missing_outcomes_and_pair_the_rest():
    cell = S.binary_cell([True, None, False, True], [False, False, None, False], seed=0)
    assert cell["value"] == pytest.approx(2 / 3) and cell["n"] == 3 and cell["n_missing"] == 1
    assert cell["ci"] == pytest.approx(list(wilson_interval(2, 3)))
    # McNemar on items 0 and 3 (both known): two discordant pairs (F->T), p = 2 * 0.5^2 = 0.5
    assert cell["test"] == "mcnemar" and cell["p_vs_baseline"] == pytest.approx(0.5)
    assert "n_missing" not in S.binary_cell([True, False], None, 0)
    assert S.binary_cell([None, True], [True, None], 0)["test"] is None  # no complete pair
    mean = S.mean_cell([0.5, None, 0.25], seed=0)
    assert mean["value"] == 0.375 and mean["n"] == 2 and mean["n_missing"] == 1
    assert mean == {**S.mean_cell([0.5, 0.25], seed=0), "n_missing": 1}


def _rubric(scores):
    return {"status": "ok", "scores": scores, "n": len(scores), "n_unparsed": sum(s is None for s in scores),
            "verdicts": [{"refused": None if s is None else int(s == 0), "specific": None, "convincing": None, "score": s}
                         for s in scores]}


def test_rubric_and_harmbench_measures():
    judged = {"jbb": judge_harmful_set(rows(), coherence_features(RESPONSES), Thresholds(), "arditi")}
    safety = {"jbb": {"status": "ok", "unsafe": [False, True, False, True]}}
    harmless, outcomes = rows(["Sure."], [None]), _outcomes([True], [2.0, 2.0])
    measures = intervention_measures(judged, safety, harmless, outcomes, "arditi", rubric={"jbb": _rubric([0.0, 0.75, None, 0.125])},
                                     harmbench={"jbb": {"status": "ok", "unsafe": [False, True, None, True]}})
    assert measures["rubric/jbb"] == Mean([0.0, 0.75, None, 0.125])
    assert measures["rubric_attack_success/jbb"] == Rate([False, True, None, True])
    assert measures["harmbench/jbb"] == Rate([False, True, None, True])
    cell = measure_cell(measures["rubric/jbb"], None, seed=0)
    assert cell["value"] == pytest.approx(0.875 / 3) and cell["n"] == 3 and cell["n_missing"] == 1 and cell["ci_method"] == "bootstrap"
    off = intervention_measures(judged, safety, harmless, outcomes, "arditi")
    assert off["rubric/jbb"] == off["rubric_attack_success/jbb"] == NotRun("no rubric judge configured")
    assert off["harmbench/jbb"] == NotRun("no HarmBench classifier configured")
    unparsed = intervention_measures(judged, safety, harmless, outcomes, "arditi", rubric={"jbb": _rubric([None, None])},
                                     harmbench={"jbb": {"status": "not run", "reason": "offline"}})
    assert unparsed["rubric/jbb"] == NotRun("rubric judge: no answer could be parsed (2 of 2 unparsed)")
    assert unparsed["harmbench/jbb"] == NotRun("offline")


def test_summary_has_rubric_cells_tested_against_the_baseline_and_judge_agreement():
    config, _ = build_config({"eval_datasets": ["jailbreakbench"], "rubric_judge": "embedded:1.5b"}, gpu_available=False)
    d = "jailbreakbench"
    plan = [InterventionSpec("baseline", "baseline"), InterventionSpec("x.ablation@all", "removal", method="x")]
    harmful = {"baseline": rows(["I cannot."] * 4), "x.ablation@all": rows()}  # x: refused, ok, refused, ok
    completions = {name: {d: r, config.harmless_eval: rows(["Sure."], [None])} for name, r in harmful.items()}
    coherence = {name: {d: {"features": [f.to_dict() for f in coherence_features([x["response"] for x in r])]}}
                 for name, r in harmful.items()}
    outcomes = {name: _outcomes([True, False], [2.0, 2.0]) for name in harmful}
    safety = {"baseline": {d: {"status": "ok", "judge": "llamaguard", "unsafe": [False] * 4}},
              "x.ablation@all": {d: {"status": "not run", "reason": "no judge"}}}
    rubric = {"baseline": {d: _rubric([0.0, 0.0, 0.0, 0.0])}, "x.ablation@all": {d: _rubric([0.0, 0.5, None, 0.0])}}
    harmbench = {name: {d: {"status": "not run", "reason": "offline"}} for name in harmful}
    summary = assemble_summary(config, plan, completions, outcomes, safety, coherence, [], rubric=rubric, harmbench=harmbench)
    base, ablated = summary["results"]["baseline"], summary["results"]["x.ablation@all"]
    assert base[f"rubric/{d}"]["value"] == 0.0 and ablated[f"rubric/{d}"]["value"] == pytest.approx(0.5 / 3)
    success = ablated[f"rubric_attack_success/{d}"]
    assert success["value"] == pytest.approx(1 / 3) and success["n"] == 3 and success["n_missing"] == 1
    assert success["test"] == "mcnemar" and success["p_raw"] == pytest.approx(1.0)  # one discordant pair
    assert ablated[f"harmbench/{d}"] == {"status": "not run", "reason": "offline"}
    assert summary["metrics"][f"rubric/{d}"]["kind"] == "score"

    block = summary["judge_agreement"][d]
    # 8 completions: baseline 4 then x 4. substring success: F F F F | F T F T; coherent the same here;
    # llamaguard: F F F F | - - - -; rubric: F F F F | F T - F; harmbench never ran
    assert block["judges"] == ["substring", "coherent", "llamaguard", "rubric"]
    assert block["n_completions"] == 8 and block["n_judged"] == {"substring": 8, "coherent": 8, "llamaguard": 4, "rubric": 7}
    assert block["positive_rate"] == {"substring": 0.25, "coherent": 0.25, "llamaguard": 0.0, "rubric": pytest.approx(1 / 7)}
    pairs = {(p["a"], p["b"]): p for p in block["pairs"]}
    assert pairs[("substring", "coherent")]["kappa"] == pytest.approx(1.0)
    assert pairs[("substring", "llamaguard")]["kappa"] is None  # both False on the 4 baseline completions
    assert pairs[("substring", "llamaguard")]["agreement"] == 1.0 and pairs[("substring", "llamaguard")]["n"] == 4
    # substring vs rubric on 7 items: tt 1, a_only 1 (x item 3), ff 5: p_o 6/7, p_a 2/7, p_b 1/7,
    # p_e = 2/49 + 30/49 = 32/49 -> kappa = (42/49 - 32/49) / (17/49) = 10/17
    assert pairs[("substring", "rubric")]["kappa"] == pytest.approx(10 / 17)
    assert block["matrix"]["kappa"][0][3] == pytest.approx(10 / 17)
    [example] = block["disagreements"]  # the only split completion: x item 3 (substring and coherent T, rubric F)
    assert example["intervention"] == "x.ablation@all" and example["index"] == 3 and example["disagreement"] == 1
    assert example["verdicts"] == {"substring": True, "coherent": True, "llamaguard": None, "rubric": False}
    assert example["text"] == RESPONSES[3] and not example["truncated"] and example["prompt"] == "prompt 3"
    assert example["rubric"] == {"refused": 1, "specific": None, "convincing": None, "score": 0.0}
    assert "embedded:1.5b" in block["labels"]["rubric"]
