"""INLP: Iterative Nullspace Projection (Ravfogel et al. 2020), fitted for the whole grid at once.

Reference semantics (DESIGN.md §6; the eliroc98/refusal_direction port), per (position, layer):

1. balance the classes to the smaller count (a seeded choice of the rows kept), harmful = 1;
2. a seeded 80/20 train/dev split (at least 4 dev points), the same for every (p, l);
3. up to ``max_iter`` times: fit an L2-regularised logistic regression on the *projected* train
   data (loss = mean BCE + λ‖w‖², λ = 1 / (2·C·n_train), unpenalised intercept); record its dev
   accuracy (prediction: harmful when the logit is > 0); add w to the directions and set
   P = I − (orthogonal projector onto their span); when the dev accuracy is below
   ``min_accuracy`` stop — ``"reference"`` mode adds that failing classifier to P first (as the
   reference tool does), ``"skip"`` mode (the original paper) does not; project train and dev.
4. outputs: an orthonormal V with P = I − VVᵀ, its rank, the dev accuracies, and the first
   classifier's unit direction oriented so that harmful activations score higher.

How it is fast (all (p, l) problems are solved together as one batch, on the inputs' device):

* **Representer theorem.** With the penalty on w only, the optimum satisfies
  w = −X̃ᵀ(σ(z) − y) / (2λn): it lies in the row span of the projected train data X̃, which
  is inside the row span of the original train data X. So one thin QR per problem,
  Xᵀ = Q₀R (Q₀: [D, r], r = min(n, D)), turns the whole run into an exact r-dimensional problem
  with train coordinates F = XQ₀ = Rᵀ ([n, r]) and dev coordinates G = X_dev Q₀ (the part of a
  dev point outside span(Q₀) is orthogonal to every w, so it never changes a logit). Every fit
  is then an n×n-sized problem (n ≈ 200 ≪ D; F is a square root of the Gram matrix XXᵀ), and
  no D×D matrix is ever formed; the D-dimensional directions are Q₀ times their coordinates.
* **Batched Newton (IRLS) in float64.** The loss is strictly convex; damped Newton steps
  (Cholesky solves of the [r+1, r+1] Hessians of all unconverged problems at once, Armijo
  backtracking, full steps once they are small) run until the gradient norm is below
  ``newton_rtol`` (1e-10) times its initial value, so the fit reaches the same optimum as
  sklearn/LBFGS, only more precisely (LBFGS stops when the loss no longer changes in float64).
* **Incremental basis.** Each new w is orthogonal to the earlier directions in exact
  arithmetic (it lies in the span of the projected data); two Gram–Schmidt passes remove the
  rounding, and the projections of F and G are rank-one updates.
* Problems that have stopped leave the batch (compaction), and so do converged Newton solves.

Two edge cases, handled the same way by the sequential reference in ``bench/inlp_reference.py``:
when the projected train data is numerically zero (all min(n_train, D) directions of its span
are used) the run stops before fitting, since no further classifier could change P; and a
degenerate classifier — one whose train logits without the intercept vary by at most
``DEGENERATE_SPREAD`` (1e-8), i.e. the intercept alone, as when all points are equal, so that w
is rounding noise — has its accuracy recorded but adds no direction and stops the run (the
reference tool would add nothing and repeat it until ``max_iter``; P is the same). A degenerate
first classifier gives a zero ``direction``.
"""

from __future__ import annotations

import math
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Literal, Sequence

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from .base import DirectionSet

StopMode = Literal["reference", "skip"]
KPolicy = Literal["none", "fixed", "acc99", "acc95"]

# The projected train data counts as exhausted below this fraction of its original norm.
EXHAUSTED_RTOL = 1e-9
# A classifier whose train logits (without the intercept) vary by at most this much is degenerate:
# it is the intercept alone (e.g. all points equal), and its direction is rounding noise.
DEGENERATE_SPREAD = 1e-8
# Bytes of float64 temporaries per chunk of problems in the QR reduction.
_CHUNK_BYTES = 512 * 2**20


@dataclass
class INLPConfig:
    """Settings of INLP (defaults: the reference semantics of DESIGN.md §6).

    Attributes:
        max_iter: most classifiers per (p, l).
        min_accuracy: stop once a classifier's dev accuracy is below this.
        C: inverse regularisation strength; λ = 1 / (2·C·n_train).
        dev_fraction: fraction of the balanced data held out for the dev accuracy (≥ 4 points).
        seed: seeds the class balancing and the train/dev split.
        stop_mode: "reference" adds the failing classifier to P before stopping; "skip" does not.
        newton_rtol: the Newton solves stop when ‖gradient‖ ≤ newton_rtol · ‖initial gradient‖.
        max_newton: at most this many Newton steps per fit (a warning says if any fit hit it).
    """

    max_iter: int = 100
    min_accuracy: float = 0.55
    C: float = 0.1
    dev_fraction: float = 0.2
    seed: int = 42
    stop_mode: StopMode = "reference"
    newton_rtol: float = 1e-10
    max_newton: int = 100

    def __post_init__(self) -> None:
        if self.max_iter < 1:
            raise ValueError(f"max_iter must be >= 1, got {self.max_iter}")
        if self.C <= 0:
            raise ValueError(f"C must be > 0, got {self.C}")
        if not 0 < self.dev_fraction < 1:
            raise ValueError(f"dev_fraction must be in (0, 1), got {self.dev_fraction}")
        if self.stop_mode not in ("reference", "skip"):
            raise ValueError(f"stop_mode must be 'reference' or 'skip', got {self.stop_mode!r}")


@dataclass
class BalancedSplit:
    """Which prompts each (p, l) problem uses; the same for every problem of a grid.

    The balanced data set is ``[harmful[harmful_rows]; harmless[harmless_rows]]`` (length
    2·n_min) with ``labels`` 1 then 0; ``train`` and ``dev`` index into it.
    """

    harmful_rows: Tensor  # [n_min] int64, sorted
    harmless_rows: Tensor  # [n_min] int64, sorted
    train: Tensor  # [n_train] int64
    dev: Tensor  # [n_dev] int64
    labels: Tensor  # [2 n_min] float64

    @property
    def n_train(self) -> int:
        return len(self.train)


def balanced_split(n_harmful: int, n_harmless: int, config: INLPConfig) -> BalancedSplit:
    """Balance to the smaller class (seeded choice of rows) and split 80/20 (seeded permutation).

    The split is ``numpy.random.default_rng(seed).permutation(2·n_min)`` with the first
    ``max(4, int(2·n_min·dev_fraction))`` indices as dev, as in the reference tool; the rows kept
    from the larger class are drawn with ``default_rng([seed, 1])``.
    """
    n_min = min(n_harmful, n_harmless)
    n_total = 2 * n_min
    n_dev = max(4, int(n_total * config.dev_fraction))
    if n_total - n_dev < 2:
        raise ValueError(
            f"INLP needs more prompts: {n_harmful} harmful and {n_harmless} harmless leave "
            f"{n_total - n_dev} training points after balancing and the dev split."
        )
    choose = np.random.default_rng([config.seed, 1])

    def rows(n: int) -> Tensor:
        kept = np.arange(n) if n == n_min else np.sort(choose.choice(n, n_min, replace=False))
        return torch.from_numpy(kept).long()

    harmful_rows, harmless_rows = rows(n_harmful), rows(n_harmless)
    perm = torch.from_numpy(np.random.default_rng(config.seed).permutation(n_total)).long()
    labels = torch.cat([torch.ones(n_min), torch.zeros(n_min)]).double()
    return BalancedSplit(harmful_rows, harmless_rows, perm[n_dev:], perm[:n_dev], labels)


# ---------------------------------------------------------------------------------- Newton
@contextmanager
def _lapack_threads(device: torch.device) -> Iterator[None]:
    """Run batched LAPACK calls single-threaded on the CPU.

    torch parallelises a batched factorisation over the batch while MKL threads each matrix,
    which oversubscribes the cores: 120 Cholesky factorisations of 206×206 took 0.96 s with
    two threads on a busy two-core machine and 0.036 s with one. On GPUs nothing changes.
    """
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _softplus(z: Tensor) -> Tensor:
    """log(1 + eˣ), exact for all z (torch's softplus switches to x above a threshold)."""
    return z.clamp_min(0) + torch.log1p(torch.exp(-z.abs()))


def _loss(faug: Tensor, theta: Tensor, y: Tensor, pen: Tensor) -> Tensor:
    """Mean BCE with logits + λ‖w‖²; faug [A, n, r+1], theta [A, r+1] -> [A]."""
    z = torch.bmm(faug, theta.unsqueeze(-1)).squeeze(-1)
    return (_softplus(z) - y * z).mean(-1) + 0.5 * (pen * theta * theta).sum(-1)


def fit_logistic_batched(
    features: Tensor, y: Tensor, lam: float, rtol: float = 1e-10, max_steps: int = 100
) -> tuple[Tensor, Tensor, int]:
    """L2-regularised logistic regressions with unpenalised intercepts, by damped Newton.

    Minimises mean BCE(F w + b, y) + lam·‖w‖² for every problem of the batch. Steps are
    Newton steps (batched Cholesky solves) with Armijo backtracking; once a step is small —
    Newton decrement² ≤ 1e-10 and no train logit moves by more than 0.01, where the quadratic
    model is exact to about 1% and the loss changes can fall below float64 resolution — it
    is taken in full (quadratic convergence).

    Args:
        features: [A, n, r] float64 design matrices (A problems, n points, r features).
        y: [n] float64 labels in {0, 1}, shared by the problems.
        lam: the L2 coefficient λ.
        rtol: a problem has converged when ‖gradient‖ ≤ rtol · ‖gradient at the start‖, or when
            its Newton decrement² is ≤ 1e-24 (rounding floor) after a full step.
        max_steps: at most this many Newton steps.

    Returns:
        w [A, r], b [A] (float64) and the number of problems that did not converge.
    """
    A, n, r = features.shape
    dev, dt = features.device, features.dtype
    pen = torch.full((r + 1,), 2.0 * lam, device=dev, dtype=dt)
    pen[-1] = 0.0
    pos = y > 0.5
    theta = torch.zeros(A, r + 1, device=dev, dtype=dt)  # the results, [w, b]
    n_pos = float(y.sum())
    if 0 < n_pos < n:  # start at the intercept-only optimum
        theta[:, -1] = math.log(n_pos / (n - n_pos))
    # The unfinished problems, compacted: ids, design matrices [F, 1], parameters, start gradients.
    ids = torch.arange(A, device=dev)
    fa = torch.cat([features, torch.ones(A, n, 1, device=dev, dtype=dt)], dim=-1)
    th = theta.clone()
    g_start = torch.zeros(A, device=dev, dtype=dt)
    n_failed = 0

    def retire(mask: Tensor) -> None:
        nonlocal ids, fa, th, g_start
        theta[ids[mask]] = th[mask]
        keep = ~mask
        ids, fa, th, g_start = ids[keep], fa[keep], th[keep], g_start[keep]

    for step in range(max_steps + 1):
        z = torch.bmm(fa, th.unsqueeze(-1)).squeeze(-1)
        sig_neg = torch.sigmoid(-z)
        resid = torch.where(pos, -sig_neg, torch.sigmoid(z))  # σ(z) − y, accurate for any z
        grad = torch.bmm(fa.transpose(1, 2), resid.unsqueeze(-1)).squeeze(-1) / n + pen * th
        gnorm = grad.norm(dim=-1)
        if step == 0:
            g_start = gnorm.clone()
        done = gnorm <= rtol * g_start
        if step == max_steps:
            n_failed += int((~done).sum())
            done = torch.ones_like(done)
        if bool(done.any()):
            keep = ~done
            z, grad, sig_neg = z[keep], grad[keep], sig_neg[keep]
            retire(done)
        if ids.numel() == 0:
            break
        weight = torch.sigmoid(z) * sig_neg / n  # σ(z)(1 − σ(z)) / n, accurate for any z
        hess = torch.bmm(fa.transpose(1, 2), fa * weight.unsqueeze(-1))
        hess.diagonal(dim1=-2, dim2=-1).add_(pen)
        with _lapack_threads(dev):
            chol, info = torch.linalg.cholesky_ex(hess)
            jitter = 1e-12
            while bool((info != 0).any()) and jitter < 1:  # numerically singular: a little ridge
                bad = info != 0
                h = hess[bad]
                h.diagonal(dim1=-2, dim2=-1).add_(jitter * h.diagonal(dim1=-2, dim2=-1).abs().amax(-1, keepdim=True))
                chol[bad], info[bad] = torch.linalg.cholesky_ex(h)
                jitter *= 1e3
            delta = -torch.cholesky_solve(grad.unsqueeze(-1), chol).squeeze(-1)
        decrement = -(grad * delta).sum(-1)  # Newton decrement², ≥ 0
        dz = torch.bmm(fa, delta.unsqueeze(-1)).squeeze(-1).abs().amax(-1)
        accepted = (decrement <= 1e-10) & (dz <= 1e-2)  # small: the full step, no line search
        new = th + delta
        if not bool(accepted.all()):  # Armijo backtracking for the others
            idx = (~accepted).nonzero().squeeze(-1)
            sub = fa if idx.numel() == ids.numel() else fa[idx]
            f0 = _loss(sub, th[idx], y, pen)
            t = torch.ones(idx.numel(), device=dev, dtype=dt)
            pending = torch.ones(idx.numel(), dtype=torch.bool, device=dev)
            for _ in range(60):
                cand = th[idx] + t.unsqueeze(-1) * delta[idx]
                ok = pending & (_loss(sub, cand, y, pen) <= f0 - 1e-4 * t * decrement[idx])
                new[idx[ok]] = cand[ok]
                pending &= ~ok
                if not bool(pending.any()):
                    break
                t = torch.where(pending, 0.5 * t, t)
            accepted[idx] = ~pending
        stalled = ~accepted  # no decrease found (should not happen): keep the point, give up
        new[stalled] = th[stalled]
        th = new
        n_failed += int(stalled.sum())
        finished = stalled | (decrement <= 1e-24)
        if bool(finished.any()):
            retire(finished)
        if ids.numel() == 0:
            break
    return theta[:, :-1], theta[:, -1], n_failed


# ---------------------------------------------------------------------------------- INLP
def _reduce(
    harmful: Tensor, harmless: Tensor, split: BalancedSplit, device: torch.device
) -> tuple[Tensor, Tensor, Tensor]:
    """Per problem b = p·L + l: Q₀ [B, D, r], train coordinates F [B, n, r], dev G [B, m, r] (float64)."""
    n1, P, L, D = harmful.shape
    B = P * L
    h1 = harmful.reshape(n1, B, D)
    h0 = harmless.reshape(harmless.shape[0], B, D)
    rows1, rows0 = split.harmful_rows.to(h1.device), split.harmless_rows.to(h0.device)
    train, dev = split.train.to(device), split.dev.to(device)
    n, m, r = len(train), len(dev), min(len(train), D)
    q0 = torch.empty(B, D, r, dtype=torch.float64, device=device)
    feats = torch.empty(B, n, r, dtype=torch.float64, device=device)
    dev_feats = torch.empty(B, m, r, dtype=torch.float64, device=device)
    for sl in _chunks(B, 3 * len(split.labels) * D):
        x = torch.cat([h1[rows1, sl].to(device), h0[rows0, sl].to(device)]).transpose(0, 1).double()
        with _lapack_threads(device):
            q, rfac = torch.linalg.qr(x[:, train].transpose(1, 2))  # Xᵀ = Q₀ R
        q0[sl], feats[sl] = q, rfac.transpose(1, 2)
        dev_feats[sl] = torch.bmm(x[:, dev], q)
        del x, q, rfac
    return q0, feats, dev_feats


def _chunks(total: int, doubles_per_item: int) -> Iterator[slice]:
    """Slices of ``range(total)`` whose float64 temporaries stay within ``_CHUNK_BYTES``."""
    size = max(1, _CHUNK_BYTES // (8 * doubles_per_item))
    for start in range(0, total, size):
        yield slice(start, min(total, start + size))


def fit_inlp(
    harmful: Tensor,
    harmless: Tensor,
    config: INLPConfig | None = None,
    positions: Sequence[int] | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> DirectionSet:
    """Fit INLP for every (position, layer) of the grid, all problems in one batch.

    Args:
        harmful: [N1, P, L, D] activations of harmful prompts (label 1).
        harmless: [N0, P, L, D] activations of harmless prompts (label 0).
        config: INLP settings (default ``INLPConfig()``).
        positions: the P token positions as negative offsets (default range(-P, 0)).
        device: where to compute (default: the device of ``harmful``; a GPU when it is there).
        progress: show a progress bar over the INLP iterations (with the active problem count).

    Returns:
        A ``DirectionSet`` (method "inlp", tensors on the CPU) with
        ``left`` [P, L, D, K_max] float32: V, the orthonormal basis of the removed span in the
        order the classifiers were found (each column oriented harmful-positive on the train
        data), zero-padded to the largest rank K_max of the grid; ``right`` = ``bias`` = None
        (the eraser is P = I − VVᵀ); ``k`` [P, L] int64 (the rank of VVᵀ); ``direction`` [P, L, D] the first
        classifier's unit direction, oriented so that harmful train points score higher (zero if
        that classifier was degenerate); ``scale`` [P, L] the norm of mean(harmful) −
        mean(harmless) over all prompts (unbalanced); ``extras["accuracies"]`` [P, L, max_iter]
        float32 dev accuracies of the successive classifiers, NaN after the last.
    """
    config = config or INLPConfig()
    P, _, _ = _grid_shape(harmful, harmless)
    positions = list(positions) if positions is not None else list(range(-P, 0))
    if len(positions) != P:
        raise ValueError(f"{len(positions)} positions given for activations with P = {P}.")
    device = torch.device(device) if device is not None else harmful.device
    split = balanced_split(harmful.shape[0], harmless.shape[0], config)
    q0, feats, dev_feats = _reduce(harmful, harmless, split, device)
    y = split.labels[split.train].to(device)
    y_dev = split.labels[split.dev].to(device) > 0.5
    lam = 1.0 / (2.0 * config.C * split.n_train)
    basis, k, acc, first, n_unconverged = _iterate(feats, dev_feats, y, y_dev, lam, config, progress)
    if n_unconverged:
        warnings.warn(
            f"INLP: {n_unconverged} logistic-regression fits did not converge within {config.max_newton} Newton steps."
        )
    return _direction_set(q0, basis, k, acc, first, harmful, harmless, positions)


def _grid_shape(harmful: Tensor, harmless: Tensor) -> tuple[int, int, int]:
    """``(P, L, D)`` of harmful [N1, P, L, D] and harmless [N0, P, L, D]; ``ValueError`` if they differ."""
    if harmful.dim() != 4 or harmless.dim() != 4 or harmful.shape[1:] != harmless.shape[1:]:
        raise ValueError(
            f"Expected harmful [N1, P, L, D] and harmless [N0, P, L, D] with equal P, L, D; got "
            f"{tuple(harmful.shape)} and {tuple(harmless.shape)}."
        )
    _, P, L, D = harmful.shape
    return P, L, D


def _iterate(
    feats: Tensor, dev_feats: Tensor, y: Tensor, y_dev: Tensor, lam: float, config: INLPConfig, progress: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor, int]:
    """The INLP iterations of every problem at once, in the reduced coordinates (the kernel).

    ``feats`` [B, n, r] / ``dev_feats`` [B, n_dev, r] float64 train and dev points, ``y`` [n] labels,
    ``y_dev`` [n_dev] bool. Returns ``(basis [B, r, max_iter] float64 V' (columns beyond each k
    zero), k [B] int64, accuracies [B, max_iter] float32 (NaN after the last classifier), first
    [B, r] float64 the first classifier's unit direction (zero if degenerate), n_unconverged)``.
    """
    B, _, r = feats.shape
    device = feats.device
    pos = y > 0.5
    f0_norm = feats.flatten(1).norm(dim=-1)
    max_iter = config.max_iter
    basis = torch.zeros(B, r, max_iter, dtype=torch.float64, device=device)  # V in Q₀ coordinates
    k = torch.zeros(B, dtype=torch.int64, device=device)  # directions kept per problem
    acc = torch.full((B, max_iter), float("nan"), dtype=torch.float32, device=device)
    first = torch.zeros(B, r, dtype=torch.float64, device=device)

    active = torch.arange(B, device=device)  # problem ids still running
    F, G, V = feats, dev_feats, basis.clone()  # compacted to the active problems
    n_unconverged = 0
    bar = tqdm(total=max_iter, desc="INLP", unit="iter", leave=False, disable=not progress)
    for t in range(max_iter):
        # Stop problems whose projected train data is exhausted (no direction left to find).
        alive = F.flatten(1).norm(dim=-1) > EXHAUSTED_RTOL * f0_norm[active]
        if t >= r:
            alive = torch.zeros_like(alive)
        if not bool(alive.all()):
            basis[active[~alive]] = V[~alive]
            active, F, G, V = active[alive], F[alive], G[alive], V[alive]
        if active.numel() == 0:
            break
        bar.set_postfix(active=int(active.numel()))

        w, b, failed = fit_logistic_batched(F, y, lam, config.newton_rtol, config.max_newton)
        n_unconverged += failed
        logits = torch.bmm(G, w.unsqueeze(-1)).squeeze(-1) + b.unsqueeze(-1)
        accuracy = ((logits > 0) == y_dev).double().mean(-1)
        acc[active, t] = accuracy.float()

        # Orient (harmful scores higher on the train data), then orthonormalise against V.
        scores = torch.bmm(F, w.unsqueeze(-1)).squeeze(-1)
        gap = scores[:, pos].mean(-1) - scores[:, ~pos].mean(-1)
        w = torch.where(gap.unsqueeze(-1) < 0, -w, w)
        w_norm = w.norm(dim=-1)
        spread = scores.amax(-1) - scores.amin(-1)
        if t == 0:
            first[active] = torch.where((spread > DEGENERATE_SPREAD).unsqueeze(-1), w / w_norm.clamp_min(1e-300).unsqueeze(-1), 0.0)
        v = w
        if t > 0:
            for _ in range(2):
                v = v - torch.bmm(V[:, :, :t], torch.bmm(V[:, :, :t].transpose(1, 2), v.unsqueeze(-1))).squeeze(-1)
        v_norm = v.norm(dim=-1)
        degenerate = ~(v_norm > 1e-8 * w_norm) | ~(spread > DEGENERATE_SPREAD)
        v = v / v_norm.clamp_min(1e-300).unsqueeze(-1)

        fail = accuracy < config.min_accuracy
        add = ~degenerate & (~fail if config.stop_mode == "skip" else torch.ones_like(fail))
        V[:, :, t] = torch.where(add.unsqueeze(-1), v, torch.zeros_like(v))
        k[active] += add.long()

        go_on = ~fail & ~degenerate
        if t + 1 == max_iter:
            go_on = torch.zeros_like(go_on)
        if not bool(go_on.all()):
            basis[active[~go_on]] = V[~go_on]
            active, F, G, V, v = active[go_on], F[go_on], G[go_on], V[go_on], v[go_on]
        # Project train and dev data: x ← x − (x·v) v.
        F = F - torch.bmm(F, v.unsqueeze(-1)) * v.unsqueeze(1)
        G = G - torch.bmm(G, v.unsqueeze(-1)) * v.unsqueeze(1)
        bar.update(1)
    bar.close()
    if active.numel():
        basis[active] = V
    return basis, k, acc, first, n_unconverged


def _direction_set(q0: Tensor, basis: Tensor, k: Tensor, acc: Tensor, first: Tensor, harmful: Tensor,
                   harmless: Tensor, positions: list[int]) -> DirectionSet:
    """``fit_inlp``'s ``DirectionSet`` from ``_iterate``'s results, mapped back to D dimensions by
    ``q0`` [B, D, r] (see ``fit_inlp`` for the fields)."""
    _, P, L, D = harmful.shape
    B, max_iter = acc.shape
    # Back to D dimensions: V = Q₀ V', first_dir = Q₀ first' (chunked, straight to float32 on the CPU).
    k_max = int(k.max()) if B else 0
    left = torch.empty(B, D, k_max, dtype=torch.float32)
    direction = torch.empty(B, D, dtype=torch.float32)
    for sl in _chunks(B, D * (k_max + 1)):
        left[sl] = torch.bmm(q0[sl], basis[sl, :, :k_max]).float().cpu()
        direction[sl] = torch.bmm(q0[sl], first[sl].unsqueeze(-1)).squeeze(-1).float().cpu()
    mean_diff = torch.mean(harmful, 0, dtype=torch.float64) - torch.mean(harmless.to(harmful.device), 0, dtype=torch.float64)
    return DirectionSet(
        method="inlp",
        positions=positions,
        direction=direction.reshape(P, L, D),
        scale=mean_diff.norm(dim=-1).float().cpu(),
        left=left.reshape(P, L, D, k_max),
        k=k.reshape(P, L).cpu(),
        extras={"accuracies": acc.reshape(P, L, max_iter).cpu()},
    )


def k_for_policy(directions: DirectionSet, policy: KPolicy, k: int | None = None) -> Tensor:
    """How many of INLP's directions (the first k columns of ``left``) to keep, per (p, l).

    Args:
        directions: an INLP ``DirectionSet`` (needs ``extras["accuracies"]`` for acc99/acc95).
        policy: ``"none"``: all (the fitted ``directions.k``); ``"fixed"``: min(k, fitted); ``"acc99"`` / ``"acc95"``:
            the number of classifiers whose dev accuracy is ≥ 0.99 / 0.95, counted over all the
            recorded accuracies (not only a leading run; INLP accuracies usually fall, so the two
            rarely differ), at most the fitted k. A count of 0 stays 0: selection skips that
            component, as the reference does (it is not clamped to 1).
        k: the k of the "fixed" policy (≥ 0).

    Returns:
        [P, L] int64. P restricted to k keeps the first k classifier directions exactly
        (I - V_k V_kᵀ, V_k an orthonormal basis of the first k classifiers); the reference
        rebuilds P from an SVD of those classifiers' summed rowspace projections, which can
        add spurious dimensions (DESIGN.md §11, docs/reference_parity.md).
    """
    fitted = directions.k.long()
    if policy == "none":
        return fitted.clone()
    if policy == "fixed":
        if k is None or k < 0:
            raise ValueError(f"The 'fixed' policy needs k >= 0, got {k}.")
        return fitted.clamp(max=k)
    thresholds = {"acc99": 0.99, "acc95": 0.95}
    if policy not in thresholds:
        raise ValueError(f"Unknown k policy {policy!r}; choose none, fixed, acc99 or acc95.")
    accuracies = directions.extras["accuracies"]
    count = (accuracies >= thresholds[policy]).sum(-1).long()  # NaN compares False
    return torch.minimum(count, fitted)
