"""How the methods' directions relate, per (position, layer), for the report."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import DirectionSet


def _unit(x: Tensor) -> Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def principal_angles_deg(r_unit: Tensor, basis: Tensor, rank: Tensor) -> Tensor:
    """Angle (degrees) between span(r̂) and the span of the first ``rank`` columns of ``basis``.

    r_unit: [P, L, D]; basis: [P, L, D, K] orthonormal columns (zeros beyond rank); rank: [P, L].
    For a one-dimensional span there is a single principal angle: arccos ‖Vᵀ r̂‖.
    """
    k = torch.arange(basis.shape[-1])
    mask = (k < rank.unsqueeze(-1)).to(basis.dtype)  # [P, L, K]
    coords = torch.einsum("pld,pldk->plk", r_unit, basis) * mask
    return torch.rad2deg(torch.arccos(coords.norm(dim=-1).clamp(0.0, 1.0)))


def geometry(dim: DirectionSet, inlp: DirectionSet | None = None, leace: DirectionSet | None = None) -> dict:
    """Per-(p, l) comparison data, as nested lists [P][L] (JSON-ready).

    * ``cos_dim_inlp``: cosine between r̂ and INLP's first (oriented) direction;
    * ``angle_dim_inlp_subspace``: principal angle (degrees) between span(r̂) and the INLP subspace;
    * ``inlp_rank`` (INLP's k per component: the artifact keeps this name) and ``inlp_accuracies``
      (the dev-accuracy curve, NaN-padded);
    * ``cos_dim_leace_readout``: cosine between r̂ and LEACE's read-out (Fisher) direction W;
    * ``dim_norm``: ‖r‖.
    """
    r_unit = _unit(dim.direction.float())
    out: dict = {"positions": dim.positions, "dim_norm": dim.scale.tolist()}
    if inlp is not None:
        out["cos_dim_inlp"] = (r_unit * _unit(inlp.direction.float())).sum(-1).tolist()
        out["angle_dim_inlp_subspace"] = principal_angles_deg(r_unit, inlp.left.float(), inlp.k).tolist()
        out["inlp_rank"] = inlp.k.tolist()
        if "accuracies" in inlp.extras:
            out["inlp_accuracies"] = inlp.extras["accuracies"].tolist()
    if leace is not None and leace.right is not None and leace.right.shape[-1] > 0:  # rank 0 everywhere: no read-out
        readout = _unit(leace.right[..., 0].float())
        out["cos_dim_leace_readout"] = (r_unit * readout).sum(-1).abs().tolist()
    return out
