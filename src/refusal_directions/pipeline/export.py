"""Export: a method's selected removal as a standard Hugging Face folder (baked weights) or as a
PEFT LoRA adapter, with a model card, optionally pushed to the Hub.

What is exact is exported: diff-in-means ablation and INLP projection are linear; LEACE is exported
as its non-affine (linear) variant, since the affine eraser's per-layer centres edit every block
input and cannot be folded into the weights.

An export runs three steps, each its own function, so that another kind of export (say a LoRA
adapter instead of edited weights) or another file (say a model card) is one more function:

1. ``load_export_source``: the run, the method's directions and its selected component;
2. full weights: ``bake_removal`` folds the all-layer removal into the loaded model's weights, or
   refuses; a LoRA adapter (``lora.py``) needs no baking: its rank-k factors are the same edits;
3. ``write_export``: run each ``ExportWriter`` (``save_model`` + ``save_metadata``, or
   ``save_lora``; then ``save_card``) into a temporary folder beside ``out``, then replace ``out``
   atomically (``artifacts.replace_dir``);
4. optionally ``model_card.push_to_hub``.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..artifacts import replace_dir, write_json
from ..config import RunConfig
from ..directions.base import DirectionSet
from ..interventions import BakingError, Removal, bake, removal_for
from ..lora import LoraExportError, save_lora_adapter
from ..model_card import HubUploadError, push_to_hub, write_model_card
from ..selection import Candidate
from .stages.extract import load_extraction
from .stages.select import load_selection
from .store import Run, RunError, open_run

log = logging.getLogger(__name__)

# method -> what its export bakes
EXPORTABLE = {"diff_in_means": "directional ablation", "inlp": "nullspace projection", "leace": "non-affine LEACE erasure"}
METADATA_FILE = "refusal_directions.json"


@dataclass(frozen=True)
class ExportSource:
    """What is exported: ``method``'s ``directions`` in ``run`` and its selected ``component``."""

    run: Run
    method: str
    directions: DirectionSet
    component: Candidate

    @property
    def k(self) -> int | None:
        """INLP's number of directions in P at the component (None for the other methods)."""
        return self.component.k if self.method == "inlp" else None

    def removal(self) -> Removal:
        """The component's removal at every layer (LEACE: the linear, non-affine eraser)."""
        c = self.component
        return removal_for(self.directions, c.pos_index, c.layer, range(self.run.adapter.n_layers), self.k,
                           affine=self.method != "leace")


@dataclass(frozen=True)
class ExportOptions:
    """How to export: ``lora`` (a PEFT adapter in ``lora_dtype``, "float32" or "model") instead of
    full weights; ``base_model``: the Hub id the card and the adapter name as base (default: derived
    from the run's model); ``push_to``: a Hub repository to upload the folder to, ``private`` or not."""

    lora: bool = False
    lora_dtype: str = "float32"
    base_model: str | None = None
    push_to: str | None = None
    private: bool = True


# writes some of the export's files into the (temporary) export folder
ExportWriter = Callable[[Path, ExportSource], None]


def export_model(config: RunConfig, method: str, out: Path, run_dir: Path | None = None,
                 options: ExportOptions = ExportOptions()) -> Path:
    """Export ``method``'s selected all-layer removal to ``out`` (an existing folder is replaced
    atomically): baked weights or a LoRA adapter, with ``README.md`` (the model card) and
    ``refusal_directions.json``; then upload it where ``options.push_to`` says. Returns ``out``."""
    if method not in EXPORTABLE:
        raise RunError(f"Cannot export {method!r}; exportable: " + ", ".join(f"{m} ({w})" for m, w in EXPORTABLE.items()))
    source = load_export_source(config, method, run_dir)
    if options.lora:
        writers = [lora_writer(options)]
    else:
        bake_removal(source)
        writers = [save_model, save_metadata]
    out = write_export(Path(out), source, [*writers, card_writer(options)])
    if options.push_to:
        try:
            url = push_to_hub(out, options.push_to, private=options.private)
        except HubUploadError as exc:
            raise RunError(f"Exported to {out}, but the upload failed: {exc}") from None
        log.info("Uploaded %s to %s", out, url)
    return out


def load_export_source(config: RunConfig, method: str, run_dir: Path | None = None) -> ExportSource:
    """Open the run (loading the model) and find ``method``'s directions and selected component."""
    run = open_run(config, run_dir=run_dir)
    extraction = load_extraction(run)
    selection = load_selection(run)
    if method not in selection:
        raise RunError(f"{method} was not selected in {run.dir}; run `refusal-directions select --methods {method}` first.")
    return ExportSource(run, method, extraction.direction_sets[method], selection[method].best)


def bake_removal(source: ExportSource) -> None:
    """Fold the source's all-layer removal into the loaded model's weights; ``RunError`` where
    baking would not be exact for this model."""
    try:
        bake(source.run.adapter, source.removal())
    except BakingError as exc:
        raise RunError(f"Cannot export {source.method} for {source.run.adapter.alias} exactly: {exc}") from None


def write_export(out: Path, source: ExportSource, writers: Sequence[ExportWriter]) -> Path:
    """Run every writer into ``.<out>.partial`` beside ``out``, then put that folder at ``out``."""
    tmp = out.with_name(f".{out.name}.partial")
    if tmp.exists():
        shutil.rmtree(tmp)  # left by an interrupted export
    for writer in writers:
        writer(tmp, source)
    replace_dir(tmp, out)
    return out


def save_model(folder: Path, source: ExportSource) -> None:
    """The (baked) model and its tokenizer, as ``save_pretrained`` writes them."""
    source.run.adapter.model.save_pretrained(folder)
    source.run.adapter.tokenizer.save_pretrained(folder)


def lora_writer(options: ExportOptions) -> ExportWriter:
    """Writes the PEFT adapter of the removal (``lora.save_lora_adapter``) and its metadata."""
    def save_lora(folder: Path, source: ExportSource) -> None:
        adapter = source.run.adapter
        dtype = adapter.model.dtype if options.lora_dtype == "model" else torch.float32
        try:
            save_lora_adapter(adapter, source.removal(), folder, dtype=dtype, base_model=options.base_model,
                              metadata=export_metadata(source))
        except LoraExportError as exc:
            raise RunError(f"Cannot export {source.method} for {adapter.alias} as a LoRA adapter: {exc}") from None
        adapter.tokenizer.save_pretrained(folder)

    return save_lora


def card_writer(options: ExportOptions) -> ExportWriter:
    """Writes ``README.md``, the model card (``model_card.write_model_card``), from the run's artifacts."""
    def save_card(folder: Path, source: ExportSource) -> None:
        write_model_card(folder, source.run.dir, source.method, base_model=options.base_model, repo_id=options.push_to)

    return save_card


def save_metadata(folder: Path, source: ExportSource) -> None:
    """``refusal_directions.json``: where the export comes from and what it baked."""
    write_json(folder / METADATA_FILE, export_metadata(source))


def export_metadata(source: ExportSource) -> dict:
    """The source run, method, what was baked, the component (position, layer, INLP's k) and the
    original model's fingerprint."""
    c = source.component
    return {"source_run": str(source.run.dir), "method": source.method, "baked": EXPORTABLE[source.method],
            "position": c.position, "layer": c.layer, "k": source.k, "fingerprint": source.run.adapter.fingerprint}
