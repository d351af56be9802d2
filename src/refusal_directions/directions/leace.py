"""LEACE (Belrose et al. 2023) per (position, layer), fitted with the ``concept-erasure`` package.

For a binary concept the LEACE eraser ``x - U Wᵀ (x - mean)`` moves activations along the
diff-in-means direction (U ∝ Σ_xz ∝ r) and reads the concept out with the Fisher direction
(W ∝ Σ⁻¹ r). Its steering direction is therefore r̂, the same as diff-in-means. With the trace
constraint of concept-erasure (on by default) the eraser can be a rank-2 mix of LEACE and the
orthogonal projection; we keep the non-negligible columns.

The affine variant (default) keeps the bias (the mean); the non-affine variant is the same
eraser without it (``DirectionSet.eraser(..., affine=False)``).
"""

from __future__ import annotations

from typing import Sequence

import torch
from concept_erasure import LeaceFitter
from torch import Tensor
from tqdm.auto import tqdm

from .base import DirectionSet
from .diff_in_means import mean_difference


def _compact(left: Tensor, right: Tensor, tol: float = 1e-6) -> tuple[Tensor, Tensor]:
    """Drop columns of U (rows of Wᵀ) whose contribution U[:, i] W[:, i]ᵀ is negligible."""
    weight = left.norm(dim=0) * right.norm(dim=0)
    keep = weight > tol * weight.max().clamp_min(1e-30)
    return left[:, keep], right[:, keep]


def fit_leace(
    harmful: Tensor,
    harmless: Tensor,
    positions: Sequence[int] | None = None,
    device: torch.device | str | None = None,
) -> DirectionSet:
    """Fit one LEACE eraser per (p, l) on all train activations (harmful label 1, harmless 0).

    ``device``: where to fit (default: where the activations are). Returns a ``DirectionSet``
    with ``left`` = U, ``right`` = W, ``bias`` = the mean of the activations.
    """
    n1, P, L, D = harmful.shape
    device = torch.device(device) if device is not None else harmful.device
    labels = torch.cat([torch.ones(n1), torch.zeros(harmless.shape[0])]).to(device)
    lefts, rights, biases = [], [], []
    for p in tqdm(range(P), desc="LEACE", leave=False):
        for l in range(L):
            x = torch.cat([harmful[:, p, l], harmless[:, p, l]]).to(device, torch.float32)
            eraser = LeaceFitter.fit(x, labels, affine=True).eraser
            left, right = _compact(eraser.proj_left, eraser.proj_right.T)
            lefts.append(left.cpu())
            rights.append(right.cpu())
            biases.append(eraser.bias.cpu())
    k_max = max(u.shape[1] for u in lefts)
    left = torch.zeros(P * L, D, k_max)
    right = torch.zeros(P * L, D, k_max)
    for i, (u, w) in enumerate(zip(lefts, rights)):
        left[i, :, : u.shape[1]] = u
        right[i, :, : w.shape[1]] = w
    r = mean_difference(harmful, harmless)
    norm = r.norm(dim=-1)
    return DirectionSet(
        method="leace",
        positions=list(positions) if positions is not None else list(range(-P, 0)),
        direction=r / norm.clamp_min(1e-12).unsqueeze(-1),
        scale=norm,
        left=left.reshape(P, L, D, k_max),
        right=right.reshape(P, L, D, k_max),
        bias=torch.stack(biases).reshape(P, L, D),
        k=torch.tensor([u.shape[1] for u in lefts], dtype=torch.int64).reshape(P, L),
    )
