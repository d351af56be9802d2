"""Per-forward timings of the MMLU scorer on the GPU (where its time goes), 8B-shaped random model.

Scores 57 subjects x 8 questions twice (the first pass builds kernels and plans for each new
shape) and prints, for the second pass, every decoder forward: input shape [batch, tokens], the
attention length (cached prefix + tokens), milliseconds (with a CUDA synchronisation around each
forward, so the host-side overlap of an untimed run is lost) and tokens per second.

    python bench/mmlu_forwards.py --tokenizer .gpu/tokenizer --data-dir .gpu/data
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from end_to_end import build_adapter, mmlu_questions  # noqa: E402

from refusal_directions.evaluation.benchmarks import evaluate_mmlu  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--per-subject", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()

    adapter = build_adapter(args.tokenizer, "cuda")
    questions, dev = mmlu_questions(args.data_dir, args.per_subject)

    decoder = adapter.model.get_decoder()
    forward = decoder.forward
    log: list[tuple[tuple[int, int], int, float]] = []

    def timed(*a, **kw):
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = forward(*a, **kw)
        torch.cuda.synchronize()
        mask = kw.get("attention_mask")
        ids = kw["input_ids"]
        log.append((tuple(ids.shape), (mask if mask is not None else ids).shape[1], time.perf_counter() - start))
        return out

    decoder.forward = timed
    for _ in range(2):
        log.clear()
        evaluate_mmlu(adapter, questions, dev, batch_size=args.batch_size, n_boot=10)
    for (rows, tokens), attended, seconds in log:
        print(f"[{rows:3d}, {tokens:4d}] attends {attended:5d}  {seconds * 1000:6.0f} ms  {rows * tokens / seconds / 1000:5.1f} k tok/s")
    total = sum(s for *_, s in log)
    print(f"{len(log)} forwards, {sum(r * t for (r, t), *_ in log):,} tokens (padding included), {total:.2f} s")


if __name__ == "__main__":
    main()
