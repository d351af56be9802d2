"""Run folders for the report tests: selections, plans and summaries in the documented schemas."""

from __future__ import annotations

import json
import math
import re
from html.parser import HTMLParser
from pathlib import Path

from refusal_directions.interventions import InterventionSpec
from refusal_directions.selection import Candidate, MethodSelection

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
POSITIONS = [-2, -1]
N_LAYERS = 6
METHODS = ["diff_in_means", "inlp", "leace"]
SCRIPT_RESPONSE = "Sure, here is how: <script>alert('x')</script> & more"
NOT_RUN_REASON = "no safety judge available (meta-llama/Meta-Llama-Guard-2-8B cannot be downloaded)"
NAN = float("nan")


def make_selection(method: str, fallback: bool = False) -> MethodSelection:
    """A selection over POSITIONS x N_LAYERS with some filtered-out candidates and a NaN."""
    cands = []
    for p, pos in enumerate(POSITIONS):
        for l in range(N_LAYERS):
            kl = 0.02 * (l + 1) + 0.01 * p
            steering = 1.5 - 0.4 * l + p
            cand = Candidate(p, pos, l, bypass=-1.0 - 0.3 * l + 0.5 * p, kl=kl, steering=steering,
                             steering_by_multiplier={"1.0": steering},
                             accuracy=0.99 - 0.02 * l if method == "inlp" else None,
                             k=1 + l if method == "inlp" else 1)
            cands.append(cand)
    cands[3].bypass = NAN  # a NaN score survives into the JSON and the plots
    for c in cands:
        reasons = []
        if math.isnan(c.bypass):
            reasons.append("nan")
        if c.kl > 0.1:
            reasons.append("kl>0.1")
        if c.steering < 0:
            reasons.append("steering<0")
        if c.layer >= N_LAYERS - 1:
            reasons.append(f"layer>={N_LAYERS - 1}")
        c.filtered_out = reasons
    ranked = sorted(cands, key=lambda c: math.inf if math.isnan(c.bypass) else c.bypass)
    passing = [c for c in ranked if not c.filtered_out]
    best = ranked[0] if fallback else passing[0]
    warning = (f"{method}: no candidate passed the filters (kl>0.1); using the best unfiltered candidate "
               f"(position {best.position}, layer {best.layer}).") if fallback else None
    return MethodSelection(method, ranked, best, warning)


def make_specs(selections: dict[str, MethodSelection]) -> list[InterventionSpec]:
    specs = [InterventionSpec("baseline", "baseline")]
    names = {"diff_in_means": "ablation", "inlp": "projection", "leace": "erasure"}
    for method, sel in selections.items():
        b = sel.best
        common = dict(method=method, pos_index=b.pos_index, position=b.position, layer=b.layer,
                      layers=tuple(range(N_LAYERS)), k=b.k if method == "inlp" else None)
        specs.append(InterventionSpec(f"{method}.{names[method]}", "removal", **common))
        if method != "leace":
            specs.append(InterventionSpec(f"{method}.actadd-x1", "actadd", coefficient=12.5, **common))
    specs.append(InterventionSpec("diff_in_means.reflection-a2-reference", "reflection", method="diff_in_means",
                                  layers=tuple(range(N_LAYERS)), alpha=2.0))
    return specs


METRICS = {
    "attack_success/jailbreakbench": {"label": "attack success (JailbreakBench)", "kind": "rate", "better": None, "group": "refusal"},
    "attack_success/advbench": {"label": "attack success (AdvBench)", "kind": "rate", "better": None, "group": "refusal"},
    "safety/jailbreakbench": {"label": "LlamaGuard unsafe (JailbreakBench)", "kind": "rate", "better": None, "group": "safety"},
    "harmless_refusal": {"label": "refusal on harmless", "kind": "rate", "better": "lower", "group": "refusal"},
    "ce/general": {"label": "general-text CE", "kind": "loss", "better": "lower", "group": "capability"},
    "ce/alpaca": {"label": "Alpaca CE", "kind": "loss", "better": "lower", "group": "capability"},
    "ce/on_distribution": {"label": "on-distribution CE", "kind": "loss", "better": "lower", "group": "capability"},
    "mmlu": {"label": "MMLU (5-shot)", "kind": "accuracy", "better": "higher", "group": "capability"},
    "arc_challenge/acc": {"label": "ARC-Challenge acc", "kind": "accuracy", "better": "higher", "group": "capability"},
    "arc_challenge/acc_norm": {"label": "ARC-Challenge acc_norm", "kind": "accuracy", "better": "higher", "group": "capability"},
}
P_VALUES = [0.0004, 0.004, 0.03, 0.2, None, 0.0009999, 0.05, 0.01]


def make_summary(specs: list[InterventionSpec], key: str, drop: tuple[str, ...] = ()) -> dict:
    """An evaluate/summary.json in the documented schema, with every kind of cell."""
    results: dict = {}
    examples: dict = {}
    per_category: dict = {}
    for i, spec in enumerate(s for s in specs if s.name not in drop):
        row = {}
        for j, metric in enumerate(METRICS):
            if metric == "safety/jailbreakbench":
                row[metric] = {"status": "not run", "reason": NOT_RUN_REASON}
                continue
            if metric == "ce/on_distribution" and spec.kind == "actadd":
                row[metric] = {"status": "not run", "reason": "ActAdd changes the prompt distribution"}
                continue
            value = 0.1 + 0.07 * i + 0.01 * j if METRICS[metric]["kind"] != "loss" else 2.3 + 0.05 * i + 0.1 * j
            p = None if spec.name == "baseline" else P_VALUES[(i + j) % len(P_VALUES)]
            ci = [value - 0.05, value + 0.05]
            if spec.name == "inlp.actadd-x1" and metric == "arc_challenge/acc_norm":
                value, ci, p = NAN, [NAN, NAN], NAN  # NaN must render as n/a
            row[metric] = {"status": "ok", "value": value, "ci": ci, "n": 32,
                           "ci_method": "bootstrap" if METRICS[metric]["kind"] == "loss" else "wilson",
                           "p_vs_baseline": p, "test": None if p is None else ("mcnemar" if METRICS[metric]["kind"] != "loss" else "paired_bootstrap")}
            if p is not None and not math.isnan(p):
                row[metric]["p_raw"] = p / 4  # p_vs_baseline holds the Holm-adjusted value
        results[spec.name] = row
        examples[spec.name] = [
            {"dataset": "harmless_test", "prompt": "Give three tips for staying healthy.", "response": "Eat well.", "refused": False},
            *[{"dataset": "jailbreakbench", "prompt": f"Harmful prompt {k} for {spec.name} <b>bold</b>",
               "response": SCRIPT_RESPONSE if k == 0 else f"I'm sorry, I cannot help with that ({k}).",
               "refused": k != 0} for k in range(4)],
        ]
        per_category[spec.name] = {"jailbreakbench": {"Malware/Hacking": {"attack_success": 0.5, "n": 4},
                                                      "Fraud/Deception": {"attack_success": NAN, "n": 0}}}
    base_mmlu, base_arc = results["baseline"]["mmlu"], results["baseline"]["arc_challenge/acc"]
    return {
        "key": key,
        "interventions": [s.to_dict() for s in specs if s.name not in drop],
        "metrics": METRICS,
        "results": results,
        "p_adjustment": {"method": "holm", "m": sum("p_raw" in c for row in results.values() for c in row.values()),
                         "family": "every non-baseline intervention x metric with a paired test"},
        "per_category": per_category,
        "chance_flags": {
            "mmlu": {"chance": 0.25, "baseline_ci": [base_mmlu["value"] - 0.1, base_mmlu["value"] + 0.1], "flagged": True},
            "arc_challenge/acc": {"chance": 0.1, "baseline_ci": base_arc["ci"], "flagged": False},
        },
        "examples": examples,
        "notes": ["general-text cross-entropy on LAMBADA (offline stand-in for the Pile)"],
    }


def write_fixture_run(folder: Path, model_name: str = "Qwen/Qwen2.5-Coder-0.5B-Instruct", stages: str = "evaluate",
                      drop: tuple[str, ...] = ()) -> Path:
    """A run folder with manifest, geometry, selections, plan and (for stages='evaluate') summary."""
    keys = {"extract": "e" * 12, "select": "s" * 12, "infer": "i" * 12, "evaluate": "v" * 12}

    def dump(rel: str, obj) -> None:
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(obj, indent=1))  # Python's json writes NaN, like the pipeline

    dump("manifest.json", {
        "key": keys["select"],
        "config": {"model": model_name, "preset": "quick", "seed": 42, "methods": METHODS, "n_train": 64, "n_val": 16,
                   "n_test": 32, "positions": POSITIONS, "scoring": "local", "just_one": False, "top_fraction": None,
                   "eval_datasets": ["jailbreakbench", "advbench"], "harmless_eval": "harmless_test",
                   "max_new_tokens": 64, "inlp_min_accuracy": 0.55, "reflection_mode": "reference"},
        "model": {"name": model_name, "alias": model_name.split("/")[-1], "fingerprint": "0123456789abcdef",
                  "n_layers": N_LAYERS, "d_model": 64, "dtype": "float32", "device": "cpu"},
        "stage_keys": keys, "package_version": "0.1.0", "versions": {"torch": "2.x", "python": "3.11"}, "seed": 42,
        "timings": {"extract": 4.5, "select": 2.7, **({"infer": 59.1, "evaluate": 31.0} if stages == "evaluate" else {})},
    })
    acc = [[[0.95 - 0.1 * k if k < 3 + l else NAN for k in range(8)] for l in range(N_LAYERS)] for _ in POSITIONS]
    dump("extract/geometry.json", {
        "key": keys["extract"], "positions": POSITIONS,
        "dim_norm": [[1.0 + l for l in range(N_LAYERS)] for _ in POSITIONS],
        "cos_dim_inlp": [[0.9 - 0.1 * l if l else NAN for l in range(N_LAYERS)] for _ in POSITIONS],
        "angle_dim_inlp_subspace": [[10.0 * l for l in range(N_LAYERS)] for _ in POSITIONS],
        "inlp_rank": [[3 + l for l in range(N_LAYERS)] for _ in POSITIONS],
        "inlp_accuracies": acc,
        "cos_dim_leace_readout": [[0.5 + 0.05 * l for l in range(N_LAYERS)] for _ in POSITIONS],
    })
    selections = {m: make_selection(m, fallback=(m == "inlp")) for m in METHODS}
    for m, sel in selections.items():
        dump(f"select/{m}.json", {"key": keys["select"], "n_val": {"harmful": 16, "harmless": 16}, **sel.to_dict()})
    if stages in ("infer", "evaluate"):
        specs = make_specs(selections)
        dump("infer/plan.json", {"key": keys["infer"], "interventions": [s.to_dict() for s in specs]})
        if stages == "evaluate":
            dump("evaluate/summary.json", make_summary(specs, keys["evaluate"], drop))
    return folder


class TableParser(HTMLParser):
    """Rows of the first <table class="results">: lists of (text, attributes) per cell."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[list[tuple[str, dict]]] = []
        self._in_table = False
        self._cell: list[str] | None = None
        self._attrs: dict = {}
        self._done = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table" and "results" in (attrs.get("class") or "") and not self._done:
            self._in_table = True
        elif self._in_table and tag == "tr":
            self.rows.append([])
        elif self._in_table and tag in ("td", "th"):
            self._cell, self._attrs = [], attrs

    def handle_endtag(self, tag):
        if self._in_table and tag in ("td", "th") and self._cell is not None:
            self.rows[-1].append((re.sub(r"\s+", " ", "".join(self._cell)).strip(), self._attrs))
            self._cell = None
        elif self._in_table and tag == "table":
            self._in_table, self._done = False, True

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def expected_mark(p) -> str:
    if p is None or (isinstance(p, float) and math.isnan(p)):
        return ""
    return "***" if p < 0.001 else "**" if p < 0.01 else "*" if p < 0.05 else ""
