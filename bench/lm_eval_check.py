"""MMLU accuracy of refusal-directions vs lm-evaluation-harness on the same questions.

Both score the embedded model (or --model) on the first ``--per-subject`` test questions of
every MMLU subject (3 -> 171 questions), 5-shot, from the local mirror. lm-evaluation-harness
runs in its own interpreter (``--lm-eval-python``, a venv with ``lm-eval`` installed) on task
files generated here: one task per subject reading JSON-lines copies of those questions (and of
the dev split for the shots), with lm-eval's own MMLU template (``doc_to_text``, ``first_n``
shots from ``dev``, description header). Ours must be within 1 accuracy point.

    python bench/lm_eval_check.py --lm-eval-python /tmp/lmeval/bin/python

Prints a JSON summary (and writes it with --out).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

TASK_TEMPLATE = """task: {task}
tag: mmlu_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {test}
    dev: {dev}
test_split: test
fewshot_split: dev
fewshot_config:
  sampler: first_n
output_type: multiple_choice
doc_to_text: "{{{{question.strip()}}}}\\nA. {{{{choices[0]}}}}\\nB. {{{{choices[1]}}}}\\nC. {{{{choices[2]}}}}\\nD. {{{{choices[3]}}}}\\nAnswer:"
doc_to_choice: ["A", "B", "C", "D"]
doc_to_target: answer
description: "The following are multiple choice questions (with answers) about {subject_words}.\\n\\n"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def first_per_subject(records: list[dict], k: int) -> list[dict]:
    seen: dict[str, int] = {}
    out = []
    for r in records:
        if seen.get(r["subject"], 0) < k:
            out.append(r)
            seen[r["subject"]] = seen.get(r["subject"], 0) + 1
    return out


def write_tasks(folder: Path, questions: list[dict], dev: list[dict], n_shots: int) -> None:
    by_subject: dict[str, list[dict]] = {}
    for r in questions:
        by_subject.setdefault(r["subject"], []).append(r)
    for subject, rows in by_subject.items():
        shots = [d for d in dev if d["subject"] == subject][:n_shots]
        test_path, dev_path = folder / f"{subject}_test.jsonl", folder / f"{subject}_dev.jsonl"
        for path, items in ((test_path, rows), (dev_path, shots)):
            path.write_text(
                "".join(json.dumps({"subject": r["subject"], "question": r["question"], "choices": r["choices"], "answer": r["answer"]}) + "\n" for r in items)
            )
        (folder / f"mmlu_local_{subject}.yaml").write_text(
            TASK_TEMPLATE.format(task=f"mmlu_local_{subject}", test=test_path, dev=dev_path, subject_words=subject.replace("_", " "))
        )


def run_lm_eval(python: str, model_path: str, questions: list[dict], dev: list[dict], n_shots: int, batch_size: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="lmeval-mmlu-") as tmp:
        tasks = Path(tmp) / "tasks"
        tasks.mkdir()
        write_tasks(tasks, questions, dev, n_shots)
        out = Path(tmp) / "out"
        cmd = [
            python, "-m", "lm_eval", "run",
            "--model", "hf",
            "--model_args", f"pretrained={model_path},dtype=float32",
            "--tasks", "mmlu_local",
            "--include_path", str(tasks),
            "--num_fewshot", str(n_shots),
            "--batch_size", str(batch_size),
            "--device", "cpu",
            "--log_samples",
            "--output_path", str(out),
        ]
        env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        start = time.time()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        seconds = time.time() - start
        if proc.returncode != 0:
            sys.stderr.write(proc.stdout[-5000:] + proc.stderr[-5000:])
            raise SystemExit(f"lm-eval failed with exit code {proc.returncode}")
        preds: dict[tuple[str, str], int] = {}
        contexts: dict[tuple[str, str], str | None] = {}
        for path in out.rglob("samples_*.jsonl"):
            for line in path.read_text().splitlines():
                sample = json.loads(line)
                lls = [float(r[0]) for r in sample["filtered_resps"]]
                doc = sample["doc"]
                key = (doc["subject"], doc["question"])
                preds[key] = max(range(len(lls)), key=lls.__getitem__)
                contexts[key] = _first_argument(sample.get("arguments"))
        version = subprocess.run(
            [python, "-c", "import importlib.metadata as m; print(m.version('lm-eval'))"], capture_output=True, text=True
        ).stdout.strip()
    return {"preds": preds, "contexts": contexts, "seconds": seconds, "version": version}


def _first_argument(arguments) -> str | None:
    """The context string of the first request in a logged sample (list or dict layouts)."""
    while isinstance(arguments, (list, tuple, dict)) and arguments:
        arguments = next(iter(arguments.values())) if isinstance(arguments, dict) else arguments[0]
    return arguments if isinstance(arguments, str) else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--data-dir", default=os.environ.get("REFUSAL_DIRECTIONS_DATA", str(REPO.parent / "shared" / "datasets")))
    parser.add_argument("--per-subject", type=int, default=3)
    parser.add_argument("--n-shots", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=8, help="ours")
    parser.add_argument("--lm-eval-batch-size", type=int, default=2)
    parser.add_argument("--lm-eval-python", default="/tmp/lmeval/bin/python")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    from refusal_directions import embedded, load_dataset, load_model
    from refusal_directions.evaluation.benchmarks import evaluate_mmlu, mmlu_prompt, mmlu_shots

    questions = first_per_subject(load_dataset("mmlu", args.data_dir, split="test"), args.per_subject)
    dev = load_dataset("mmlu", args.data_dir, split="dev")
    spec = embedded.parse_embedded_spec(args.model)
    model_path = str(embedded.ensure_converted(spec)) if spec is not None else args.model

    adapter = load_model(args.model, device="cpu", dtype="float32")
    start = time.time()
    ours = evaluate_mmlu(adapter, questions, dev, n_shots=args.n_shots, batch_size=args.batch_size)
    ours_seconds = time.time() - start
    del adapter

    theirs = run_lm_eval(args.lm_eval_python, model_path, questions, dev, args.n_shots, args.lm_eval_batch_size)
    keys = [(r["subject"], r["question"]) for r in questions]
    missing = [k for k in keys if k not in theirs["preds"]]
    if missing:
        raise SystemExit(f"lm-eval returned no prediction for {len(missing)} questions, e.g. {missing[0]}")
    their_correct = [theirs["preds"][k] == r["answer"] for k, r in zip(keys, questions)]
    our_preds = [q["pred"] for q in ours["questions"]]
    agree = sum(p == theirs["preds"][k] for p, k in zip(our_preds, keys))
    lm_acc = sum(their_correct) / len(questions)
    shots = mmlu_shots(dev, args.n_shots)
    same_prompt = sum(theirs["contexts"].get(k) == mmlu_prompt(r, shots[r["subject"]]) for k, r in zip(keys, questions))
    summary = {
        "model": args.model,
        "n_questions": len(questions),
        "n_shots": args.n_shots,
        "ours_accuracy": ours["accuracy"],
        "lm_eval_accuracy": lm_acc,
        "difference_points": 100 * (ours["accuracy"] - lm_acc),
        "within_1_point": abs(ours["accuracy"] - lm_acc) <= 0.01 + 1e-12,
        "same_prediction": agree,
        "same_prompt_text": same_prompt,
        "lm_eval_version": theirs["version"],
        "ours_seconds": round(ours_seconds, 1),
        "lm_eval_seconds": round(theirs["seconds"], 1),
    }
    print(json.dumps(summary, indent=2))
    if args.out:
        args.out.write_text(json.dumps(summary, indent=2) + "\n")
    if not summary["within_1_point"]:
        raise SystemExit("MMLU accuracy differs from lm-evaluation-harness by more than 1 point")


if __name__ == "__main__":
    main()
