"""Benchmark: peak memory and time of activation extraction, against a simple implementation.

Ours (``cache_activations``) streams: one batch of hidden states alive at a time, only the
post-instruction positions kept, logits only at the last position. The simple implementation
asks the model for ``output_hidden_states=True`` and full logits and keeps every layer's hidden
states of the batch before slicing (what most notebooks do). Both run in this process on the
same prompts, ours first; peak resident memory is sampled during each (a thread polling RSS every
5 ms), absolute and relative to the RSS before it started (freed memory that the allocator keeps
counts in the second method's start, which favours the simple one).

    python bench/extraction.py --data-dir ../shared/datasets       # embedded model, CPU, 128+128 prompts
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time

import psutil
import torch

from refusal_directions.activations import cache_activations, default_positions
from refusal_directions.data import load_dataset, sample
from refusal_directions.models import load_model


class PeakRSS:
    """Peak resident set size (bytes) while the block runs, by polling."""

    def __enter__(self):
        self.process = psutil.Process()
        self.start = self.peak = self.process.memory_info().rss
        self.running = True
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()
        self.t0 = time.perf_counter()
        return self

    def _poll(self):
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.005)

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


@torch.inference_mode()
def simple_cache(adapter, prompts, positions, batch_size):
    out = []
    for start in range(0, len(prompts), batch_size):
        enc = adapter.encode_instructions(prompts[start : start + batch_size])
        result = adapter.model(**enc, output_hidden_states=True)
        hidden = torch.stack(result.hidden_states[:-1], dim=2)  # [B, S, L, D]: inputs of every layer
        out.append(hidden[:, positions].float().cpu())
    return torch.cat(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--n", type=int, default=128, help="harmful and harmless prompts each")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()

    base_rss = psutil.Process().memory_info().rss
    adapter = load_model(args.model, device=args.device)
    model_rss = psutil.Process().memory_info().rss
    positions = default_positions(adapter)
    prompts = [r["instruction"] for name in ("harmful_train", "harmless_train")
               for r in sample(load_dataset(name, args.data_dir), args.n, 42)]
    # Page in the weights (safetensors are memory-mapped) before measuring, so that neither
    # method's "extra" memory counts them.
    cache_activations(adapter, prompts[:1], positions, 1)
    with PeakRSS() as ours:
        ours_acts, _ = cache_activations(adapter, prompts, positions, args.batch_size)
    with PeakRSS() as simple:
        simple_acts = simple_cache(adapter, prompts, positions, args.batch_size)
    cache_bytes = ours_acts.numel() * 4
    result = {
        "model": args.model, "prompts": len(prompts), "positions": positions, "n_layers": adapter.n_layers,
        "d_model": adapter.d_model, "batch_size": args.batch_size,
        "cache_mib": round(cache_bytes / 2**20, 1),
        "model_rss_mib": round((model_rss - base_rss) / 2**20, 1),
        "ours": {"seconds": round(ours.seconds, 1), "peak_rss_gib": round(ours.peak / 2**30, 2),
                 "extra_peak_mib": round((ours.peak - ours.start) / 2**20, 1)},
        "simple": {"seconds": round(simple.seconds, 1), "peak_rss_gib": round(simple.peak / 2**30, 2),
                   "extra_peak_mib": round((simple.peak - simple.start) / 2**20, 1)},
        "max_abs_diff": float((ours_acts - simple_acts).abs().max()),
    }
    result["extra_memory_ratio_ours_over_simple"] = round(
        result["ours"]["extra_peak_mib"] / max(result["simple"]["extra_peak_mib"], 1e-9), 3)
    print(json.dumps(result))
    print(f"peak RSS: ours {result['ours']['peak_rss_gib']} GiB (+{result['ours']['extra_peak_mib']} MiB during "
          f"extraction), simple +{result['simple']['extra_peak_mib']} MiB; cache {result['cache_mib']} MiB", file=sys.stderr)


if __name__ == "__main__":
    main()
