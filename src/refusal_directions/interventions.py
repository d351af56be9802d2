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

from .directions.base import DirectionSet, Eraser
from .hooks import Hook, HookFn, apply_hooks
from .models import ModelAdapter

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
        y = x.to(left.device, torch.float32)
        delta = y if bias is None else y - bias
        return (y - alpha * (delta @ right) @ left.T).to(x.dtype)

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
    """

    eraser: Eraser
    layers: Sequence[int]
    alpha: float = 1.0
    mode: ReflectionMode = "reference"
    affine: bool = True
    name: str = "removal"
    centres: Tensor | None = None
    writes: bool = True

    @property
    def rank(self) -> int:
        return self.eraser.rank

    def centre(self, layer: int) -> Tensor | None:
        """The affine centre of ``layer``'s block input (None: linear)."""
        if not self.affine:
            return None
        return self.centres[layer] if self.centres is not None else self.eraser.bias

    def block_input_layers(self) -> list[int]:
        layers = sorted(set(self.layers))
        if (self.affine and self.centres is not None) or not self.writes:
            return layers
        if self.alpha == 1.0:
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
                hooks.append(Hook(points.block, "input", _edit_fn(centred, self.alpha, affine=True)))
            if self.writes:
                linear = _edit_fn(eraser, self.alpha, affine=False)
                hooks.extend(Hook(write, "output", linear) for write in points.writes)
        return hooks


@dataclass
class ActAdd:
    """Add ``vector`` (already scaled and signed) to the residual stream entering ``layer``."""

    vector: Tensor
    layer: int
    name: str = "actadd"
    rank = 0

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
    def rank(self) -> int:
        return max(p.rank for p in self.parts)

    def hooks(self, adapter: ModelAdapter) -> list[Hook]:
        return [h for part in self.parts for h in part.hooks(adapter)]


Intervention = Removal | ActAdd | Composite


@contextmanager
def intervene(adapter: ModelAdapter, *interventions: Intervention | None) -> Iterator[None]:
    """Install the hooks of ``interventions`` (None entries are skipped) for the block."""
    hooks = [h for i in interventions if i is not None for h in i.hooks(adapter)]
    with apply_hooks(hooks):
        yield


# ---------------------------------------------------------------------- persistent slots
class _LayerSlot(nn.Module):
    """The tensors one layer's persistent hooks read (float32, on the layer's device)."""

    def __init__(self, d_model: int, max_rank: int, device: torch.device):
        super().__init__()
        for name, shape in (("left", (d_model, max_rank)), ("right", (d_model, max_rank)), ("bias", (d_model,)),
                            ("add", (d_model,)), ("alpha_input", ()), ("alpha_writes", ())):
            self.register_buffer(name, torch.zeros(shape, dtype=torch.float32, device=device), persistent=False)

    def input_fn(self, x: Tensor) -> Tensor:
        y = x.to(self.left.device, torch.float32)
        return (y - self.alpha_input * ((y - self.bias) @ self.right) @ self.left.T + self.add).to(x.dtype)

    def write_fn(self, x: Tensor) -> Tensor:
        y = x.float()
        return (y - self.alpha_writes * (y @ self.right) @ self.left.T).to(x.dtype)


class InterventionSlots:
    """Hooks installed once at every block input and write point, driven by tensors.

    Loading an intervention only copies values into the slots' buffers (zeros: no effect), so a
    compiled decoding step (static KV cache, CUDA graphs) serves every intervention without
    recompiling: torch.compile does not notice hooks added after compilation, so swapping hooks
    would be silently ignored, while buffer contents are read at every replay. Per layer l:
    block input ``x - a_in[l] ((x - b) W) Uᵀ + v[l]``; writes ``w - a_w[l] (w W) Uᵀ``.
    """

    def __init__(self, adapter: ModelAdapter, max_rank: int = 1):
        self.adapter = adapter
        self.max_rank = max_rank
        self.slots = [_LayerSlot(adapter.d_model, max_rank, adapter.layer_device(l)) for l in range(adapter.n_layers)]

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
        eraser, rank = removal.eraser, removal.rank
        if rank > self.max_rank:
            raise ValueError(f"Intervention rank {rank} exceeds the slots' max_rank {self.max_rank}.")
        block_inputs = set(removal.block_input_layers())
        for layer in sorted(set(removal.layers)):
            slot = self.slots[layer]
            slot.left[:, :rank] = eraser.left
            slot.right[:, :rank] = eraser.right
            if (centre := removal.centre(layer)) is not None:
                slot.bias.copy_(centre)
            if removal.writes:
                slot.alpha_writes.fill_(removal.alpha)
            if layer in block_inputs:
                slot.alpha_input.fill_(removal.alpha)


# ---------------------------------------------------------------------- weight baking
def _output_projection(module: nn.Module, d_model: int) -> nn.Linear:
    children = dict(module.named_children())
    for name in _OUTPUT_PROJECTIONS:
        child = children.get(name)
        if isinstance(child, nn.Linear) and child.out_features == d_model:
            return child
    raise BakingError(f"Cannot find the output projection of {type(module).__name__}; use hooks instead.")


def check_bakeable(adapter: ModelAdapter, removal: Removal) -> None:
    """Raise ``BakingError`` unless baking ``removal`` into the weights is exact."""
    if any(p.post_sublayer_norms for p in adapter.hook_points):
        raise BakingError(
            f"{type(adapter.model).__name__} normalises sublayer outputs after they are computed "
            "(post-sublayer norms, as Gemma-2/3), so an edit of the residual writes cannot be folded "
            "into the weights exactly. Use the hook mode (interventions are applied as hooks)."
        )
    if sorted(set(removal.layers)) != list(range(adapter.n_layers)):
        raise BakingError("Only removals at all layers can be baked; narrower scopes use hooks.")
    if removal.alpha != 1.0 and removal.mode == "reference":
        raise BakingError("Reference-mode reflection edits every block input; it cannot be baked. Use hooks.")
    if removal.affine and removal.centres is not None:
        raise BakingError("An affine eraser with per-layer centres edits every block input; it cannot be baked. Use hooks.")
    embedding = adapter.model.get_input_embeddings()
    if type(embedding) is not nn.Embedding:
        raise BakingError(f"The embedding {type(embedding).__name__} transforms its output; use hooks.")
    for points in adapter.hook_points:
        for write in points.writes:
            _output_projection(write, adapter.d_model)


@torch.no_grad()
def _untie_embeddings(adapter: ModelAdapter) -> None:
    embedding, head = adapter.model.get_input_embeddings(), adapter.lm_head
    if head is not None and head.weight is embedding.weight:
        head.weight = nn.Parameter(embedding.weight.detach().clone(), requires_grad=False)
        for config in (adapter.model.config, adapter.model.config.get_text_config()):
            config.tie_word_embeddings = False


@torch.no_grad()
def bake(adapter: ModelAdapter, removal: Removal) -> dict[str, Tensor]:
    """Fold ``removal`` (all layers) into the weights in place; returns the original tensors.

    Embedding rows get the affine edit (they are the stream entering layer 0); attention and MLP
    output projections (weight and bias) get the linear part. Tied embeddings are untied first.
    """
    check_bakeable(adapter, removal)
    _untie_embeddings(adapter)
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
            proj = _output_projection(write, adapter.d_model)
            eraser = removal.eraser.to(proj.weight.device)
            linear = _edit_fn(eraser, removal.alpha, affine=False)
            edit(proj.weight, lambda w: linear(w.T).T)  # each column of W is a write direction
            if proj.bias is not None:
                edit(proj.bias, linear)
    return originals


@torch.no_grad()
def restore(adapter: ModelAdapter, originals: dict[str, Tensor]) -> None:
    params = dict(adapter.model.named_parameters())
    for name, value in originals.items():
        params[name].copy_(value)


@contextmanager
def applied(adapter: ModelAdapter, intervention: Intervention | None, bake_weights: bool = False) -> Iterator[str]:
    """Apply an intervention for the block, baked into the weights where asked and exact.

    Yields "baked", "hooks" or "none" (what was used).
    """
    if intervention is None:
        yield "none"
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
                writes: bool = True) -> Removal:
    """The method's removal (or reflection) of component (pos_index, layer), applied at ``layers``.

    Affine methods (LEACE) are centred at each layer on that layer's mean at the same position.
    ``writes=False``: block inputs only.
    """
    centres = directions.bias[pos_index].float() if (affine and directions.bias is not None) else None
    return Removal(directions.eraser(pos_index, layer, k, affine=affine), list(layers), alpha, mode, affine,
                   centres=centres, writes=writes)


def actadd_for(directions: DirectionSet, pos_index: int, layer: int, coefficient: float) -> ActAdd:
    """ActAdd of the component's unit direction times ``coefficient`` (signed) at its layer."""
    return ActAdd(coefficient * directions.direction[pos_index, layer].float(), layer)


@dataclass(frozen=True)
class InterventionSpec:
    """A named, serialisable intervention of the evaluation plan.

    kind: "baseline", "removal" (ablation / projection / erasure), "reflection" (alpha != 1) or
    "actadd" (coefficient = |c|; subtracted on harmful prompts to remove refusal, added on
    harmless prompts to induce it; capability metrics use the harmful-side sign).
    ``scope``: the scope label of a removal or reflection (one, top0.5, all). ``components``:
    (pos_index, layer, k) of each component in scope when each keeps its own direction or P
    (empty: the best component's at every layer of ``layers``, the reference's default).
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

    def build(self, direction_sets: dict[str, DirectionSet], harmful: bool = True) -> Intervention | None:
        """The intervention for prompts of one side: ActAdd's sign is decided here, and only here."""
        if self.kind == "baseline":
            return None
        directions = direction_sets[self.method]
        if self.kind == "actadd":
            sign = -1.0 if harmful else 1.0
            return actadd_for(directions, self.pos_index, self.layer, sign * self.coefficient)
        if self.components:
            return Composite([removal_for(directions, p, l, [l], k, self.alpha, self.mode, self.affine)  # type: ignore[arg-type]
                              for p, l, k in self.components])
        return removal_for(directions, self.pos_index, self.layer, self.layers, self.k, self.alpha,
                           self.mode, self.affine)  # type: ignore[arg-type]

    def to_dict(self) -> dict:
        return {**self.__dict__, "layers": list(self.layers), "components": [list(c) for c in self.components]}

    @classmethod
    def from_dict(cls, d: dict) -> "InterventionSpec":
        return cls(**{**d, "layers": tuple(d["layers"]), "components": tuple(tuple(c) for c in d.get("components", ()))})


REMOVAL_NAMES = {"diff_in_means": "ablation", "inlp": "projection", "leace": "erasure"}
