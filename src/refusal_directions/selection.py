"""Scoring, filtering and ranking of candidate components (DESIGN.md §7, reference semantics).

Metrics on the validation prompts, at the last prompt position:

* refusal score: log(p_ref + eps) - log(1 - p_ref + eps), p_ref = total probability of the
  refusal tokens;
* bypass score: mean refusal score on harmful prompts under the method's removal intervention
  at the candidate's layer only ("local", default) or at all layers ("global");
* steering score: mean refusal score on harmless prompts with ActAdd of the candidate's
  direction at its layer, max over the multiplier sweep; the coefficient is m * ||r|| (the
  diff-in-means norm at that component for diff-in-means, the norm of the best diff-in-means
  component for the other methods, for fairness);
* KL: mean KL(baseline || intervened) of the next-token distribution on harmless prompts
  under the removal.

Local scoring reuses the baseline computation of the layers before the candidate's layer: one
baseline forward per prompt batch records the residual stream entering every layer and the
keyword arguments each layer was called with; every candidate at layer l then runs only
layers l..L-1 (with the intervention's hooks), the final norm and the unembedding of the last
position.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Callable, Literal, Sequence

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from .activations import refusal_score
from .directions.base import DirectionSet
from .interventions import Intervention, actadd_for, intervene, removal_for
from .models import ModelAdapter
from .shared_prefix import (CHECK_ERRORS, SharedPrefixError, SplitBatch, cache_keyword, check_close, new_cache,
                            shareable_split)

log = logging.getLogger(__name__)


HookPointMode = Literal["full", "reference"]


class SelectionError(RuntimeError):
    """Selection cannot produce a trustworthy choice; the message says why and what to do."""


@dataclass
class SelectionSettings:
    """How candidates are scored and filtered.

    ``shared_prefix``: local scoring runs the prompts' common prefix (the chat template's opening)
    once per batch and shares its KV cache (``shared_prefix`` module; verified on the first batch,
    full sequences otherwise).
    ``hook_points``: where a candidate's removal is applied while scoring its bypass and KL.
    "full": every method at the block input and the write points (attention and MLP outputs)
    of the layers it is applied at, as in the evaluated interventions. "reference": as the
    reference tool, diff-in-means at those three points, INLP and LEACE at the block input only.
    """

    kl_threshold: float = 0.1
    prune_layer_fraction: float = 0.2
    actadd_multipliers: Sequence[float] = (0.5, 1.0, 2.0)
    scoring: str = "local"  # or "global"
    compare_rankings: bool = False
    batch_size: int = 32
    inlp_k: dict | None = None  # (pos index, layer) -> k, from the INLP k-policy
    hook_points: HookPointMode = "full"
    shared_prefix: bool = False  # local scoring computes the prompts' common prefix once per batch

    def hooks_writes(self, method: str) -> bool:
        """Whether ``method``'s removal also edits the write points while scoring."""
        return self.hook_points == "full" or method == "diff_in_means"


@dataclass
class Candidate:
    """Scores of one component of one method."""

    pos_index: int
    position: int
    layer: int
    bypass: float = math.nan
    kl: float = math.nan
    steering: float = math.nan
    steering_by_multiplier: dict[str, float] = field(default_factory=dict)
    global_bypass: float | None = None
    accuracy: float | None = None  # INLP first-classifier dev accuracy
    k: int = 1  # directions the component's eraser removes (INLP's k; 1 for the others)
    filtered_out: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        """The JSON of ``select/<method>.json``; ``k`` is saved as ``"rank"`` (the artifact format)."""
        out = dict(self.__dict__)
        out["rank"] = out.pop("k")
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "Candidate":
        """Reads ``to_dict``'s JSON (``"rank"``) and dicts that say ``"k"``."""
        d = dict(d)
        if "rank" in d:
            d["k"] = d.pop("rank")
        return cls(**d)


# ---------------------------------------------------------------------- forward helpers
@dataclass
class _PrefixStates:
    """The shared prompt prefix of a batch (``shared_prefix``): its inputs and kwargs of every layer
    (batch 1) and the KV-cache object the recorded kwargs of prefix and suffixes refer to."""

    layer_inputs: list[Tensor]
    layer_kwargs: list[dict]
    recorded_cache: object
    batch_size: int


@dataclass
class _BatchCache:
    """The baseline computation of one prompt batch: inputs and kwargs of every layer.

    With a shared prefix (``prefix`` set) the inputs are the suffixes' [B, S, d] and their kwargs
    attend to the prefix through the recorded KV cache, which each candidate replaces by its own.
    """

    layer_inputs: list[Tensor]
    layer_kwargs: list[dict]
    last_logits: Tensor  # [B, V] float32
    prefix: _PrefixStates | None = None


def _recorded_layers(adapter: ModelAdapter, forward: Callable[[], Tensor]) -> tuple[list[Tensor], list[dict], Tensor]:
    """Run ``forward()`` recording the input and keyword arguments of every decoder layer."""
    inputs: list[Tensor | None] = [None] * adapter.n_layers
    kwargs: list[dict | None] = [None] * adapter.n_layers
    handles = []

    def recorder(i: int):
        def record(module, args, kw):
            inputs[i] = args[0] if args else kw["hidden_states"]
            kwargs[i] = {k: v for k, v in kw.items() if k != "hidden_states"}

        return record

    try:
        for i, layer in enumerate(adapter.layers):
            handles.append(layer.register_forward_pre_hook(recorder(i), with_kwargs=True))
        result = forward()
    finally:
        for h in handles:
            h.remove()
    return inputs, kwargs, result  # type: ignore[return-value]


@torch.inference_mode()
def _baseline_pass(adapter: ModelAdapter, enc: dict[str, Tensor]) -> _BatchCache:
    inputs, kwargs, logits = _recorded_layers(adapter, lambda: adapter.last_logits(enc))
    return _BatchCache(inputs, kwargs, logits)


@torch.inference_mode()
def _split_baseline_pass(adapter: ModelAdapter, split: SplitBatch) -> _BatchCache:
    """The baseline pass of a batch whose prompts share a prefix: the prefix once, then the suffixes."""
    model, keyword = adapter.model, cache_keyword(adapter.model)
    cache = new_cache(model)
    p_inputs, p_kwargs, _ = _recorded_layers(
        adapter, lambda: model(input_ids=split.prefix, use_cache=True, logits_to_keep=1, **{keyword: cache}).logits)
    cache.batch_repeat_interleave(split.batch_size)
    s_inputs, s_kwargs, logits = _recorded_layers(
        adapter, lambda: model(**split.suffix_inputs(), use_cache=True, logits_to_keep=1,
                               **{keyword: cache}).logits[:, -1].float())
    return _BatchCache(s_inputs, s_kwargs, logits, _PrefixStates(p_inputs, p_kwargs, cache, split.batch_size))


def _run_layers(adapter: ModelAdapter, hidden: Tensor, kwargs: list[dict], first: int) -> Tensor:
    """Layers ``first``..L-1 on ``hidden`` with their recorded kwargs (hooks installed by the caller fire)."""
    for j in range(first, adapter.n_layers):
        out = adapter.layers[j](hidden, **kwargs[j])
        hidden = out[0] if isinstance(out, tuple) else out
    return hidden


@torch.inference_mode()
def _logits_from_layer(adapter: ModelAdapter, cache: _BatchCache, layer: int) -> Tensor:
    """Last-position logits [B, V] after running layers ``layer``..L-1 from the cached input.

    With a shared prefix, the prefix runs first (batch 1) into a fresh KV cache, so that the
    active hooks act on its positions too; the suffixes then attend to it.
    """
    kwargs = cache.layer_kwargs
    prefix = cache.prefix
    if prefix is not None:
        fresh = new_cache(adapter.model)

        def swap(kw: dict) -> dict:
            return {k: (fresh if v is prefix.recorded_cache else v) for k, v in kw.items()}

        _run_layers(adapter, prefix.layer_inputs[layer], [swap(kw) if kw else kw for kw in prefix.layer_kwargs], layer)
        fresh.batch_repeat_interleave(prefix.batch_size)
        kwargs = [swap(kw) if kw else kw for kw in kwargs]
    hidden = _run_layers(adapter, cache.layer_inputs[layer], kwargs, layer)
    return adapter.logits_from_hidden(hidden[:, -1]).float()


class _PrefixSharing:
    """Whether local scoring uses the shared prompt prefix; checked against full sequences on the first batch.

    The check compares the baseline's last-position log-probabilities and those of a run from the
    middle layer with the full-sequence forward (``shared_prefix.check_close``); any difference or
    error turns sharing off for the rest of the call, with a warning.
    """

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.verified = False

    def baseline(self, adapter: ModelAdapter, prompts: Sequence[str], enc: dict[str, Tensor]) -> _BatchCache:
        """The baseline pass of ``prompts`` (encoded as ``enc``), with the prefix shared when possible."""
        if not self.enabled:
            return _baseline_pass(adapter, enc)
        sequences = [adapter.tokenizer(p, add_special_tokens=False)["input_ids"] for p in adapter.format_prompts(prompts)]
        split = shareable_split(sequences, adapter.model, adapter.pad_id, adapter.input_device)
        if split is None:
            return _baseline_pass(adapter, enc)
        if self.verified:
            return _split_baseline_pass(adapter, split)
        full = _baseline_pass(adapter, enc)
        try:
            shared = _split_baseline_pass(adapter, split)
            check_close(shared.last_logits, full.last_logits, adapter.dtype, "baseline")
            middle = adapter.n_layers // 2
            check_close(_logits_from_layer(adapter, shared, middle), full.last_logits, adapter.dtype, f"layers {middle}..")
        except (SharedPrefixError, *CHECK_ERRORS) as exc:
            log.warning("Shared prompt prefix not used in selection (%s: %s); scoring full sequences.",
                        type(exc).__name__, exc)
            self.enabled = False
            return full
        self.verified = True
        return shared


def kl_divergence(base_logits: Tensor, new_logits: Tensor) -> Tensor:
    """KL(base || new) per row of [B, V] logits, in float32."""
    base = torch.log_softmax(base_logits.float(), -1)
    new = torch.log_softmax(new_logits.to(base.device, torch.float32), -1)  # sharded models: heads may differ
    return (base.exp() * (base - new)).sum(-1)


@torch.inference_mode()
def refusal_scores(adapter: ModelAdapter, instructions: Sequence[str], batch_size: int = 32,
                   intervention: Intervention | None = None) -> Tensor:
    """Refusal score of each prompt [N] (float32, CPU), optionally under an intervention."""
    out = []
    with intervene(adapter, intervention):
        for start in range(0, len(instructions), batch_size):
            enc = adapter.encode_instructions(instructions[start : start + batch_size])
            out.append(refusal_score(adapter.last_logits(enc), adapter.refusal_token_ids).cpu())
    return torch.cat(out)


def candidate_issue(directions: DirectionSet, p: int, l: int, k: int | None) -> str | None:
    """Why component (p, l) cannot be a candidate, or None.

    ``k == 0``: the INLP k-policy keeps no direction there (the reference skips it); a zero-norm or
    non-finite direction or eraser (e.g. layer 0 at a chat-template token, where every prompt has
    the same activation and r = 0) would make its removal the identity or NaN.
    """
    if k == 0 or int(directions.k[p, l]) == 0:
        return "k=0" if k == 0 else "rank 0 (no classifier kept)"
    direction = directions.direction[p, l]
    if not bool(torch.isfinite(direction).all()) or not bool(torch.isfinite(directions.scale[p, l])):
        return "non-finite direction"
    largest = float(directions.scale.nan_to_num(0.0).max())
    if float(direction.norm()) < 0.5 or float(directions.scale[p, l]) <= 1e-6 * largest:
        return "zero-norm direction"
    eraser = directions.eraser(p, l, k)
    tensors = [eraser.left, eraser.right] + ([eraser.bias] if eraser.bias is not None else [])
    if not all(bool(torch.isfinite(t).all()) for t in tensors):
        return "non-finite eraser"
    return None


def score_candidates(
    adapter: ModelAdapter,
    directions: DirectionSet,
    harmful_val: Sequence[str],
    harmless_val: Sequence[str],
    settings: SelectionSettings,
    steering_norm: Callable[[int, int], float],
    reuse_steering: dict[tuple[int, int], tuple[float, dict]] | None = None,
    skipped: list[dict] | None = None,
) -> list[Candidate]:
    """Bypass, KL and steering scores for every usable (position, layer) of ``directions``.

    ``steering_norm(p, l)``: the ActAdd scale ||r|| for that component. ``reuse_steering``: steering
    scores already computed for the same directions (LEACE steers along r̂, like diff-in-means).
    Components with a ``candidate_issue`` are not scored: they are listed in ``skipped``
    (dicts with position, layer and reason) when a list is given.
    """
    cands = usable_candidates(directions, settings.inlp_k or {}, skipped)
    L = directions.n_layers
    writes = settings.hooks_writes(directions.method)
    sums: dict[tuple[int, int], dict[str, float]] = {key: {} for key in cands}

    def add(key, metric, value: Tensor):
        sums[key][metric] = sums[key].get(metric, 0.0) + float(value.double().sum())

    local = settings.scoring == "local"
    sharing = _PrefixSharing(settings.shared_prefix)
    total = len(cands) * (len(harmful_val) + len(harmless_val))
    with tqdm(total=total, desc=f"select {directions.method}", unit="cand·prompt", leave=False) as bar:
        for harmful, prompts in ((True, harmful_val), (False, harmless_val)):
            for start in range(0, len(prompts), settings.batch_size):
                batch = prompts[start : start + settings.batch_size]
                enc = adapter.encode_instructions(batch)
                cache = sharing.baseline(adapter, batch, enc) if local else _baseline_pass(adapter, enc)
                for (p, l), cand in cands.items():
                    removal = removal_for(directions, p, l, [l] if local else range(L), cand.k, writes=writes)
                    with intervene(adapter, removal):
                        logits = _logits_from_layer(adapter, cache, l) if local else adapter.last_logits(enc)
                    if harmful:
                        add((p, l), "bypass", refusal_score(logits, adapter.refusal_token_ids))
                    else:
                        add((p, l), "kl", kl_divergence(cache.last_logits, logits))
                        if reuse_steering is None:
                            for m in settings.actadd_multipliers:
                                steer = actadd_for(directions, p, l, m * steering_norm(p, l))
                                with intervene(adapter, steer):
                                    logits = _logits_from_layer(adapter, cache, l)
                                add((p, l), f"steer{m}", refusal_score(logits, adapter.refusal_token_ids))
                    bar.update(len(batch))
                del cache
    for key, cand in cands.items():
        cand.bypass = sums[key]["bypass"] / len(harmful_val)
        cand.kl = sums[key]["kl"] / len(harmless_val)
        if reuse_steering is not None:
            cand.steering, cand.steering_by_multiplier = reuse_steering[key]
        else:
            cand.steering_by_multiplier = {str(m): sums[key][f"steer{m}"] / len(harmless_val) for m in settings.actadd_multipliers}
            cand.steering = max(cand.steering_by_multiplier.values())
    if "accuracies" in directions.extras:
        for (p, l), cand in cands.items():
            cand.accuracy = float(directions.extras["accuracies"][p, l, 0])
    return list(cands.values())


def usable_candidates(directions: DirectionSet, k_of: dict[tuple[int, int], int],
                      skipped: list[dict] | None = None) -> dict[tuple[int, int], Candidate]:
    """An unscored ``Candidate`` for every (p, l) without a ``candidate_issue``, keyed by (p, l)."""
    cands = {}
    for p in range(directions.n_positions):
        for l in range(directions.n_layers):
            k = int(k_of.get((p, l), directions.k[p, l]))
            issue = candidate_issue(directions, p, l, k)
            if issue is None:
                cands[(p, l)] = Candidate(p, directions.positions[p], l, k=k)
            elif skipped is not None:
                skipped.append({"pos_index": p, "position": directions.positions[p], "layer": l, "reason": issue})
    if not cands:
        raise SelectionError(f"{directions.method}: no usable component (every one has a zero-norm or non-finite "
                             "direction, or k = 0 under the INLP k-policy); nothing can be selected.")
    return cands


def global_bypass_scores(adapter: ModelAdapter, directions: DirectionSet, candidates: list[Candidate],
                         harmful_val: Sequence[str], batch_size: int, writes: bool = True) -> None:
    """Fill ``global_bypass`` (removal at all layers) for ``--compare-rankings``."""
    for cand in tqdm(candidates, desc=f"global {directions.method}", leave=False):
        removal = removal_for(directions, cand.pos_index, cand.layer, range(adapter.n_layers), cand.k, writes=writes)
        cand.global_bypass = float(refusal_scores(adapter, harmful_val, batch_size, removal).mean())


# ---------------------------------------------------------------------- filter and rank
def first_pruned_layer(n_layers: int, prune_layer_fraction: float) -> int:
    """The first layer the late-layer filter discards (the reference's ``int(L * (1 - f))``)."""
    return int(n_layers * (1 - prune_layer_fraction))


def apply_filters(candidates: list[Candidate], n_layers: int, kl_threshold: float, prune_layer_fraction: float) -> None:
    """Mark candidates the reference discards: KL > threshold, steering < 0, late layers, NaN.

    Late layers: ``layer >= int(n_layers * (1 - prune_layer_fraction))``, the reference's
    arithmetic (24 layers: 19 and up; 28: 22; 32: 25).
    """
    first_pruned = first_pruned_layer(n_layers, prune_layer_fraction)
    for cand in candidates:
        reasons = []
        if any(math.isnan(v) for v in (cand.bypass, cand.kl, cand.steering)):
            reasons.append("nan")
        if cand.kl > kl_threshold:
            reasons.append(f"kl>{kl_threshold}")
        if cand.steering < 0:
            reasons.append("steering<0")
        if cand.layer >= first_pruned:
            reasons.append(f"layer>={first_pruned}")
        cand.filtered_out = reasons


def rank_candidates(method: str, candidates: list[Candidate]) -> list[Candidate]:
    """diff-in-means and LEACE: lowest bypass first; INLP: highest first-classifier accuracy, then bypass."""
    def bypass_key(c: Candidate) -> float:
        return math.inf if math.isnan(c.bypass) else c.bypass

    if method == "inlp":
        return sorted(candidates, key=lambda c: (-(c.accuracy or 0.0), bypass_key(c)))
    return sorted(candidates, key=bypass_key)


@dataclass
class MethodSelection:
    """The outcome of selection for one method: the ranking and its best filtered component.

    ``skipped``: components that were not candidates (dicts: pos_index, position, layer, reason).
    ``hook_points``: the selection hook-point mode the scores were computed with.
    """

    method: str
    ranked: list[Candidate]
    best: Candidate
    fallback_warning: str | None
    skipped: list[dict] = field(default_factory=list)
    spearman: float | None = None
    hook_points: str = "full"

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "best": self.best.to_dict(),
            "fallback_warning": self.fallback_warning,
            "skipped": self.skipped,
            "hook_points": self.hook_points,
            "spearman_local_global": self.spearman,
            "ranked": [c.to_dict() for c in self.ranked],
        }

    @classmethod
    def from_dict(cls, d: dict) -> "MethodSelection":
        ranked = [Candidate.from_dict(c) for c in d["ranked"]]
        best = next(c for c in ranked if (c.pos_index, c.layer) == (d["best"]["pos_index"], d["best"]["layer"]))
        return cls(d["method"], ranked, best, d["fallback_warning"], d.get("skipped", []),
                   d.get("spearman_local_global"), d.get("hook_points", "full"))


def choose(method: str, ranked: list[Candidate]) -> MethodSelection:
    """The best filtered component of ``ranked`` (fallback: the best unfiltered, with a warning).

    Raises ``SelectionError`` when there is no candidate or every candidate's scores are NaN.
    """
    if not ranked:
        raise SelectionError(f"{method}: no candidate components to choose from.")
    if all(any(math.isnan(v) for v in (c.bypass, c.kl, c.steering)) for c in ranked):
        raise SelectionError(f"{method}: every candidate has a NaN score (a non-finite model output or "
                             "direction); check the model's dtype (try --dtype float32) and the directions.")
    passing = [c for c in ranked if not c.filtered_out]
    warning = None
    if passing:
        best = passing[0]
    else:
        best = next(c for c in ranked if not any(math.isnan(v) for v in (c.bypass, c.kl, c.steering)))
        reasons = sorted({r for c in ranked for r in c.filtered_out})
        warning = (
            f"{method}: no candidate passed the filters ({', '.join(reasons)}); using the best unfiltered "
            f"candidate (position {best.position}, layer {best.layer})."
        )
        log.warning(warning)
    return MethodSelection(method, ranked, best, warning)


# ---------------------------------------------------------------------- scopes
def pool_size(selections: dict[str, MethodSelection]) -> int:
    """The shared pool of the top-fraction scope: the shortest ranked list over the methods."""
    if not selections:
        raise SelectionError("No method was selected; nothing to scope.")
    return min(len(s.ranked) for s in selections.values())


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation (average ranks for ties)."""
    def ranks(x):
        x = np.asarray(x, dtype=float)
        order = np.argsort(x, kind="mergesort")
        r = np.empty(len(x))
        r[order] = np.arange(len(x), dtype=float)
        for value in np.unique(x):
            tie = x == value
            r[tie] = r[tie].mean()
        return r

    ra, rb = ranks(a), ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return math.nan
    return float(np.corrcoef(ra, rb)[0, 1])


def select_method(
    adapter: ModelAdapter,
    directions: DirectionSet,
    harmful_val: Sequence[str],
    harmless_val: Sequence[str],
    settings: SelectionSettings,
    best_dim_norm: float | None = None,
    dim_steering: dict[tuple[int, int], tuple[float, dict]] | None = None,
) -> MethodSelection:
    """Score, filter, rank and choose the best component of one method.

    ``best_dim_norm``: ||r|| of the selected diff-in-means component, the ActAdd scale of the other
    methods (None: each component's own diff-in-means norm). ``dim_steering``: diff-in-means
    steering scores, reused for LEACE, which steers along the same r̂.
    """
    method = directions.method
    if method == "diff_in_means" or best_dim_norm is None:
        norm_fn = lambda p, l: float(directions.scale[p, l])  # noqa: E731
    else:
        norm_fn = lambda p, l: best_dim_norm  # noqa: E731
    reuse = dim_steering if method == "leace" else None
    skipped: list[dict] = []
    cands = score_candidates(adapter, directions, harmful_val, harmless_val, settings, norm_fn, reuse, skipped)
    if skipped:
        log.warning("%s: %d components skipped (%s)", method, len(skipped),
                    ", ".join(sorted({s["reason"] for s in skipped})))
    apply_filters(cands, adapter.n_layers, settings.kl_threshold, settings.prune_layer_fraction)
    result = choose(method, rank_candidates(method, cands))
    result.skipped, result.hook_points = skipped, settings.hook_points
    if settings.compare_rankings:
        global_bypass_scores(adapter, directions, cands, harmful_val, settings.batch_size, settings.hooks_writes(method))
        result.spearman = spearman([c.bypass for c in cands], [c.global_bypass for c in cands])
    return result


def steering_table(selection: MethodSelection) -> dict[tuple[int, int], tuple[float, dict]]:
    """(pos index, layer) -> (steering score, per multiplier), for reuse by LEACE."""
    return {(c.pos_index, c.layer): (c.steering, c.steering_by_multiplier) for c in selection.ranked}

