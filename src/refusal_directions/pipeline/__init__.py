"""Stage orchestration and the artifact store: extract -> select -> infer -> evaluate -> report.

A run folder is ``<output_dir>/<model-alias>/<key>/`` where ``key`` hashes the model fingerprint
and every setting that changes the directions and the selection (``RunConfig.stage_key``).
Every artifact records the key of the stage that made it; a rerun reuses each artifact whose key
matches and recomputes the rest, so settings of later stages (generation length, evaluation
sizes) can change without redoing extraction and selection. Every file is written atomically
(``artifacts``), so killing the process at any moment loses nothing already written.

Layout::

    manifest.json                      config, model, package version, stage keys and timings
    run.log                            concise log of every invocation
    extract/prompts.json               sampled train/val prompts, baseline refusal scores, filter
    extract/activations.safetensors    harmful / harmless residual streams [N, P, L, D]
    extract/directions_<method>.safetensors
    extract/geometry.json
    select/<method>.json               every candidate's scores, the ranking, the choice, the scope
    select/plots/*.png
    infer/plan.json                    the interventions
    infer/<intervention>/<dataset>.jsonl
    evaluate/<intervention>/<metric>.json
    evaluate/summary.json
    report/report.html, report/report.md
    reproduce.json                     what `refusal-directions reproduce` reruns: settings, versions, data hashes

Modules: ``store`` (run folder, keys, manifest, artifact validity), ``stages`` (one module per
stage), ``plan`` (every intervention's layers, coefficient and ActAdd sign), ``summary`` (the
assembly of ``evaluate/summary.json``), ``export`` (baked models), ``commands`` (which stages a
command runs), ``evaluate_model`` (infer and evaluate on a model as it is, against its base),
``reproduce`` (rerun from ``reproduce.json``) and ``diff`` (artifact differences of two folders). ``docs/architecture.md`` draws the data flow and what each module may import.
This package re-exports the public names.
"""

from .commands import run_command, stages_for
from .diff import Difference, diff_runs
from .evaluate_model import check_compatible, evaluate_model_command
from .export import EXPORTABLE, ExportOptions, export_model
from .plan import INDUCE_REFUSAL, REMOVE_REFUSAL, actadd_sign, capability_sign, plan_interventions
from .stages.evaluate import evaluate, general_text_corpus
from .stages.extract import Extraction, extract, fit_method, load_extraction, sample_prompts, separation_summary, unused_train_prompts
from .stages.infer import eval_prompt_sets, generation_batch_size, infer, load_completions, load_plan, use_static_cache
from .stages.select import filtered_val_prompts, inlp_k_table, load_selection, select
from .reproduce import Reproduction, reproduce_run
from .store import Run, RunError, open_run, timed, write_manifest

__all__ = [
    "Difference", "EXPORTABLE", "INDUCE_REFUSAL", "Reproduction", "check_compatible", "diff_runs",
    "evaluate_model_command", "reproduce_run", "REMOVE_REFUSAL", "Extraction", "Run", "RunError", "actadd_sign", "capability_sign",
    "eval_prompt_sets", "evaluate", "ExportOptions", "export_model", "extract", "filtered_val_prompts", "fit_method", "general_text_corpus",
    "generation_batch_size", "infer", "inlp_k_table", "load_completions", "load_extraction", "load_plan", "load_selection",
    "open_run", "plan_interventions", "run_command", "sample_prompts", "select", "separation_summary", "stages_for", "timed",
    "unused_train_prompts", "use_static_cache", "write_manifest",
]
