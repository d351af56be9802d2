"""Interventions on the residual stream, as hooks or as baked weights.

* ``Removal``: the low-rank edit ``x -> x - alpha U Wᵀ (x - b)`` of an ``Eraser`` at the block
  input and the write points of each layer in scope. alpha = 1 is the removal itself
  (diff-in-means directional ablation, INLP nullspace projection, LEACE erasure); other alphas
  are the counterfactual reflection R_alpha = alpha P + (1 - alpha) I (alpha = 2: reflection).
  Block inputs get the affine map, writes (increments) its linear part.
* ``ActAdd``: ``x -> x + c d̂`` at the block input of one layer, every position.

Which block inputs are hooked (DESIGN.md §8):
  alpha = 1: the map is idempotent and every write is erased, so only the first layer of each
  contiguous run of layers in scope needs its input erased (the others would be no-ops);
  alpha != 1, "reference" mode: every block input and write in scope (as the reference tool);
  the concept component is then multiplied by (1 - alpha) again at each layer, so at alpha = 2
  its sign alternates layer by layer;
  alpha != 1, "consistent" mode: the stream is transformed once, at the first layer in scope,
  and every later write in scope is transformed, so the stream's concept component is
  (1 - alpha) times what it would have been.

Hooks compute in float32 and cast back; per-layer copies of the tensors live on each layer's
device (multi-GPU), so hooks never move data or synchronise.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Literal, Sequence

import torch
from torch import Tensor, nn

from .directions.base import DirectionSet, Eraser, erase
from .hooks import Hook, HookFn, apply_hooks
from .models import ModelAdapter, untie_embeddings

ReflectionMode = Literal["reference", "consistent"]
_OUTPUT_PROJECTIONS = ("o_proj", "out_proj", "down_proj", "dense", "c_proj", "fc2", "w2", "dense_4h_to_h")


class BakingError(RuntimeError):
    """Weight baking would not be exact for this model or intervention."""


def _edit_fn(eraser: Eraser, alpha: float, affine: bool) -> HookFn:
    left, right = eraser.left, eraser.right
    bias = eraser.bias if affine else None

    def edit(x: Tensor) -> Tensor:
        # Block inputs may still sit on the previous layer's device when a model is sharded
        # (accelerate moves them inside forward, after pre-hooks run): compute on this layer's.
        return erase(x.to(left.device, torch.float32), left, right, bias, alpha).to(x.dtype)

    return edit


def _add_fn(vector: Tensor) -> HookFn:
    def add(x: Tensor) -> Tensor:
        return (x.to(vector.device, torch.float32) + vector).to(x.dtype)

    return add


@dataclass
class Removal:
    """Erase (alpha = 1) or reflect (alpha != 1) a concept at the layers in scope.

    ``centres``: optional [n_layers, D] affine centres, one per layer (LEACE: the mean activation
    at each layer). An affine eraser fitted at one layer is centred on that layer's mean; applied
    at other layers it must use theirs (the stream's mean moves a lot across layers). With
    centres, every block input in scope is edited, each around its own centre.
    ``writes``: False edits the block inputs only (the reference tool's INLP selection scoring);
    every block input in scope is then edited.
    ``layer_alpha``: per-layer weights {layer: w_l} (a Heretic-style kernel, ``InterventionSpec.weights``)
    used instead of ``alpha`` at each layer in scope: the writes of layer l are edited with w_l and,
    as for alpha = 1, only the first block input of each contiguous run of layers (with its w_l), so
    the concept component of every write is scaled by (1 - w_l); weights all 1 are the plain removal.
    """

    eraser: Eraser
    layers: Sequence[int]
    alpha: float = 1.0
    mode: ReflectionMode = "reference"
    affine: bool = True
    name: str = "removal"
    centres: Tensor | None = None
    writes: bool = True
    layer_alpha: dict[int, float] | None = None

    @property
    def k(self) -> int:
        """The number of directions removed (the eraser's columns)."""
        return self.eraser.k

    def alpha_at(self, layer: int) -> float:
        """The edit's strength at ``layer``: its per-layer weight, else ``alpha``."""
        return self.alpha if self.layer_alpha is None else float(self.layer_alpha.get(layer, self.alpha))

    def centre(self, layer: int) -> Tensor | None:
        """The affine centre of ``layer``'s block input (None: linear)."""
        if not self.affine:
            return None
        return self.centres[layer] if self.centres is not None else self.eraser.bias

    def block_input_layers(self) -> list[int]:
        layers = sorted(set(self.layers))
        if (self.affine and self.centres is not None) or not self.writes:
            return layers
        if self.alpha == 1.0 or self.layer_alpha is not None:
            return [l for l in layers if l - 1 not in layers]
        if self.mode == "consistent":
            return layers[:1]
        return layers

    def hooks(self, adapter: ModelAdapter) -> list[Hook]:
        hooks: list[Hook] = []
        by_device: dict[torch.device, Eraser] = {}
        block_inputs = set(self.block_input_layers())
        for layer in sorted(set(self.layers)):
            device = adapter.layer_device(layer)
            eraser = by_device.setdefault(device, self.eraser.to(device))
            points = adapter.hook_points[layer]
            if layer in block_inputs:
                centre = self.centre(layer)
                centred = Eraser(eraser.left, eraser.right, None if centre is None else centre.to(device))
                hooks.append(Hook(points.block, "input", _edit_fn(centred, self.alpha_at(layer), affine=True)))
            if self.writes:
                linear = _edit_fn(eraser, self.alpha_at(layer), affine=False)
                hooks.extend(Hook(write, "output", linear) for write in points.writes)
        return hooks


@dataclass
class ActAdd:
    """Add ``vector`` (already scaled and signed) to the residual stream entering ``layer``."""

    vector: Tensor
    layer: int
    name: str = "actadd"
    k = 0  # removes nothing

    def hooks(self, adapter: ModelAdapter) -> list[Hook]:
        vector = self.vector.float().to(adapter.layer_device(self.layer))
        return [Hook(adapter.hook_points[self.layer].block, "input", _add_fn(vector))]


@dataclass
class Composite:
    """Several removals applied together, each at its own layers (a scope whose components keep
    their own direction or P: ``--scope-directions own``). Parts at the same layer apply in order."""

    parts: list[Removal]
    name: str = "composite"

    @property
    def k(self) -> int:
        """The most directions any part removes (what the persistent slots must hold)."""
        return max(p.k for p in self.parts)

    def hooks(self, adapter: ModelAdapter) -> list[Hook]:
        return [h for part in self.parts for h in part.hooks(adapter)]


class ReplacementError(ValueError):
    """Another model's weights cannot replace the adapter's; the message says what differs."""


@dataclass
class Replacement:
    """Another model's weights put in place of the adapter's while applied (``applied``): the
    evaluate-model run's "model" row, computed with the base model's modules and code paths.

    ``weights``: every parameter of the other model by name (``named_parameters(remove_duplicate=False)``,
    so a tied output head appears under both names); ``tied``: whether its output head is its
    input embedding; ``label``: what it is (the model's name), for messages. Exact: the copied
    values are the other model's, bit for bit. It has no hooks (``intervene`` refuses it).
    """

    weights: dict[str, Tensor]
    tied: bool
    label: str
    rank: int = 0

    @classmethod
    def of(cls, adapter: ModelAdapter) -> "Replacement":
        """The replacement by ``adapter``'s model's weights."""
        head, embedding = adapter.lm_head, adapter.model.get_input_embeddings()
        weights = {n: p.detach() for n, p in adapter.model.named_parameters(remove_duplicate=False)}
        return cls(weights, head is not None and head.weight is embedding.weight, adapter.name)

    def hooks(self, adapter: ModelAdapter) -> list[Hook]:
        raise TypeError(f"{self.label}: a weight replacement has no hooks; apply it with interventions.applied.")


@torch.no_grad()
def replace_weights(adapter: ModelAdapter, replacement: Replacement) -> dict[str, Tensor]:
    """Copy ``replacement``'s weights into the adapter's model in place; returns the original values
    of the parameters that changed (for ``restore``). Unties the adapter's embeddings first when the
    replacement's are untied. ``ReplacementError`` when names, shapes or dtypes differ."""
    head, embedding = adapter.lm_head, adapter.model.get_input_embeddings()
    if not replacement.tied and head is not None and head.weight is embedding.weight:
        _untie_embeddings(adapter)
    params = dict(adapter.model.named_parameters(remove_duplicate=False))
    missing, extra = sorted(set(params) - set(replacement.weights)), sorted(set(replacement.weights) - set(params))
    if missing or extra:
        raise ReplacementError(f"{replacement.label} has other parameters than {adapter.name}: "
                               f"missing {missing[:5]}, extra {extra[:5]} (another architecture?).")
    for name, param in params.items():
        new = replacement.weights[name]
        if new.shape != param.shape or new.dtype != param.dtype:
            raise ReplacementError(f"{replacement.label}: parameter {name} is {tuple(new.shape)} {new.dtype}, "
                                   f"{adapter.name}'s is {tuple(param.shape)} {param.dtype}; load both with the same --dtype.")
    originals: dict[str, Tensor] = {}
    seen: set[int] = set()
    for name, param in params.items():
        new = replacement.weights[name].to(param.device)
        if id(param) in seen or torch.equal(param, new):
            continue
        seen.add(id(param))
        originals[name] = param.detach().clone()
        param.copy_(new)
    return originals


Intervention = Removal | ActAdd | Composite | Replacement


@contextmanager
def intervene(adapter: ModelAdapter, *interventions: Intervention | None) -> Iterator[None]:
    """Install the hooks of ``interventions`` (None entries are skipped) for the block."""
    hooks = [h for i in interventions if i is not None for h in i.hooks(adapter)]
    with apply_hooks(hooks):
        yield


# ---------------------------------------------------------------------- persistent slots
class _LayerSlot(nn.Module):
    """The tensors one layer's persistent hooks read (float32, on the layer's device)."""

    def __init__(self, d_model: int, max_k: int, device: torch.device):
        super().__init__()
        for name, shape in (("left", (d_model, max_k)), ("right", (d_model, max_k)), ("bias", (d_model,)),
                            ("add", (d_model,)), ("alpha_input", ()), ("alpha_writes", ())):
            self.register_buffer(name, torch.zeros(shape, dtype=torch.float32, device=device), persistent=False)

    def input_fn(self, x: Tensor) -> Tensor:
        """Block input [..., D]: the affine edit around ``bias`` scaled by ``alpha_input``, plus ``add``."""
        y = x.to(self.left.device, torch.float32)
        return (erase(y, self.left, self.right, self.bias, self.alpha_input) + self.add).to(x.dtype)

    def write_fn(self, x: Tensor) -> Tensor:
        """A write [..., D]: the linear edit scaled by ``alpha_writes``."""
        return erase(x.float(), self.left, self.right, None, self.alpha_writes).to(x.dtype)


class InterventionSlots:
    """Hooks installed once at every block input and write point, driven by tensors.

    Loading an intervention only copies values into the slots' buffers (zeros: no effect), so a
    compiled decoding step (static KV cache, CUDA graphs) serves every intervention without
    recompiling: torch.compile does not notice hooks added after compilation, so swapping hooks
    would be silently ignored, while buffer contents are read at every replay. Per layer l:
    block input ``x - a_in[l] ((x - b) W) Uᵀ + v[l]``; writes ``w - a_w[l] (w W) Uᵀ``.
    """

    def __init__(self, adapter: ModelAdapter, max_k: int = 1):
        self.adapter = adapter
        self.max_k = max_k
        self.slots = [_LayerSlot(adapter.d_model, max_k, adapter.layer_device(l)) for l in range(adapter.n_layers)]

    def hooks(self) -> list[Hook]:
        out = []
        for slot, points in zip(self.slots, self.adapter.hook_points):
            out.append(Hook(points.block, "input", slot.input_fn))
            out.extend(Hook(write, "output", slot.write_fn) for write in points.writes)
        return out

    @torch.no_grad()
    def load(self, intervention: Intervention | None) -> None:
        """Make the slots apply ``intervention`` (None: the identity)."""
        for slot in self.slots:
            for buffer in slot.buffers():
                buffer.zero_()
        if isinstance(intervention, ActAdd):
            self.slots[intervention.layer].add.copy_(intervention.vector)
        elif isinstance(intervention, (Removal, Composite)):
            parts = intervention.parts if isinstance(intervention, Composite) else [intervention]
            layers = [l for part in parts for l in set(part.layers)]
            if len(layers) != len(set(layers)):
                raise ValueError("The slots hold one removal per layer; this intervention has several at one layer.")
            for part in parts:
                self._load_removal(part)

    def _load_removal(self, removal: Removal) -> None:
        eraser, k = removal.eraser, removal.k
        if k > self.max_k:
            raise ValueError(f"The intervention removes {k} directions; the slots hold at most max_k = {self.max_k}.")
        block_inputs = set(removal.block_input_layers())
        for layer in sorted(set(removal.layers)):
            slot = self.slots[layer]
            slot.left[:, :k] = eraser.left
            slot.right[:, :k] = eraser.right
            if (centre := removal.centre(layer)) is not None:
                slot.bias.copy_(centre)
            if removal.writes:
                slot.alpha_writes.fill_(removal.alpha_at(layer))
            if layer in block_inputs:
                slot.alpha_input.fill_(removal.alpha_at(layer))


# ---------------------------------------------------------------------- weight baking
_EXPERTS = ("experts",)  # the expert container of a mixture-of-experts block
_BAKE_TOLERANCE = {torch.float64: 1e-8, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def _output_projection(module: nn.Module, d_model: int) -> nn.Linear:
    """The Linear child of a dense sublayer (attention, MLP, one expert) that writes its output."""
    children = dict(module.named_children())
    for name in _OUTPUT_PROJECTIONS:
        child = children.get(name)
        if isinstance(child, nn.Linear) and child.out_features == d_model:
            return child
    raise BakingError(f"Cannot find the output projection of {type(module).__name__}; use hooks instead.")


@dataclass(frozen=True)
class _Projection:
    """A weight whose output vectors are what a write point adds to the stream, and its bias.

    ``transposed``: False for ``F.linear`` layouts (``[..., d_model, d_in]``: nn.Linear and fused
    experts such as Mixtral's ``down_proj [E, D, I]``), True for ``x @ W`` layouts
    (``[..., d_in, d_model]``: gpt-oss and Llama-4 ``down_proj [E, I, D]``). ``bias``: ``[..., d_model]``.
    """

    weight: nn.Parameter
    bias: nn.Parameter | None
    transposed: bool

    def edit(self, fn: HookFn) -> list[tuple[nn.Parameter, HookFn]]:
        """(parameter, map) pairs applying the linear edit ``fn`` (on vectors in the last dim) to
        every output vector of the weight, and to the bias."""
        if self.transposed:
            pairs: list[tuple[nn.Parameter, HookFn]] = [(self.weight, fn)]
        else:
            pairs = [(self.weight, lambda w: fn(w.transpose(-1, -2)).transpose(-1, -2))]
        if self.bias is not None:
            pairs.append((self.bias, fn))
        return pairs


def _fused_layout(experts: nn.Module, name: str, weight: Tensor, d_model: int) -> bool:
    """Whether a fused ``[E, a, b]`` expert weight is ``x @ W`` (``b == d_model``) or
    ``F.linear`` (``a == d_model``); the ``is_transposed`` flag of transformers' experts decides ties."""
    flag = getattr(experts, "is_transposed", None)
    rows, cols = weight.shape[-2], weight.shape[-1]
    if rows == cols == d_model and not isinstance(flag, bool):
        raise BakingError(f"{type(experts).__name__}.{name} is [{rows}, {cols}] per expert: cannot tell which side "
                          "writes the residual stream; use hooks.")
    if isinstance(flag, bool) and (cols if flag else rows) == d_model:
        return flag
    if cols == d_model:
        return True
    if rows == d_model:
        return False
    raise BakingError(f"{type(experts).__name__}.{name} has shape {tuple(weight.shape)}: no side is d_model={d_model}.")


def _expert_projections(experts: nn.Module, d_model: int) -> list[_Projection]:
    """Every expert's output projection: per-expert modules (``experts[i].w2`` / ``down_proj``) or
    fused 3-D parameters (``down_proj [E, ...]`` with ``down_proj_bias [E, d_model]``)."""
    if getattr(experts, "has_post_expert_norm", False):
        raise BakingError(f"{type(experts).__name__} normalises each expert's output; it cannot be baked. Use hooks.")
    if isinstance(experts, (nn.ModuleList, nn.Sequential)):
        projections = [_output_projection(expert, d_model) for expert in experts]
        return [_Projection(p.weight, p.bias, False) for p in projections]
    parameters = dict(experts.named_parameters(recurse=False))
    for name in _OUTPUT_PROJECTIONS:
        weight = parameters.get(name)
        if weight is not None and weight.dim() == 3:
            bias = parameters.get(f"{name}_bias")
            if bias is not None and (bias.dim() != 2 or bias.shape[-1] != d_model):
                raise BakingError(f"{type(experts).__name__}.{name}_bias has shape {tuple(bias.shape)}; use hooks.")
            return [_Projection(weight, bias, _fused_layout(experts, name, weight, d_model))]
    raise BakingError(f"Cannot find the experts' output projections in {type(experts).__name__} "
                      f"(parameters: {sorted(parameters)}); use hooks instead.")


def _write_projections(write: nn.Module, d_model: int) -> list[_Projection]:
    """Every weight (and bias) whose outputs a write point adds to the residual stream.

    A dense sublayer: its output projection (``o_proj``, ``down_proj``, ...). A mixture of experts
    (a child ``experts``): every expert's output projection plus those of the other children that
    have one (shared experts, whether gated per token or not); routers write nothing. Whether this
    is all of the write is checked numerically by ``_verify_bakeable``.
    """
    children = dict(write.named_children())
    experts = next((children[n] for n in _EXPERTS if n in children), None)
    if experts is None:
        projection = _output_projection(write, d_model)
        return [_Projection(projection.weight, projection.bias, False)]
    projections = _expert_projections(experts, d_model)
    for name, child in children.items():
        if child is experts:
            continue
        try:
            projection = _output_projection(child, d_model)
        except BakingError:
            continue  # a router or gate: it writes nothing
        projections.append(_Projection(projection.weight, projection.bias, False))
    return projections


@torch.no_grad()
def _baked(projections: Sequence[_Projection], fn: HookFn) -> dict[int, Tensor]:
    """The edited tensors of ``projections`` (by parameter id), without touching the parameters."""
    return {id(param): edit(param) for projection in projections for param, edit in projection.edit(fn)}


@torch.no_grad()
def _verify_bakeable(adapter: ModelAdapter) -> str | None:
    """Why baking would not reproduce the hooks on this model (None: it would); checked once.

    One forward of a few tokens: each write point's module is re-run (``torch.func.functional_call``)
    with its projections edited to remove a random half-dimensional subspace, and its output must
    equal the hooked edit of its real output, per token within ``_BAKE_TOLERANCE`` of its norm; a
    skipped expert or an unknown output transform shows as an error of order one. The stream
    entering layer 0 must be the embedding output (times a constant, recorded for affine edits).
    """
    cached = getattr(adapter, "_bake_verification", None)
    if cached is not None:
        return cached[0] or None
    d_model = adapter.d_model
    generator = torch.Generator().manual_seed(4321)
    basis = torch.linalg.qr(torch.randn(d_model, max(1, d_model // 2), generator=generator))[0]
    tolerance = _BAKE_TOLERANCE.get(adapter.dtype, 5e-2)
    errors: list[str] = []
    worst: dict[str, float] = {}
    seen: dict[str, Tensor] = {}
    handles = []
    try:
        _add_write_checks(adapter, basis, worst, handles)
        handles += _stream_recorders(adapter, seen)
        text = adapter.format_prompt("Hello! Can you tell me about the weather today?")
        ids = adapter.tokenizer(text, add_special_tokens=False)["input_ids"][:16] or [0]
        n_vocab = adapter.model.get_input_embeddings().weight.shape[0]
        adapter.model(input_ids=torch.tensor([[i % n_vocab for i in ids]], device=adapter.input_device), use_cache=False)
    except BakingError as exc:
        errors.append(str(exc))
    finally:
        for handle in handles:
            handle.remove()
    errors += [f"{label}: baked output differs from the hooked edit by {error:.2g} (relative; tolerance {tolerance:g})"
               for label, error in worst.items() if not error <= tolerance]
    scale = 1.0
    if not errors and "embedding" in seen and "input" in seen:
        scale = _embedding_scale(seen["embedding"], seen["input"], tolerance, errors)
    message = "; ".join(errors)
    if message:
        message = f"{type(adapter.model).__name__}: baking would not equal the hooks: {message}. Use hooks."
    adapter._bake_verification = (message, scale)  # type: ignore[attr-defined]
    return message or None


def _add_write_checks(adapter: ModelAdapter, basis: Tensor, worst: dict[str, float], handles: list) -> None:
    """Forward hooks (their handles appended to ``handles`` as they are registered, so a caller can
    remove them even after a failure) on every write point that re-run the module with its
    projections baked to remove span(``basis`` [D, K]) and record, per write label in ``worst``,
    the largest per-token error against the hooked edit, relative to the output's norm.
    Raises ``BakingError`` for a write whose projections cannot be found."""
    busy: set[int] = set()  # modules being re-run (their hook must not recurse)

    def check_write(write: nn.Module, label: str, projections: list[_Projection]):
        names = {id(p): n for n, p in write.named_parameters()}

        def hook(module, args, kwargs, output):
            if id(module) in busy:
                return None
            real = output[0] if isinstance(output, tuple) else output
            device = real.device
            fn = _edit_fn(Eraser(basis.to(device), basis.to(device)), 1.0, affine=False)
            edited = {names[key]: value for key, value in _baked(projections, fn).items()}
            busy.add(id(module))
            try:
                baked = torch.func.functional_call(module, edited, args, kwargs, strict=False)
            finally:
                busy.discard(id(module))
            baked = baked[0] if isinstance(baked, tuple) else baked
            expected = fn(real).float()
            error = ((baked.float() - expected).norm(dim=-1) / real.float().norm(dim=-1).clamp_min(1e-30)).max().item()
            worst[label] = max(worst.get(label, 0.0), error)
            return None

        return hook

    for index, points in enumerate(adapter.hook_points):
        for name, write in zip(points.names or [str(i) for i in range(len(points.writes))], points.writes):
            label = f"layer {index} {name} ({type(write).__name__})"
            hook = check_write(write, label, _write_projections(write, adapter.d_model))
            handles.append(write.register_forward_hook(hook, with_kwargs=True))


def _stream_recorders(adapter: ModelAdapter, seen: dict[str, Tensor]) -> list:
    """Hooks (handles returned) recording the embedding output (``seen["embedding"]``) and the
    stream entering layer 0 (``seen["input"]``), float32."""
    embedding = adapter.model.get_input_embeddings()
    return [
        embedding.register_forward_hook(lambda m, a, out: seen.__setitem__("embedding", out.detach().float())),
        adapter.layers[0].register_forward_pre_hook(
            lambda m, args, kwargs: seen.__setitem__("input", (args[0] if args else kwargs["hidden_states"]).detach().float()),
            with_kwargs=True),
    ]


def _embedding_scale(embedding: Tensor, stream: Tensor, tolerance: float, errors: list[str]) -> float:
    """The constant c with stream = c * embedding (least squares; NaN if their sizes differ), and an
    entry in ``errors`` when the stream entering layer 0 is not that multiple within ``tolerance``."""
    emb, x = embedding.reshape(-1), stream.to(embedding.device).reshape(-1)
    scale = float((emb @ x) / (emb @ emb).clamp_min(1e-30)) if emb.numel() == x.numel() else float("nan")
    if not (emb.numel() == x.numel() and (x - scale * emb).norm() <= tolerance * x.norm()):
        errors.append("the stream entering the first layer is not the embedding output (position embeddings or "
                      "another transform are added), so editing the embedding rows cannot edit it")
    return scale


def check_bakeable(adapter: ModelAdapter, removal: Removal) -> None:
    """Raise ``BakingError`` unless baking ``removal`` into the weights is exact.

    Exact needs: write points verified at load (``LayerHookPoints.checked``) and not post-sublayer
    norms; a removal at every layer, linear on the writes; a plain embedding whose rows are the stream
    entering layer 0; and the projections of every write, dense or mixture-of-experts, edited to give
    exactly the hooked output (``_verify_bakeable``, once per adapter).
    """
    if not all(p.checked for p in adapter.hook_points):
        raise BakingError(f"The write points of {type(adapter.model).__name__} were not verified; baking needs "
                          "them checked (models.check_write_points). Use hooks.")
    if any(p.post_sublayer_norms for p in adapter.hook_points):
        names = sorted({n for p in adapter.hook_points if p.post_sublayer_norms for n in p.names})
        raise BakingError(
            f"{type(adapter.model).__name__} normalises sublayer outputs after they are computed "
            f"(post-sublayer norms {names}, as Gemma-2/3, GLM-4, OLMo-2), so an edit of the residual writes cannot "
            "be folded into the weights exactly. Use the hook mode (interventions are applied as hooks)."
        )
    if sorted(set(removal.layers)) != list(range(adapter.n_layers)):
        raise BakingError("Only removals at all layers can be baked; narrower scopes use hooks.")
    if removal.layer_alpha is not None and any(w != 1.0 for w in removal.layer_alpha.values()):
        raise BakingError("Per-layer weights other than 1 edit each layer differently; they cannot be baked. Use hooks.")
    if removal.alpha != 1.0 and removal.mode == "reference":
        raise BakingError("Reference-mode reflection edits every block input; it cannot be baked. Use hooks.")
    if removal.affine and removal.centres is not None:
        raise BakingError("An affine eraser with per-layer centres edits every block input; it cannot be baked. Use hooks.")
    embedding = adapter.model.get_input_embeddings()
    if type(embedding) is not nn.Embedding:
        raise BakingError(f"The embedding {type(embedding).__name__} transforms its output; use hooks.")
    for points in adapter.hook_points:
        for write in points.writes:
            _write_projections(write, adapter.d_model)
    if (problem := _verify_bakeable(adapter)) is not None:
        raise BakingError(problem)
    scale = adapter._bake_verification[1]  # type: ignore[attr-defined]
    if removal.affine and removal.eraser.bias is not None and abs(scale - 1.0) > 1e-6:
        raise BakingError(f"{type(adapter.model).__name__} scales its embeddings by {scale:.4g} before the first layer, "
                          "so an affine edit of the embedding rows is not the edit of the stream. Use hooks.")


@torch.no_grad()
def bake(adapter: ModelAdapter, removal: Removal) -> dict[str, Tensor]:
    """Fold ``removal`` (all layers) into the weights in place; returns the original tensors.

    Embedding rows get the affine edit (they are the stream entering layer 0); attention and MLP
    output projections (weight and bias) get the linear part: for a mixture of experts, every
    expert's (per-expert modules or fused 3-D weights) and the shared experts'. Tied embeddings are
    untied first.
    """
    check_bakeable(adapter, removal)
    untie_embeddings(adapter.model)
    originals: dict[str, Tensor] = {}
    names = {id(p): n for n, p in adapter.model.named_parameters()}

    def edit(param: Tensor, fn: HookFn) -> None:
        originals[names[id(param)]] = param.detach().clone()
        param.copy_(fn(param))

    embedding = adapter.model.get_input_embeddings().weight
    eraser = removal.eraser.to(embedding.device)
    edit(embedding, _edit_fn(eraser, removal.alpha, removal.affine))
    for points in adapter.hook_points:
        for write in points.writes:
            for projection in _write_projections(write, adapter.d_model):  # dense, or every expert + shared
                eraser = removal.eraser.to(projection.weight.device)
                for param, fn in projection.edit(_edit_fn(eraser, removal.alpha, affine=False)):
                    edit(param, fn)  # each output vector of W (a column of nn.Linear's) is a write direction
    return originals


@torch.no_grad()
def restore(adapter: ModelAdapter, originals: dict[str, Tensor]) -> None:
    params = dict(adapter.model.named_parameters())
    for name, value in originals.items():
        params[name].copy_(value)


@contextmanager
def applied(adapter: ModelAdapter, intervention: Intervention | None, bake_weights: bool = False) -> Iterator[str]:
    """Apply an intervention for the block, baked into the weights where asked and exact; a
    ``Replacement`` by copying its weights in (restored after the block).

    Yields "baked", "hooks", "replaced" or "none" (what was used).
    """
    if intervention is None:
        yield "none"
        return
    if isinstance(intervention, Replacement):
        originals = replace_weights(adapter, intervention)
        try:
            yield "replaced"
        finally:
            restore(adapter, originals)
        return
    if bake_weights and isinstance(intervention, Removal):
        try:
            check_bakeable(adapter, intervention)
        except BakingError:
            pass
        else:
            originals = bake(adapter, intervention)
            try:
                yield "baked"
            finally:
                restore(adapter, originals)
            return
    with intervene(adapter, intervention):
        yield "hooks"


# ---------------------------------------------------------------------- constructors and plans
def removal_for(directions: DirectionSet, pos_index: int, layer: int, layers: Sequence[int], k: int | None = None,
                alpha: float = 1.0, mode: ReflectionMode = "reference", affine: bool = True,
                writes: bool = True, weights: Sequence[float] | None = None) -> Removal:
    """The method's removal (or reflection) of component (pos_index, layer), applied at ``layers``.

    Affine methods (LEACE) are centred at each layer on that layer's mean at the same position.
    ``writes=False``: block inputs only. ``weights``: one strength per layer of ``layers``
    (``Removal.layer_alpha``), instead of ``alpha``.
    """
    layers = list(layers)
    if weights is not None and len(weights) != len(layers):
        raise ValueError(f"{len(weights)} per-layer weights for {len(layers)} layers; give one weight per layer.")
    centres = directions.bias[pos_index].float() if (affine and directions.bias is not None) else None
    layer_alpha = None if weights is None else {l: float(w) for l, w in zip(layers, weights)}
    return Removal(directions.eraser(pos_index, layer, k, affine=affine), layers, alpha, mode, affine,
                   centres=centres, writes=writes, layer_alpha=layer_alpha)


def actadd_for(directions: DirectionSet, pos_index: int, layer: int, coefficient: float) -> ActAdd:
    """ActAdd of the component's unit direction times ``coefficient`` (signed) at its layer."""
    return ActAdd(coefficient * directions.direction[pos_index, layer].float(), layer)


@dataclass(frozen=True)
class InterventionSpec:
    """A named, serialisable intervention of the evaluation plan.

    kind: "baseline", "removal" (ablation / projection / erasure), "reflection" (alpha != 1),
    "actadd" (coefficient = |c|; the sign is not part of the spec: ``build`` is given it per
    prompt set, decided by the plan, ``pipeline.plan``) or "model" (another model's weights: the
    ``Replacement`` found under ``method`` in the mapping given to ``build``; evaluate-model runs).
    ``scope``: the scope label of a removal or reflection (one, top0.5, all). ``components``:
    (pos_index, layer, k) of each component in scope when each keeps its own direction or P
    (empty: the best component's at every layer of ``layers``, the reference's default).
    ``weights``: one removal strength per layer of ``layers`` (empty: ``alpha`` at every layer), the
    per-layer kernel of the Pareto search (``search.kernel_weights``); see ``Removal.layer_alpha``.
    """

    name: str
    kind: str
    method: str | None = None
    pos_index: int = 0
    position: int = -1
    layer: int = 0
    layers: tuple[int, ...] = ()
    alpha: float = 1.0
    mode: str = "reference"
    affine: bool = True
    coefficient: float = 0.0
    k: int | None = None
    scope: str = ""
    components: tuple[tuple[int, int, int | None], ...] = ()
    weights: tuple[float, ...] = ()

    def build(self, direction_sets: dict[str, DirectionSet], sign: float | None = None) -> Intervention | None:
        """The intervention as specified. ActAdd adds ``sign * coefficient`` times its unit direction:
        ``sign`` (+1 adds, -1 subtracts) is required for ActAdd and ignored by the other kinds."""
        if self.kind == "baseline":
            return None
        if self.kind == "model":
            replacement = direction_sets.get(self.method)  # type: ignore[call-overload]
            if not isinstance(replacement, Replacement):
                raise ValueError(f"{self.name}: no model weights ({self.method!r}) were given to build it from.")
            return replacement
        directions = direction_sets[self.method]
        if self.kind == "actadd":
            if sign is None:
                raise ValueError(f"{self.name}: ActAdd needs its sign (+1 adds the direction, -1 subtracts it).")
            return actadd_for(directions, self.pos_index, self.layer, sign * self.coefficient)
        if self.components and self.weights:
            raise ValueError(f"{self.name}: per-layer weights apply to one direction at every layer, not to own components.")
        if self.components:
            return Composite([removal_for(directions, p, l, [l], k, self.alpha, self.mode, self.affine)  # type: ignore[arg-type]
                              for p, l, k in self.components])
        return removal_for(directions, self.pos_index, self.layer, self.layers, self.k, self.alpha,
                           self.mode, self.affine, weights=self.weights or None)  # type: ignore[arg-type]

    def to_dict(self) -> dict:
        """The JSON of the plan; ``weights`` only when set (plans without them read as before)."""
        out = {**self.__dict__, "layers": list(self.layers), "components": [list(c) for c in self.components]}
        if self.weights:
            out["weights"] = list(self.weights)
        else:
            out.pop("weights")
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "InterventionSpec":
        return cls(**{**d, "layers": tuple(d["layers"]), "components": tuple(tuple(c) for c in d.get("components", ())),
                      "weights": tuple(float(w) for w in d.get("weights", ()))})


REMOVAL_NAMES = {"diff_in_means": "ablation", "inlp": "projection", "leace": "erasure"}
