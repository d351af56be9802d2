"""Cheap proxies of an intervention, without generation: selection's bypass score and KL.

For an intervention I, on the validation prompts at the last prompt position (``selection``'s
definitions, its ``refusal_score`` and ``kl_divergence``):

* refusal proxy: mean refusal score on the harmful prompts under I (selection's bypass score:
  lower means less refusal);
* KL: mean KL(baseline || I) of the next-token distribution on the harmless prompts.

``ProxyScorer`` is built once per run: it encodes the prompts and keeps the baseline logits of the
harmless ones. Interventions that edit with the same eraser, or add vectors (ActAdd), are run
*stacked*: the prompt batch is repeated once per configuration along the batch dimension and one
``StackedEdit`` applies every configuration's per-layer strengths to its own rows, so a sweep of a
few hundred configurations costs a few hundred / ``stack`` forwards. Other interventions (own
components, ``Composite``) run one per forward with their own hooks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from .activations import refusal_score
from .directions.base import erase
from .hooks import Hook, HookFn
from .interventions import ActAdd, Intervention, Removal, intervene
from .models import ModelAdapter
from .selection import kl_divergence


@dataclass(frozen=True)
class Proxy:
    """The proxies of one intervention: ``refusal`` (mean refusal score, harmful) and ``kl`` (harmless)."""

    refusal: float
    kl: float


def _tensor_id(t: Tensor | None) -> tuple | None:
    return None if t is None else (t.data_ptr(), tuple(t.shape), tuple(t.stride()), str(t.device))


def stack_key(intervention: Intervention | None) -> tuple | None:
    """Interventions with the same key can share one ``StackedEdit``: removals of one eraser (same
    tensors, affine-ness and centres), or ActAdds ("add"); None: it cannot be stacked. The baseline
    (None) stacks with anything (key ``("any",)``)."""
    if intervention is None:
        return ("any",)
    if isinstance(intervention, ActAdd):
        return ("add",)
    if isinstance(intervention, Removal):
        e = intervention.eraser
        return ("erase", _tensor_id(e.left), _tensor_id(e.right), _tensor_id(e.bias), intervention.affine,
                _tensor_id(intervention.centres))
    return None


@dataclass
class StackedEdit:
    """C interventions applied at once, configuration c to rows [c B, (c + 1) B) of a batch of C B rows.

    ``alpha_in`` / ``alpha_w`` [L, C]: each configuration's strength at each layer's block input and
    writes (0: no edit); ``add`` [L, C, D]: vectors added at the block input (ActAdd). The eraser,
    its per-layer centres and affine-ness are shared (``stack_key``). A row's edit is exactly that of
    its intervention's own hooks (``interventions.Removal.hooks``, ``ActAdd.hooks``): the same
    ``erase`` arithmetic in float32 with that row's strength.
    """

    removal: Removal | None  # a removal of the group (its eraser and centres), None: ActAdds only
    alpha_in: Tensor
    alpha_w: Tensor
    add: Tensor

    @property
    def n_configs(self) -> int:
        return self.alpha_in.shape[1]

    @classmethod
    def of(cls, interventions: Sequence[Intervention | None], n_layers: int, d_model: int) -> "StackedEdit":
        """The stacked edit of ``interventions`` (all of one ``stack_key``, baselines allowed)."""
        keys = {stack_key(i) for i in interventions} - {("any",)}
        if len(keys) > 1 or None in keys:
            raise ValueError(f"These interventions cannot be stacked (keys {keys}).")
        C = len(interventions)
        alpha_in, alpha_w = torch.zeros(n_layers, C), torch.zeros(n_layers, C)
        add = torch.zeros(n_layers, C, d_model)
        removal = None
        for c, item in enumerate(interventions):
            if isinstance(item, ActAdd):
                add[item.layer, c] = item.vector.float().cpu()
            elif isinstance(item, Removal):
                removal = item
                inputs = set(item.block_input_layers())
                for layer in sorted(set(item.layers)):
                    alpha_in[layer, c] = item.alpha_at(layer) if layer in inputs else 0.0
                    alpha_w[layer, c] = item.alpha_at(layer) if item.writes else 0.0
        return cls(removal, alpha_in, alpha_w, add)

    def _per_row(self, values: Tensor, rows: int) -> Tensor:
        if rows % self.n_configs:
            raise ValueError(f"A batch of {rows} rows cannot hold {self.n_configs} configurations.")
        return values.repeat_interleave(rows // self.n_configs, dim=0)

    def _input_fn(self, layer: int, device: torch.device) -> HookFn:
        alphas, adds = self.alpha_in[layer].to(device), self.add[layer].to(device)
        eraser = self.removal.eraser.to(device) if self.removal is not None else None
        centre = self.removal.centre(layer) if self.removal is not None else None
        centre = None if centre is None else centre.to(device)

        def edit(x: Tensor) -> Tensor:
            y = x.to(device, torch.float32)
            if eraser is not None:
                y = erase(y, eraser.left, eraser.right, centre, self._per_row(alphas, len(y))[:, None, None])
            return (y + self._per_row(adds, len(y))[:, None, :]).to(x.dtype)

        return edit

    def _write_fn(self, layer: int, device: torch.device) -> HookFn:
        alphas = self.alpha_w[layer].to(device)
        eraser = self.removal.eraser.to(device)  # type: ignore[union-attr]

        def edit(x: Tensor) -> Tensor:
            y = erase(x.to(device, torch.float32), eraser.left, eraser.right, None,
                      self._per_row(alphas, len(x))[:, None, None])
            return y.to(x.dtype)

        return edit

    def hooks(self, adapter: ModelAdapter) -> list[Hook]:
        """Block-input and write hooks at every layer some configuration edits."""
        hooks: list[Hook] = []
        for layer, points in enumerate(adapter.hook_points):
            device = adapter.layer_device(layer)
            if bool(self.alpha_in[layer].any()) or bool(self.add[layer].any()):
                hooks.append(Hook(points.block, "input", self._input_fn(layer, device)))
            if self.removal is not None and bool(self.alpha_w[layer].any()):
                hooks.extend(Hook(write, "output", self._write_fn(layer, device)) for write in points.writes)
        return hooks


def _repeat(enc: dict[str, Tensor], times: int) -> dict[str, Tensor]:
    return {k: v.repeat(times, *([1] * (v.dim() - 1))) for k, v in enc.items()}


class ProxyScorer:
    """The refusal proxy and KL of interventions on fixed validation prompts (module docstring).

    ``harmful`` / ``harmless``: the validation prompts (those selection scored: after its filter);
    ``batch_size``: prompts per forward; ``stack``: configurations per stacked forward (rows per
    forward: ``stack * batch_size``). The baseline logits of the harmless prompts [N, V] are computed
    once, here.
    """

    def __init__(self, adapter: ModelAdapter, harmful: Sequence[str], harmless: Sequence[str],
                 batch_size: int = 16, stack: int = 8):
        if not harmful or not harmless:
            raise ValueError("The proxies need harmful and harmless validation prompts.")
        if stack < 1 or batch_size < 1:
            raise ValueError(f"stack and batch_size must be at least 1 (got {stack}, {batch_size}).")
        self.adapter, self.stack = adapter, stack
        self.n_harmful, self.n_harmless = len(harmful), len(harmless)
        chunks = lambda xs: [list(xs[i : i + batch_size]) for i in range(0, len(xs), batch_size)]  # noqa: E731
        self.harmful = [adapter.encode_instructions(b) for b in chunks(harmful)]
        self.harmless = [adapter.encode_instructions(b) for b in chunks(harmless)]
        with torch.inference_mode():
            self.baseline = [adapter.last_logits(enc) for enc in self.harmless]

    @torch.inference_mode()
    def _sums(self, edit: StackedEdit | Intervention | None, n: int) -> tuple[Tensor, Tensor]:
        """Summed refusal scores [n] (harmful) and KLs [n] (harmless) of ``n`` stacked configurations."""
        refusal, kl = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
        ids = self.adapter.refusal_token_ids
        with intervene(self.adapter, edit):  # type: ignore[arg-type]
            for enc in self.harmful:
                scores = refusal_score(self.adapter.last_logits(_repeat(enc, n)), ids).cpu().double()
                refusal += scores.view(n, -1).sum(1)
            for enc, base in zip(self.harmless, self.baseline):
                logits = self.adapter.last_logits(_repeat(enc, n))
                kl += kl_divergence(base.repeat(n, 1), logits).cpu().double().view(n, -1).sum(1)
        return refusal, kl

    def score(self, interventions: Sequence[Intervention | None]) -> list[Proxy]:
        """The proxies of every intervention, in order (stacked where ``stack_key`` allows)."""
        out: list[Proxy | None] = [None] * len(interventions)
        groups: dict[tuple, list[int]] = {}
        for i, item in enumerate(interventions):
            key = stack_key(item)
            groups.setdefault(key if key is not None else ("alone", i), []).append(i)
        for key, indices in groups.items():
            size = 1 if key[0] == "alone" else self.stack
            for start in range(0, len(indices), size):
                chunk = indices[start : start + size]
                items = [interventions[i] for i in chunk]
                edit = items[0] if key[0] == "alone" else StackedEdit.of(items, self.adapter.n_layers, self.adapter.d_model)
                refusal, kl = self._sums(edit, len(chunk))
                for j, i in enumerate(chunk):
                    out[i] = Proxy(float(refusal[j]) / self.n_harmful, float(kl[j]) / self.n_harmless)
        return out  # type: ignore[return-value]
