"""MMLU scoring speed: batched (ours) vs one question per forward (as simple implementations do).

Same questions, same process, same model. The simple scorer runs ``model(input_ids)`` on one
5-shot prompt at a time, takes the full logits and reads the last row (what most hand-written
MMLU loops do). Ours is ``evaluation.benchmarks.evaluate_mmlu``: length-sorted batches, the
subject's few-shot prefix computed once, and logits only at the last position. A third variant
(batched, no prefix sharing) shows how much each part contributes.

To be fair on a shared machine, the methods alternate subject by subject (their order flips
every subject), and each method's time is the sum over subjects. ``--whole-set`` instead scores
all questions in one call per method, as the pipeline does (``--repeats`` times, alternating).
Accuracies must be identical.

    python bench/evaluation.py --device cpu
"""

from __future__ import annotations

import argparse
import sys
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent


@torch.inference_mode()
def simple_scores(adapter, prompts: list[str], letter_ids: list[int]) -> np.ndarray:
    """One forward per question with full logits; log-softmax of the last row at the letters."""
    out = []
    for prompt in prompts:
        ids = adapter.tokenizer(prompt, return_tensors="pt")["input_ids"].to(adapter.input_device)
        logits = adapter.model(input_ids=ids).logits
        out.append(torch.log_softmax(logits[0, -1].float(), dim=-1)[letter_ids].cpu().numpy())
    return np.array(out, dtype=np.float64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--data-dir", default=os.environ.get("REFUSAL_DIRECTIONS_DATA", str(REPO.parent / "shared" / "datasets")))
    parser.add_argument("--every-nth-subject", type=int, default=3, help="subjects used: every n-th of the 57 (sorted)")
    parser.add_argument("--per-subject", type=int, default=3, help="first test questions of each subject")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--no-plain-batched", action="store_true", help="skip the batched-without-prefix-sharing variant")
    parser.add_argument("--whole-set", action="store_true",
                        help="score all questions in one call per method (as the pipeline does) instead of subject by subject")
    parser.add_argument("--repeats", type=int, default=1, help="with --whole-set: times each method scores the set (order alternating)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--random-8b-tokenizer", default=None,
                        help="instead of --model: a Llama-3-8B-shaped random bf16 model with this tokenizer (GPU timing)")
    args = parser.parse_args()

    from refusal_directions import load_dataset, load_model
    from refusal_directions.evaluation.benchmarks import evaluate_mmlu, mmlu_prompt, mmlu_shots

    test = load_dataset("mmlu", args.data_dir, split="test")
    dev = load_dataset("mmlu", args.data_dir, split="dev")
    subjects = sorted({r["subject"] for r in test})[:: args.every_nth_subject]
    by_subject = {s: [r for r in test if r["subject"] == s][: args.per_subject] for s in subjects}
    shots = mmlu_shots(dev)
    if args.random_8b_tokenizer:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from end_to_end import build_adapter

        adapter = build_adapter(args.random_8b_tokenizer, args.device)
        args.model = "llama3-8b-shaped-random"
    else:
        adapter = load_model(args.model, device=args.device)
    letter_ids = [adapter.tokenizer(" " + x, add_special_tokens=False)["input_ids"][0] for x in "ABCD"]

    evaluate_mmlu(adapter, by_subject[subjects[0]][:1], dev, batch_size=1)  # warm-up (and head check)
    methods = ["simple", "batched"] + ([] if args.no_plain_batched else ["batched_no_prefix_sharing"])
    seconds_per_group: dict[str, list[float]] = {m: [] for m in methods}
    logprobs: dict[str, list[np.ndarray]] = {m: [] for m in methods}
    answers: list[int] = []
    n_tokens = 0
    # One group per subject (alternating order, fair on a shared CPU), or one group of everything.
    groups = [by_subject[s] for s in subjects]
    if args.whole_set:
        groups = [[q for g in groups for q in g]] * args.repeats
    for k, questions in enumerate(groups):
        prompts = [mmlu_prompt(q, shots[q["subject"]]) for q in questions]
        if k < len(groups) // (args.repeats if args.whole_set else 1):
            n_tokens += sum(len(adapter.tokenizer(p)["input_ids"]) for p in prompts)
        answers += [q["answer"] for q in questions]
        for method in methods if k % 2 == 0 else methods[::-1]:
            start = time.perf_counter()
            if method == "simple":
                scores = simple_scores(adapter, prompts, letter_ids)
            else:
                share = method == "batched"
                result = evaluate_mmlu(adapter, questions, dev, batch_size=args.batch_size, share_prefix=share, n_boot=10)
                scores = np.array([q["logprobs"] for q in result["questions"]])
            if adapter.input_device.type == "cuda":
                torch.cuda.synchronize()
            seconds_per_group[method].append(time.perf_counter() - start)
            logprobs[method].append(scores)

    seconds = {m: sum(t) for m, t in seconds_per_group.items()}
    answers_arr = np.array(answers)
    report: dict = {
        "model": args.model,
        "device": args.device,
        "n_questions": len(answers) // (args.repeats if args.whole_set else 1),
        "n_subjects": len(subjects),
        "prompt_tokens": n_tokens,
        "batch_size": args.batch_size,
        "whole_set": args.whole_set,
        "repeats": args.repeats if args.whole_set else 1,
        "torch_threads": torch.get_num_threads(),
    }
    simple = np.concatenate(logprobs["simple"])
    for method in methods:
        scores = np.concatenate(logprobs[method])
        preds = scores.argmax(axis=1)
        report[method] = {
            "seconds": round(seconds[method], 1),
            **({"seconds_per_pass": [round(t, 2) for t in seconds_per_group[method]]} if args.whole_set else {}),
            "accuracy": float((preds == answers_arr).mean()),
            "speedup_vs_simple": round(seconds["simple"] / seconds[method], 2),
            "predictions_differing_from_simple": int((preds != simple.argmax(axis=1)).sum()),
            "max_abs_logprob_diff_vs_simple": float(np.abs(scores - simple).max()),
        }
    report["identical_accuracy"] = all(report[m]["accuracy"] == report["simple"]["accuracy"] for m in methods)
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    if not report["identical_accuracy"]:
        if adapter.dtype == torch.float32:
            raise SystemExit("batched and one-at-a-time MMLU accuracies differ")
        print(f"accuracies differ in {adapter.dtype} (near-ties; float32 must agree exactly)", file=sys.stderr)


if __name__ == "__main__":
    main()
