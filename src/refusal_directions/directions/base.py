"""The output type shared by every direction-finding method.

Each method produces, for every (position, layer) candidate component, the same things:

* a unit *steering direction* (harmful side positive), used by ActAdd;
* a low-rank affine *eraser* ``x -> x - U Wᵀ (x - b)`` used by the removal interventions
  (``erase`` is its arithmetic, shared by hooks, persistent slots, baking and LoRA export):
  - diff-in-means ablation: U = W = r̂ (rank 1), no bias;
  - INLP nullspace projection P = I - V Vᵀ: U = W = V (orthonormal, rank k), no bias;
  - LEACE: U = proj_left, W = proj_rightᵀ, b = the mean (affine variant).

So selection and interventions treat all methods alike.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

METHODS = ("diff_in_means", "inlp", "leace")


def erase(x: Tensor, left: Tensor, right: Tensor, bias: Tensor | None = None, alpha: float | Tensor = 1.0) -> Tensor:
    """The eraser arithmetic, the one implementation every hook, slot, bake and LoRA edit uses.

    ``x - alpha * ((x - bias) @ right) @ left.T`` for ``x`` [..., D], ``left`` / ``right`` [D, K],
    ``bias`` [D] or None (linear), ``alpha`` a float or a 0-d tensor (the persistent slots'). Runs
    in the dtype of its inputs (callers pass float32) and returns the same shape as ``x``.
    """
    delta = x if bias is None else x - bias
    return x - alpha * (delta @ right) @ left.T


@dataclass
class Eraser:
    """``x -> x - alpha * U Wᵀ (x - b)`` for one component; ``U``, ``W``: [D, K], ``b``: [D] or None.

    Applied to points of the residual stream (block inputs) the bias is used; applied to
    *writes* (increments added to the stream) only the linear part is, so that erasing the
    stream and then adding an erased write keeps the stream erased.
    """

    left: Tensor
    right: Tensor
    bias: Tensor | None = None

    @property
    def k(self) -> int:
        """The number of directions erased: the columns of ``left`` (0 for an identity eraser)."""
        return self.left.shape[1]

    def to(self, device: torch.device | str) -> "Eraser":
        bias = None if self.bias is None else self.bias.to(device)
        return Eraser(self.left.to(device), self.right.to(device), bias)


@dataclass
class DirectionSet:
    """All candidates of one method, for P token positions and L layers.

    Attributes:
        method: "diff_in_means", "inlp" or "leace".
        positions: the token positions, as negative offsets from the end of the prompt
            (e.g. [-5, -4, -3, -2, -1] for the five post-instruction tokens of Qwen).
        direction: [P, L, D] float32 unit steering directions, oriented so that harmful
            activations project higher than harmless ones.
        scale: [P, L] float32 norm of the diff-in-means vector at (p, l): ActAdd's natural
            coefficient scale.
        left: [P, L, D, K] float32 eraser column basis U (columns beyond ``k`` are zero).
        right: [P, L, D, K] read-out W, or None when W = U (orthogonal projections).
        bias: [P, L, D] affine centre b, or None.
        k: [P, L] int64 number of columns of U in use: the directions each eraser removes (INLP:
            the classifiers kept; diff-in-means: 1; LEACE: its eraser's). Saved under the tensor
            name "rank", the artifact format of every recorded run.
        extras: method-specific tensors (e.g. INLP "accuracies" [P, L, max_iter], NaN-padded).
    """

    method: str
    positions: list[int]
    direction: Tensor
    scale: Tensor
    left: Tensor
    k: Tensor
    right: Tensor | None = None
    bias: Tensor | None = None
    extras: dict[str, Tensor] = field(default_factory=dict)

    @property
    def n_positions(self) -> int:
        return self.direction.shape[0]

    @property
    def n_layers(self) -> int:
        return self.direction.shape[1]

    def eraser(self, pos: int, layer: int, k: int | None = None, affine: bool = True) -> Eraser:
        """The eraser of component (pos index, layer), restricted to its first ``k`` columns."""
        k = int(self.k[pos, layer]) if k is None else min(k, int(self.k[pos, layer]))
        left = self.left[pos, layer, :, :k]
        right = left if self.right is None else self.right[pos, layer, :, :k]
        bias = self.bias[pos, layer] if (affine and self.bias is not None) else None
        return Eraser(left.float(), right.float(), bias)

    # ------------------------------------------------------------------ persistence
    def tensors(self) -> dict[str, Tensor]:
        out = {"direction": self.direction, "scale": self.scale, "left": self.left, "rank": self.k}
        if self.right is not None:
            out["right"] = self.right
        if self.bias is not None:
            out["bias"] = self.bias
        out.update({f"extra.{k}": v for k, v in self.extras.items()})
        return {k: v.contiguous().cpu() for k, v in out.items()}

    def metadata(self) -> dict[str, str]:
        return {"method": self.method, "positions": json.dumps(self.positions)}

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor], metadata: dict[str, str]) -> "DirectionSet":
        extras = {k.removeprefix("extra."): v for k, v in tensors.items() if k.startswith("extra.")}
        return cls(
            method=metadata["method"],
            positions=json.loads(metadata["positions"]),
            direction=tensors["direction"],
            scale=tensors["scale"],
            left=tensors["left"],
            k=tensors["rank"],
            right=tensors.get("right"),
            bias=tensors.get("bias"),
            extras=extras,
        )

    def save(self, path: Path, extra_metadata: dict[str, str] | None = None) -> None:
        from ..artifacts import save_safetensors

        save_safetensors(path, self.tensors(), {**self.metadata(), **(extra_metadata or {})})

    @classmethod
    def load(cls, path: Path) -> "DirectionSet":
        from ..artifacts import load_safetensors

        tensors, metadata = load_safetensors(path)
        return cls.from_tensors(tensors, metadata)
