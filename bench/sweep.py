"""Sweep proxies: configurations stacked along the batch vs one configuration per forward, same process.

On the embedded model (Qwen2.5-Coder-0.5B-Instruct; float32 on CPU, bfloat16 on GPU), a diff-in-means
direction fitted at the last position, the strength sweep (``--weights``) at the scopes ``--scopes``
plus the ActAdd multipliers, scored on ``--n-val`` harmful and harmless validation prompts by
``proxies.ProxyScorer`` with ``stack`` configurations per forward (``--stack``) and with 1. Each mode
runs ``--repeats`` times alternately (the best kept), so machine load affects both alike; the ratio is
what to read. Also prints the largest difference of the proxies between the two modes, and the time of
a small Pareto search (``--trials``) with one trial per forward.

    .venv/bin/python bench/sweep.py --data-dir ../shared/datasets [--device cpu] [--stack 8] [--n-val 32]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from refusal_directions.activations import cache_activations  # noqa: E402
from refusal_directions.data import instructions, load_dataset, sample  # noqa: E402
from refusal_directions.directions.diff_in_means import fit_diff_in_means  # noqa: E402
from refusal_directions.models import load_model  # noqa: E402
from refusal_directions.proxies import ProxyScorer  # noqa: E402
from refusal_directions.search import open_study, run_search  # noqa: E402
from refusal_directions.selection import Candidate, MethodSelection  # noqa: E402
from refusal_directions.sweeps import SweepGrid, sweep_points  # noqa: E402


def timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--n-val", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--stack", type=int, default=8)
    parser.add_argument("--weights", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5])
    parser.add_argument("--scopes", nargs="+", default=["one", "window:2", "top:0.25", "all"])
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    torch.manual_seed(0)
    adapter = load_model("embedded", device=args.device, dtype="auto")
    harmful = instructions(sample(load_dataset("harmful_val", args.data_dir), args.n_val, 0))
    harmless = instructions(sample(load_dataset("harmless_val", args.data_dir), args.n_val, 0))
    h, _ = cache_activations(adapter, harmful, [-1])
    b, _ = cache_activations(adapter, harmless, [-1])
    dim = fit_diff_in_means(h, b, [-1])
    layer = int(adapter.n_layers * 0.55)  # a mid-depth component, where refusal directions usually are
    ranked = [Candidate(0, -1, l) for l in [layer, *[l for l in range(adapter.n_layers) if l != layer]]]
    sel = MethodSelection("diff_in_means", ranked, ranked[0], None)
    grid = SweepGrid(tuple(args.weights), (2.0,), (1.0, 2.0), tuple(args.scopes))
    points = sweep_points(dim, sel, grid, len(ranked), adapter.n_layers, float(dim.scale[0, layer]))
    items = [p.intervention for p in points]
    stacked = ProxyScorer(adapter, harmful, harmless, args.batch_size, args.stack)
    single = ProxyScorer(adapter, harmful, harmless, args.batch_size, 1)
    best = {"stacked": float("inf"), "single": float("inf")}
    results = {}
    for _ in range(args.repeats):
        for name, scorer in (("stacked", stacked), ("single", single)):
            seconds, results[name] = timed(lambda: scorer.score(items))
            best[name] = min(best[name], seconds)
    diff = max(max(abs(a.refusal - b.refusal), abs(a.kl - b.kl)) for a, b in zip(results["stacked"], results["single"]))
    with tempfile.TemporaryDirectory() as folder:
        search_s, _ = timed(lambda: run_search(open_study(Path(folder) / "s.db", "bench"), single, dim, sel,
                                               adapter.n_layers, args.trials, min(4, args.trials), 0))
    print(json.dumps({"device": str(adapter.input_device), "dtype": str(adapter.dtype), "configurations": len(items),
                      "n_val": args.n_val, "batch_size": args.batch_size, "stack": args.stack,
                      "stacked_s": round(best["stacked"], 2), "single_s": round(best["single"], 2),
                      "speedup": round(best["single"] / best["stacked"], 2), "max_abs_difference": diff,
                      "search_trials": args.trials, "search_s": round(search_s, 2),
                      "search_s_per_trial": round(search_s / args.trials, 2)}), flush=True)


if __name__ == "__main__":
    main()
