"""Stage 1, extract: sample the train/val prompts, cache the train activations, fit every method.

Artifacts (all keyed by the extract stage's key)::

    extract/prompts.json               sampled train/val prompts, baseline refusal scores, filter
    extract/activations.safetensors    harmful / harmless residual streams [N, P, L, D]
    extract/directions_<method>.safetensors
    extract/geometry.json              diff-in-means vs INLP vs LEACE per (position, layer)

Also the extraction summary (``separation_summary``): each method's best-separating component.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from ...activations import cache_activations, default_positions
from ...artifacts import load_safetensors, save_safetensors, write_json
from ...config import RunConfig
from ...data import instructions, load_dataset, sample
from ...directions.base import DirectionSet
from ...directions.diff_in_means import fit_diff_in_means
from ...directions.geometry import geometry
from ..store import Run, RunError, timed, valid_json, valid_safetensors

log = logging.getLogger(__name__)

MIN_FILTERED_TRAIN = 4  # fewer train prompts of a side passing the baseline refusal filter: refuse to fit


@dataclass
class Extraction:
    """What the extract stage hands on: ``prompts`` (the ``prompts.json`` document), each method's
    ``direction_sets``, and ``separation`` (``separation_summary`` rows; empty when loaded from disk)."""

    prompts: dict
    direction_sets: dict[str, DirectionSet]
    separation: list[dict] = field(default_factory=list)


def fitted_methods(config: RunConfig) -> list[str]:
    """The methods to fit or score, diff-in-means first (the others' steering is scaled by its norm)."""
    return ["diff_in_means", *[m for m in config.methods if m != "diff_in_means"]]


# ---------------------------------------------------------------------- sampling
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


# ---------------------------------------------------------------------- the stage
def extract(run: Run) -> Extraction:
    """Activations of the train prompts, then every method's directions and the geometry."""
    key = run.stage_key("extract")
    acts_path = run.path("extract", "activations.safetensors")
    prompts_path = run.path("extract", "prompts.json")
    with timed(run, "extract"):
        prompts = valid_json(prompts_path, key)
        if prompts is None or not valid_safetensors(acts_path, key) or run.config.force_overwrite:
            prompts = _cache_train_activations(run, key, acts_path, prompts_path)
        tensors, _ = load_safetensors(acts_path)
        harmful, harmless = tensors["harmful"], tensors["harmless"]
        sets = {method: _directions(run, method, key, harmful, harmless, prompts["positions"])
                for method in fitted_methods(run.config)}
        write_json(run.path("extract", "geometry.json"),
                   {"key": key, **geometry(sets["diff_in_means"], sets.get("inlp"), sets.get("leace"))})
    return Extraction(prompts, sets, separation_summary(sets, harmful, harmless))


def _directions(run: Run, method: str, key: str, harmful: Tensor, harmless: Tensor, positions: list[int]) -> DirectionSet:
    """``method``'s saved directions if valid, else fitted on the cached activations and saved."""
    path = run.path("extract", f"directions_{method}.safetensors")
    if valid_safetensors(path, key) and not run.config.force_overwrite:
        return DirectionSet.load(path)
    log.info("Fitting %s on %d harmful and %d harmless prompts", method, len(harmful), len(harmless))
    directions = fit_method(method, harmful, harmless, positions, run.config, run.adapter.input_device)
    directions.save(path, {"key": key})
    return directions


def fit_method(method: str, harmful: Tensor, harmless: Tensor, positions: list[int], config: RunConfig,
               device: torch.device) -> DirectionSet:
    """Fit one method on activations ``[N, P, L, D]`` of each side."""
    if method == "diff_in_means":
        return fit_diff_in_means(harmful, harmless, positions)
    if method == "inlp":
        from ...directions.inlp import INLPConfig, fit_inlp

        inlp_config = INLPConfig(max_iter=config.inlp_max_iter, min_accuracy=config.inlp_min_accuracy, C=config.inlp_c,
                                 seed=config.seed, stop_mode=config.inlp_stop_mode)  # type: ignore[arg-type]
        return fit_inlp(harmful, harmless, inlp_config, positions, device=device)
    if method == "leace":
        from ...directions.leace import fit_leace

        return fit_leace(harmful, harmless, positions, device=device)
    raise RunError(f"Unknown method {method!r}")


def _cache_train_activations(run: Run, key: str, acts_path: Path, prompts_path: Path) -> dict:
    """Sample the prompts, cache the train activations (kept by the filter) and write ``prompts.json``."""
    config, adapter = run.config, run.adapter
    sampled = sample_prompts(config)
    positions = config.positions or default_positions(adapter)
    acts, scores = {}, {}
    for harm in ("harmful", "harmless"):
        acts[harm], scores[harm] = cache_activations(
            adapter, instructions(sampled[f"{harm}_train"]), positions, run.batch_size, desc=f"{harm} activations"
        )
    keep = _train_filter(scores) if config.filter_train else {h: torch.ones(len(s), dtype=torch.bool) for h, s in scores.items()}
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


def _train_filter(scores: dict[str, Tensor]) -> dict[str, Tensor]:
    """The baseline refusal filter: harmful prompts the model refuses (score > 0), harmless ones it
    does not (score < 0); a ``[N]`` bool mask per side. Refuses too few kept prompts."""
    keep = {"harmful": scores["harmful"] > 0, "harmless": scores["harmless"] < 0}
    for harm, mask in keep.items():
        if int(mask.sum()) < MIN_FILTERED_TRAIN:
            raise RunError(
                f"Only {int(mask.sum())} of {len(mask)} {harm} train prompts pass the baseline refusal filter "
                f"(the model {'rarely refuses' if harm == 'harmful' else 'refuses most'} of them); "
                "pass --no-filter-train or use more prompts."
            )
    log.info("Train filter kept %d/%d harmful and %d/%d harmless prompts", int(keep["harmful"].sum()),
             len(keep["harmful"]), int(keep["harmless"].sum()), len(keep["harmless"]))
    return keep


def separation_summary(sets: dict[str, DirectionSet], harmful: Tensor, harmless: Tensor) -> list[dict]:
    """For each method, the best-separating (position, layer), for the extraction summary.

    diff-in-means and LEACE: largest d' of the train projections ``[N, P, L]`` on the read-out
    direction (r̂, or LEACE's W); INLP: highest first-classifier dev accuracy. Each row:
    ``{"method", "position", "layer", "score" (text), "inlp_k"}`` (INLP's k there, if fitted).
    """
    rows = []
    for method, ds in sets.items():
        if method == "inlp":
            acc = ds.extras["accuracies"][..., 0]
            p, l = divmod(int(torch.nan_to_num(acc, -1.0).argmax()), ds.n_layers)
            rows.append({"method": method, "position": ds.positions[p], "layer": l,
                         "score": f"dev acc {float(acc[p, l]):.3f}", "inlp_k": int(ds.k[p, l])})
            continue
        readout = ds.direction if ds.right is None else ds.right[..., 0]
        readout = readout / readout.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        ph, pb = (harmful * readout).sum(-1), (harmless * readout).sum(-1)  # [N, P, L]
        pooled = ((ph.var(0) + pb.var(0)) / 2).sqrt().clamp_min(1e-12)
        d_prime = ((ph.mean(0) - pb.mean(0)) / pooled).abs()
        p, l = divmod(int(d_prime.argmax()), ds.n_layers)
        row = {"method": method, "position": ds.positions[p], "layer": l, "score": f"d' {float(d_prime[p, l]):.2f}"}
        if "inlp" in sets:
            row["inlp_k"] = int(sets["inlp"].k[p, l])
        rows.append(row)
    return rows


def load_extraction(run: Run) -> Extraction:
    """The saved extraction of this configuration; ``RunError`` if it is missing or stale."""
    key = run.stage_key("extract")
    prompts = valid_json(run.path("extract", "prompts.json"), key)
    sets = {}
    for method in fitted_methods(run.config):
        path = run.path("extract", f"directions_{method}.safetensors")
        if prompts is None or not valid_safetensors(path, key):
            raise RunError(f"No valid extraction in {run.dir} for this configuration; run `refusal-directions extract` first.")
        sets[method] = DirectionSet.load(path)
    return Extraction(prompts, sets)

