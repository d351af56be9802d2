"""MMLU scorer configurations against the one-question loop, in interleaved rounds (GPU, 8B-shaped).

Same questions, same process, as ``bench/evaluation.py``, but several configurations of our
scorer are timed side by side, and the one-question loop (``evaluation.simple_scores``) runs once
untimed first, so every timed round is steady state. Configurations: suffix packing on (the
default, where the model allows it) or off, and the padding bound of batches.

    python bench/mmlu_variants.py --tokenizer .gpu/tokenizer --data-dir .gpu/data
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from end_to_end import build_adapter, mmlu_questions, sync  # noqa: E402
from evaluation import simple_scores  # noqa: E402

from refusal_directions.evaluation import prefix_scorer  # noqa: E402
from refusal_directions.evaluation.benchmarks import evaluate_mmlu, mmlu_prompt, mmlu_shots  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--per-subject", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--subjects", type=int, default=None, help="only the first N subjects (a quick check)")
    parser.add_argument("--layers", type=int, default=None, help="fewer decoder layers (a quick check)")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()

    adapter = build_adapter(args.tokenizer, args.device, n_layers=args.layers)
    questions, dev = mmlu_questions(args.data_dir, args.per_subject, args.subjects)
    shots = mmlu_shots(dev)
    prompts = [mmlu_prompt(q, shots[q["subject"]]) for q in questions]
    letter_ids = [adapter.tokenizer(" " + x, add_special_tokens=False)["input_ids"][0] for x in "ABCD"]

    can_pack = prefix_scorer._can_pack
    variants = {  # name: (packing allowed, padding bound)
        f"packed, padding {prefix_scorer.MAX_PADDING:.0%} (default)": (True, prefix_scorer.MAX_PADDING),
        "packed, padding 25%": (True, 0.25),
        "not packed, padding 25% (before packing)": (False, 0.25),
    }

    def timed(fn):
        sync()
        start = time.perf_counter()
        out = fn()
        sync()
        return time.perf_counter() - start, out

    def ours(name: str):
        packing, padding = variants[name]
        prefix_scorer._can_pack = can_pack if packing else (lambda adapter: False)
        prefix_scorer.iter_final_hidden.__kwdefaults__["max_padding"] = padding
        seconds, result = timed(lambda: evaluate_mmlu(adapter, questions, dev, n_boot=10, batch_size=args.batch_size))
        return seconds, np.array([q["logprobs"] for q in result["questions"]])

    logprobs = {name: ours(name)[1] for name in variants}  # warm-up (new shapes)
    first, simple = timed(lambda: simple_scores(adapter, prompts, letter_ids))
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
    print(f"one-question loop, first (untimed) pass {first:.2f} s; peak GPU memory {peak:.1f} GiB")
    for name in variants:
        print(f"{name}: max |d log p| vs the loop {np.abs(logprobs[name] - simple).max():.3f}, "
              f"same prediction {np.mean(logprobs[name].argmax(1) == simple.argmax(1)):.1%}")
    seconds: dict[str, list[float]] = {"one-question loop": [], **{name: [] for name in variants}}
    for r in range(args.rounds):
        seconds["one-question loop"].append(timed(lambda: simple_scores(adapter, prompts, letter_ids))[0])
        for name in variants:
            seconds[name].append(ours(name)[0])
        print(f"round {r}: " + ", ".join(f"{name} {times[-1]:.2f} s" for name, times in seconds.items()), flush=True)
    loop = np.mean(seconds["one-question loop"])
    for name in variants:
        print(f"{name}: {np.mean(seconds[name]):.2f} s per pass, {loop / np.mean(seconds[name]):.2f}x the loop's {loop:.2f} s")


if __name__ == "__main__":
    main()
