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
"""

from __future__ import annotations

import gc
import logging
import math
import platform
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from . import __version__
from .activations import cache_activations, default_positions
from .artifacts import read_json, read_jsonl, safetensors_metadata, save_safetensors, load_safetensors, write_json, write_jsonl
from .config import STAGE_VERSIONS, RunConfig
from .data import instructions, load_dataset, sample
from .directions.base import DirectionSet
from .directions.diff_in_means import fit_diff_in_means
from .directions.geometry import geometry
from .generation import generate
from .hooks import apply_hooks
from .interventions import REMOVAL_NAMES, InterventionSpec, applied, intervene
from .models import ModelAdapter, load_model
from .scopes import Scope, ScopeError
from .selection import MethodSelection, SelectionSettings, pool_size, refusal_scores, select_method, steering_table

log = logging.getLogger(__name__)


class RunError(RuntimeError):
    """A run cannot proceed; the message says why and what to do."""


# ---------------------------------------------------------------------- the run folder
@dataclass
class Run:
    """One run: its configuration, model and folder."""

    config: RunConfig
    adapter: ModelAdapter
    dir: Path
    key: str
    timings: dict[str, float] = field(default_factory=dict)
    model_info: dict = field(default_factory=dict)  # for the manifest; kept when the model is freed

    def path(self, *parts: str) -> Path:
        return self.dir.joinpath(*parts)

    def stage_key(self, stage: str) -> str:
        return self.config.stage_key(stage, self.adapter.fingerprint)

    @property
    def batch_size(self) -> int:
        if self.config.batch_size:
            return self.config.batch_size
        return 64 if self.adapter.input_device.type == "cuda" else 16


def open_run(config: RunConfig, adapter: ModelAdapter | None = None, run_dir: Path | None = None) -> Run:
    """Load the model (unless given) and open (or create) the run folder for ``config``.

    A folder whose manifest belongs to another model or configuration is refused, unless
    ``force_overwrite`` is set.
    """
    if adapter is None:
        adapter = load_model(config.model, device=config.device, dtype=config.dtype, chat_template=config.chat_template)
    key = config.stage_key("select", adapter.fingerprint)
    folder = Path(run_dir) if run_dir is not None else Path(config.output_dir) / adapter.alias / key
    manifest_path = folder / "manifest.json"
    if manifest_path.exists() and not config.force_overwrite:
        manifest = read_json(manifest_path)
        if manifest.get("model", {}).get("fingerprint") != adapter.fingerprint:
            raise RunError(
                f"{folder} holds a run of another model ({manifest.get('model', {}).get('name')}, fingerprint "
                f"{manifest.get('model', {}).get('fingerprint')}); choose another folder or pass --force-overwrite."
            )
        if manifest.get("key") != key:
            raise RunError(
                f"{folder} holds a run with another configuration (key {manifest.get('key')}, this one {key}); "
                "choose another folder or pass --force-overwrite."
            )
    folder.mkdir(parents=True, exist_ok=True)
    described = adapter.describe()
    model_info = {k: described[k] for k in ("name", "alias", "fingerprint", "n_layers", "d_model", "dtype", "device")}
    run = Run(config, adapter, folder, key, model_info=model_info)
    _attach_log_file(folder / "run.log")
    write_manifest(run)
    return run


def _attach_log_file(path: Path) -> None:
    root = logging.getLogger("refusal_directions")
    if any(isinstance(h, logging.FileHandler) and Path(h.baseFilename) == path.resolve() for h in root.handlers):
        return
    for h in [h for h in root.handlers if isinstance(h, logging.FileHandler)]:
        root.removeHandler(h)
        h.close()
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    root.addHandler(handler)
    root.setLevel(min(root.level or logging.INFO, logging.INFO))


def write_manifest(run: Run) -> None:
    path = run.path("manifest.json")
    old = read_json(path) if path.exists() else {}
    timings = {**old.get("timings", {}), **run.timings}
    write_json(
        path,
        {
            "key": run.key,
            "config": run.config.to_dict(),
            "model": run.model_info,
            "stage_keys": {s: run.stage_key(s) for s in ("extract", "select", "infer", "evaluate")},
            "stage_versions": dict(STAGE_VERSIONS),
            "data": run.config.data_identity(),  # source and content hash of every dataset the stages read
            "package_version": __version__,
            "versions": {"torch": torch.__version__, "python": platform.python_version()},
            "seed": run.config.seed,
            "timings": timings,
        },
    )


@contextmanager
def timed(run: Run, stage: str) -> Iterator[None]:
    """Log the stage's duration; record it in the manifest only if the stage wrote an artifact
    (a rerun that reuses everything keeps the time it took to compute them)."""
    start, wall = time.perf_counter(), time.time()
    log.info("%s: started", stage)
    yield
    seconds = round(time.perf_counter() - start, 2)
    folder = run.path(stage)
    if folder.exists() and any(p.stat().st_mtime >= wall for p in folder.rglob("*") if p.is_file()):
        run.timings[stage] = seconds
        log.info("%s: done in %.1f s", stage, seconds)
    else:
        log.info("%s: every artifact reused (%.1f s)", stage, seconds)
    write_manifest(run)


def _valid_json(path: Path, key: str) -> Any | None:
    """The JSON artifact at ``path`` if it exists and was made with ``key``."""
    if not path.exists():
        return None
    try:
        data = read_json(path)
    except (OSError, ValueError):
        log.warning("%s is unreadable; recomputing it.", path)
        return None
    return data if isinstance(data, dict) and data.get("key") == key else None


def _valid_safetensors(path: Path, key: str) -> bool:
    try:
        return path.exists() and safetensors_metadata(path).get("key") == key
    except Exception:  # a truncated or foreign file: recompute
        log.warning("%s is unreadable; recomputing it.", path)
        return False


# ---------------------------------------------------------------------- extract
@dataclass
class Extraction:
    prompts: dict
    direction_sets: dict[str, DirectionSet]


def sample_prompts(config: RunConfig) -> dict[str, list[dict]]:
    """Seeded train/val samples of the harmful and harmless splits.

    With ``config.val_from_train``, a validation split smaller than ``n_val`` is used whole and topped
    up by ``unused_train_prompts`` (marked ``"source": "<harm>_train"``); otherwise, or when the split
    is large enough, the samples are exactly those without the option.
    """
    out = {}
    for harm in ("harmful", "harmless"):
        train = load_dataset(f"{harm}_train", config.data_dir)
        val = load_dataset(f"{harm}_val", config.data_dir)
        out[f"{harm}_train"] = sample(train, config.n_train, config.seed)
        missing = config.n_val - len(val) if config.val_from_train else 0
        if missing <= 0:
            out[f"{harm}_val"] = sample(val, config.n_val, config.seed)
            continue
        # sample(val, len(val)) is what sample(val, n_val) falls back to, without its "set too small" warning
        extra = unused_train_prompts(train, out[f"{harm}_train"], val, missing, config.seed)
        log.info("Topping up %s_val (%d prompts) with %d unused %s_train prompts", harm, len(val), len(extra), harm)
        out[f"{harm}_val"] = sample(val, len(val), config.seed) + [{**r, "source": f"{harm}_train"} for r in extra]
    return out


def unused_train_prompts(train: list[dict], sampled: list[dict], val: list[dict], n: int, seed: int) -> list[dict]:
    """A seeded sample of ``n`` train-split records whose instruction is neither in the train sample
    ``sampled`` nor in the validation split ``val`` (all of them if fewer remain)."""
    taken = {r["instruction"] for r in [*sampled, *val]}
    pool = [r for r in train if r["instruction"] not in taken]
    return sample(pool, n, seed)


def extract(run: Run) -> Extraction:
    """Activations of the train prompts, then every method's directions and the geometry."""
    config, adapter = run.config, run.adapter
    key = run.stage_key("extract")
    acts_path = run.path("extract", "activations.safetensors")
    prompts_path = run.path("extract", "prompts.json")
    with timed(run, "extract"):
        prompts = _valid_json(prompts_path, key)
        if prompts is None or not _valid_safetensors(acts_path, key) or config.force_overwrite:
            prompts = _cache_train_activations(run, key, acts_path, prompts_path)
        tensors, _ = load_safetensors(acts_path)
        harmful, harmless = tensors["harmful"], tensors["harmless"]
        positions = prompts["positions"]
        sets: dict[str, DirectionSet] = {}
        for method in ["diff_in_means", *[m for m in config.methods if m != "diff_in_means"]]:
            path = run.path("extract", f"directions_{method}.safetensors")
            if _valid_safetensors(path, key) and not config.force_overwrite:
                sets[method] = DirectionSet.load(path)
                continue
            log.info("Fitting %s on %d harmful and %d harmless prompts", method, len(harmful), len(harmless))
            sets[method] = fit_method(method, harmful, harmless, positions, config, adapter.input_device)
            sets[method].save(path, {"key": key})
        write_json(run.path("extract", "geometry.json"),
                   {"key": key, **geometry(sets["diff_in_means"], sets.get("inlp"), sets.get("leace"))})
    return Extraction(prompts, sets)


def fit_method(method: str, harmful, harmless, positions, config: RunConfig, device) -> DirectionSet:
    if method == "diff_in_means":
        return fit_diff_in_means(harmful, harmless, positions)
    if method == "inlp":
        from .directions.inlp import INLPConfig, fit_inlp

        inlp_config = INLPConfig(max_iter=config.inlp_max_iter, min_accuracy=config.inlp_min_accuracy, C=config.inlp_c,
                                 seed=config.seed, stop_mode=config.inlp_stop_mode)  # type: ignore[arg-type]
        return fit_inlp(harmful, harmless, inlp_config, positions, device=device)
    if method == "leace":
        from .directions.leace import fit_leace

        return fit_leace(harmful, harmless, positions, device=device)
    raise RunError(f"Unknown method {method!r}")


def _cache_train_activations(run: Run, key: str, acts_path: Path, prompts_path: Path) -> dict:
    config, adapter = run.config, run.adapter
    sampled = sample_prompts(config)
    positions = config.positions or default_positions(adapter)
    acts, scores = {}, {}
    for harm in ("harmful", "harmless"):
        acts[harm], scores[harm] = cache_activations(
            adapter, instructions(sampled[f"{harm}_train"]), positions, run.batch_size, desc=f"{harm} activations"
        )
    keep = {h: torch.ones(len(scores[h]), dtype=torch.bool) for h in scores}
    if config.filter_train:
        keep = {"harmful": scores["harmful"] > 0, "harmless": scores["harmless"] < 0}
        for harm, mask in keep.items():
            if int(mask.sum()) < 4:
                raise RunError(
                    f"Only {int(mask.sum())} of {len(mask)} {harm} train prompts pass the baseline refusal filter "
                    f"(the model {'rarely refuses' if harm == 'harmful' else 'refuses most'} of them); "
                    "pass --no-filter-train or use more prompts."
                )
        log.info("Train filter kept %d/%d harmful and %d/%d harmless prompts", int(keep["harmful"].sum()),
                 len(keep["harmful"]), int(keep["harmless"].sum()), len(keep["harmless"]))
    save_safetensors(acts_path, {h: acts[h][keep[h]] for h in acts},
                     {"key": key, "fingerprint": adapter.fingerprint, "positions": str(list(positions))})
    prompts = {"key": key, "positions": list(positions)}
    for harm in ("harmful", "harmless"):
        prompts[f"{harm}_train"] = [
            {**r, "refusal_score": float(s), "kept": bool(k)}
            for r, s, k in zip(sampled[f"{harm}_train"], scores[harm], keep[harm])
        ]
        prompts[f"{harm}_val"] = sampled[f"{harm}_val"]
    write_json(prompts_path, prompts)
    return prompts


def separation_summary(sets: dict[str, DirectionSet], harmful, harmless) -> list[dict]:
    """For each method, the best-separating (position, layer), for the extraction summary.

    diff-in-means and LEACE: largest d' of the train projections on the read-out direction (r̂, or
    LEACE's W); INLP: highest first-classifier dev accuracy. INLP's rank there is reported.
    """
    rows = []
    for method, ds in sets.items():
        if method == "inlp":
            acc = ds.extras["accuracies"][..., 0]
            p, l = divmod(int(torch.nan_to_num(acc, -1.0).argmax()), ds.n_layers)
            rows.append({"method": method, "position": ds.positions[p], "layer": l,
                         "score": f"dev acc {float(acc[p, l]):.3f}", "inlp_rank": int(ds.rank[p, l])})
            continue
        readout = ds.direction if ds.right is None else ds.right[..., 0]
        readout = readout / readout.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        ph, pb = (harmful * readout).sum(-1), (harmless * readout).sum(-1)  # [N, P, L]
        pooled = ((ph.var(0) + pb.var(0)) / 2).sqrt().clamp_min(1e-12)
        d_prime = ((ph.mean(0) - pb.mean(0)) / pooled).abs()
        p, l = divmod(int(d_prime.argmax()), ds.n_layers)
        row = {"method": method, "position": ds.positions[p], "layer": l, "score": f"d' {float(d_prime[p, l]):.2f}"}
        if "inlp" in sets:
            row["inlp_rank"] = int(sets["inlp"].rank[p, l])
        rows.append(row)
    return rows


# ---------------------------------------------------------------------- select
def load_extraction(run: Run) -> Extraction:
    key = run.stage_key("extract")
    prompts = _valid_json(run.path("extract", "prompts.json"), key)
    sets = {}
    for method in ["diff_in_means", *run.config.methods]:
        path = run.path("extract", f"directions_{method}.safetensors")
        if prompts is None or not _valid_safetensors(path, key):
            raise RunError(f"No valid extraction in {run.dir} for this configuration; run `refusal-directions extract` first.")
        sets[method] = DirectionSet.load(path)
    return Extraction(prompts, sets)


def inlp_k_table(run: Run, inlp: DirectionSet) -> dict[tuple[int, int], int]:
    from .directions.inlp import k_for_policy

    k = k_for_policy(inlp, run.config.inlp_k_policy, run.config.inlp_k)  # type: ignore[arg-type]
    return {(p, l): int(k[p, l]) for p in range(k.shape[0]) for l in range(k.shape[1])}


def filtered_val_prompts(run: Run, prompts: dict) -> tuple[list[str], list[str]]:
    """Validation prompts, with the baseline refusal filter when ``filter_train`` is on."""
    harmful = instructions(prompts["harmful_val"])
    harmless = instructions(prompts["harmless_val"])
    if not run.config.filter_train:
        return harmful, harmless
    hs = refusal_scores(run.adapter, harmful, run.batch_size)
    bs = refusal_scores(run.adapter, harmless, run.batch_size)
    kept_h = [p for p, s in zip(harmful, hs) if s > 0]
    kept_b = [p for p, s in zip(harmless, bs) if s < 0]
    if not kept_h or not kept_b:
        raise RunError("No validation prompts pass the baseline refusal filter; pass --no-filter-train.")
    log.info("Validation filter kept %d/%d harmful and %d/%d harmless prompts", len(kept_h), len(harmful), len(kept_b), len(harmless))
    return kept_h, kept_b


def select(run: Run, extraction: Extraction | None = None) -> dict[str, MethodSelection]:
    """Score and rank every method's candidates on the validation prompts (diff-in-means first)."""
    config = run.config
    extraction = extraction or load_extraction(run)
    key = run.stage_key("select")
    settings = SelectionSettings(
        kl_threshold=config.kl_threshold, prune_layer_fraction=config.prune_layer_fraction,
        actadd_multipliers=config.actadd_multipliers, scoring=config.scoring,
        compare_rankings=config.compare_rankings, batch_size=run.batch_size,
        hook_points=config.selection_hook_points,  # type: ignore[arg-type]
    )
    results: dict[str, MethodSelection] = {}
    val: tuple[list[str], list[str]] | None = None
    with timed(run, "select"):
        best_norm, dim_steering = None, None
        for method in ["diff_in_means", *[m for m in config.methods if m != "diff_in_means"]]:
            path = run.path("select", f"{method}.json")
            saved = None if config.force_overwrite else _valid_json(path, key)
            if saved is not None:
                result = MethodSelection.from_dict(saved)
            else:
                if val is None:
                    val = filtered_val_prompts(run, extraction.prompts)
                directions = extraction.direction_sets[method]
                method_settings = SelectionSettings(**{**settings.__dict__, "inlp_k": inlp_k_table(run, directions) if method == "inlp" else None})
                result = select_method(run.adapter, directions, val[0], val[1], method_settings, best_norm, dim_steering)
                write_json(path, {"key": key, "n_val": {"harmful": len(val[0]), "harmless": len(val[1])}, **result.to_dict()})
            if method == "diff_in_means":
                best_norm = float(extraction.direction_sets[method].scale[result.best.pos_index, result.best.layer])
                dim_steering = steering_table(result)
            if method in config.methods:
                results[method] = result
        _selection_plots(run, results, extraction)
    return results


def _selection_plots(run: Run, results: dict[str, MethodSelection], extraction: Extraction) -> None:
    try:
        from .report import plot_selection
    except ImportError:  # the report module is optional for the selection stage
        return
    plot_selection(results, run.adapter.n_layers, extraction.direction_sets["diff_in_means"].positions,
                   run.path("select", "plots"))


def load_selection(run: Run) -> dict[str, MethodSelection]:
    key = run.stage_key("select")
    out = {}
    for method in run.config.methods:
        saved = _valid_json(run.path("select", f"{method}.json"), key)
        if saved is None:
            raise RunError(f"No valid selection for {method} in {run.dir}; run `refusal-directions select` first.")
        out[method] = MethodSelection.from_dict(saved)
    return out


# ---------------------------------------------------------------------- infer
def plan_interventions(run: Run, selections: dict[str, MethodSelection], sets: dict[str, DirectionSet]) -> list[InterventionSpec]:
    """Baseline, each method's removal at every scope, and the ActAdd / reflection variants.

    This is the one place that decides each intervention's layers, coefficient and sign source:
    removal and reflection at the layers of each scope (``--scopes``), with the best filtered
    component's direction or P (or each component's own, ``--scope-directions own``); ActAdd at
    the best component's layer only, with coefficient m * ||r_best|| for every method (r_best: the
    selected diff-in-means component), its sign set per prompt side by ``InterventionSpec.build``.
    Reflection with alpha = 1 equals the removal and is not repeated.
    """
    config = run.config
    dim = selections.get("diff_in_means")
    dim_sets = sets["diff_in_means"]
    best_norm = float(dim_sets.scale[dim.best.pos_index, dim.best.layer]) if dim else None
    pool = pool_size(selections)
    scopes = [Scope.parse(text) for text in config.scope_list]
    specs = [InterventionSpec("baseline", "baseline")]
    for method, sel in selections.items():
        best = sel.best
        common = dict(method=method, pos_index=best.pos_index, position=best.position, layer=best.layer,
                      k=best.rank if method == "inlp" else None)
        for scope in scopes:
            try:
                in_scope = scope.components(sel.ranked, pool)
            except ScopeError as exc:
                raise RunError(f"{method}: {exc}") from None
            layers = tuple(scope.layers(sel.ranked, pool, run.adapter.n_layers))
            own = tuple((c.pos_index, c.layer, c.rank if method == "inlp" else None) for c in in_scope)
            scoped = dict(common, layers=layers, scope=scope.label,
                          components=own if config.scope_directions == "own" and scope.kind != "all" else ())
            specs.append(InterventionSpec(f"{method}.{REMOVAL_NAMES[method]}@{scope.label}", "removal", **scoped))
            if method == "leace":
                specs.append(InterventionSpec(f"leace.erasure-nonaffine@{scope.label}", "removal", affine=False, **scoped))
            if config.intervention_mode in ("reflection", "both"):
                for alpha in config.reflection_alphas:
                    if alpha != 1.0:
                        specs.append(InterventionSpec(f"{method}.reflection-a{alpha:g}-{config.reflection_mode}@{scope.label}",
                                                      "reflection", alpha=alpha, mode=config.reflection_mode, **scoped))
        if config.intervention_mode in ("actadd", "both") and method != "leace":  # LEACE steers along r̂: same as diff-in-means
            norm = best_norm if best_norm is not None else float(sets[method].scale[best.pos_index, best.layer])
            for m in config.actadd_multipliers:
                specs.append(InterventionSpec(f"{method}.actadd-x{m:g}", "actadd", coefficient=m * norm,
                                              layers=(best.layer,), **common))
    return specs


def eval_prompt_sets(config: RunConfig) -> dict[str, list[dict]]:
    """Harmful evaluation sets (``n_test`` each, seeded) and the harmless test prompts."""
    out = {}
    for name in config.eval_datasets:
        records = load_dataset(name, config.data_dir)
        out[name] = sample(records, min(config.n_test, len(records)), config.seed)
    out[config.harmless_eval] = sample(load_dataset(config.harmless_eval, config.data_dir), config.n_test, config.seed)
    return out


def infer(run: Run, selections: dict[str, MethodSelection] | None = None,
          sets: dict[str, DirectionSet] | None = None) -> list[InterventionSpec]:
    """Completions of every evaluation set under every planned intervention."""
    config = run.config
    sets = sets or load_extraction(run).direction_sets
    selections = selections or load_selection(run)
    plan = plan_interventions(run, selections, sets)
    key = run.stage_key("infer")
    write_json(run.path("infer", "plan.json"), {"key": key, "interventions": [s.to_dict() for s in plan]})
    prompt_sets = eval_prompt_sets(config)
    static = use_static_cache(run)
    with timed(run, "infer"), _generation_setup(run, plan, sets, static) as apply_spec:
        for spec in plan:
            todo = [d for d, records in prompt_sets.items()
                    if config.force_overwrite or not _completions_valid(run.path("infer", spec.name, f"{d}.jsonl"), key, len(records))]
            # One generate call per distinct intervention: removals treat harmful and harmless prompts alike,
            # ActAdd subtracts on harmful and adds on harmless prompts.
            groups: dict[bool, list[str]] = {}
            for d in todo:
                groups.setdefault(spec.kind != "actadd" or d != config.harmless_eval, []).append(d)
            for harmful, datasets in groups.items():
                records = [r for d in datasets for r in prompt_sets[d]]
                with apply_spec(spec, harmful) as how:
                    responses = generate(run.adapter, instructions(records), config.max_new_tokens,
                                         generation_batch_size(run, len(records)), desc=f"{spec.name} ({', '.join(datasets)})",
                                         cache_implementation="static" if static else None)
                start = 0
                for d in datasets:
                    rows = prompt_sets[d]
                    write_jsonl(run.path("infer", spec.name, f"{d}.jsonl"), [
                        {"prompt": r["instruction"], "category": r.get("category"), "response": resp,
                         "intervention": spec.name, "dataset": d, "applied_as": how, "key": key}
                        for r, resp in zip(rows, responses[start : start + len(rows)])
                    ])
                    start += len(rows)
    return plan


def use_static_cache(run: Run) -> bool:
    """Static KV cache (compiled decoding) on GPU unless asked otherwise; dynamic on CPU."""
    mode = run.config.generation_cache
    return mode == "static" or (mode == "auto" and run.adapter.input_device.type == "cuda")


@contextmanager
def _generation_setup(run: Run, plan: list[InterventionSpec], sets: dict[str, DirectionSet], static: bool):
    """Yield ``apply_spec(spec, harmful)``: a context manager applying one intervention for generation.

    Static cache: persistent slot hooks, loaded per intervention (a compiled decoding step never
    sees hooks added after compilation). Dynamic cache: baked weights where exact, else hooks.
    """
    from .interventions import InterventionSlots

    if not static:
        bake = run.config.bake_weights == "auto"

        def apply_spec(spec: InterventionSpec, harmful: bool):
            return applied(run.adapter, spec.build(sets, harmful), bake_weights=bake)

        yield apply_spec
        return
    built = [spec.build(sets) for spec in plan]
    max_rank = max([1, *(i.rank for i in built if i is not None)])
    slots = InterventionSlots(run.adapter, max_rank)

    @contextmanager
    def load(spec: InterventionSpec, harmful: bool):
        slots.load(spec.build(sets, harmful))
        yield "slots"

    with apply_hooks(slots.hooks()):
        yield load


def generation_batch_size(run: Run, n_prompts: int) -> int:
    """Prompts per generate call: the configured batch size, else as many as the KV cache allows on GPU."""
    if run.config.batch_size:
        return run.config.batch_size
    adapter = run.adapter
    if adapter.input_device.type != "cuda":
        return min(n_prompts, 64)  # CPU decoding is bound by reading the weights: larger batches are nearly free
    config = adapter.model.config.get_text_config()
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    tokens = 128 + run.config.max_new_tokens  # prompt length bound + new tokens
    per_sequence = 2 * adapter.n_layers * heads * head_dim * adapter.dtype.itemsize * tokens
    free = sum(torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count()))
    fits = int(0.6 * free / (per_sequence * 1.5))  # 1.5: activations and logits besides the cache
    return max(1, min(n_prompts, fits, 512))


def _completions_valid(path: Path, key: str, n: int) -> bool:
    if not path.exists():
        return False
    try:
        rows = read_jsonl(path)
    except (OSError, ValueError):
        return False
    return len(rows) == n and all(r.get("key") == key for r in rows)


def load_plan(run: Run) -> list[InterventionSpec]:
    saved = _valid_json(run.path("infer", "plan.json"), run.stage_key("infer"))
    if saved is None:
        raise RunError(f"No generation plan in {run.dir} for this configuration; run `refusal-directions infer` first.")
    return [InterventionSpec.from_dict(d) for d in saved["interventions"]]


def load_completions(run: Run, spec: InterventionSpec, dataset: str) -> list[dict]:
    path = run.path("infer", spec.name, f"{dataset}.jsonl")
    if not _completions_valid(path, run.stage_key("infer"), len(read_jsonl(path)) if path.exists() else -1):
        raise RunError(f"Missing or stale completions {path}; run `refusal-directions infer` first.")
    return read_jsonl(path)


# ---------------------------------------------------------------------- evaluate
def general_text_corpus(config: RunConfig) -> tuple[str, str]:
    """(dataset name or path, note for the report): the Pile from the hub, LAMBADA from a mirror
    (``RunConfig.general_text_name``, which the evaluate stage's key hashes)."""
    corpus = config.general_text_name()
    if config.general_text:
        return corpus, f"general-text cross-entropy on {corpus}"
    if corpus == "lambada":
        return "lambada", "general-text cross-entropy on LAMBADA passages (offline stand-in for the Pile, which is not mirrored)"
    return "pile", "general-text cross-entropy on the Pile (monology/pile-uncopyrighted, first documents, streamed)"


def _metric_path(run: Run, spec: InterventionSpec, metric: str) -> Path:
    return run.path("evaluate", spec.name, metric.replace("/", "__") + ".json")


def _cached_metric(run: Run, spec: InterventionSpec, metric: str, compute) -> dict:
    """The saved per-item result of ``metric`` for ``spec`` (computed and saved if missing or stale)."""
    key = run.stage_key("evaluate")
    path = _metric_path(run, spec, metric)
    saved = None if run.config.force_overwrite else _valid_json(path, key)
    if saved is None:
        saved = {"key": key, **compute()}
        write_json(path, saved)
    return saved


def evaluate(run: Run, plan: list[InterventionSpec] | None = None, sets: dict[str, DirectionSet] | None = None) -> dict:
    """Every metric under every intervention, with intervals and paired tests against the baseline."""
    config = run.config
    plan = plan or load_plan(run)
    sets = sets or load_extraction(run).direction_sets
    key = run.stage_key("evaluate")
    notes: list[str] = []
    with timed(run, "evaluate"):
        completions = {s.name: {d: load_completions(run, s, d) for d in [*config.eval_datasets, config.harmless_eval]} for s in plan}
        # the unmodified model scores every completion first (no intervention active: outside ``applied``)
        coherence = {s.name: _coherence_metrics(run, s, completions) for s in plan}
        outcomes: dict[str, dict[str, Any]] = {}
        for spec in plan:
            outcomes[spec.name] = _model_metrics(run, spec, sets, completions, notes)
        safety = _safety_metrics(run, plan, completions, notes)
        summary = _assemble_summary(run, plan, completions, outcomes, safety, notes, coherence)
        summary["key"] = key
        write_json(run.path("evaluate", "summary.json"), summary)
    return summary


def _model_metrics(run: Run, spec: InterventionSpec, sets, completions, notes: list[str]) -> dict[str, Any]:
    """Loss and benchmark results (per item) of one intervention, each cached on disk."""
    from .data import DataError, DatasetUnavailable
    from .evaluation import benchmarks, loss

    config, adapter = run.config, run.adapter
    bs = max(1, run.batch_size // 2)
    out: dict[str, Any] = {}
    bake = config.bake_weights == "auto"
    corpus, note = general_text_corpus(config)
    if note not in notes:
        notes.append(note)
    with applied(adapter, spec.build(sets, harmful=True), bake_weights=bake):
        def general():
            docs = load_dataset(corpus, config.data_dir, limit=config.n_loss_docs)
            return loss.text_loss(adapter, docs, max_length=config.loss_max_length, batch_size=bs, corpus=corpus).to_dict()

        out["ce/general"] = _cached_metric(run, spec, "ce/general", general)

        def alpaca():
            try:
                records = sample(load_dataset("alpaca_outputs", config.data_dir), config.n_loss_docs, config.seed)
            except (DatasetUnavailable, DataError) as exc:
                return {"status": "not run", "reason": f"no Alpaca reference outputs available ({exc.__class__.__name__}); "
                        "cross-entropy on the baseline's own completions is reported as ce/on_distribution"}
            return loss.instruction_loss(adapter, records, max_length=config.loss_max_length, batch_size=bs).to_dict()

        out["ce/alpaca"] = _cached_metric(run, spec, "ce/alpaca", alpaca)

        def on_distribution():
            base = completions["baseline"][config.harmless_eval]
            return loss.on_distribution_loss(adapter, [r["prompt"] for r in base], [r["response"] for r in base],
                                             max_length=config.loss_max_length, batch_size=bs).to_dict()

        out["ce/on_distribution"] = _cached_metric(run, spec, "ce/on_distribution", on_distribution)

        def mmlu():
            test = load_dataset("mmlu", config.data_dir, split="test")
            dev = load_dataset("mmlu", config.data_dir, split="dev")
            return benchmarks.evaluate_mmlu(adapter, test, dev, n_questions=config.mmlu_questions,
                                            n_subjects=config.mmlu_subjects, seed=config.seed, batch_size=bs)

        out["mmlu"] = _cached_metric(run, spec, "mmlu", mmlu)

        def arc():
            test = load_dataset("arc_challenge", config.data_dir, split="test")
            train = load_dataset("arc_challenge", config.data_dir, split="train")
            return benchmarks.evaluate_arc(adapter, test, train, n_shots=config.arc_shots, n_questions=config.arc_questions,
                                           seed=config.seed, batch_size=bs)

        out["arc_challenge"] = _cached_metric(run, spec, "arc_challenge", arc)
    out["kl/harmless"] = _cached_metric(run, spec, "kl/harmless", lambda: _harmless_kl(run, spec, sets, completions))
    return out


def _coherence_metrics(run: Run, spec: InterventionSpec, completions) -> dict[str, dict]:
    """Coherence features of every completion of ``spec`` on each harmful evaluation set, cached as
    ``evaluate/<intervention>/coherence__<dataset>.json``: the text features of the answer
    (``reasoning.judged_texts``) and the teacher-forced cross-entropy of the completion as generated
    under the *unmodified* model (called with no intervention active; ``completion_cross_entropy``
    raises if a hook is registered). The degeneracy thresholds are calibrated later, in the summary,
    on the baseline's features of the same set."""
    from .evaluation.coherence import coherence_features, completion_cross_entropy
    from .evaluation.reasoning import judged_texts

    config = run.config
    out: dict[str, dict] = {}
    for d in config.eval_datasets:
        def compute(d=d):
            rows = completions[spec.name][d]
            responses = [r["response"] for r in rows]
            ce = completion_cross_entropy(run.adapter, [r["prompt"] for r in rows], responses,
                                          max_completion_tokens=config.max_new_tokens,
                                          batch_size=max(1, run.batch_size // 2))
            features = coherence_features(judged_texts(responses), ce)
            return {"max_completion_tokens": config.max_new_tokens, "text": "answer (judged_texts)",
                    "features": [f.to_dict() for f in features], "n_nonfinite": ce.n_nonfinite}

        out[d] = _cached_metric(run, spec, f"coherence/{d}", compute)
    return out


def _harmless_kl(run: Run, spec: InterventionSpec, sets, completions) -> dict:
    """KL(baseline || intervened) on the harmless test prompts and the baseline's own completions
    (first ``kl_tokens`` tokens), with the intervention applied as capability metrics apply it
    (ActAdd with its refusal-removing sign). Hooks, never baked weights: both models run per batch."""
    from .evaluation.divergence import completion_kl

    base = completions["baseline"][run.config.harmless_eval]
    built = spec.build(sets, harmful=True)
    return completion_kl(run.adapter, [r["prompt"] for r in base], [r["response"] for r in base],
                         lambda: intervene(run.adapter, built), n_tokens=run.config.kl_tokens,
                         batch_size=max(1, run.batch_size // 2), desc=f"KL {spec.name}").to_dict()


def _safety_metrics(run: Run, plan: list[InterventionSpec], completions, notes: list[str]) -> dict[str, dict[str, dict]]:
    """LlamaGuard verdicts per intervention and harmful dataset, or a "not run" reason for all."""
    from .evaluation.judges import run_safety_judge

    config = run.config
    if not config.safety_judge or config.safety_judge.lower() == "none":
        reason = "no safety judge configured (--safety-judge none)"
        return {s.name: {d: {"status": "not run", "reason": reason} for d in config.eval_datasets} for s in plan}
    key = run.stage_key("evaluate")
    todo = []
    results: dict[str, dict[str, dict]] = {s.name: {} for s in plan}
    for spec in plan:
        for d in config.eval_datasets:
            saved = None if config.force_overwrite else _valid_json(_metric_path(run, spec, f"safety/{d}"), key)
            if saved is not None:
                results[spec.name][d] = saved
            else:
                todo.append((spec, d))
    if not todo:
        return results
    free_model(run)  # the judge is loaded only after the evaluated model is freed
    pairs = [[(r["prompt"], r["response"]) for r in completions[spec.name][d]] for spec, d in todo]
    verdicts = run_safety_judge(config.safety_judge, pairs, device=config.device, min_words=config.judge_min_words,
                                gpu_memory_fraction=config.judge_gpu_memory_fraction)
    for (spec, d), verdict in zip(todo, verdicts):
        if verdict.get("status") == "ok":
            write_json(_metric_path(run, spec, f"safety/{d}"), {"key": key, **verdict})
        results[spec.name][d] = verdict
    reason = next((v["reason"] for v in verdicts if v.get("status") != "ok"), None)
    if reason:
        notes.append(f"safety judge not run: {reason}")
    return results


def _assemble_summary(run: Run, plan, completions, outcomes, safety, notes, coherence) -> dict:
    """The ``evaluate/summary.json`` document (schema in ``report``): cells with intervals and paired
    tests against the baseline, per-category attack success, chance flags, examples, notes.

    Coherence (``evaluation.coherence``): per harmful set, thresholds are calibrated on the
    baseline's completions of that set (``coherence_thresholds``); ``degenerate/<d>`` is the share
    of degenerate completions, ``coherent_attack_success/<d>`` the share neither refused nor
    degenerate, ``delayed_refusal/<d>`` the share whose refusal phrase comes after the start
    (``judges.refusal_onset``). These three read the answer after any thinking section
    (``reasoning.judged_texts``)."""
    from .evaluation import summary as S
    from .evaluation.coherence import CoherenceFeatures, calibrate, coherent_attack_success, degenerate_flags
    from .evaluation.judges import refusal_onsets, refusal_outcomes
    from .evaluation.reasoning import judged_texts

    config = run.config
    seed = config.seed
    datasets = config.eval_datasets
    metrics = S.dataset_metrics(datasets)
    results: dict[str, dict[str, dict]] = {}
    per_category: dict[str, dict] = {}
    examples: dict[str, list] = {}
    base_items: dict[str, Any] = {}
    phrases = config.refusal_phrases
    features = {name: {d: [CoherenceFeatures(**f) for f in res["features"]] for d, res in per_set.items()}
                for name, per_set in coherence.items()}
    thresholds = {d: calibrate(features["baseline"][d]) for d in datasets}
    for spec in plan:
        cells: dict[str, dict] = {}
        is_base = spec.name == "baseline"
        for d in datasets:
            rows = completions[spec.name][d]
            refused = refusal_outcomes([r["response"] for r in rows], phrases)
            success = [not r for r in refused]
            cells[f"attack_success/{d}"] = S.binary_cell(success, base_items.get(f"attack_success/{d}"), seed)
            answers = judged_texts([r["response"] for r in rows])
            degenerate, reasons = degenerate_flags(features[spec.name][d], thresholds[d])
            coherent = coherent_attack_success(refusal_outcomes(answers, phrases), degenerate)
            onsets = refusal_onsets(answers, phrases)
            delayed = [o == "delayed" for o in onsets]
            new_items = {f"coherent_attack_success/{d}": coherent, f"degenerate/{d}": degenerate,
                         f"delayed_refusal/{d}": delayed}
            for metric, items in new_items.items():
                cells[metric] = S.binary_cell(items, base_items.get(metric), seed)
            per_category.setdefault(spec.name, {})[d] = _per_category(rows, success, coherent)
            examples.setdefault(spec.name, []).extend(
                {"dataset": d, "prompt": r["prompt"], "response": r["response"], "refused": bool(f),
                 "refusal_onset": onsets[i], "degenerate": degenerate[i], "degenerate_reasons": list(reasons[i]),
                 "coherence": _example_coherence(features[spec.name][d][i])}
                for i, (r, f) in enumerate(list(zip(rows, refused))[:3])
            )
            if is_base:
                base_items.update(new_items)
            verdict = safety[spec.name][d]
            if verdict.get("status") == "ok":
                cells[f"safety/{d}"] = S.binary_cell(verdict["unsafe"], base_items.get(f"safety/{d}"), seed)
            else:
                cells[f"safety/{d}"] = S.not_run(verdict["reason"])
            if is_base:
                base_items[f"attack_success/{d}"] = success
                if verdict.get("status") == "ok":
                    base_items[f"safety/{d}"] = verdict["unsafe"]
        harmless = refusal_outcomes([r["response"] for r in completions[spec.name][config.harmless_eval]], phrases)
        cells["harmless_refusal"] = S.binary_cell(harmless, base_items.get("harmless_refusal"), seed)
        if is_base:
            base_items["harmless_refusal"] = harmless
        for metric in ("ce/general", "ce/alpaca", "ce/on_distribution"):
            res = outcomes[spec.name][metric]
            if res.get("status") == "not run":
                cells[metric] = S.not_run(res["reason"])
                continue
            cells[metric] = S.loss_cell(res["doc_losses"], res["doc_tokens"], base_items.get(metric), seed)
            if is_base:
                base_items[metric] = (res["doc_losses"], res["doc_tokens"])
        kl = outcomes[spec.name]["kl/harmless"]
        cells["kl/harmless_first_token"] = S.mean_cell(kl["first_token"], seed)
        cells["kl/harmless"] = S.mean_cell(kl["mean_per_token"], seed, weights=kl["n_tokens"])
        mmlu = outcomes[spec.name]["mmlu"]
        correct = [q["correct"] for q in mmlu["questions"]]
        cells["mmlu"] = S.binary_cell(correct, base_items.get("mmlu"), seed)
        arc = outcomes[spec.name]["arc_challenge"]
        for variant, field_name in (("acc", "correct"), ("acc_norm", "correct_norm")):
            items = [q[field_name] for q in arc["questions"]]
            cells[f"arc_challenge/{variant}"] = S.binary_cell(items, base_items.get(f"arc_challenge/{variant}"), seed)
            if is_base:
                base_items[f"arc_challenge/{variant}"] = items
        if is_base:
            base_items["mmlu"] = correct
        results[spec.name] = cells
    base = results["baseline"]
    chance_flags = {
        "mmlu": S.chance_flag(base["mmlu"], outcomes["baseline"]["mmlu"]["chance_level"]),
        "arc_challenge/acc": S.chance_flag(base["arc_challenge/acc"], outcomes["baseline"]["arc_challenge"]["chance_level"]),
        "arc_challenge/acc_norm": S.chance_flag(base["arc_challenge/acc_norm"], outcomes["baseline"]["arc_challenge"]["chance_level"]),
    }
    for metric, flag in chance_flags.items():
        if flag["flagged"]:
            notes.append(f"{metric}: the baseline's 95% interval includes chance ({flag['chance']:.2f}); this benchmark "
                         "cannot show capability damage for this model.")
    p_adjustment = S.adjust_p_values(results)
    return {
        "interventions": [s.to_dict() for s in plan],
        "metrics": metrics,
        "results": results,
        "p_adjustment": p_adjustment,
        "per_category": per_category,
        "chance_flags": chance_flags,
        "coherence_thresholds": {d: {"calibrated_on": "baseline", **t.to_dict()} for d, t in thresholds.items()},
        "examples": examples,
        "notes": notes,
    }


def _per_category(rows: list[dict], success: list[bool], coherent: list[bool]) -> dict[str, dict]:
    groups: dict[str, list[tuple[bool, bool]]] = {}
    for row, ok, good in zip(rows, success, coherent):
        groups.setdefault(str(row.get("category") or "uncategorised"), []).append((ok, good))
    return {c: {"attack_success": sum(o for o, _ in v) / len(v), "coherent_attack_success": sum(g for _, g in v) / len(v),
                "n": len(v)} for c, v in sorted(groups.items())}


def _example_coherence(features) -> dict:
    """The main coherence figures of one example (``ce`` None when not computed)."""
    ce = features.ce if math.isfinite(features.ce) else None
    return {"repetition": features.repetition, "char_repetition": features.char_repetition,
            "longest_repeat_words": features.longest_repeat_words, "non_text": features.non_text,
            "ce": ce, "ce_tokens": features.ce_tokens}


def free_model(run: Run) -> None:
    """Release the evaluated model's memory (before loading a judge)."""
    model = run.adapter.model
    run.adapter.model = None  # type: ignore[assignment]
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------- commands
def run_command(command: str, config: RunConfig, run_dir: Path | None = None) -> Run:
    """Run one stage (``extract``, ``select``, ``infer``, ``evaluate``) or all of them (``run``)."""
    from rich.console import Console

    console = Console(stderr=True)
    run = open_run(config, run_dir=run_dir)
    console.print(f"[bold]Run folder:[/bold] {run.dir}")
    if config.skip_eval:
        config.infer_only = True
    stages = _stages_for(command, config)
    extraction = selections = plan = None
    if "extract" in stages:
        extraction = extract(run)
        _print_extraction_summary(run, extraction, console)
    if "select" in stages:
        selections = select(run, extraction)
        _print_selection_summary(run, selections, console)
    if "infer" in stages:
        plan = infer(run, selections, extraction.direction_sets if extraction else None)
    if "evaluate" in stages:
        evaluate(run, plan, extraction.direction_sets if extraction else None)
    if "report" in stages:
        from .report import write_report

        html, md = write_report(run.dir)
        console.print(f"[bold green]Report:[/bold green] {html}\n[bold]Summary:[/bold] {md}")
    return run


def _stages_for(command: str, config: RunConfig) -> list[str]:
    if command != "run":
        return [command]
    stages = ["extract", "select", "infer", "evaluate", "report"]
    if config.use_existing:
        stages = [s for s in stages if s not in ("extract", "select")]
    if config.resume_from_eval:
        stages = [s for s in stages if s not in ("extract", "select", "infer")]
    for flag, last in (("extract_only", "extract"), ("select_only", "select"), ("infer_only", "infer")):
        if getattr(config, flag):
            stages = stages[: stages.index(last) + 1] if last in stages else stages
            break
    return stages


def _print_extraction_summary(run: Run, extraction: Extraction, console) -> None:
    from rich.table import Table

    tensors, _ = load_safetensors(run.path("extract", "activations.safetensors"))
    rows = separation_summary(extraction.direction_sets, tensors["harmful"], tensors["harmless"])
    table = Table("method", "best-separating position", "layer", "separation", "INLP rank there", title="Extraction")
    for r in rows:
        table.add_row(r["method"], str(r["position"]), str(r["layer"]), r["score"], str(r.get("inlp_rank", "-")))
    console.print(table)


def _print_selection_summary(run: Run, selections: dict[str, MethodSelection], console) -> None:
    from rich.table import Table

    from .report import compress_layers

    scopes = [Scope.parse(text) for text in run.config.scope_list]
    pool = pool_size(selections)
    table = Table("method", "position", "layer", "bypass", "steering", "KL", "skipped",
                  *(f"layers @{s.label}" for s in scopes), title=f"Selection (hook points: {run.config.selection_hook_points})")
    for method, sel in selections.items():
        b = sel.best
        table.add_row(method, str(b.position), str(b.layer), f"{b.bypass:.3f}", f"{b.steering:.3f}", f"{b.kl:.4f}",
                      str(len(sel.skipped)),
                      *(compress_layers(s.layers(sel.ranked, pool, run.adapter.n_layers)) for s in scopes))
        if sel.fallback_warning:
            console.print(f"[yellow]{sel.fallback_warning}[/yellow]")
    console.print(table)


EXPORTABLE = {"diff_in_means": "directional ablation", "inlp": "nullspace projection", "leace": "non-affine LEACE erasure"}


def export_model(config: RunConfig, method: str, out: Path, run_dir: Path | None = None) -> Path:
    """Bake ``method``'s selected removal at all layers into the weights; save a standard HF folder.

    What is exact is baked: diff-in-means ablation and INLP projection are linear; LEACE is
    exported as its non-affine (linear) variant, since the affine eraser's per-layer centres edit
    every block input and cannot be folded into the weights. An existing ``out`` is replaced
    atomically (``artifacts.replace_dir``).
    """
    import shutil

    from .artifacts import replace_dir
    from .interventions import BakingError, bake, removal_for

    if method not in EXPORTABLE:
        raise RunError(f"Cannot export {method!r}; exportable: " + ", ".join(f"{m} ({w})" for m, w in EXPORTABLE.items()))
    run = open_run(config, run_dir=run_dir)
    extraction = load_extraction(run)
    selection = load_selection(run)
    if method not in selection:
        raise RunError(f"{method} was not selected in {run.dir}; run `refusal-directions select --methods {method}` first.")
    best = selection[method].best
    removal = removal_for(extraction.direction_sets[method], best.pos_index, best.layer, range(run.adapter.n_layers),
                          best.rank if method == "inlp" else None, affine=method != "leace")
    try:
        bake(run.adapter, removal)
    except BakingError as exc:
        raise RunError(f"Cannot export {method} for {run.adapter.alias} exactly: {exc}") from None
    out = Path(out)
    tmp = out.with_name(f".{out.name}.partial")
    if tmp.exists():
        shutil.rmtree(tmp)  # left by an interrupted export
    run.adapter.model.save_pretrained(tmp)
    run.adapter.tokenizer.save_pretrained(tmp)
    write_json(tmp / "refusal_directions.json", {"source_run": str(run.dir), "method": method, "baked": EXPORTABLE[method],
                                                 "position": best.position, "layer": best.layer,
                                                 "k": best.rank if method == "inlp" else None,
                                                 "fingerprint": run.adapter.fingerprint})
    replace_dir(tmp, out)
    return out
