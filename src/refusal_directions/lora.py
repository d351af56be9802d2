"""Export a linear removal as a PEFT LoRA adapter: base + adapter = baked weights = hooks.

A removal applies ``x -> x - alpha U Wᵀ x`` (``U = eraser.left``, ``W = eraser.right``, both
[D, k]; ``P = U Wᵀ`` is ``V Vᵀ`` for diff-in-means and INLP, an oblique projection for
non-affine LEACE). Baking (``interventions.bake``) writes it into the weights:

* every weight whose outputs are added to the residual stream (attention and MLP output
  projections, every expert's and shared expert's): each output vector ``w`` becomes
  ``w - alpha U Wᵀ w``. For ``F.linear`` layouts (``[..., D, d_in]``) that is
  ``M' = M - (alpha U)(Wᵀ M)``, for ``x @ M`` layouts (``[..., d_in, D]``) ``M' = M - (alpha M W) Uᵀ``;
* the embedding rows (the stream entering layer 0): ``E' = E - (alpha E W) Uᵀ``;
* the biases of those weights: ``b' = b - alpha U Wᵀ b``.

So every weight edit is ``ΔM = X Y`` with ``k`` inner dimensions: an exact rank-k LoRA update
(``B = X``, ``A = Y``; ``r = lora_alpha = k``, scaling 1). Fused 3-D expert weights and 2-D expert
biases (``[E, D]``, gpt-oss) are targeted with peft's ``target_parameters`` (``lora.ParamWrapper``,
rank k per expert). A 1-D bias cannot be a LoRA update; an edited dense bias is stored whole in the
adapter instead (peft's ``bias="lora_only"``: the bias of each targeted layer is saved and loaded in
place of the base's), which is exact, but the adapter then *replaces* those biases: disabling or
unloading it does not restore them (reload the base model).

Exactness has the conditions of baking (``interventions.check_bakeable``: verified write points,
no post-sublayer norms, a removal at every layer, a plain embedding ...), checked the same way, and
one more: ``A = Wᵀ M`` is computed from the base weights ``M``, so the adapter is exact only on the
very weights it was made from (same model fingerprint), not on another checkpoint of the model.
Tied input/output embeddings: the unmerged adapter is exact (the output head keeps reading the base
matrix); merging writes the embedding edit into the shared matrix and changes the head too, so untie
first (``untie_embeddings``) or keep the adapter unmerged.
"""

from __future__ import annotations

import copy
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor, nn

from .directions.base import erase
from .interventions import BakingError, Removal, _write_projections, check_bakeable
from .models import ModelAdapter, tied_embeddings, untie_embeddings  # untie_embeddings: user API (model cards)

if TYPE_CHECKING:
    from peft import LoraConfig

log = logging.getLogger(__name__)

ADAPTER_NAME = "default"
_PEFT_PREFIX = "base_model.model."
_VERIFY_MAX_NUMEL = 1 << 26  # deltas checked against peft's own get_delta_weight up to this size (256 MB in float32)

EditKind = Literal["linear", "embedding", "parameter", "bias"]


class LoraExportError(RuntimeError):
    """The removal cannot be exported exactly as a LoRA adapter for this model; the message says why."""


@dataclass(frozen=True)
class WeightEdit:
    """The exact edit baking makes to one parameter.

    ``kind``: "linear" (an ``nn.Linear`` weight ``[out, in]``), "embedding" (``nn.Embedding``
    weight ``[V, D]``), "parameter" (a 2-D or 3-D parameter of another module, e.g. fused expert
    weights ``[E, a, b]`` or expert biases ``[E, D]``: peft ``target_parameters``) or "bias" (the
    1-D bias of an ``nn.Linear``). For all but "bias": ``new = old + left @ right`` with ``left``
    ``[..., a, k]`` and ``right`` ``[..., k, b]`` (batched over the experts of a 3-D parameter);
    for "bias": ``new = value``. Tensors are float32, on the parameter's device.
    """

    module: str
    parameter: str
    kind: EditKind
    left: Tensor | None = None
    right: Tensor | None = None
    value: Tensor | None = None
    target: nn.Parameter | None = field(default=None, repr=False, compare=False)

    @property
    def name(self) -> str:
        return f"{self.module}.{self.parameter}"

    def delta(self) -> Tensor:
        """The dense ``ΔM = left @ right`` (for checks on small models; never needed to export)."""
        return self.left @ self.right


# ---------------------------------------------------------------------- the edits
def _check_exportable(adapter: ModelAdapter, removal: Removal) -> None:
    """Raise ``LoraExportError`` unless baking ``removal`` is exact and its edits are linear."""
    if not isinstance(removal, Removal):
        raise LoraExportError(f"Only a single removal at every layer can be exported as LoRA (got {type(removal).__name__}).")
    if not removal.writes:
        raise LoraExportError("A removal that edits the block inputs only (writes=False) edits every block input; "
                              "it cannot be folded into weights. Use hooks.")
    if removal.k == 0:
        raise LoraExportError("The removal has k = 0 (it removes no direction); there is no adapter to export.")
    if removal.affine and removal.eraser.bias is not None:
        raise LoraExportError("An affine eraser (LEACE with its centre) adds a constant to every embedding row; "
                              "export its non-affine (linear) variant instead (removal_for(..., affine=False)).")
    try:
        check_bakeable(adapter, removal)
    except BakingError as exc:
        raise LoraExportError(f"A LoRA adapter is exact exactly where baking is, and here baking is not: {exc}") from None


def _parameter_names(model: nn.Module) -> dict[int, str]:
    """``id(parameter) -> name``: the first name of a shared parameter, except that a tied embedding
    matrix is named by the input embedding module (not the output head)."""
    names: dict[int, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), name)
    embedding = model.get_input_embeddings()
    module_name = next(n for n, m in model.named_modules() if m is embedding)
    names[id(embedding.weight)] = f"{module_name}.weight"
    return names


def _edit_of(model: nn.Module, names: dict[int, str], param: nn.Parameter, left: Tensor, right: Tensor | None,
             value: Tensor | None = None) -> WeightEdit:
    """A ``WeightEdit`` for ``param``, its kind decided by the module that owns it."""
    full = names[id(param)]
    module_name, _, attribute = full.rpartition(".")
    module = model.get_submodule(module_name)
    if isinstance(module, nn.Linear) and attribute == "weight":
        kind: EditKind = "linear"
    elif isinstance(module, nn.Linear) and attribute == "bias":
        kind = "bias"
    elif isinstance(module, nn.Embedding) and attribute == "weight":
        kind = "embedding"
    elif param.dim() in (2, 3):
        kind = "parameter"
    else:
        raise LoraExportError(f"{full} ({tuple(param.shape)}) is edited by baking but is neither an nn.Linear / "
                              "nn.Embedding parameter nor a 2-D or 3-D parameter peft can target; LoRA cannot "
                              "express its edit. Export the baked weights instead.")
    return WeightEdit(module_name, attribute, kind, left, right, value, param)


@torch.no_grad()
def lora_edits(adapter: ModelAdapter, removal: Removal) -> list[WeightEdit]:
    """Every edit baking ``removal`` makes, factorised (float32): the embedding first, then each
    layer's write projections (weights, then biases) in layer order.

    Raises ``LoraExportError`` where the LoRA form would not equal the hooks (see the module docstring).
    """
    _check_exportable(adapter, removal)
    model, alpha = adapter.model, float(removal.alpha)
    names = _parameter_names(model)
    embedding = model.get_input_embeddings().weight
    eraser = removal.eraser.to(embedding.device)
    U, W = eraser.left.float(), eraser.right.float()
    edits = [_edit_of(model, names, embedding, -alpha * (embedding.float() @ W), U.T.contiguous())]
    for points in adapter.hook_points:
        for write in points.writes:
            for projection in _write_projections(write, adapter.d_model):
                weight = projection.weight
                U, W = (t.to(weight.device).float() for t in (removal.eraser.left, removal.eraser.right))
                M = weight.float()
                if projection.transposed:  # x @ M: rows of M [..., d_in, D] are write vectors
                    left, right = -alpha * (M @ W), U.T.expand(*M.shape[:-2], *U.T.shape)
                else:  # F.linear: columns of M [..., D, d_in] are write vectors
                    left, right = (-alpha * U).expand(*M.shape[:-2], *U.shape), W.T @ M
                edits.append(_edit_of(model, names, weight, left.contiguous(), right.contiguous()))
                bias = projection.bias
                if bias is None:
                    continue
                b = bias.float()
                if bias.dim() == 1:
                    edits.append(_edit_of(model, names, bias, None, None, value=erase(b, U, W, None, alpha)))
                else:  # [E, D]: a rank-k update of a 2-D parameter
                    edits.append(_edit_of(model, names, bias, -alpha * (b @ W), U.T.contiguous()))
    return edits


# ---------------------------------------------------------------------- peft
def lora_config_for(edits: list[WeightEdit], r: int, base_model: str | None = None) -> LoraConfig:
    """The ``peft.LoraConfig`` targeting exactly the edited parameters: rank and ``lora_alpha`` both ``r``
    (the removal's k; scaling 1), no dropout, ``bias="lora_only"`` when dense biases are stored."""
    from peft import LoraConfig

    modules = sorted({e.module for e in edits if e.kind in ("linear", "embedding")})
    parameters = sorted({e.name for e in edits if e.kind == "parameter"})
    return LoraConfig(
        r=r,
        lora_alpha=r,
        lora_dropout=0.0,
        target_modules=modules,
        target_parameters=parameters or None,
        bias="lora_only" if any(e.kind == "bias" for e in edits) else "none",
        init_lora_weights=False,
        inference_mode=True,
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model,
    )


def _set(param: nn.Parameter, value: Tensor) -> None:
    """Replace ``param``'s data with a float32 copy of ``value`` (never rounded through the model's dtype,
    never sharing memory with another factor: safetensors refuses shared tensors)."""
    if tuple(param.shape) != tuple(value.shape):
        raise LoraExportError(f"internal: a LoRA factor of shape {tuple(param.shape)} got {tuple(value.shape)}")
    param.data = value.detach().to(param.device, torch.float32, copy=True).contiguous()  # never a view of the eraser


def _fill(layer: nn.Module, edit: WeightEdit) -> None:
    """Write ``edit``'s factors into the LoRA matrices of the peft ``layer`` wrapping its parameter,
    in that layer's layout (``peft.tuners.lora.layer``: Linear ``ΔW = B A``, Embedding
    ``ΔE = (B A)ᵀ``, ParamWrapper per expert ``B_e A_e`` or its transpose)."""
    from peft.tuners.lora import Embedding, ParamWrapper

    X, Y = edit.left, edit.right
    if isinstance(layer, Embedding):
        _set(layer.lora_embedding_A[ADAPTER_NAME], X.T)
        _set(layer.lora_embedding_B[ADAPTER_NAME], Y.T)
        return
    A, B = layer.lora_A[ADAPTER_NAME].weight, layer.lora_B[ADAPTER_NAME].weight
    if not isinstance(layer, ParamWrapper) or X.dim() == 2:
        _set(B, X)
        _set(A, Y)
        return
    if getattr(layer, "_did_swap_in_out_features", False):  # [E, out, in]: delta[e] = B_e A_e
        a_e, b_e = Y, X
    else:  # [E, in, out]: delta[e] = (B_e A_e)ᵀ
        a_e, b_e = X.transpose(-1, -2), Y.transpose(-1, -2)
    experts, k = a_e.shape[0], a_e.shape[1]
    _set(A, a_e.reshape(experts * k, a_e.shape[-1]))  # rows e*k + j
    _set(B, b_e.permute(1, 2, 0).reshape(b_e.shape[1], k * experts))  # columns j*E + e


def _base_parameter(layer: nn.Module) -> nn.Parameter:
    from peft.tuners.lora import ParamWrapper

    return layer.get_param() if isinstance(layer, ParamWrapper) else layer.get_base_layer().weight


def _verify(layer: nn.Module, edit: WeightEdit) -> None:
    """Check peft's own delta of ``layer`` against ``edit`` (the first layer of each kind, small ones)."""
    from peft.tuners.lora import Embedding

    param = edit.target
    if param.numel() > _VERIFY_MAX_NUMEL:
        return
    delta = layer.get_delta_weight(ADAPTER_NAME).float()
    expected = edit.delta()
    if isinstance(layer, Embedding) or delta.shape != expected.shape:
        delta = delta.reshape(expected.shape)
    error = float((delta - expected).norm() / expected.norm().clamp_min(1e-30))
    tolerance = 1e-5 if param.dtype in (torch.float32, torch.float64) else 1e-2
    if not error <= tolerance:
        raise LoraExportError(f"internal: peft's delta of {edit.name} differs from the baked edit by {error:.2g} "
                              f"(relative); this peft version lays LoRA factors out differently.")


@torch.no_grad()
def _peft_state_dict(model: nn.Module, edits: list[WeightEdit], config: LoraConfig) -> dict[str, Tensor]:
    """Inject ``config`` into ``model``, fill every LoRA layer from ``edits``, read peft's state dict
    (its own key names), and remove the adapter again (the model is left as it was)."""
    from peft import get_peft_model, get_peft_model_state_dict
    from peft.tuners.tuners_utils import BaseTunerLayer

    by_param = {id(e.target): e for e in edits if e.kind != "bias"}
    biases = {e.module: e for e in edits if e.kind == "bias"}
    requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*tie_word_embeddings.*")  # handled: see the module docstring
        warnings.filterwarnings("ignore", message=".*base_model_name_or_path.*")  # peft renames it on a copy
        peft_model = get_peft_model(model, copy.deepcopy(config), adapter_name=ADAPTER_NAME)
    try:
        filled, verified = set(), set()
        for path, layer in peft_model.named_modules():
            if not isinstance(layer, BaseTunerLayer) or not hasattr(layer, "lora_A"):
                continue
            edit = by_param.get(id(_base_parameter(layer)))
            if edit is None:
                raise LoraExportError(f"internal: peft wrapped {path}, which no edit targets")
            _fill(layer, edit)
            kind = (type(layer).__name__, edit.left.dim())
            if kind not in verified:
                _verify(layer, edit)
                verified.add(kind)
            filled.add(id(edit.target))
        missing = [e.name for e in by_param.values() if id(e.target) not in filled]
        if missing:
            raise LoraExportError(f"internal: peft did not wrap {missing[:4]}{' ...' if len(missing) > 4 else ''}")
        state = get_peft_model_state_dict(peft_model, adapter_name=ADAPTER_NAME, save_embedding_layers=False)
    finally:
        peft_model.unload()
        for name, param in model.named_parameters():
            param.requires_grad_(requires_grad.get(name, False))
    out = {}
    for key, value in state.items():
        if key.endswith(".base_layer.bias"):
            module = key.removeprefix(_PEFT_PREFIX).removesuffix(".base_layer.bias")
            if module not in biases:
                raise LoraExportError(f"internal: peft saves the bias of {module}, which baking does not edit")
            value = biases.pop(module).value
        out[key] = value.detach().float().cpu().contiguous()
    if biases:
        raise LoraExportError(f"internal: peft does not save the edited biases {sorted(biases)[:4]}")
    return out


def lora_adapter_for(adapter: ModelAdapter, removal: Removal, *, dtype: torch.dtype = torch.float32,
                     base_model: str | None = None) -> tuple[LoraConfig, dict[str, Tensor]]:
    """The PEFT LoRA adapter of ``removal`` (all layers): its ``LoraConfig`` and state dict.

    ``r = lora_alpha = k`` (the removal's k: its LoRA rank; scaling 1). Targets: the input embedding, every write
    projection (dense ``nn.Linear`` via ``target_modules``; fused expert weights and 2-D expert biases
    via ``target_parameters``); edited dense biases stored whole (``bias="lora_only"``). The state dict
    has peft's saved key names (``base_model.model.<module>.lora_A.weight`` ...), on the CPU, in
    ``dtype`` (float32 by default: the factors are computed in float32; the model's dtype halves the
    file and rounds as a checkpoint in that dtype would). ``base_model``: recorded as
    ``base_model_name_or_path`` (default: the adapter's model name).

    The model is wrapped by peft while the adapter is built and unwrapped before returning.
    Raises ``LoraExportError`` where the adapter would not equal the hooks.
    """
    edits = lora_edits(adapter, removal)
    config = lora_config_for(edits, removal.k, base_model if base_model is not None else adapter.name)
    state = _peft_state_dict(adapter.model, edits, config)
    return config, {k: v.to(dtype) for k, v in state.items()}


def lora_summary(config: LoraConfig, state: dict[str, Tensor], model: nn.Module, dtype: torch.dtype) -> dict:
    """What ``refusal_directions.json`` records about an adapter (and the model card shows)."""
    biases = sorted(k.removeprefix(_PEFT_PREFIX).removesuffix(".base_layer.bias") for k in state if k.endswith(".base_layer.bias"))
    return {
        "format": "peft-lora",
        "r": config.r,
        "lora_alpha": config.lora_alpha,
        "dtype": str(dtype).replace("torch.", ""),
        "target_modules": len(config.target_modules or ()),
        "target_parameters": len(config.target_parameters or ()),
        "replaced_biases": biases,
        "tied_embeddings": tied_embeddings(model),
    }


def save_lora_adapter(adapter: ModelAdapter, removal: Removal, folder: Path, *, dtype: torch.dtype = torch.float32,
                      base_model: str | None = None, metadata: dict | None = None) -> Path:
    """Write the adapter of ``removal`` as a PEFT folder (``adapter_config.json``,
    ``adapter_model.safetensors``) that ``peft.PeftModel.from_pretrained(base, folder)`` loads, plus
    ``refusal_directions.json`` (``metadata`` and ``lora_summary``). An existing ``folder`` is
    replaced atomically. Returns ``folder``.
    """
    import shutil

    from safetensors.torch import save_file

    from .artifacts import replace_dir, write_json

    config, state = lora_adapter_for(adapter, removal, dtype=dtype, base_model=base_model)
    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    config.save_pretrained(str(tmp))
    save_file(state, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
    write_json(tmp / "refusal_directions.json", {**(metadata or {}), **lora_summary(config, state, adapter.model, dtype)})
    replace_dir(tmp, folder)
    log.info("LoRA adapter (r=%d, %d tensors) written to %s", config.r, len(state), folder)
    return folder
