"""Export: bake a method's selected removal into the weights and save a standard Hugging Face folder.

What is exact is baked: diff-in-means ablation and INLP projection are linear; LEACE is exported
as its non-affine (linear) variant, since the affine eraser's per-layer centres edit every block
input and cannot be folded into the weights.

An export runs three steps, each its own function, so that another kind of export (say a LoRA
adapter instead of edited weights) or another file (say a model card) is one more function:

1. ``load_export_source``: the run, the method's directions and its selected component;
2. ``bake_removal``: fold the all-layer removal into the loaded model's weights, or refuse;
3. ``write_export``: run each ``ExportWriter`` (``save_model``, ``save_metadata``) into a
   temporary folder beside ``out``, then replace ``out`` atomically (``artifacts.replace_dir``).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from ..artifacts import replace_dir, write_json
from ..config import RunConfig
from ..directions.base import DirectionSet
from ..interventions import BakingError, Removal, bake, removal_for
from ..selection import Candidate
from .stages.extract import load_extraction
from .stages.select import load_selection
from .store import Run, RunError, open_run

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
        return self.component.rank if self.method == "inlp" else None

    def removal(self) -> Removal:
        """The component's removal at every layer (LEACE: the linear, non-affine eraser)."""
        c = self.component
        return removal_for(self.directions, c.pos_index, c.layer, range(self.run.adapter.n_layers), self.k,
                           affine=self.method != "leace")


# writes some of the export's files into the (temporary) export folder
ExportWriter = Callable[[Path, ExportSource], None]


def export_model(config: RunConfig, method: str, out: Path, run_dir: Path | None = None) -> Path:
    """Bake ``method``'s selected removal at all layers into the weights; save a standard HF folder
    at ``out`` (an existing one is replaced atomically). Returns ``out``."""
    if method not in EXPORTABLE:
        raise RunError(f"Cannot export {method!r}; exportable: " + ", ".join(f"{m} ({w})" for m, w in EXPORTABLE.items()))
    source = load_export_source(config, method, run_dir)
    bake_removal(source)
    return write_export(Path(out), source, [save_model, save_metadata])


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


def save_metadata(folder: Path, source: ExportSource) -> None:
    """``refusal_directions.json``: where the export comes from and what it baked."""
    write_json(folder / METADATA_FILE, export_metadata(source))


def export_metadata(source: ExportSource) -> dict:
    """The source run, method, what was baked, the component (position, layer, INLP's k) and the
    original model's fingerprint."""
    c = source.component
    return {"source_run": str(source.run.dir), "method": source.method, "baked": EXPORTABLE[source.method],
            "position": c.position, "layer": c.layer, "k": source.k, "fingerprint": source.run.adapter.fingerprint}
