"""Evaluate a model as it is: the infer and evaluate stages (and the report) on ``--model``, against
``--base`` when given.

The model may come from anywhere (abliterated by another tool, or this package's ``export``): no
directions are extracted or selected. The plan has two rows, named as the summary and the report
name every run's rows: ``baseline`` (the base model as it is, the baseline of every paired test) and
``model`` (the evaluated model). The ``model`` row is computed on the base's modules with the
evaluated model's weights copied in (``interventions.Replacement``, exact), so every metric runs
through the same code as a run's interventions: generation (``stages.infer``), coherence under the
unmodified (base) model, losses, benchmarks and the KL from the base (``stages.evaluate``), judges,
intervals and paired tests (``pipeline.summary``). Both models must share the architecture, the
tokenizer and the chat template (``check_compatible``).

Without a base the plan is the ``baseline`` row alone, and it is the evaluated model itself: its own
numbers, with no tests.

The run folder is ``<output_dir>/evaluate-model/<model alias>[-vs-<base alias>]/<key>``; its keys
hash both models' fingerprints (``run_identity``), and ``manifest.json`` / ``reproduce.json`` record
``evaluate_model`` (both models), which the report's header shows.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any, Callable

from ..config import RunConfig
from ..interventions import InterventionSpec, Replacement
from ..models import ModelAdapter, load_model
from .stages.evaluate import evaluate
from .stages.infer import infer
from .store import MODEL_INFO_FIELDS, Run, RunError, open_run

log = logging.getLogger(__name__)

MODEL_ROW = "model"  # the evaluated model's row (the base's is "baseline", as in every run)
EVALUATE_MODEL_FOLDER = "evaluate-model"

# on_event(step, run, result), as pipeline.commands.run_command's
EventListener = Callable[[str, Run, Any], None]


def evaluate_model_plan(with_base: bool) -> list[InterventionSpec]:
    """The rows of an evaluate-model run: ``baseline``, then ``model`` when there is a base."""
    rows = [InterventionSpec("baseline", "baseline")]
    if with_base:
        rows.append(InterventionSpec(MODEL_ROW, "model", method=MODEL_ROW))
    return rows


def check_compatible(model: ModelAdapter, base: ModelAdapter) -> None:
    """``RunError`` unless ``model`` can be evaluated on ``base``'s modules with ``base``'s prompts:
    the same architecture and layer count, tokenizer vocabulary, chat template, post-instruction
    and refusal tokens."""
    problems = []
    if type(model.model) is not type(base.model):
        problems.append(f"architecture {type(model.model).__name__} != {type(base.model).__name__}")
    if (model.n_layers, model.d_model) != (base.n_layers, base.d_model):
        problems.append(f"{model.n_layers} layers x d_model {model.d_model} != {base.n_layers} x {base.d_model}")
    if model.tokenizer.get_vocab() != base.tokenizer.get_vocab():
        problems.append("the tokenizer vocabularies differ")
    if model.tokenizer.chat_template != base.tokenizer.chat_template:
        problems.append("the chat templates differ")
    if (model.eoi_token_ids, model.refusal_token_ids) != (base.eoi_token_ids, base.refusal_token_ids):
        problems.append("the post-instruction or refusal tokens differ")
    if problems:
        raise RunError(f"{model.name} cannot be evaluated against base {base.name}: " + "; ".join(problems)
                       + ". Give the base it was made from, or leave out --base to evaluate it alone.")


def run_identity(model_fingerprint: str, base_fingerprint: str | None) -> str:
    """What an evaluate-model run's stage keys hash instead of one model's fingerprint."""
    text = f"evaluate-model:{model_fingerprint}:{base_fingerprint or '-'}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def describe(adapter: ModelAdapter, spec: str) -> dict:
    """The manifest's description of one model of the run (``spec``: as given on the command line)."""
    info = adapter.describe()
    return {"spec": spec, **{k: info[k] for k in MODEL_INFO_FIELDS}}


def evaluate_model_command(config: RunConfig, run_dir: Path | None = None, on_event: EventListener | None = None,
                           adapters: tuple[ModelAdapter, ModelAdapter | None] | None = None) -> Run:
    """Generate and evaluate ``config.model`` (against ``config.base`` when set) and write the report.

    ``adapters``: the already loaded (model, base) to use instead of loading ``config.model`` and
    ``config.base``. Events as ``run_command``'s: open, infer, evaluate, report (evaluate and
    report are skipped with ``infer_only`` / ``skip_eval``).
    """
    notify = on_event or (lambda step, run, result: None)
    if config.extract_only or config.select_only or config.use_existing or config.resume_from_eval:
        raise RunError("evaluate-model runs generation and evaluation only; leave out --extract-only, --select-only, "
                       "--use-existing and --resume-from-eval.")
    model, base = adapters if adapters is not None else _load(config)
    evaluated = {"model": describe(model, config.model), "base": describe(base, config.base) if base else None}
    identity = run_identity(model.fingerprint, base.fingerprint if base else None)
    if base is not None:
        check_compatible(model, base)
        sets: dict = {MODEL_ROW: Replacement.of(model)}
        host = base
    else:
        sets, host = {}, model
    folder = Path(run_dir) if run_dir is not None else default_folder(config, model, base, identity)
    run = open_run(config, adapter=host, run_dir=folder, identity=identity, evaluate_model=evaluated)
    notify("open", run, None)
    plan = infer(run, sets=sets, plan=evaluate_model_plan(base is not None))
    notify("infer", run, plan)
    if not (config.infer_only or config.skip_eval):
        notify("evaluate", run, evaluate(run, plan, sets))
        from ..report import write_report

        notify("report", run, write_report(run.dir))
    return run


def default_folder(config: RunConfig, model: ModelAdapter, base: ModelAdapter | None, identity: str) -> Path:
    """``<output_dir>/evaluate-model/<model alias>[-vs-<base alias>]/<key>``."""
    name = model.alias if base is None else f"{model.alias}-vs-{base.alias}"
    return Path(config.output_dir) / EVALUATE_MODEL_FOLDER / name / config.stage_key("select", identity)


def _load(config: RunConfig) -> tuple[ModelAdapter, ModelAdapter | None]:
    """Load ``config.model`` and ``config.base`` (None when unset) with the configured device and dtype."""
    def load(spec: str) -> ModelAdapter:
        return load_model(spec, device=config.device, dtype=config.dtype, chat_template=config.chat_template)

    model = load(config.model)
    base = load(config.base) if config.base else None
    if base is not None and base.fingerprint == model.fingerprint:
        log.warning("--model and --base are the same model (fingerprint %s): every difference will be zero.", model.fingerprint)
    return model, base
