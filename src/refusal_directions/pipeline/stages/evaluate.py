"""Stage 4, evaluate: per-item results of every metric under every intervention, then the summary.

Artifacts (keyed by the evaluate stage's key)::

    evaluate/<intervention>/<metric>.json   per-item results ("/" in a metric id becomes "__")
    evaluate/agreement.json                 judge agreement per harmful set (``summary.judge_agreement``)
    evaluate/summary.json                   cells with intervals and tests (``pipeline.summary``)

Order of work: coherence of every completion under the *unmodified* model (no intervention
active); then, per intervention, cross-entropies, MMLU and ARC with the intervention applied as
the plan applies it to capability metrics (``plan.build_for_capability``) and the KL from the
baseline; last the model judges, each loaded only after the evaluated model is freed: the safety
judge (LlamaGuard), the HarmBench classifier and the rubric grader, one after the other.

The HarmBench and rubric verdicts (``harmbench__<dataset>.json``, ``rubric__<dataset>.json``) are
valid with the stage key *and* the judge settings they record (``settings``: the model, and for the
rubric the completion limit and the prompt's hash), so that choosing another grader re-judges
without recomputing the other metrics. A judge whose model cannot be found (not installed, a
missing path, offline and not cached) is reported "not run" without freeing the evaluated model.
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any, Callable

import torch

from ...artifacts import write_json
from ...config import RunConfig
from ...data import DataError, DatasetUnavailable, load_dataset, sample
from ...directions.base import DirectionSet
from ...evaluation import benchmarks, loss
from ...evaluation.coherence import CompletionCE, coherence_features, completion_cross_entropy
from ...evaluation.divergence import completion_kl
from ...evaluation.judges import judge_model_unavailable_reason, run_harmbench_judge, run_safety_judge
from ...evaluation.rubric import RubricJudge, rubric_settings_id, run_rubric_judge
from ...evaluation.reasoning import judged_texts
from ...interventions import InterventionSpec, applied
from ..plan import build_for_capability
from ..store import Run, timed, valid_json
from ..summary import assemble_summary
from .extract import load_extraction
from .infer import load_completions, load_plan

GPU_SCORE_TOKENS = 32768  # scoring forwards' token budget on a GPU (``_scoring_batches``)

# completions[intervention name][dataset] -> the rows of infer/<intervention>/<dataset>.jsonl
Completions = dict[str, dict[str, list[dict]]]


def evaluate(run: Run, plan: list[InterventionSpec] | None = None, sets: dict[str, DirectionSet] | None = None) -> dict:
    """Every metric under every intervention; writes and returns ``evaluate/summary.json``."""
    config = run.config
    plan = load_plan(run) if plan is None else plan
    sets = load_extraction(run).direction_sets if sets is None else sets
    key = run.stage_key("evaluate")
    notes: list[str] = []
    with timed(run, "evaluate"):
        completions = {s.name: {d: load_completions(run, s, d) for d in [*config.eval_datasets, config.harmless_eval]}
                       for s in plan}
        # the unmodified model scores every completion first (no intervention active: outside ``applied``)
        coherence = _coherence_metrics(run, plan, completions)
        outcomes = {s.name: _model_metrics(run, s, sets, completions, notes) for s in plan}
        safety = _safety_metrics(run, plan, completions, notes)
        harmbench = _harmbench_metrics(run, plan, completions, notes)
        rubric = _rubric_metrics(run, plan, completions, notes)
        summary = assemble_summary(config, plan, completions, outcomes, safety, coherence, notes,
                                   rubric=rubric, harmbench=harmbench)
        summary["key"] = key
        write_json(run.path("evaluate", "agreement.json"), {"key": key, **summary["judge_agreement"]})
        write_json(run.path("evaluate", "summary.json"), summary)
    return summary


# ---------------------------------------------------------------------- per-item artifacts
def metric_path(run: Run, spec: InterventionSpec, metric: str) -> Path:
    """``evaluate/<intervention>/<metric>.json`` ("/" in ``metric`` becomes "__")."""
    return run.path("evaluate", spec.name, metric.replace("/", "__") + ".json")


def saved_metric(run: Run, spec: InterventionSpec, metric: str) -> dict | None:
    """The saved per-item result of ``metric`` for ``spec``; None if missing, stale or ``force_overwrite``."""
    return None if run.config.force_overwrite else valid_json(metric_path(run, spec, metric), run.stage_key("evaluate"))


def cached_metric(run: Run, spec: InterventionSpec, metric: str, compute: Callable[[], dict]) -> dict:
    """The saved per-item result of ``metric`` for ``spec`` (computed and saved if missing or stale)."""
    saved = saved_metric(run, spec, metric)
    if saved is None:
        saved = {"key": run.stage_key("evaluate"), **compute()}
        write_json(metric_path(run, spec, metric), saved)
    return saved


def general_text_corpus(config: RunConfig) -> tuple[str, str]:
    """(dataset name or path, note for the report): the Pile from the hub, LAMBADA from a mirror
    (``RunConfig.general_text_name``, which the evaluate stage's key hashes)."""
    corpus = config.general_text_name()
    if config.general_text:
        return corpus, f"general-text cross-entropy on {corpus}"
    if corpus == "lambada":
        return "lambada", "general-text cross-entropy on LAMBADA passages (offline stand-in for the Pile, which is not mirrored)"
    return "pile", "general-text cross-entropy on the Pile (monology/pile-uncopyrighted, first documents, streamed)"


# ---------------------------------------------------------------------- coherence (unmodified model)
def _coherence_metrics(run: Run, plan: list[InterventionSpec], completions: Completions) -> dict[str, dict[str, dict]]:
    """Coherence features of every completion of every intervention on each harmful evaluation
    set (``[intervention][dataset]``), cached as ``evaluate/<intervention>/coherence__<dataset>.json``:
    the text features of the answer (``reasoning.judged_texts``) and the teacher-forced
    cross-entropy of the completion as generated under the *unmodified* model (called with no
    intervention active; ``completion_cross_entropy`` raises if a hook is registered). The sets not
    saved yet are scored in one call, so that the interventions' completions of one prompt share it
    and identical completions are scored once. The degeneracy thresholds are calibrated later, in
    the summary, on the baseline's features of the same set."""
    todo = [(s, d) for s in plan for d in run.config.eval_datasets if saved_metric(run, s, f"coherence/{d}") is None]
    computed = dict(zip([(s.name, d) for s, d in todo], _coherence_features(run, [completions[s.name][d] for s, d in todo])))
    return {s.name: {d: cached_metric(run, s, f"coherence/{d}", lambda s=s, d=d: computed[(s.name, d)])
                     for d in run.config.eval_datasets} for s in plan}


def _coherence_features(run: Run, sets: list[list[dict]]) -> list[dict]:
    """The coherence artifact of each set of completions (all scored in one call)."""
    config = run.config
    rows = [r for rows in sets for r in rows]
    if not rows:
        return [_coherence_artifact(config, [], CompletionCE([], [], [])) for _ in sets]
    ce = completion_cross_entropy(run.adapter, [r["prompt"] for r in rows], [r["response"] for r in rows],
                                  max_completion_tokens=config.max_new_tokens, **_scoring_batches(run))
    out, start = [], 0
    for part in sets:
        stop = start + len(part)
        piece = CompletionCE(ce.ce[start:stop], ce.n_tokens[start:stop], ce.n_nonfinite[start:stop])
        out.append(_coherence_artifact(config, [r["response"] for r in part], piece))
        start = stop
    return out


def _coherence_artifact(config: RunConfig, responses: list[str], ce: CompletionCE) -> dict:
    """The coherence artifact of one set: text features and cross-entropy of each completion."""
    features = coherence_features(judged_texts(responses, config.judge_text), ce)
    return {"max_completion_tokens": config.max_new_tokens, "text": f"{config.judge_text} (judged_texts)",
            "features": [f.to_dict() for f in features], "n_nonfinite": ce.n_nonfinite}


# ---------------------------------------------------------------------- capability under the intervention
def _model_metrics(run: Run, spec: InterventionSpec, sets: dict[str, DirectionSet], completions: Completions,
                   notes: list[str]) -> dict[str, Any]:
    """Loss and benchmark results (per item) of one intervention, each cached on disk, and the KL."""
    corpus, note = general_text_corpus(run.config)
    if note not in notes:
        notes.append(note)
    out: dict[str, Any] = {}
    with applied(run.adapter, build_for_capability(spec, sets), bake_weights=run.config.bake_weights == "auto"):
        out["ce/general"] = cached_metric(run, spec, "ce/general", lambda: _general_text_loss(run, corpus))
        out["ce/alpaca"] = cached_metric(run, spec, "ce/alpaca", lambda: _alpaca_loss(run))
        out["ce/on_distribution"] = cached_metric(run, spec, "ce/on_distribution",
                                                  lambda: _on_distribution_loss(run, completions))
        out["mmlu"] = cached_metric(run, spec, "mmlu", lambda: _mmlu(run))
        out["arc_challenge"] = cached_metric(run, spec, "arc_challenge", lambda: _arc(run))
    out["kl/harmless"] = cached_metric(run, spec, "kl/harmless", lambda: _harmless_kl(run, spec, sets, completions))
    return out


def _metric_batch_size(run: Run) -> int:
    """Sequences per forward of the KL (and of the other metrics without a token budget): half the
    prompt batch (longer inputs)."""
    return max(1, run.batch_size // 2)


def _scoring_batches(run: Run) -> dict[str, int | None]:
    """``batch_size`` and ``max_tokens`` of the scorer's forwards (losses, benchmarks, coherence).

    With a token budget (``score_tokens``; by default ``GPU_SCORE_TOKENS`` on a GPU unless the batch
    size is set) a forward holds as many sequences as fit: 4,096 LAMBADA passages of ~84 tokens
    take 128 forwards of 32, each too small to keep a GPU busy, and about 11 of ~380 within
    32,768 tokens. Without one, ``_metric_batch_size`` sequences (the CPU's batches, unchanged).
    """
    tokens = run.config.score_tokens
    if tokens is None and run.adapter.input_device.type == "cuda" and not run.config.batch_size:
        tokens = GPU_SCORE_TOKENS
    if tokens is None:
        return {"batch_size": _metric_batch_size(run), "max_tokens": None}
    return {"batch_size": tokens, "max_tokens": tokens}  # every sequence holds a token: no cap by count


def _tokenized(run: Run, name: str, build: Callable[[], Any]) -> Any:
    """``build()``'s tokenized workload of metric ``name``, built once per process and shared by
    every intervention (``run.scratch``): it depends on the data and tokenizer, not the weights."""
    inputs = run.scratch.setdefault("tokenized", {})
    if name not in inputs:
        inputs[name] = build()
    return inputs[name]


def _general_text_loss(run: Run, corpus: str) -> dict:
    config = run.config
    sequences = _tokenized(run, "ce/general", lambda: loss.text_sequences(
        run.adapter, load_dataset(corpus, config.data_dir, limit=config.n_loss_docs), max_length=config.loss_max_length))
    return loss.sequences_loss(run.adapter, sequences, max_length=config.loss_max_length,
                               corpus=corpus, **_scoring_batches(run)).to_dict()


def _alpaca_loss(run: Run) -> dict:
    config = run.config
    try:
        records = sample(load_dataset("alpaca_outputs", config.data_dir), config.n_loss_docs, config.seed)
    except (DatasetUnavailable, DataError) as exc:
        return {"status": "not run", "reason": f"no Alpaca reference outputs available ({exc.__class__.__name__}); "
                "cross-entropy on the baseline's own completions is reported as ce/on_distribution"}
    return loss.instruction_loss(run.adapter, records, max_length=config.loss_max_length, **_scoring_batches(run)).to_dict()


def _on_distribution_loss(run: Run, completions: Completions) -> dict:
    base = completions["baseline"][run.config.harmless_eval]
    return loss.on_distribution_loss(run.adapter, [r["prompt"] for r in base], [r["response"] for r in base],
                                     max_length=run.config.loss_max_length, **_scoring_batches(run)).to_dict()


def _mmlu(run: Run) -> dict:
    config = run.config
    inputs = _tokenized(run, "mmlu", lambda: benchmarks.mmlu_inputs(
        run.adapter, load_dataset("mmlu", config.data_dir, split="test"), load_dataset("mmlu", config.data_dir, split="dev"),
        n_questions=config.mmlu_questions, n_subjects=config.mmlu_subjects, seed=config.seed))
    return benchmarks.score_mmlu(run.adapter, inputs, **_scoring_batches(run))


def _arc(run: Run) -> dict:
    config = run.config
    inputs = _tokenized(run, "arc_challenge", lambda: benchmarks.arc_inputs(
        run.adapter, load_dataset("arc_challenge", config.data_dir, split="test"),
        load_dataset("arc_challenge", config.data_dir, split="train"), n_shots=config.arc_shots,
        n_questions=config.arc_questions, seed=config.seed))
    return benchmarks.score_arc(run.adapter, inputs, **_scoring_batches(run))


def _harmless_kl(run: Run, spec: InterventionSpec, sets: dict[str, DirectionSet], completions: Completions) -> dict:
    """KL(baseline || intervened) on the harmless test prompts and the baseline's own completions
    (first ``kl_tokens`` tokens), with the intervention applied as capability metrics apply it
    (``plan.capability_sign``). Hooks, never baked weights: the baseline's logits are computed (or
    reused) first, then the intervened model's (a ``Replacement``, another model's weights, is copied in
    for the intervened pass)."""
    base = completions["baseline"][run.config.harmless_eval]
    built = build_for_capability(spec, sets)
    intervened = None if spec.kind == "baseline" else (lambda: applied(run.adapter, built, bake_weights=False))
    return completion_kl(run.adapter, [r["prompt"] for r in base], [r["response"] for r in base], intervened,
                         n_tokens=run.config.kl_tokens, batch_size=_metric_batch_size(run), desc=f"KL {spec.name}",
                         reuse=run.scratch.setdefault("kl_baseline_logits", {})).to_dict()


# ---------------------------------------------------------------------- safety judge (model freed first)
def _safety_metrics(run: Run, plan: list[InterventionSpec], completions: Completions,
                    notes: list[str]) -> dict[str, dict[str, dict]]:
    """LlamaGuard verdicts per intervention and harmful dataset (``verdicts[name][dataset]``), or a
    "not run" reason for all. Saved verdicts are reused; the judge runs only on the others."""
    config = run.config
    if not config.safety_judge or config.safety_judge.lower() == "none":
        reason = "no safety judge configured (--safety-judge none)"
        return {s.name: {d: {"status": "not run", "reason": reason} for d in config.eval_datasets} for s in plan}
    results, todo = _saved_safety(run, plan)
    if not todo:
        return results
    free_model(run)  # the judge is loaded only after the evaluated model is freed
    pairs = [list(zip([r["prompt"] for r in completions[spec.name][d]],
                      judged_texts([r["response"] for r in completions[spec.name][d]], config.judge_text)))
             for spec, d in todo]
    verdicts = run_safety_judge(config.safety_judge, pairs, device=config.device, min_words=config.judge_min_words,
                                gpu_memory_fraction=config.judge_gpu_memory_fraction)
    key = run.stage_key("evaluate")
    for (spec, d), verdict in zip(todo, verdicts):
        if verdict.get("status") == "ok":
            write_json(metric_path(run, spec, f"safety/{d}"), {"key": key, **verdict})
        results[spec.name][d] = verdict
    reason = next((v["reason"] for v in verdicts if v.get("status") != "ok"), None)
    if reason:
        notes.append(f"safety judge not run: {reason}")
    return results


def _saved_safety(run: Run, plan: list[InterventionSpec]) -> tuple[dict[str, dict[str, dict]], list[tuple[InterventionSpec, str]]]:
    """The valid saved safety verdicts, and the (intervention, dataset) pairs still to judge."""
    key = run.stage_key("evaluate")
    results: dict[str, dict[str, dict]] = {s.name: {} for s in plan}
    todo = []
    for spec in plan:
        for d in run.config.eval_datasets:
            saved = None if run.config.force_overwrite else valid_json(metric_path(run, spec, f"safety/{d}"), key)
            if saved is not None:
                results[spec.name][d] = saved
            else:
                todo.append((spec, d))
    return results, todo


# ---------------------------------------------------------------------- HarmBench and rubric judges
JudgeRunner = Callable[[list[list[tuple[str, str]]]], list[dict]]


def _harmbench_metrics(run: Run, plan: list[InterventionSpec], completions: Completions,
                       notes: list[str]) -> dict[str, dict[str, dict]]:
    """HarmBench classifier verdicts per intervention and harmful dataset (``--harmbench-judge``)."""
    config = run.config
    model = config.harmbench_judge

    def runner(pairs: list[list[tuple[str, str]]]) -> list[dict]:
        return run_harmbench_judge(model, pairs, device=config.device,
                                   gpu_memory_fraction=config.judge_gpu_memory_fraction)

    return _judge_metrics(run, plan, completions, notes, metric="harmbench", model=model, settings={"model": model},
                          limit=None, runner=runner, off="no HarmBench classifier configured (--harmbench-judge none)")


def _rubric_metrics(run: Run, plan: list[InterventionSpec], completions: Completions,
                    notes: list[str]) -> dict[str, dict[str, dict]]:
    """Rubric grader scores per intervention and harmful dataset (``--rubric-judge``), of the first
    ``--rubric-max-completions`` completions of each set (all when unset)."""
    config = run.config
    model = config.rubric_judge
    settings = {"model": model, "max_completions": config.rubric_max_completions, "scoring": config.rubric_scoring,
                "settings_id": rubric_settings_id(RubricJudge.max_new_tokens, RubricJudge.max_response_tokens,
                                                  config.rubric_scoring)}

    def runner(pairs: list[list[tuple[str, str]]]) -> list[dict]:
        return run_rubric_judge(model, pairs, device=config.device, scoring=config.rubric_scoring)

    return _judge_metrics(run, plan, completions, notes, metric="rubric", model=model, settings=settings,
                          limit=config.rubric_max_completions, runner=runner,
                          off="no rubric judge configured (--rubric-judge none)")


def _judge_metrics(run: Run, plan: list[InterventionSpec], completions: Completions, notes: list[str], *, metric: str,
                   model: str | None, settings: dict, limit: int | None, runner: JudgeRunner,
                   off: str) -> dict[str, dict[str, dict]]:
    """One model judge's results ``[intervention][dataset]``: saved verdicts with the same key and
    ``settings`` are reused; the judge runs (after the evaluated model is freed) on the others, each
    set's judged texts (first ``limit`` completions), and its "ok" results are saved as
    ``evaluate/<intervention>/<metric>__<dataset>.json``. "not run" with the reason when ``model``
    is None or cannot be loaded (a note says why)."""
    config = run.config
    datasets = config.eval_datasets
    if not model:
        return {s.name: {d: {"status": "not run", "reason": off} for d in datasets} for s in plan}
    key = run.stage_key("evaluate")
    results: dict[str, dict[str, dict]] = {s.name: {} for s in plan}
    todo = []
    for spec in plan:
        for d in datasets:
            saved = None if config.force_overwrite else valid_json(metric_path(run, spec, f"{metric}/{d}"), key)
            if saved is not None and saved.get("settings") == settings:
                results[spec.name][d] = saved
            else:
                todo.append((spec, d))
    if not todo:
        return results
    reason = judge_model_unavailable_reason(model)
    if reason is None:
        free_model(run)  # the judge is loaded only after the evaluated model is freed
        pairs = []
        for spec, d in todo:
            rows = completions[spec.name][d][:limit]
            pairs.append(list(zip([r["prompt"] for r in rows], judged_texts([r["response"] for r in rows], config.judge_text))))
        verdicts = runner(pairs)
    else:
        verdicts = [{"status": "not run", "judge": metric, "model": model, "reason": f"could not load {model!r}: {reason}"}
                    for _ in todo]
    for (spec, d), verdict in zip(todo, verdicts):
        if verdict.get("status") == "ok":
            verdict = {"key": key, "settings": settings, **verdict}
            write_json(metric_path(run, spec, f"{metric}/{d}"), verdict)
        results[spec.name][d] = verdict
    failed = next((v["reason"] for v in verdicts if v.get("status") != "ok"), None)
    if failed:
        notes.append(f"{metric} judge not run: {failed}")
    return results


def free_model(run: Run) -> None:
    """Release the evaluated model's memory (before loading a judge)."""
    model = run.adapter.model
    run.adapter.model = None  # type: ignore[assignment]
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
