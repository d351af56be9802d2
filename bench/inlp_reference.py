"""The sequential reference INLP: one (position, layer) problem at a time, slow and simple.

This is the one copy of the reference, used by ``bench/inlp.py`` (the baseline it times) and by
``tests/test_inlp.py`` (the semantics the fast solver must reproduce). It follows the reference
tool (eliroc98/refusal_direction) step by step, in float64:

* each classifier is fitted in the primal, over all D + 1 parameters: by default with Newton's
  method (dense (D+1)×(D+1) Hessians, exact to rounding), or (``solver="lbfgs"``) with torch's
  L-BFGS and a strong-Wolfe line search, as the tool does, to a tight gradient tolerance;
* the nullspace projection is rebuilt densely every iteration, as the tool does: the D×D sum of
  the rank-one projections onto the unit directions found so far is decomposed with a full SVD
  (the tool runs two: ``svdvals`` and ``svd``; one is enough here), P = I − UUᵀ over the
  singular vectors with singular value > 0.5 (the directions are orthogonal, so the singular
  values are ~1 or ~0), and the original train/dev data are multiplied by the D×D matrix P.

Only the data preparation (class balancing and train/dev split) is shared with the fast solver.
The two edge rules of the fast solver are mirrored: stop before fitting when the projected train
data is numerically zero, and stop without adding a direction when a classifier is degenerate
(its train logits without the intercept vary by at most 1e-8: the intercept alone).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from refusal_directions.directions.inlp import DEGENERATE_SPREAD, EXHAUSTED_RTOL, INLPConfig, balanced_split


@dataclass
class ReferenceResult:
    """One (p, l) problem: ``basis`` [D, k] orthonormal (float64), dev ``accuracies`` (one per
    classifier), ``first_dir`` [D] (unit, harmful-positive; zeros if degenerate), fit ``seconds``."""

    basis: Tensor
    accuracies: list[float]
    first_dir: Tensor
    seconds: float = 0.0

    @property
    def k(self) -> int:
        """The number of directions in P's nullspace (columns of ``basis``)."""
        return self.basis.shape[1]


def _objective(X: Tensor, y: Tensor, w: Tensor, b: Tensor, lam: float) -> Tensor:
    return F.binary_cross_entropy_with_logits(X @ w + b, y) + lam * (w @ w)


def fit_logreg_lbfgs(X: Tensor, y: Tensor, lam: float, rtol: float = 1e-12, max_iter: int = 20000) -> tuple[Tensor, Tensor]:
    """Primal L2-regularised logistic regression (mean BCE + lam‖w‖², free intercept), float64.

    L-BFGS with a strong-Wolfe line search until max |gradient| ≤ rtol · max |gradient at 0|,
    or until the loss stops changing in float64 (which is where it usually stops: a relative
    error of ~1e-8 in w, more along flat directions of ill-conditioned data).
    """
    X, y = X.double(), y.double()
    w = torch.zeros(X.shape[1], dtype=torch.float64, device=X.device, requires_grad=True)
    b = torch.zeros(1, dtype=torch.float64, device=X.device, requires_grad=True)
    g0 = torch.autograd.grad(_objective(X, y, w, b, lam), [w, b])
    scale = max(float(g.abs().max()) for g in g0)
    opt = torch.optim.LBFGS(
        [w, b], lr=1.0, max_iter=max_iter, max_eval=2 * max_iter, tolerance_grad=rtol * scale,
        tolerance_change=1e-30, history_size=100, line_search_fn="strong_wolfe",
    )

    def closure() -> Tensor:
        opt.zero_grad()
        loss = _objective(X, y, w, b, lam)
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def fit_logreg_newton(X: Tensor, y: Tensor, lam: float, rtol: float = 1e-12, max_steps: int = 200) -> tuple[Tensor, Tensor]:
    """The same fit by Newton's method in the primal: a dense (D+1)×(D+1) Hessian per step.

    Steps are halved until the loss does not increase (beyond float64 rounding); stops when
    ‖gradient‖ ≤ rtol · ‖gradient at 0‖ or when the update is below rounding.
    """
    X, y = X.double(), y.double()
    n, D = X.shape
    A = torch.cat([X, torch.ones(n, 1, dtype=X.dtype, device=X.device)], dim=1)
    pen = torch.full((D + 1,), 2.0 * lam, dtype=X.dtype, device=X.device)
    pen[-1] = 0.0
    theta = torch.zeros(D + 1, dtype=X.dtype, device=X.device)

    def loss(th: Tensor) -> float:
        return float(F.binary_cross_entropy_with_logits(A @ th, y) + 0.5 * (pen * th * th).sum())

    g0 = None
    for _ in range(max_steps):
        p = torch.sigmoid(A @ theta)
        grad = A.T @ (p - y) / n + pen * theta
        g0 = float(grad.norm()) if g0 is None else g0
        if float(grad.norm()) <= rtol * g0:
            break
        hess = A.T @ (A * (p * (1 - p) / n).unsqueeze(1)) + torch.diag(pen)
        step = -torch.cholesky_solve(grad.unsqueeze(1), torch.linalg.cholesky(hess)).squeeze(1)
        f, t = loss(theta), 1.0
        while loss(theta + t * step) > f + 4e-16 * abs(f) and t > 1e-12:
            t /= 2
        theta = theta + t * step
        if float((t * step).norm()) <= 1e-15 * (1.0 + float(theta.norm())):  # at the rounding floor
            break
    return theta[:-1], theta[-1:]


def reference_inlp(
    X_train: Tensor, y_train: Tensor, X_dev: Tensor, y_dev: Tensor, config: INLPConfig, solver: str = "newton"
) -> ReferenceResult:
    """INLP on one problem: X_train [n, D], y_train [n] in {0, 1}, X_dev [m, D], y_dev [m].

    ``solver``: "newton" (exact to rounding; the default, used by the tests) or "lbfgs" (the
    reference tool's optimiser; its loss-based stopping leaves a relative error of ~1e-8 in
    the loss, so on ill-conditioned data (e.g. the last layers, with norms ~1000) its later
    directions drift from the exact ones).
    """
    fit = {"newton": fit_logreg_newton, "lbfgs": fit_logreg_lbfgs}[solver]
    X_train, X_dev = X_train.double(), X_dev.double()
    y_train, y_dev = y_train.double(), y_dev.double()
    D = X_train.shape[1]
    lam = 1.0 / (2.0 * config.C * len(y_train))
    eye = torch.eye(D, dtype=torch.float64, device=X_train.device)
    rowspace_sum = torch.zeros(D, D, dtype=torch.float64, device=X_train.device)
    basis = torch.zeros(D, 0, dtype=torch.float64, device=X_train.device)
    first_dir = torch.zeros(D, dtype=torch.float64, device=X_train.device)
    accuracies: list[float] = []
    Xtr, Xdv = X_train, X_dev
    for it in range(config.max_iter):
        if Xtr.norm() <= EXHAUSTED_RTOL * X_train.norm():
            break
        w, b = fit(Xtr, y_train, lam)
        acc = float((((Xdv @ w + b) > 0).double() == y_dev).double().mean())
        accuracies.append(acc)
        scores = X_train @ w
        if scores[y_train == 1].mean() < scores[y_train == 0].mean():
            w = -w
        if float(scores.max() - scores.min()) <= DEGENERATE_SPREAD:  # intercept only: w is noise
            break
        unit = w / w.norm()
        if it == 0:
            first_dir = unit
        failed = acc < config.min_accuracy
        if failed and config.stop_mode == "skip":
            break
        rowspace_sum = rowspace_sum + torch.outer(unit, unit)
        U, S, _ = torch.linalg.svd(rowspace_sum)
        basis = U[:, S > 0.5]
        P = eye - basis @ basis.T
        if failed:
            break
        Xtr, Xdv = X_train @ P, X_dev @ P
    return ReferenceResult(basis, accuracies, first_dir)


def reference_grid(
    harmful: Tensor,
    harmless: Tensor,
    config: INLPConfig,
    pairs: Sequence[tuple[int, int]] | None = None,
    device: torch.device | str | None = None,
    solver: str = "newton",
) -> dict[tuple[int, int], ReferenceResult]:
    """Reference INLP for the given (position index, layer) pairs (default: all), one at a time."""
    import time

    _, P, L, _ = harmful.shape
    split = balanced_split(harmful.shape[0], harmless.shape[0], config)
    device = torch.device(device) if device is not None else harmful.device
    y = split.labels.to(device)
    out = {}
    for p, l in pairs if pairs is not None else [(p, l) for p in range(P) for l in range(L)]:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        X = torch.cat([harmful[split.harmful_rows, p, l], harmless[split.harmless_rows, p, l]]).to(device).double()
        result = reference_inlp(X[split.train], y[split.train], X[split.dev], y[split.dev], config, solver)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        result.seconds = time.perf_counter() - start
        out[(p, l)] = result
    return out


def planted_activations(
    n_harmful: int,
    n_harmless: int,
    n_positions: int,
    n_layers: int,
    d: int,
    n_planted: int = 4,
    strength: float = 3.0,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> tuple[Tensor, Tensor]:
    """Synthetic activations [N, P, L, D] (float32) with planted structure, per (p, l):

    a shared offset (so the intercept matters), anisotropic Gaussian noise (per-dimension scales
    log-uniform in [0.3, 3]) and a class-mean difference along ``n_planted`` random orthonormal
    directions with strengths strength·2^-j. The anisotropy makes INLP find several informative
    directions before the dev accuracy falls to chance.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    B = n_positions * n_layers
    k = max(1, min(n_planted, d))
    planted, _ = torch.linalg.qr(torch.randn(B, d, k, generator=gen))  # [B, d, k]
    gaps = strength * 0.5 ** torch.arange(k, dtype=torch.float32)  # [k]
    delta = (planted * gaps).sum(-1)  # [B, d]
    offset = 2.0 * torch.randn(B, d, generator=gen)
    scales = torch.exp(torch.empty(B, d).uniform_(math.log(0.3), math.log(3.0), generator=gen))

    def draw(n: int, sign: float) -> Tensor:
        noise = torch.randn(n, B, d, generator=gen) * scales
        return (offset + sign * 0.5 * delta + noise).reshape(n, n_positions, n_layers, d)

    return draw(n_harmful, 1.0).to(device), draw(n_harmless, -1.0).to(device)
