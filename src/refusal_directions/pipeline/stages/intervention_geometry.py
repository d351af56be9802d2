"""Intervention geometry: where each planned intervention moves the validation activations.

Artifacts (keyed by the select stage's key, and valid only with the settings they record: the plan,
the position, the layers, the probe's L2 and the numbers of prompts)::

    evaluate/intervention_geometry.json        per intervention, layer and class: the cluster numbers
                                               (``intervention_geometry.geometry_numbers``) and the 2-D points
    evaluate/intervention_geometry/<layer>_<intervention>.png   the scatter plots (``report.plot_intervention_geometry``)

The validation prompts (all sampled, without the refusal filter: the filter can leave a handful of
harmful ones) are run once without intervention and once under each intervention of the plan, built
as generation builds it: removals and reflections alike on both classes, ActAdd with the sign the plan
gives each class (``plan.capability_sign``, refusal-removing, on harmful prompts; ``plan.actadd_sign`` of
the harmless set, refusal-inducing, on harmless ones). The residual stream is recorded as
``activations.cache_activations`` records it (the input of each layer's block, after the intervention's
own hooks at that block) at one position: that of the selected diff-in-means component. Layers: every
method's selected layer and the last layer. The probe is fitted on the clean *train* activations
(``extract/activations.safetensors``), the basis and class means come from the clean validation ones.
"""

from __future__ import annotations

import logging

from torch import Tensor

from ...activations import cache_activations
from ...artifacts import load_safetensors, write_json
from ...data import instructions
from ...intervention_geometry import fit_probe, geometry_numbers, project, projection_basis
from ...interventions import InterventionSpec, applied
from ...selection import MethodSelection
from ..plan import actadd_sign, capability_sign, plan_interventions
from ..store import Run, RunError, timed, valid_json
from .extract import Extraction, load_extraction
from .select import load_selection

log = logging.getLogger(__name__)
CLASSES = ("harmful", "harmless")


def intervention_geometry(run: Run, extraction: Extraction | None = None,
                          selections: dict[str, MethodSelection] | None = None,
                          plan: list[InterventionSpec] | None = None) -> dict:
    """The geometry of every intervention of ``plan`` (default: planned from ``selections``, else from
    the saved selection, as the infer stage plans); reuses a valid ``evaluate/intervention_geometry.json``,
    else computes, writes and returns it."""
    extraction = extraction or load_extraction(run)
    if plan is None:
        plan = plan_interventions(run, selections or load_selection(run), extraction.direction_sets)
    key, settings = run.stage_key("select"), geometry_settings(run, plan, extraction)
    path = run.path("evaluate", "intervention_geometry.json")
    saved = None if run.config.force_overwrite else valid_json(path, key)
    if saved is not None and saved.get("settings") == settings:
        return saved
    with timed(run, "geometry"):
        result = {"key": key, "settings": settings, **_compute(run, plan, extraction, settings)}
        write_json(path, result)
        _plots(run, result)
    return result


def geometry_settings(run: Run, plan: list[InterventionSpec], extraction: Extraction) -> dict:
    """What the numbers depend on beyond the plan: the position, the layers, the probe's L2 and the prompts."""
    dim = next((s for s in plan if s.method == "diff_in_means" and s.kind != "baseline"), None)
    chosen = dim or next((s for s in plan if s.kind != "baseline"), None)
    if chosen is None:
        raise RunError("The plan has no intervention: nothing to measure the geometry of.")
    layers = sorted({s.layer for s in plan if s.kind != "baseline"} | {run.adapter.n_layers - 1})
    n = {c: len(extraction.prompts[f"{c}_val"]) for c in CLASSES}
    return {"position": chosen.position, "pos_index": chosen.pos_index, "layers": layers,
            "probe_l2": run.config.geometry_probe_l2, "n_val": n, "plan": [s.to_dict() for s in plan]}


def _record(run: Run, prompts: list[str], settings: dict, spec: InterventionSpec | None, sign: float | None,
            extraction: Extraction) -> Tensor:
    """``[n, len(layers), d]`` block inputs at the geometry's position, under ``spec`` (None: clean)."""
    intervention = None if spec is None else spec.build(extraction.direction_sets, sign)
    with applied(run.adapter, intervention):
        acts, _ = cache_activations(run.adapter, prompts, [settings["position"]], run.batch_size, desc="geometry")
    return acts[:, 0, settings["layers"]]


def _class_signs(run: Run, spec: InterventionSpec) -> dict[str, float | None]:
    """The sign ``spec`` is built with on each class's prompts (None: not an ActAdd)."""
    return {"harmful": capability_sign(spec), "harmless": actadd_sign(spec, run.config.harmless_eval, run.config)}


def _points(x: Tensor, basis: Tensor) -> list[list[float]]:
    """2-D coordinates of ``x [n, d]`` in ``basis``, rounded for the JSON."""
    return [[round(float(a), 4), round(float(b), 4)] for a, b in project(x, basis).tolist()]


def _compute(run: Run, plan: list[InterventionSpec], extraction: Extraction, settings: dict) -> dict:
    """The clean clusters and every intervention's numbers and points, per layer."""
    prompts = {c: instructions(extraction.prompts[f"{c}_val"]) for c in CLASSES}
    clean = {c: _record(run, prompts[c], settings, None, None, extraction) for c in CLASSES}
    train, _ = load_safetensors(run.path("extract", "activations.safetensors"))
    layers = settings["layers"]
    bases = [projection_basis(clean["harmful"][:, i], clean["harmless"][:, i]) for i in range(len(layers))]
    probes = [fit_probe(train["harmful"][:, settings["pos_index"], l], train["harmless"][:, settings["pos_index"], l],
                        settings["probe_l2"]) for l in layers]
    out_layers = {}
    for i, layer in enumerate(layers):
        h, b = clean["harmful"][:, i], clean["harmless"][:, i]
        out_layers[str(layer)] = {c: {**geometry_numbers(h, b, clean[c][:, i], probes[i], c),
                                      "points": _points(clean[c][:, i], bases[i])} for c in CLASSES}
    entries = []
    for spec in plan:
        if spec.kind == "baseline":
            continue
        log.info("Intervention geometry: %s", spec.name)
        moved = {c: _record(run, prompts[c], settings, spec, sign, extraction) for c, sign in _class_signs(run, spec).items()}
        per_layer = {}
        for i, layer in enumerate(layers):
            h, b = clean["harmful"][:, i], clean["harmless"][:, i]
            per_layer[str(layer)] = {c: {**geometry_numbers(h, b, moved[c][:, i], probes[i], c),
                                         "points": _points(moved[c][:, i], bases[i])} for c in CLASSES}
        entries.append({"name": spec.name, "kind": spec.kind, "method": spec.method, "alpha": spec.alpha,
                        "selected_layer": spec.layer, "layers": per_layer})
    return {"clean": out_layers, "interventions": entries}


def _plots(run: Run, result: dict) -> None:
    """Write the scatter plots (skipped when the report module cannot be imported)."""
    try:
        from ...report import plot_intervention_geometry
    except ImportError:  # the report module is optional here, as for the selection plots
        return
    plot_intervention_geometry(result, run.path("evaluate", "intervention_geometry"))
