#!/usr/bin/env python
"""Benchmark: the batched INLP grid (``fit_inlp``) against the sequential reference, in one process.

CPU, real activations of the embedded model (5 positions x 24 layers, d 896, 128 + 128 prompts):

    python bench/inlp.py --source embedded --device cpu --threads 1 --reference-pairs 24

GPU, synthetic activations with planted structure:

    python bench/inlp.py --source synthetic --d 4096 --positions 5 --layers 32 --n 128 --device cuda --reference-pairs 8

The reference (``bench/inlp_reference.py``) fits one (position, layer) problem at a time, as the
reference tool does, with dense D×D projections; ``--reference-solver`` picks its classifier fit
(newton: exact, the one the tests use; lbfgs: the reference tool's optimiser). On a small shared
CPU use ``--threads 1``: torch's OpenMP threads on these small operations mostly wait for each
other there (the reference was ~40x slower with two threads on a busy two-core machine). When it runs on a subset of pairs (``--reference-pairs N``, a seeded choice),
its time on the full grid is a linear projection and is labelled as such. Agreement statistics
(iteration counts, dev accuracies, first-direction cosines, subspace angles) are computed on the
pairs where the reference ran. Prints a human-readable table and one JSON summary line.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from inlp_reference import planted_activations, reference_grid  # noqa: E402

from refusal_directions.directions.inlp import INLPConfig, fit_inlp  # noqa: E402


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _acts(cached):
    """``cache_activations`` returns the activations, or (activations, refusal scores)."""
    return cached[0] if isinstance(cached, tuple) else cached


def embedded_activations(n: int, seed: int, data_dir: Path, cache_dir: Path) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Activations of the embedded model at its post-instruction positions, cached under ``cache_dir``."""
    path = cache_dir / f"inlp_embedded_n{n}_seed{seed}.pt"
    if path.exists():
        blob = torch.load(path)
        print(f"Loaded cached activations from {path}", file=sys.stderr)
        return _acts(blob["harmful"]), _acts(blob["harmless"]), blob["meta"]
    from refusal_directions import load_dataset, load_model, sample
    from refusal_directions.activations import cache_activations, default_positions
    from refusal_directions.data import instructions

    adapter = load_model("embedded", device="cpu")
    positions = default_positions(adapter)
    harmful = instructions(sample(load_dataset("harmful_train", data_dir), n, seed))
    harmless = instructions(sample(load_dataset("harmless_train", data_dir), n, seed))
    start = time.perf_counter()
    h1 = _acts(cache_activations(adapter, harmful, positions, desc="harmful"))
    h0 = _acts(cache_activations(adapter, harmless, positions, desc="harmless"))
    meta = {"model": adapter.name, "positions": positions, "n": n, "seed": seed, "cache_seconds": time.perf_counter() - start}
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"harmful": h1, "harmless": h0, "meta": meta}, tmp)
    os.replace(tmp, path)
    print(f"Cached activations to {path} ({meta['cache_seconds']:.0f} s)", file=sys.stderr)
    return h1, h0, meta


def subspace_angle_deg(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest principal angle (degrees) between the column spans of a and b (equal widths)."""
    if a.shape[1] == 0 and b.shape[1] == 0:
        return 0.0
    if a.shape[1] != b.shape[1]:
        return 90.0
    a, b = a.double(), b.double()
    # sin of the largest angle = the largest singular value of the part of a outside span(b)
    # (more precise than acos of the smallest cosine for tiny angles).
    residual = a - b @ (b.T @ a)
    return math.degrees(math.asin(min(1.0, float(torch.linalg.matrix_norm(residual, ord=2)))))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", choices=["embedded", "synthetic"], default="embedded")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    parser.add_argument("--n", type=int, default=128, help="prompts (or samples) per class")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--data-dir", type=Path, default=None, help="dataset mirror (default $REFUSAL_DIRECTIONS_DATA or ../shared/datasets)")
    parser.add_argument("--cache-dir", type=Path, default=REPO / ".bench")
    parser.add_argument("--d", type=int, default=4096, help="synthetic: model width")
    parser.add_argument("--positions", type=int, default=5, help="synthetic: positions")
    parser.add_argument("--layers", type=int, default=32, help="synthetic: layers")
    parser.add_argument("--planted", type=int, default=8, help="synthetic: planted directions per (p, l)")
    parser.add_argument("--max-iter", type=int, default=100)
    parser.add_argument("--reference-pairs", type=int, default=None, help="run the reference on a seeded subset of N pairs (default: all)")
    parser.add_argument(
        "--reference-solver", choices=["newton", "lbfgs"], default="newton",
        help="the reference's classifier fit: newton (exact, as in the tests) or lbfgs (the reference tool's optimiser)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)

    if args.source == "embedded":
        data_dir = args.data_dir or Path(os.environ.get("REFUSAL_DIRECTIONS_DATA", REPO.parent / "shared" / "datasets"))
        harmful, harmless, meta = embedded_activations(args.n, args.seed, data_dir, args.cache_dir)
    else:
        harmful, harmless = planted_activations(
            args.n, args.n, args.positions, args.layers, args.d, n_planted=args.planted, seed=args.seed
        )
        meta = {"model": "synthetic", "planted": args.planted}
    harmful, harmless = harmful.to(device), harmless.to(device)
    _, P, L, D = harmful.shape
    config = INLPConfig(max_iter=args.max_iter, seed=args.seed)
    all_pairs = [(p, l) for p in range(P) for l in range(L)]
    n_ref = len(all_pairs) if args.reference_pairs is None else min(args.reference_pairs, len(all_pairs))
    ref_pairs = sorted(random.Random(args.seed).sample(all_pairs, n_ref))

    # Warm-up both (library initialisation, kernels), on one pair and two iterations.
    warm = INLPConfig(max_iter=2, seed=args.seed)
    fit_inlp(harmful[:, :1, :1], harmless[:, :1, :1], warm, progress=False)
    reference_grid(harmful[:, :1, :1], harmless[:, :1, :1], warm, device=device, solver=args.reference_solver)

    sync(device)
    start = time.perf_counter()
    fast = fit_inlp(harmful, harmless, config, device=device)
    sync(device)
    fast_s = time.perf_counter() - start

    start = time.perf_counter()
    ref = {}
    for i, pair in enumerate(ref_pairs):
        ref.update(reference_grid(harmful, harmless, config, pairs=[pair], device=device, solver=args.reference_solver))
        print(f"reference {i + 1}/{n_ref} {pair}: {len(ref[pair].accuracies)} classifiers, {ref[pair].seconds:.1f} s", file=sys.stderr)
    ref_s = time.perf_counter() - start

    # Agreement on the reference pairs.
    acc = fast.extras["accuracies"]
    iters_fast = (~acc.isnan()).sum(-1)
    same_iters = same_rank = degenerate = 0
    max_acc_diff = 0.0
    min_cos = 1.0
    max_angle = 0.0
    for (p, l), r in ref.items():
        a = acc[p, l][: int(iters_fast[p, l])].tolist()
        same_iters += len(a) == len(r.accuracies)
        diffs = [abs(x - y) for x, y in zip(a, r.accuracies)] + ([1.0] if len(a) != len(r.accuracies) else [])
        max_acc_diff = max(max_acc_diff, max(diffs, default=0.0))
        k = int(fast.k[p, l])
        same_rank += k == r.k
        if float(r.first_dir.norm()) == 0 and float(fast.direction[p, l].norm()) == 0:
            degenerate += 1  # both found a degenerate (intercept-only) first classifier
        else:
            min_cos = min(min_cos, float(fast.direction[p, l].double() @ r.first_dir.double().cpu()))
        max_angle = max(max_angle, subspace_angle_deg(fast.left[p, l, :, :k], r.basis.cpu()))

    n_pairs = len(all_pairs)
    ref_classifiers = sum(len(r.accuracies) for r in ref.values())
    fast_classifiers = int(iters_fast.sum())
    measured_full = n_ref == n_pairs
    ref_full_pair = ref_s / max(n_ref, 1) * n_pairs
    ref_full_clf = ref_s / max(ref_classifiers, 1) * fast_classifiers
    summary = {
        "benchmark": "inlp_grid",
        "source": args.source,
        "model": meta.get("model"),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "grid": {"positions": P, "layers": L, "d": D, "n_harmful": harmful.shape[0], "n_harmless": harmless.shape[0]},
        "fast_seconds": fast_s,
        "fast_classifiers": fast_classifiers,
        "fast_mean_rank": float(fast.k.double().mean()),
        "reference_solver": args.reference_solver,
        "reference_pairs": n_ref,
        "reference_seconds_measured": ref_s,
        "reference_seconds_per_pair": ref_s / max(n_ref, 1),
        "reference_classifiers": ref_classifiers,
        "reference_full_grid_seconds": ref_full_pair,
        "reference_full_grid_is_projected": not measured_full,
        "reference_full_grid_seconds_projected_per_classifier": ref_full_clf,
        "speedup": ref_full_pair / fast_s,
        "ratio_fast_over_reference": fast_s / ref_full_pair if ref_full_pair else None,
        "speedup_per_classifier_projection": ref_full_clf / fast_s,
        "agreement": {
            "pairs": n_ref,
            "same_iterations": same_iters,
            "same_rank": same_rank,
            "max_abs_acc_diff": max_acc_diff,
            "min_first_dir_cosine": min_cos,
            "both_degenerate_first_dir": degenerate,
            "max_subspace_angle_deg": max_angle,
        },
    }
    label = "measured" if measured_full else f"projected from {n_ref} pairs"
    rows = [
        ("grid (P x L, d, n per class)", f"{P} x {L}, {D}, {harmful.shape[0]}/{harmless.shape[0]}"),
        ("device", f"{summary['device']} ({summary['device_name']}, {summary['torch_threads']} threads)"),
        ("fast: whole grid", f"{fast_s:.2f} s ({fast_classifiers} classifiers, mean rank {summary['fast_mean_rank']:.1f})"),
        ("reference: solver", args.reference_solver),
        ("reference: measured", f"{ref_s:.1f} s on {n_ref} pairs ({ref_classifiers} classifiers, {ref_s / max(n_ref, 1):.2f} s/pair)"),
        (f"reference: full grid ({label})", f"{ref_full_pair:.1f} s"),
        ("reference: full grid (per-classifier projection)", f"{ref_full_clf:.1f} s"),
        ("speedup reference / fast", f"{summary['speedup']:.1f}x (per-classifier projection: {summary['speedup_per_classifier_projection']:.1f}x)"),
        ("ratio fast / reference", f"{fast_s / ref_full_pair:.4f}" if ref_full_pair else "n/a"),
        ("agreement: same #classifiers / rank", f"{same_iters}/{n_ref} / {same_rank}/{n_ref}"),
        ("agreement: max |dev acc diff|", f"{max_acc_diff:.3g}"),
        ("agreement: min first-dir cosine", f"{min_cos:.6f} ({degenerate} pairs degenerate in both: zero direction)"),
        ("agreement: max subspace angle", f"{max_angle:.3g} deg"),
    ]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
