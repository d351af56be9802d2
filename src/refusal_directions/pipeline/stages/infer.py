"""Stage 3, infer: completions of every evaluation set under every planned intervention.

Artifacts (keyed by the infer stage's key)::

    infer/plan.json                      the interventions (``plan.plan_interventions``)
    infer/<intervention>/<dataset>.jsonl one row per prompt: prompt, category, response, applied_as

Generation applies each intervention with the sign the plan gives per dataset
(``plan.generation_groups``). With a static KV cache (GPU by default) persistent slot hooks are
loaded per intervention; with a dynamic cache weights are baked where exact, else hooks are used.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Callable, ContextManager, Iterator

import torch

from ...artifacts import read_jsonl, write_json, write_jsonl
from ...config import RunConfig
from ...data import instructions, load_dataset, sample
from ...directions.base import DirectionSet
from ...generation import generate
from ...hooks import apply_hooks
from ...interventions import InterventionSpec, Replacement, applied
from ...selection import MethodSelection
from ..plan import build_for_capability, generation_groups, plan_interventions
from ..store import Run, RunError, timed, valid_json, valid_jsonl
from .extract import load_extraction
from .select import load_selection, use_shared_prefix

# apply(spec, sign) -> a context manager applying ``spec`` with ActAdd sign ``sign``; yields how ("baked", "hooks", "slots", "none")
ApplySpec = Callable[[InterventionSpec, float | None], ContextManager[str]]


def eval_prompt_sets(config: RunConfig) -> dict[str, list[dict]]:
    """Harmful evaluation sets (``n_test`` each, seeded) and the harmless test prompts."""
    out = {}
    for name in config.eval_datasets:
        records = load_dataset(name, config.data_dir)
        out[name] = sample(records, min(config.n_test, len(records)), config.seed)
    out[config.harmless_eval] = sample(load_dataset(config.harmless_eval, config.data_dir), config.n_test, config.seed)
    return out


def infer(run: Run, selections: dict[str, MethodSelection] | None = None,
          sets: dict[str, DirectionSet] | None = None, plan: list[InterventionSpec] | None = None) -> list[InterventionSpec]:
    """Completions of every evaluation set under every planned intervention; returns the plan.

    ``plan``: the interventions to generate under (default: ``plan.plan_interventions`` of the
    selections; an evaluate-model run passes its own, with ``sets`` holding what its specs build from).
    """
    config = run.config
    sets = load_extraction(run).direction_sets if sets is None else sets
    if plan is None:
        plan = plan_interventions(run, selections or load_selection(run), sets)
    key = run.stage_key("infer")
    write_json(run.path("infer", "plan.json"), {"key": key, "interventions": [s.to_dict() for s in plan]})
    prompt_sets = eval_prompt_sets(config)
    static = use_static_cache(run)
    with timed(run, "infer"), _generation_setup(run, plan, sets, static) as apply_spec:
        for spec in plan:
            todo = [d for d, records in prompt_sets.items()
                    if config.force_overwrite or not valid_jsonl(completions_path(run, spec, d), key, len(records))]
            for sign, datasets in generation_groups(spec, todo, config).items():
                _generate_group(run, spec, sign, datasets, prompt_sets, apply_spec, static, key)
    return plan


def _generate_group(run: Run, spec: InterventionSpec, sign: float | None, datasets: list[str],
                    prompt_sets: dict[str, list[dict]], apply_spec: ApplySpec, static: bool, key: str) -> None:
    """One generate call over the prompts of ``datasets`` under ``spec`` (ActAdd sign ``sign``);
    writes each dataset's completions."""
    records = [r for d in datasets for r in prompt_sets[d]]
    with apply_spec(spec, sign) as how:
        responses = generate(run.adapter, instructions(records), run.config.max_new_tokens,
                             generation_batch_size(run, len(records)), desc=f"{spec.name} ({', '.join(datasets)})",
                             cache_implementation="static" if static else None, shared_prefix=use_shared_prefix(run))
    start = 0
    for d in datasets:
        rows = prompt_sets[d]
        write_jsonl(completions_path(run, spec, d), [
            {"prompt": r["instruction"], "category": r.get("category"), "response": resp,
             "intervention": spec.name, "dataset": d, "applied_as": how, "key": key}
            for r, resp in zip(rows, responses[start : start + len(rows)])
        ])
        start += len(rows)


def use_static_cache(run: Run) -> bool:
    """Static KV cache (compiled decoding) on GPU unless asked otherwise; dynamic on CPU."""
    mode = run.config.generation_cache
    return mode == "static" or (mode == "auto" and run.adapter.input_device.type == "cuda")


@contextmanager
def _generation_setup(run: Run, plan: list[InterventionSpec], sets: dict[str, DirectionSet],
                      static: bool) -> Iterator[ApplySpec]:
    """Yield ``apply_spec(spec, sign)``: a context manager applying one intervention for generation.

    Static cache: persistent slot hooks, loaded per intervention (a compiled decoding step never
    sees hooks added after compilation). Dynamic cache: baked weights where exact, else hooks.
    """
    from ...interventions import InterventionSlots

    if not static:
        bake = run.config.bake_weights == "auto"

        def apply_spec(spec: InterventionSpec, sign: float | None) -> ContextManager[str]:
            return applied(run.adapter, spec.build(sets, sign), bake_weights=bake)

        yield apply_spec
        return
    built = [build_for_capability(spec, sets) for spec in plan]
    max_k = max([1, *(i.k for i in built if i is not None)])
    slots = InterventionSlots(run.adapter, max_k)

    @contextmanager
    def load(spec: InterventionSpec, sign: float | None) -> Iterator[str]:
        built = spec.build(sets, sign)
        if isinstance(built, Replacement):  # another model's weights, copied into the same tensors
            slots.load(None)
            with applied(run.adapter, built) as how:
                yield how
            return
        slots.load(built)
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


# ---------------------------------------------------------------------- reading the stage's artifacts
def completions_path(run: Run, spec: InterventionSpec, dataset: str) -> Path:
    """``infer/<intervention>/<dataset>.jsonl``."""
    return run.path("infer", spec.name, f"{dataset}.jsonl")


def load_plan(run: Run) -> list[InterventionSpec]:
    """The saved plan of this configuration; ``RunError`` if it is missing or stale."""
    saved = valid_json(run.path("infer", "plan.json"), run.stage_key("infer"))
    if saved is None:
        raise RunError(f"No generation plan in {run.dir} for this configuration; run `refusal-directions infer` first.")
    return [InterventionSpec.from_dict(d) for d in saved["interventions"]]


def load_completions(run: Run, spec: InterventionSpec, dataset: str) -> list[dict]:
    """The saved completions of ``spec`` on ``dataset``; ``RunError`` if missing or stale."""
    path = completions_path(run, spec, dataset)
    if not valid_jsonl(path, run.stage_key("infer"), len(read_jsonl(path)) if path.exists() else -1):
        raise RunError(f"Missing or stale completions {path}; run `refusal-directions infer` first.")
    return read_jsonl(path)
