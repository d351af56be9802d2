"""Shared prompt prefix on CPU: selection scoring and generation, shared vs full prompts, same process.

On the embedded model (Qwen2.5-Coder-0.5B-Instruct, float32) with the quick preset's shapes: the
diff-in-means candidates of every layer at the last position scored on ``--n-val`` harmful and
harmless validation prompts, and greedy generation of ``--n-test`` JailbreakBench + harmless prompts.
Each measurement alternates the two modes (``--repeats`` times, the best of each kept), so load on
the machine affects both alike; the ratio is what to read. Also checks the numbers agree.

    .venv/bin/python bench/shared_prefix.py --data-dir ../shared/datasets [--layers 6] [--n-test 16]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from refusal_directions.activations import cache_activations  # noqa: E402
from refusal_directions.data import instructions, load_dataset, sample  # noqa: E402
from refusal_directions.directions.diff_in_means import fit_diff_in_means  # noqa: E402
from refusal_directions.generation import generate_tokens  # noqa: E402
from refusal_directions.models import load_model  # noqa: E402
from refusal_directions.selection import SelectionSettings, score_candidates  # noqa: E402


def best_time(fn, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--n-val", type=int, default=32)
    parser.add_argument("--n-test", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--layers", type=int, default=24, help="score the candidates of the first N layers")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    torch.manual_seed(0)
    adapter = load_model("embedded", device="cpu", dtype="float32")
    harmful = instructions(sample(load_dataset("harmful_val", args.data_dir), args.n_val, 0))
    harmless = instructions(sample(load_dataset("harmless_val", args.data_dir), args.n_val, 0))
    h, _ = cache_activations(adapter, harmful, [-1])
    b, _ = cache_activations(adapter, harmless, [-1])
    dim = fit_diff_in_means(h, b, [-1])
    dim.scale[:, args.layers:] = 0  # candidates of later layers are skipped (zero norm)
    norm = lambda p, l: float(dim.scale[p, l])  # noqa: E731
    rows = {}
    for shared in (False, True):
        settings = SelectionSettings(actadd_multipliers=[2.0], batch_size=32, shared_prefix=shared)
        rows[f"select shared={shared}"] = best_time(
            lambda: score_candidates(adapter, dim, harmful, harmless, settings, norm), args.repeats)
    prompts = instructions(sample(load_dataset("jailbreakbench", args.data_dir), args.n_test, 0)) + \
        instructions(sample(load_dataset("harmless_test", args.data_dir), args.n_test, 0))
    generate_tokens(adapter, prompts[:4], 2, batch_size=4, shared_prefix=True)  # the one-time check, not timed
    for shared in (False, True, False, True):  # alternated: load on the machine hits both modes
        t, out = best_time(lambda: generate_tokens(adapter, prompts, args.max_new_tokens, batch_size=len(prompts),
                                                   shared_prefix=shared), args.repeats)
        name = f"generate shared={shared}"
        rows[name] = min(rows.get(name, (t, out)), (t, out), key=lambda r: r[0])
    (t0, full), (t1, shared) = rows["select shared=False"], rows["select shared=True"]
    kl = max(abs(a.kl - c.kl) for a, c in zip(full, shared))
    bypass = max(abs(a.bypass - c.bypass) for a, c in zip(full, shared))
    print(json.dumps({"what": "select", "full_s": round(t0, 2), "shared_s": round(t1, 2), "speedup": round(t0 / t1, 2),
                      "candidates": len(full), "max_abs_diff_kl": kl, "max_abs_diff_bypass": bypass}))
    (t0, full), (t1, shared) = rows["generate shared=False"], rows["generate shared=True"]
    same = sum(a == c for a, c in zip(full, shared))
    print(json.dumps({"what": "generate", "full_s": round(t0, 2), "shared_s": round(t1, 2), "speedup": round(t0 / t1, 2),
                      "prompts": len(prompts), "identical_completions": same}))


if __name__ == "__main__":
    main()
