"""Diff-in-means (Arditi et al. 2024): r[p, l] = mean(harmful) - mean(harmless)."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .base import DirectionSet


def mean_difference(harmful: Tensor, harmless: Tensor) -> Tensor:
    """[N1, P, L, D], [N0, P, L, D] -> r [P, L, D] (accumulated in float64, returned float32)."""
    return (harmful.double().mean(0) - harmless.double().mean(0)).float()


def fit_diff_in_means(harmful: Tensor, harmless: Tensor, positions: Sequence[int] | None = None) -> DirectionSet:
    """One candidate direction per (position, layer); its eraser is the ablation of r̂."""
    r = mean_difference(harmful, harmless)
    norm = r.norm(dim=-1)
    unit = r / norm.clamp_min(1e-12).unsqueeze(-1)
    P, L, _ = r.shape
    return DirectionSet(
        method="diff_in_means",
        positions=list(positions) if positions is not None else list(range(-P, 0)),
        direction=unit,
        scale=norm,
        left=unit.unsqueeze(-1).clone(),
        k=torch.ones(P, L, dtype=torch.int64),
    )
