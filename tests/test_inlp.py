"""The batched INLP solver against the sequential reference (bench/inlp_reference.py), and its API."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))  # the one copy of the reference

from inlp_reference import planted_activations, reference_grid  # noqa: E402

from refusal_directions.activations import cache_activations  # noqa: E402
from refusal_directions.directions.base import DirectionSet  # noqa: E402
from refusal_directions.directions.inlp import (  # noqa: E402
    INLPConfig,
    balanced_split,
    fit_inlp,
    fit_logistic_batched,
    k_for_policy,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These problems are small: on a shared few-core machine, OpenMP threads only add waiting."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def activations(adapter, prompts: list[str], positions: list[int]) -> torch.Tensor:
    cached = cache_activations(adapter, prompts, positions)
    return cached[0] if isinstance(cached, tuple) else cached  # (activations, refusal scores)


def n_classifiers(ds: DirectionSet) -> torch.Tensor:
    return (~ds.extras["accuracies"].isnan()).sum(-1)


def assert_matches_reference(fast: DirectionSet, ref: dict) -> None:
    """Same classifiers, accuracies and k; first direction and subspace agree."""
    for (p, l), r in ref.items():
        acc = fast.extras["accuracies"][p, l]
        n_it = int(n_classifiers(fast)[p, l])
        assert n_it == len(r.accuracies), f"({p}, {l}): {acc[:n_it].tolist()} vs {r.accuracies}"
        torch.testing.assert_close(acc[:n_it].double(), torch.tensor(r.accuracies, dtype=torch.float64), atol=1e-6, rtol=0)
        k = int(fast.k[p, l])
        assert k == r.k, (p, l)
        if float(r.first_dir.norm()) == 0:  # a degenerate first classifier (intercept only)
            assert float(fast.direction[p, l].norm()) == 0, (p, l)
        else:
            cos = float(fast.direction[p, l].double() @ r.first_dir)
            assert cos >= 0.999, ((p, l), cos)
        if k:
            sv = torch.linalg.svdvals(fast.left[p, l, :, :k].double().T @ r.basis).clamp(max=1.0)
            angle = math.degrees(math.acos(float(sv.min())))
            assert angle < 1.0, ((p, l), angle)


@pytest.fixture(scope="module")
def planted():
    return planted_activations(80, 80, 2, 3, 48, n_planted=4, seed=1)


@pytest.fixture(scope="module")
def planted_fit(planted):
    return fit_inlp(*planted, INLPConfig(), progress=False)


def test_matches_reference_on_planted_data(planted, planted_fit):
    ref = reference_grid(*planted, INLPConfig())
    assert_matches_reference(planted_fit, ref)
    assert int(planted_fit.k.max()) >= 3  # the planted structure takes several classifiers
    assert bool((planted_fit.extras["accuracies"][..., 0] > 0.9).all())


def test_lbfgs_reference_agrees_on_well_conditioned_data(planted, planted_fit):
    # The reference tool's optimiser (the benchmark's other baseline) on two pairs.
    assert_matches_reference(planted_fit, reference_grid(*planted, INLPConfig(), pairs=[(0, 0), (1, 2)], solver="lbfgs"))


def test_matches_reference_when_the_span_is_exhausted():
    # d = 3 < n_train with signal in every dimension: all 3 directions are found, then the data is zero.
    harmful, harmless = planted_activations(40, 40, 1, 2, 3, n_planted=3, strength=12.0, seed=3)
    config = INLPConfig(min_accuracy=0.0)  # never stop on accuracy
    fast = fit_inlp(harmful, harmless, config, progress=False)
    assert_matches_reference(fast, reference_grid(harmful, harmless, config))
    assert fast.k.tolist() == [[3, 3]] and n_classifiers(fast).tolist() == [[3, 3]]


def test_matches_reference_on_tiny_model_activations():
    from tiny import make_adapter

    adapter = make_adapter("qwen2", n_layers=2, d_model=64)
    topics = ["a weapon", "a virus", "poison", "a bomb", "malware", "a fake passport", "stolen cards", "a scam"]
    harmful = [f"Explain how to make {t}, step {i}." for i in range(3) for t in topics]
    themes = ["the sea", "a cat", "rain", "bread", "spring", "a city", "music", "tea"]
    harmless = [f"Write a short poem about {t} number {i}" for i in range(3) for t in themes]
    h1 = activations(adapter, harmful, [-2, -1])
    h0 = activations(adapter, harmless, [-2, -1])
    config = INLPConfig(max_iter=30)
    fast = fit_inlp(h1, h0, config, progress=False)
    assert_matches_reference(fast, reference_grid(h1, h0, config))
    # Layer 0 sees the same template token in every prompt: all points equal, a degenerate
    # (intercept-only) classifier, no direction. Layer 1 has mixed in the prompt by attention.
    assert fast.k[:, 0].tolist() == [0, 0] and float(fast.direction[:, 0].abs().max()) == 0
    assert bool((fast.k[:, 1] >= 1).all())


def test_skip_mode_drops_exactly_the_failing_classifier(planted):
    ref_mode = fit_inlp(*planted, INLPConfig(stop_mode="reference"), progress=False)
    skip_mode = fit_inlp(*planted, INLPConfig(stop_mode="skip"), progress=False)
    torch.testing.assert_close(ref_mode.extras["accuracies"], skip_mode.extras["accuracies"], equal_nan=True)
    last = ref_mode.extras["accuracies"].gather(-1, (n_classifiers(ref_mode) - 1).unsqueeze(-1)).squeeze(-1)
    failed = last < 0.55
    assert bool(failed.any())
    assert torch.equal(ref_mode.k[failed], skip_mode.k[failed] + 1)
    assert torch.equal(ref_mode.k[~failed], skip_mode.k[~failed])
    for p, l in zip(*torch.nonzero(torch.ones_like(failed), as_tuple=True)):
        k = int(skip_mode.k[p, l])
        torch.testing.assert_close(ref_mode.left[p, l, :, :k], skip_mode.left[p, l, :, :k])
    assert skip_mode.k.tolist() == (ref_mode.k - failed.long()).tolist()


def test_basis_is_orthonormal_and_padded(planted_fit):
    ds = planted_fit
    P, L, D, k_max = ds.left.shape
    assert (P, L, D) == (2, 3, 48) and k_max == int(ds.k.max())
    assert ds.left.dtype == ds.direction.dtype == ds.scale.dtype == torch.float32 and ds.k.dtype == torch.int64
    assert ds.right is None and ds.bias is None and ds.method == "inlp" and ds.positions == [-2, -1]
    for p in range(P):
        for l in range(L):
            k = int(ds.k[p, l])
            V = ds.left[p, l, :, :k].double()
            torch.testing.assert_close(V.T @ V, torch.eye(k, dtype=torch.float64), atol=1e-6, rtol=0)
            assert bool((ds.left[p, l, :, k:] == 0).all())
            # The first column is the first classifier (reference mode: it is always kept).
            torch.testing.assert_close(ds.left[p, l, :, 0], ds.direction[p, l], atol=1e-6, rtol=0)


def test_first_direction_is_unit_and_harmful_positive(planted, planted_fit):
    harmful, harmless = planted
    d = planted_fit.direction
    torch.testing.assert_close(d.norm(dim=-1), torch.ones(2, 3))
    gap = torch.einsum("npld,pld->pl", harmful, d) / len(harmful) - torch.einsum("npld,pld->pl", harmless, d) / len(harmless)
    assert bool((gap > 0).all())
    # Swapping the classes (and so the train/dev split) flips the direction, up to the split.
    flipped = fit_inlp(harmless, harmful, INLPConfig(max_iter=1), progress=False)
    assert bool(((flipped.direction * d).sum(-1) < -0.8).all())


def test_scale_is_the_diff_in_means_norm_on_all_prompts(planted):
    harmful, harmless = planted
    ds = fit_inlp(harmful[:70], harmless, INLPConfig(max_iter=2), progress=False)
    expected = (harmful[:70].double().mean(0) - harmless.double().mean(0)).norm(dim=-1).float()
    torch.testing.assert_close(ds.scale, expected)


def test_balancing_uses_the_smaller_class():
    config = INLPConfig(seed=7)
    split = balanced_split(30, 50, config)
    assert split.harmful_rows.tolist() == list(range(30))
    rows = split.harmless_rows.tolist()
    assert len(rows) == 30 and rows == sorted(set(rows)) and max(rows) < 50 and rows != list(range(30))
    assert len(split.dev) == 12 and len(split.train) == 48
    assert sorted(split.dev.tolist() + split.train.tolist()) == list(range(60))
    assert split.labels.tolist() == [1.0] * 30 + [0.0] * 30
    again = balanced_split(30, 50, config)
    assert torch.equal(again.train, split.train) and torch.equal(again.harmless_rows, split.harmless_rows)
    assert not torch.equal(balanced_split(30, 50, INLPConfig(seed=8)).train, split.train)
    assert len(balanced_split(6, 9, config).dev) == 4  # at least 4 dev points
    with pytest.raises(ValueError, match="more prompts"):
        balanced_split(2, 9, config)


def test_imbalanced_input_equals_its_balanced_subset(planted):
    harmful, harmless = planted
    config = INLPConfig(seed=3)
    split = balanced_split(60, 80, config)
    direct = fit_inlp(harmful[:60], harmless, config, progress=False)
    by_hand = fit_inlp(harmful[:60], harmless[split.harmless_rows], config, progress=False)
    torch.testing.assert_close(direct.extras["accuracies"], by_hand.extras["accuracies"], equal_nan=True)
    torch.testing.assert_close(direct.left, by_hand.left)


def test_max_iter_caps_the_rank(planted):
    ds = fit_inlp(*planted, INLPConfig(max_iter=2, min_accuracy=0.0), progress=False)
    assert ds.extras["accuracies"].shape == (2, 3, 2)
    assert ds.k.tolist() == [[2, 2, 2], [2, 2, 2]]


def test_newton_reaches_the_optimum():
    torch.manual_seed(0)
    n, r = 60, 20
    X = torch.randn(3, n, r, dtype=torch.float64) * torch.tensor([1.0, 10.0, 100.0], dtype=torch.float64)[:, None, None]
    y = torch.cat([torch.ones(n // 2), torch.zeros(n // 2)]).double()
    X[:, : n // 2, 0] += 3.0  # separable in the third problem: large logits
    lam = 1 / (2 * 0.1 * n)
    w, b, failed = fit_logistic_batched(X, y, lam)
    assert failed == 0
    for i in range(3):
        wi = w[i].clone().requires_grad_()
        bi = b[i].clone().requires_grad_()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(X[i] @ wi + bi, y) + lam * wi @ wi
        gw, gb = torch.autograd.grad(loss, [wi, bi])
        g0 = (X[i].T @ (0.5 - y)).norm() / n
        assert float(torch.cat([gw, gb.reshape(1)]).norm()) < 1e-9 * float(g0)


def test_k_for_policy():
    nan = float("nan")
    accuracies = torch.tensor(
        [
            [[1.0, 0.995, 0.96, 0.5, nan], [0.97, 0.96, 0.6, 0.4, nan]],
            [[0.9, 0.8, 0.5, nan, nan], [0.99, 0.5, 0.999, 0.7, 0.3]],
        ]
    )
    rank = torch.tensor([[4, 4], [3, 5]])
    ds = DirectionSet(
        method="inlp", positions=[-2, -1], direction=torch.zeros(2, 2, 4), scale=torch.ones(2, 2),
        left=torch.zeros(2, 2, 4, 5), k=rank, extras={"accuracies": accuracies},
    )
    assert k_for_policy(ds, "none").tolist() == [[4, 4], [3, 5]]
    assert k_for_policy(ds, "fixed", 2).tolist() == [[2, 2], [2, 2]]
    assert k_for_policy(ds, "fixed", 10).tolist() == [[4, 4], [3, 5]]
    assert k_for_policy(ds, "acc99").tolist() == [[2, 0], [0, 2]]  # counts; 0 is kept (selection skips it)
    assert k_for_policy(ds, "acc95").tolist() == [[3, 2], [0, 2]]
    zero_rank = DirectionSet(**{**ds.__dict__, "k": torch.zeros(2, 2, dtype=torch.int64)})
    assert k_for_policy(zero_rank, "acc95").tolist() == [[0, 0], [0, 0]]
    with pytest.raises(ValueError):
        k_for_policy(ds, "fixed")


@pytest.mark.embedded
def test_matches_reference_on_embedded_model(embedded_adapter, data_dir):
    from refusal_directions import load_dataset, sample

    harmful = [r["instruction"] for r in sample(load_dataset("harmful_train", data_dir), 32, 0)]
    harmless = [r["instruction"] for r in sample(load_dataset("harmless_train", data_dir), 32, 0)]
    h1 = activations(embedded_adapter, harmful, [-1])
    h0 = activations(embedded_adapter, harmless, [-1])
    assert h1.shape == (32, 1, 24, 896)
    config = INLPConfig()
    fast = fit_inlp(h1, h0, config, positions=[-1], progress=False)
    assert fast.left.shape[:3] == (1, 24, 896) and fast.positions == [-1]
    # Middle and last layers (the last ones have norms ~1000: the ill-conditioned fits).
    assert_matches_reference(fast, reference_grid(h1, h0, config, pairs=[(0, 8), (0, 14), (0, 21), (0, 23)]))


def test_geometry_without_a_leace_readout():
    """LEACE of rank 0 everywhere (indistinguishable classes) has no read-out column: no crash."""
    from refusal_directions.directions.geometry import geometry

    dim = DirectionSet(method="diff_in_means", positions=[-1], direction=torch.ones(1, 2, 4) / 2, scale=torch.ones(1, 2),
                       left=torch.ones(1, 2, 4, 1) / 2, k=torch.ones(1, 2, dtype=torch.int64))
    leace = DirectionSet(method="leace", positions=[-1], direction=torch.zeros(1, 2, 4), scale=torch.ones(1, 2),
                         left=torch.zeros(1, 2, 4, 0), right=torch.zeros(1, 2, 4, 0),
                         k=torch.zeros(1, 2, dtype=torch.int64))
    out = geometry(dim, None, leace)
    assert "cos_dim_leace_readout" not in out and out["dim_norm"] == [[1.0, 1.0]]
