"""Benchmark: local selection scoring with reuse of the layers before each candidate, against a
full forward pass per candidate (what a simple implementation does), same prompts, same process.

Both paths compute, for every (position, layer) diff-in-means candidate, the bypass score
(harmful val), the KL (harmless val) and the steering score (harmless val, each multiplier),
with the intervention at the candidate's layer only. The scores must agree to 1e-4.

    python bench/selection.py --data-dir ../shared/datasets            # embedded model, CPU
    python bench/selection.py --model PATH --device cuda --n-val 32     # any model, GPU
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from refusal_directions.activations import cache_activations, default_positions
from refusal_directions.data import instructions, load_dataset, sample
from refusal_directions.directions.diff_in_means import fit_diff_in_means
from refusal_directions.interventions import actadd_for, intervene, removal_for
from refusal_directions.models import load_model
from refusal_directions.selection import SelectionSettings, kl_divergence, refusal_scores, score_candidates


@torch.inference_mode()
def score_by_full_forwards(adapter, dim, harmful, harmless, multipliers, batch_size):
    """The reference path: a full forward of every prompt batch for every candidate and metric."""
    out = {}
    base_logits = []
    for start in range(0, len(harmless), batch_size):
        enc = adapter.encode_instructions(harmless[start : start + batch_size])
        base_logits.append(adapter.last_logits(enc))
    for p in range(dim.n_positions):
        for l in range(dim.n_layers):
            removal = removal_for(dim, p, l, [l])
            bypass = float(refusal_scores(adapter, harmful, batch_size, removal).mean())
            kl = []
            with intervene(adapter, removal):
                for i, start in enumerate(range(0, len(harmless), batch_size)):
                    enc = adapter.encode_instructions(harmless[start : start + batch_size])
                    kl.append(kl_divergence(base_logits[i], adapter.last_logits(enc)))
            steering = max(
                float(refusal_scores(adapter, harmless, batch_size, actadd_for(dim, p, l, m * float(dim.scale[p, l]))).mean())
                for m in multipliers
            )
            out[(p, l)] = (bypass, float(torch.cat(kl).mean()), steering)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--n-train", type=int, default=32)
    parser.add_argument("--n-val", type=int, default=8)
    parser.add_argument("--positions", type=int, nargs="+", default=None, help="default: all post-instruction tokens")
    parser.add_argument("--multipliers", type=float, nargs="+", default=[1.0])
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()

    adapter = load_model(args.model, device=args.device)
    torch.set_grad_enabled(False)
    positions = args.positions or default_positions(adapter)
    pick = lambda name, n: instructions(sample(load_dataset(name, args.data_dir), n, 42))  # noqa: E731
    h, _ = cache_activations(adapter, pick("harmful_train", args.n_train), positions, args.batch_size)
    b, _ = cache_activations(adapter, pick("harmless_train", args.n_train), positions, args.batch_size)
    dim = fit_diff_in_means(h, b, positions)
    harmful, harmless = pick("harmful_val", args.n_val), pick("harmless_val", args.n_val)

    settings = SelectionSettings(actadd_multipliers=args.multipliers, batch_size=args.batch_size)
    start = time.perf_counter()
    cands = score_candidates(adapter, dim, harmful, harmless, settings, lambda p, l: float(dim.scale[p, l]))
    t_reuse = time.perf_counter() - start
    start = time.perf_counter()
    reference = score_by_full_forwards(adapter, dim, harmful, harmless, args.multipliers, args.batch_size)
    t_full = time.perf_counter() - start

    diff = max(
        max(abs(c.bypass - reference[(c.pos_index, c.layer)][0]), abs(c.kl - reference[(c.pos_index, c.layer)][1]),
            abs(c.steering - reference[(c.pos_index, c.layer)][2]))
        for c in cands
    )
    result = {
        "model": args.model, "device": str(adapter.input_device), "candidates": len(cands),
        "positions": positions, "n_layers": adapter.n_layers, "n_val": args.n_val, "multipliers": args.multipliers,
        "seconds_reuse": round(t_reuse, 2), "seconds_full_forward": round(t_full, 2),
        "speedup": round(t_full / t_reuse, 2), "max_abs_score_difference": diff,
    }
    print(json.dumps(result))
    print(f"{len(cands)} candidates: reuse {t_reuse:.1f} s, full forward per candidate {t_full:.1f} s "
          f"-> {t_full / t_reuse:.2f}x faster; max |score difference| {diff:.2e}", file=sys.stderr)


if __name__ == "__main__":
    main()
