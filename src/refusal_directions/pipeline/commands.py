"""Commands: which stages a command runs, in order, and what each hands to the next.

``run_command`` opens the run folder, runs the stages of ``command`` and returns the ``Run``. It
prints nothing: a caller that wants to show progress (the command line, ``cli``) passes
``on_event``, called after each step with the step's name and result:

    ("open", None)  ("extract", Extraction)  ("select", {method: MethodSelection})
    ("sweep", {method: records})  ("optimize", {method: optimize document})
    ("geometry", intervention geometry dict)  ("infer", [InterventionSpec])  ("evaluate", summary dict)
    ("report", (html path, md path))

The ``geometry`` command runs the intervention-geometry step alone (on the saved extraction and
selection); ``run`` runs it after select when ``intervention_geometry`` is on and generation follows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from ..config import RunConfig
from ..models import ModelAdapter
from .stages.evaluate import evaluate
from .stages.extract import extract
from .stages.infer import infer
from .stages.optimize import optimize
from .stages.intervention_geometry import intervention_geometry
from .stages.select import select
from .stages.sweep import sweep
from .store import Run, open_run

STAGE_ORDER = ("extract", "select", "sweep", "optimize", "infer", "evaluate", "report")

# on_event(step, run, result): see the module docstring
EventListener = Callable[[str, Run, Any], None]


def run_command(command: str, config: RunConfig, run_dir: Path | None = None,
                on_event: EventListener | None = None, adapter: ModelAdapter | None = None) -> Run:
    """Run one stage (``extract``, ``select``, ``sweep``, ``optimize``, ``geometry``, ``infer``, ``evaluate``)
    or all of them (``run``; sweep and optimize only with ``--sweep`` / ``--optimize``);
    ``adapter``: the model already loaded (default: load ``config.model``)."""
    notify = on_event or (lambda step, run, result: None)
    run = open_run(config, adapter=adapter, run_dir=run_dir)
    notify("open", run, None)
    if config.skip_eval:
        config.infer_only = True
    stages = stages_for(command, config)
    extraction = selections = plan = None
    if "extract" in stages:
        extraction = extract(run)
        notify("extract", run, extraction)
    if "select" in stages:
        selections = select(run, extraction)
        notify("select", run, selections)
    for name, stage in (("sweep", sweep), ("optimize", optimize)):
        if name in stages:
            notify(name, run, stage(run, extraction, selections))
    if "geometry" in stages or ("infer" in stages and config.intervention_geometry):
        notify("geometry", run, intervention_geometry(run, extraction=extraction, selections=selections))
    if "infer" in stages:
        plan = infer(run, selections, extraction.direction_sets if extraction else None)
        notify("infer", run, plan)
    if "evaluate" in stages:
        summary = evaluate(run, plan, extraction.direction_sets if extraction else None)
        notify("evaluate", run, summary)
    if "report" in stages:
        from ..report import write_report

        notify("report", run, write_report(run.dir))
    return run


def stages_for(command: str, config: RunConfig) -> list[str]:
    """The stages ``command`` runs: itself, or for ``run`` every stage less those that
    ``use_existing`` / ``resume_from_eval`` skip, up to the one ``*_only`` stops after."""
    if command != "run":
        return [command]
    stages = [s for s in STAGE_ORDER if not (s in ("sweep", "optimize") and not getattr(config, s))]
    if config.use_existing:
        stages = [s for s in stages if s not in ("extract", "select")]
    if config.resume_from_eval:
        stages = [s for s in stages if s not in ("extract", "select", "sweep", "optimize", "infer")]
    for flag, last in (("extract_only", "extract"), ("select_only", "select"), ("infer_only", "infer")):
        if getattr(config, flag):
            stages = stages[: stages.index(last) + 1] if last in stages else stages
            break
    return stages
