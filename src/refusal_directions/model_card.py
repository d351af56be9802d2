"""The README (Hugging Face model card) of an exported model, and its upload to the Hub.

``render_model_card`` writes the card from a run folder's artifacts (``manifest.json``,
``select/<method>.json``, ``evaluate/summary.json``, read with ``report.load_run``) and the export's
``refusal_directions.json``: a YAML front matter (base model, library, pipeline tag, tags), then what
was removed and how (method, component, scope, format, exactness), the run's settings, the warnings
that change how the numbers read (thin selection or evaluation sets, fallbacks, chance-level
benchmarks, ceiling), and the metrics of the exported intervention against the baseline with their
95% intervals and Holm-adjusted p-values, exactly as ``evaluate/summary.json`` holds them. A metric
that was not run says "not run" with the reason; an exported intervention the run did not evaluate
gets "not run" everywhere. ``push_to_hub`` creates the repository (``exist_ok``) and uploads the folder.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

from .artifacts import read_json, write_text

log = logging.getLogger(__name__)

# The embedded default models are GGUF files of these Hub checkpoints (dequantized to float32).
EMBEDDED_BASE_MODELS = {"0.5b": "Qwen/Qwen2.5-Coder-0.5B-Instruct", "1.5b": "Qwen/Qwen2.5-Coder-1.5B-Instruct"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_REMOVALS = {"diff_in_means": ("diff-in-means", "directional ablation", "ablation"),
             "inlp": ("INLP", "nullspace projection", "projection"),
             "leace": ("LEACE", "non-affine LEACE erasure", "erasure-nonaffine")}
_TAGS = {"diff_in_means": ["diff-in-means", "directional-ablation"], "inlp": ["inlp", "nullspace-projection"],
         "leace": ["leace", "concept-erasure"]}


class HubUploadError(RuntimeError):
    """The folder could not be uploaded (no token, no network, refused); the message says what to do."""


# ---------------------------------------------------------------------- what was exported
def hub_base_model(model_name: str) -> tuple[str | None, str | None]:
    """``(hub id, note)`` of the run's model: an embedded model's source checkpoint (with a note that
    its weights are a dequantized GGUF), a hub id as given, or ``(None, note)`` for a local folder/file."""
    from .embedded import EmbeddedModelError, parse_embedded_spec

    try:
        embedded = parse_embedded_spec(model_name)
    except EmbeddedModelError:
        embedded = None
    if embedded is not None:
        hub_id = EMBEDDED_BASE_MODELS.get(embedded.key)
        return hub_id, (f"The run used refusal-directions' embedded model `{model_name}`: {embedded.title}, dequantized "
                        f"to float32. Its weights differ from the original `{hub_id}` checkpoint by the quantization.")
    looks_local = model_name.startswith(("/", "./", "../", "~")) or model_name.endswith(".gguf") or Path(model_name).exists()
    if not looks_local and _HUB_ID.match(model_name):
        return model_name, None
    return None, (f"The run used the local model `{model_name}`, not a Hub id: add `base_model: <hub id>` to the front "
                  "matter before uploading if it is a copy of a Hub checkpoint.")


def exported_intervention(summary: dict | None, method: str, n_layers: int | None, export: dict) -> dict | None:
    """The spec in ``summary["interventions"]`` that equals the export: ``method``'s removal (alpha 1,
    non-affine for LEACE, the best component's own direction) at every layer, from the export's
    position, layer and k where it records them. None when the run evaluated no such intervention."""
    for spec in (summary or {}).get("interventions") or []:
        if spec.get("kind") != "removal" or spec.get("method") != method or spec.get("components"):
            continue
        if float(spec.get("alpha", 1.0)) != 1.0 or bool(spec.get("affine", True)) != (method != "leace"):
            continue
        if n_layers is not None and sorted(spec.get("layers") or []) != list(range(n_layers)):
            continue
        if any(export.get(f) is not None and spec.get(f) != export[f] for f in ("position", "layer", "k")):
            continue
        return spec
    return None


# ---------------------------------------------------------------------- the card
def _front_matter(base_model: str | None, method: str, lora: bool) -> str:
    from huggingface_hub import ModelCardData

    tags = ["refusal-directions", "refusal-removal", *_TAGS.get(method, [method])] + (["lora"] if lora else [])
    data = ModelCardData(base_model=base_model, library_name="peft" if lora else "transformers",
                         pipeline_tag="text-generation", tags=tags)
    return f"---\n{data.to_yaml()}\n---\n"


def _md(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def metric_rows(summary: dict, name: str | None) -> list[dict]:
    """One row per metric of ``summary`` (report order): its id and label, the baseline's and the
    exported intervention's cells (None: that intervention is not in the summary)."""
    from .report import metric_label, ordered_metrics

    results = summary.get("results") or {}
    return [{"metric": mid, "label": metric_label(summary, mid), "baseline": (results.get("baseline") or {}).get(mid),
             "exported": (results.get(name) or {}).get(mid) if name else None} for mid in ordered_metrics(summary)]


def _metrics_section(summary: dict | None, spec: dict | None, method: str) -> list[str]:
    from .report import fmt_p, format_cell, significance_mark, statistics_legend

    lines = ["## Evaluation", ""]
    if summary is None:
        return lines + ["Not run: the run has no `evaluate/summary.json` (the evaluation stage did not run), so "
                        "there are no metrics for this model.", ""]
    name = spec.get("name") if spec else None
    missing = (f"the run evaluated no intervention equal to this export ({method} removal at every layer from the "
               "selected component); rerun with `--scopes all` to measure it")
    if spec is None:
        lines += [f"**Not run:** {missing}. The baseline column is the unmodified model.", ""]
    p_kind = " (Holm-adjusted)" if (summary.get("p_adjustment") or {}).get("method") == "holm" else ""
    lines += [statistics_legend(summary) + " Rows come from `evaluate/summary.json` of the source run.", "",
              f"| metric | baseline | this model (`{name or 'not evaluated'}`) | p vs baseline{p_kind} | n |",
              "|---|---|---|---|---|"]
    footnotes: dict[str, int] = {}

    def cell_text(cell: dict | None, fallback: str) -> str:
        if cell is None or cell.get("status") != "ok":
            reason = str((cell or {}).get("reason") or fallback)
            return f"not run [{footnotes.setdefault(reason, len(footnotes) + 1)}]"
        return format_cell(cell, with_mark=False)

    for row in metric_rows(summary, name):
        base, new = row["baseline"], row["exported"]
        p_text, n = "", ""
        if new is not None and new.get("status") == "ok":
            n = str(new.get("n", ""))
            if new.get("p_vs_baseline") is not None:
                p_text = f"{fmt_p(new['p_vs_baseline'])}{significance_mark(new['p_vs_baseline'])} ({new.get('test')})"
        lines.append(f"| {_md(row['label'])} (`{row['metric']}`) | {_md(cell_text(base, 'not in the summary'))} | "
                     f"{_md(cell_text(new, missing))} | {_md(p_text)} | {n} |")
    lines.append("")
    lines += [f"[{n}] not run: {reason}" for reason, n in footnotes.items()]
    return lines + [""]


def _what_was_done(art, method: str, export: dict, spec: dict | None, base_model: str | None, base_note: str | None
                   ) -> list[str]:
    label, removal, _ = _REMOVALS.get(method, (method, method, ""))
    model, config = art.model, art.config
    raw = art.selection_raw.get(method) or {}
    best, n_val = raw.get("best") or {}, raw.get("n_val") or {}
    k = export.get("k") if export.get("k") is not None else (spec or {}).get("k")
    lora = export.get("format") == "peft-lora"
    component = f"position {export.get('position', best.get('position'))}, layer {export.get('layer', best.get('layer'))}"
    component += f", k = {k} directions" if k is not None else (", rank 1 (one direction)" if method == "diff_in_means" else "")
    if raw:
        component += (f"; chosen by selection among {len(raw.get('ranked') or [])} ranked candidates (bypass "
                      f"{best.get('bypass', float('nan')):.3f}, KL {best.get('kl', float('nan')):.3f}, steering "
                      f"{best.get('steering', float('nan')):.3f})")
    if lora:
        form = (f"PEFT LoRA adapter, r = lora_alpha = {export.get('r')} (scaling 1), {export.get('dtype', 'float32')} "
                f"factors on the input embedding and every write projection ({export.get('target_modules')} modules, "
                f"{export.get('target_parameters')} fused expert parameters)")
        if export.get("replaced_biases"):
            form += (f"; {len(export['replaced_biases'])} edited output-projection biases are stored whole and replace the "
                     "base's when the adapter loads (LoRA cannot add to a bias), so disabling the adapter does not restore them")
    else:
        form = f"full weights with the removal baked in (`{export.get('baked', removal)}`)"
    rows = [
        ("base model", f"`{base_model or model.get('name', 'unknown')}` (run model `{model.get('name')}`, fingerprint "
                       f"`{model.get('fingerprint')}`, {model.get('n_layers')} layers, d_model {model.get('d_model')})"),
        ("method", f"{label}: {removal} (x ↦ x − P x, P = U Wᵀ of rank k)"),
        ("component", component),
        ("scope", f"all {model.get('n_layers')} layers: the embedding rows (the stream entering layer 0) and every "
                  "matrix that writes the residual stream (attention and MLP outputs, every expert)"),
        ("format", form),
        ("exactness", "numerically the intervention the run applied as hooks in its evaluation (the package's tests "
                      "check baked weights and adapters against the hooks in float32)"
                      + ("; the adapter is exact only on the base weights with the fingerprint above" if lora else "")),
        ("protocol", _protocol_text(config)),
        ("settings", f"preset {config.get('preset')}, n_train {config.get('n_train')}, n_val {config.get('n_val')} "
                     f"(after the refusal filter: {n_val.get('harmful', 'n/a')} harmful, {n_val.get('harmless', 'n/a')} "
                     f"harmless), n_test {config.get('n_test')}, positions {config.get('positions')}, max_new_tokens "
                     f"{config.get('max_new_tokens')}, evaluation sets {', '.join(config.get('eval_datasets') or [])}, "
                     f"safety judge {config.get('safety_judge') or 'none'}, seed {config.get('seed')}"),
        ("provenance", f"refusal-directions {(art.manifest or {}).get('package_version', 'n/a')}, run key "
                       f"`{(art.manifest or {}).get('key', 'n/a')}`"),
    ]
    lines = ["## What was done", "", "| | |", "|---|---|", *[f"| {k} | {_md(v)} |" for k, v in rows], ""]
    if base_note:
        lines += [f"> {base_note}", ""]
    if method == "leace":
        lines += ["> LEACE is exported as its non-affine (linear) eraser: the affine eraser's per-layer centres edit "
                  "every block input and cannot be written into weights. The table shows the run's "
                  "`leace.erasure-nonaffine@all` row, not the affine `leace.erasure@all`.", ""]
    if lora and export.get("tied_embeddings"):
        lines += ["> The base model ties its input and output embeddings. The adapter is exact unmerged; merging "
                  "writes the embedding edit into the shared matrix and changes the output head too: untie first "
                  "(see Usage).", ""]
    return lines


def _protocol_text(config: dict) -> str:
    """The protocol line: which selection protocol, and what the reference one changes."""
    protocol, points = config.get("protocol", "n/a"), config.get("selection_hook_points", "n/a")
    text = f"{protocol} (selection hook points {points}, {config.get('scoring', 'n/a')} scoring"
    if points == "reference":
        text += "; INLP and LEACE candidates were scored with their removal at the block input only, as the reference tool does"
    return text + ")"


def _usage(export: dict, base_model: str | None, repo_id: str | None) -> list[str]:
    repo = repo_id or "<this folder or repo id>"
    if export.get("format") != "peft-lora":
        return ["## Usage", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                f'model = AutoModelForCausalLM.from_pretrained("{repo}")',
                f'tokenizer = AutoTokenizer.from_pretrained("{repo}")', "```", ""]
    base = base_model or "<the base model>"
    lines = ["## Usage", "", "```python", "import torch", "from peft import PeftModel",
             "from transformers import AutoModelForCausalLM", "",
             f'base = AutoModelForCausalLM.from_pretrained("{base}", dtype=torch.float32)',
             f'model = PeftModel.from_pretrained(base, "{repo}")  # exact as it is']
    if export.get("tied_embeddings"):
        lines += ["# to merge, untie the embeddings first (refusal_directions.lora.untie_embeddings does this):",
                  "base.lm_head.weight = torch.nn.Parameter(base.lm_head.weight.detach().clone())",
                  "base.config.tie_word_embeddings = False"]
    lines += ["merged = model.merge_and_unload()  # the same model as the baked weights", "```", "",
              "The adapter's factors A = Wᵀ M were computed from the base weights M: on any other checkpoint of the "
              "model it is not the removal.", ""]
    return lines


def _upload(repo_id: str | None) -> list[str]:
    repo = repo_id or "<user>/<name>"
    return ["## Uploading", "", "```python", "from huggingface_hub import HfApi", "",
            "api = HfApi()  # a token from `hf auth login` or $HF_TOKEN",
            f'api.create_repo("{repo}", repo_type="model", private=True, exist_ok=True)',
            f'api.upload_folder(folder_path=".", repo_id="{repo}", repo_type="model")', "```", "",
            f"or `refusal-directions export ... --push-to-hub {repo}` at export time.", ""]


def render_model_card(run_dir: Path, method: str, export: dict | None = None, *, base_model: str | None = None,
                      repo_id: str | None = None) -> str:
    """The README.md text of a model exported from ``run_dir`` with ``method``.

    ``export``: the export folder's ``refusal_directions.json`` (``format`` "peft-lora" for an adapter,
    else full weights; ``position``, ``layer``, ``k`` pick the evaluated intervention). ``base_model``:
    the Hub id for the front matter (default: derived from the run's model, ``hub_base_model``).
    ``repo_id``: shown in the usage and upload snippets.
    """
    from .report import load_run, read_first_warnings

    art = load_run(Path(run_dir))
    export = dict(export or {})
    derived, note = hub_base_model(str(art.model.get("name") or ""))
    base_model = base_model or derived
    spec = exported_intervention(art.summary, method, art.model.get("n_layers"), export)
    label, removal, _ = _REMOVALS.get(method, (method, method, ""))
    lora = export.get("format") == "peft-lora"
    title = f"{art.model.get('alias') or art.model.get('name') or 'model'}: refusal removed by {label} {removal}"
    lines = [f"# {title}" + (" (LoRA adapter)" if lora else ""), "",
             "> **Research artifact.** This is the base model with the refusal direction(s) that refusal-directions "
             "found removed from its residual stream, which is meant to make it comply with harmful requests; the "
             "evaluation below shows how far it does for this model, on how many prompts. Whatever safety behaviour it "
             "keeps is not a safety guarantee: use it for interpretability and safety research, not as an assistant.", ""]
    lines += _what_was_done(art, method, export, spec, base_model, note)
    warnings_ = read_first_warnings(art)
    if warnings_:
        lines += ["## Read this first", "", *[f"- {_md(w)}" for w in warnings_], ""]
    chance = any(w.startswith("Chance level") for w in warnings_)
    notes = [str(n) for n in (art.summary or {}).get("notes") or [] if not (chance and "includes chance" in str(n))]
    if notes + art.notes:
        lines += ["## Notes", "", *[f"- {_md(n)}" for n in dict.fromkeys(notes + art.notes)], ""]
    lines += _metrics_section(art.summary, spec, method)
    lines += _usage(export, base_model, repo_id) + _upload(repo_id)
    return _front_matter(base_model, method, lora) + "\n" + "\n".join(lines)


def write_model_card(folder: Path, run_dir: Path, method: str, *, base_model: str | None = None,
                     repo_id: str | None = None) -> Path:
    """Write ``folder/README.md`` for the export in ``folder`` (reads its ``refusal_directions.json``)."""
    folder = Path(folder)
    meta = folder / "refusal_directions.json"
    export = read_json(meta) if meta.exists() else {}
    path = folder / "README.md"
    write_text(path, render_model_card(run_dir, method, export, base_model=base_model, repo_id=repo_id))
    return path


# ---------------------------------------------------------------------- the Hub
def push_to_hub(folder: Path, repo_id: str, *, token: str | None = None, private: bool = True,
                commit_message: str | None = None) -> str:
    """Create ``repo_id`` (a model repository; ``exist_ok``) and upload ``folder`` to it; returns the
    commit URL. ``token``: default ``$HF_TOKEN`` or the saved login (``huggingface_hub.get_token``).
    ``private``: True by default (a model without refusals should not be public by accident).

    Raises ``HubUploadError`` without a token, in offline mode, without network, or when the Hub
    refuses (the message names the cause and the fix).
    """
    import huggingface_hub
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    folder = Path(folder)
    if not folder.is_dir():
        raise HubUploadError(f"No folder {folder} to upload.")
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        raise HubUploadError(f"Cannot upload {folder} to {repo_id}: HF_HUB_OFFLINE is set. Unset it on a machine with network.")
    token = token or huggingface_hub.get_token()
    if not token:
        raise HubUploadError(f"Cannot upload {folder} to {repo_id}: no Hugging Face token. Log in (`hf auth login`), "
                             "set HF_TOKEN, or pass a token; it needs write access.")
    api = huggingface_hub.HfApi(token=token)
    try:
        url = api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
        info = api.upload_folder(repo_id=getattr(url, "repo_id", None) or repo_id, folder_path=str(folder), repo_type="model",
                                 commit_message=commit_message or f"Upload {folder.name} (refusal-directions export)")
    except OfflineModeIsEnabled as exc:
        raise HubUploadError(f"Cannot upload {folder} to {repo_id}: huggingface_hub is in offline mode ({exc}).") from exc
    except HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        hint = " The token was refused or lacks write access to this namespace." if status in (401, 403) else ""
        raise HubUploadError(f"The Hub refused the upload of {folder} to {repo_id} (HTTP {status}): {exc}.{hint}") from exc
    except Exception as exc:  # httpx2 transport errors, DNS failures, timeouts: no network
        if not _is_network_error(exc):
            raise
        raise HubUploadError(f"Cannot reach the Hugging Face Hub to upload {folder} to {repo_id} "
                             f"({type(exc).__name__}: {exc}). Check the network (or HF_ENDPOINT) and retry.") from exc
    return str(getattr(info, "commit_url", None) or info)


def _is_network_error(exc: BaseException) -> bool:
    """Whether ``exc`` is a connection failure (OSError/ConnectionError, or an HTTP client's transport error)."""
    if isinstance(exc, (OSError, ConnectionError, TimeoutError)):
        return True
    return any(cls.__name__ in ("TransportError", "RequestError", "HTTPError") for cls in type(exc).__mro__)
