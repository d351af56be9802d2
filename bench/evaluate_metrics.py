"""The evaluate stage's capability metrics per intervention: before vs now, in one process (issue 17 items 1-2).

Before (the code up to 48524cd, reproduced here): every intervention tokenizes its own workload (general-text
documents, MMLU prompts, ARC pairs one ``encode_pair`` at a time) and every logit block is sanitized
(``nan_to_num`` + clamp) before the log-softmax. Now: the workloads are tokenized once per stage
(``text_sequences`` / ``mmlu_inputs`` / ``arc_inputs``, ARC pairs in two tokenizer calls) and only blocks
with non-finite or out-of-range logits are sanitized. Both score the same model (no intervention: the cost
does not depend on which one) ``--rounds`` times, alternating old and new; the tokenization of "now" is
timed once and reported apart (the stage pays it once for all interventions). Prints one JSON line per
metric: old seconds per intervention, new scoring seconds per intervention, the one-off tokenization, the
ratio old / new and whether the results are identical.

    python bench/evaluate_metrics.py --data-dir ../shared/datasets                      # quick-preset sizes, CPU
    python bench/evaluate_metrics.py --device cuda --loss-docs 4096 --mmlu 500 --mmlu-subjects 0 --arc 0  # reference sizes (0: all)

``--compare batching`` times the tokenized workloads scored two ways instead: "old" in batches of
``--batch-size`` sequences (the stage's count batches, 32 on a GPU), "new" in batches of up to
``--score-tokens`` tokens (the stage's GPU default, ``evaluate.GPU_SCORE_TOKENS``); both with LM-head
blocks of ``--max-rows`` rows. "identical" is then exact equality, and the largest differences of the
per-document losses and the accuracies are printed (bf16 on a GPU: batch composition changes rounding).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from end_to_end import Timer  # noqa: E402
from refusal_directions.data import load_dataset  # noqa: E402
from refusal_directions.evaluation import benchmarks, loss, prefix_scorer  # noqa: E402
from refusal_directions.models import load_model  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
NEW_LOG_SOFTMAX = prefix_scorer._safe_log_softmax


def old_log_softmax(logits):
    """The log-softmax before: every block sanitized."""
    nonfinite = ~torch.isfinite(logits).all(dim=-1)
    limit = prefix_scorer.LOGIT_LIMIT
    logits = torch.nan_to_num(logits, nan=0.0, posinf=limit, neginf=-limit).clamp(-limit, limit)
    return torch.log_softmax(logits, dim=-1), nonfinite


def old_arc_inputs(adapter, questions, train, *, n_questions, seed) -> benchmarks.ArcInputs:
    """ARC tokenized as before: one ``encode_pair`` (two tokenizer calls) per (question, choice)."""
    selected = benchmarks._select(len(questions), n_questions, seed)
    records = [questions[i] for i in selected]
    shots = benchmarks.arc_shots(None, train, 5, 1234)
    sequences, starts, owners, lens = [], [], [], []
    for q, record in enumerate(records):
        context = benchmarks.arc_prompt(record, shots)
        for choice in record["choices"]:
            ctx, cont = benchmarks.encode_pair(adapter, context, " " + choice)
            sequences.append(ctx + cont), starts.append(len(ctx)), owners.append(q), lens.append(float(len(choice)))
    settings = {"n_shots": 5, "shot_seed": 1234, "shared_shots": True, "n_available": len(questions), "seed": seed}
    return benchmarks.ArcInputs(settings, selected, records, sequences, starts, [0] * len(owners), owners, lens)


def timed(fn):
    """``(fn(), seconds)``, the GPU synchronized around it (``end_to_end.Timer``)."""
    with Timer() as t:
        out = fn()
    return out, t.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--data-dir", default=os.environ.get("REFUSAL_DIRECTIONS_DATA", str(REPO.parent / "shared" / "datasets")))
    parser.add_argument("--loss-docs", type=int, default=16)
    parser.add_argument("--mmlu", type=int, default=16)
    parser.add_argument("--mmlu-subjects", type=int, default=2, help="MMLU subjects (0: all; the quick preset's 2)")
    parser.add_argument("--arc", type=int, default=16, help="ARC questions (0: all 1,172)")
    parser.add_argument("--batch-size", type=int, default=None, help="sequences per forward (default: the stage's)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--compare", choices=("tokenization", "batching"), default="tokenization")
    parser.add_argument("--score-tokens", type=int, nargs="+", default=[32768],
                        help="--compare batching: token budgets (one 'new' variant each, in turn against 'old')")
    parser.add_argument("--max-rows", type=int, default=prefix_scorer.DEFAULT_MAX_ROWS, help="--compare batching: LM-head rows")
    args = parser.parse_args()

    adapter = load_model(args.model, device=args.device)
    batch = args.batch_size or (32 if args.device.startswith("cuda") else 4)  # _metric_batch_size: half of 64 / 8
    data = args.data_dir
    docs = load_dataset("lambada", data, limit=args.loss_docs)
    mmlu_test, mmlu_dev = load_dataset("mmlu", data, split="test"), load_dataset("mmlu", data, split="dev")
    arc_test, arc_train = load_dataset("arc_challenge", data, split="test"), load_dataset("arc_challenge", data, split="train")
    n_arc, subjects = args.arc or None, args.mmlu_subjects or None
    seed = 42

    tokenize = {
        "ce/general": lambda: loss.text_sequences(adapter, docs, max_length=256),
        "mmlu": lambda: benchmarks.mmlu_inputs(adapter, mmlu_test, mmlu_dev, n_questions=args.mmlu, n_subjects=subjects, seed=seed),
        "arc_challenge": lambda: benchmarks.arc_inputs(adapter, arc_test, arc_train, n_questions=n_arc, seed=seed),
    }
    old = {
        "ce/general": lambda: loss.text_loss(adapter, docs, max_length=256, batch_size=batch, corpus="lambada").to_dict(),
        "mmlu": lambda: benchmarks.evaluate_mmlu(adapter, mmlu_test, mmlu_dev, n_questions=args.mmlu, n_subjects=subjects, seed=seed,
                                              batch_size=batch),
        "arc_challenge": lambda: benchmarks.score_arc(
            adapter, old_arc_inputs(adapter, arc_test, arc_train, n_questions=n_arc, seed=seed), batch_size=batch),
    }
    score = {
        "ce/general": lambda x: loss.sequences_loss(adapter, x, max_length=256, batch_size=batch, corpus="lambada").to_dict(),
        "mmlu": lambda x: benchmarks.score_mmlu(adapter, x, batch_size=batch),
        "arc_challenge": lambda x: benchmarks.score_arc(adapter, x, batch_size=batch),
    }
    old["mmlu"]()  # warm-up: kernels, allocator, the head check
    if args.compare == "batching":
        compare_batching(adapter, tokenize, batch, args)
        return
    for metric in tokenize:
        inputs, tokenize_s = timed(tokenize[metric])
        times = {"old": [], "new": []}
        results = {}
        for r in range(args.rounds):
            for name in (("old", "new") if r % 2 == 0 else ("new", "old")):
                prefix_scorer._safe_log_softmax = old_log_softmax if name == "old" else NEW_LOG_SOFTMAX
                results[name], seconds = timed(old[metric] if name == "old" else (lambda: score[metric](inputs)))
                times[name].append(seconds)
        prefix_scorer._safe_log_softmax = NEW_LOG_SOFTMAX
        old_s, new_s = min(times["old"]), min(times["new"])
        print(json.dumps({"metric": metric, "device": args.device, "old_s": round(old_s, 3), "new_score_s": round(new_s, 3),
                          "tokenize_once_s": round(tokenize_s, 3), "speedup_per_intervention": round(old_s / new_s, 2),
                          "identical": results["old"] == results["new"]}), flush=True)


def compare_batching(adapter, tokenize, batch: int, args) -> None:
    """Each tokenized workload scored in count batches (old) and token-budget batches (new), for
    every budget of ``--score-tokens``."""
    rows = args.max_rows
    runs = {
        "ce/general": lambda x, **b: loss.sequences_loss(adapter, x, max_length=256, max_rows=rows, corpus="lambada", **b).to_dict(),
        "mmlu": lambda x, **b: benchmarks.score_mmlu(adapter, x, **b),
        "arc_challenge": lambda x, **b: benchmarks.score_arc(adapter, x, **b),
    }
    for metric, build in tokenize.items():
        inputs = build()
        for tokens in args.score_tokens:
            ways = {"old": {"batch_size": batch, "max_tokens": None}, "new": {"batch_size": tokens, "max_tokens": tokens}}
            times, results = {"old": [], "new": []}, {}
            for r in range(args.rounds):
                for name in (("old", "new") if r % 2 == 0 else ("new", "old")):
                    results[name], seconds = timed(lambda: runs[metric](inputs, **ways[name]))
                    times[name].append(seconds)
            old_s, new_s = min(times["old"]), min(times["new"])
            print(json.dumps({"metric": metric, "device": args.device, "compare": "batching", "batch_size": batch,
                              "score_tokens": tokens, "max_rows": rows, "old_s": round(old_s, 3), "new_s": round(new_s, 3),
                              "speedup": round(old_s / new_s, 2), "identical": results["old"] == results["new"],
                              **differences(results["old"], results["new"])}), flush=True)


def differences(old: dict, new: dict) -> dict:
    """The largest |difference| of per-document losses (cross-entropy) or of the accuracies (benchmarks)."""
    if "doc_losses" in old:
        gap = max((abs(a - b) for a, b in zip(old["doc_losses"], new["doc_losses"])), default=0.0)
        return {"max_doc_loss_diff": gap, "mean_loss_diff": abs(old["mean_loss"] - new["mean_loss"])}
    keys = [k for k in ("accuracy", "acc", "acc_norm") if k in old]
    return {f"{k}_diff": abs(old[k] - new[k]) for k in keys}


if __name__ == "__main__":
    main()
