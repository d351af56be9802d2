"""The rubric judge over an existing run folder's completions: timings and the table.

Reads ``infer/plan.json`` and ``infer/<intervention>/<dataset>.jsonl`` of a finished (or at least
generated) run, grades the judged text of every harmful completion (``reasoning.judged_texts``,
the answer after any thinking section) with ``evaluation.rubric.RubricJudge`` and the given grader,
and prints the load and grading times and, per intervention and dataset, the mean score with its
bootstrap interval, the rubric attack success (score > 0) with its Wilson interval, and how many
grader answers could not be parsed. Cells come from ``evaluation.summary`` (the pipeline's cell
builders). Nothing is written into the run folder; ``--out FILE`` saves the verdicts as JSON.

    python bench/rubric_run.py runs/qwen2.5-coder-0.5b-instruct/<key> --grader embedded:1.5b --device cpu
    python bench/rubric_run.py RUN_DIR --grader embedded:1.5b --max-completions 8 --datasets jailbreakbench
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))


def read_completions(run_dir: Path, datasets: list[str] | None) -> dict[str, dict[str, list[dict]]]:
    """``{intervention: {dataset: rows}}`` of the run folder's harmful sets (``datasets``, default the
    config's ``eval_datasets`` in ``manifest.json``, else every set except ``harmless_*``)."""
    plan = json.loads((run_dir / "infer" / "plan.json").read_text())["interventions"]
    if datasets is None:
        manifest = run_dir / "manifest.json"
        config = json.loads(manifest.read_text()).get("config", {}) if manifest.exists() else {}
        datasets = config.get("eval_datasets")
    out: dict[str, dict[str, list[dict]]] = {}
    for spec in plan:
        folder = run_dir / "infer" / spec["name"]
        names = datasets or sorted(p.stem for p in folder.glob("*.jsonl") if not p.stem.startswith("harmless"))
        out[spec["name"]] = {d: [json.loads(line) for line in (folder / f"{d}.jsonl").read_text().splitlines() if line.strip()]
                             for d in names if (folder / f"{d}.jsonl").exists()}
    return out


def main(argv: list[str] | None = None) -> int:
    from refusal_directions.evaluation import summary as S
    from refusal_directions.evaluation.reasoning import judged_texts
    from refusal_directions.evaluation.rubric import RubricJudge, rubric_outcomes

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--grader", default="embedded:1.5b", help="hub id, local folder, .gguf, embedded or embedded:1.5b")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-completions", type=int, default=None, help="first N completions per intervention and set")
    parser.add_argument("--datasets", nargs="*", default=None)
    parser.add_argument("--judge-text", default="answer", choices=("answer", "both"))
    parser.add_argument("--scoring", default="probabilities", choices=("probabilities", "generate"))
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--out", type=Path, default=None, help="save every verdict as JSON")
    args = parser.parse_args(argv)

    completions = read_completions(args.run_dir, args.datasets)
    sets = [(name, d, rows[: args.max_completions]) for name, per in completions.items() for d, rows in per.items()]
    n = sum(len(rows) for _, _, rows in sets)
    start = time.perf_counter()
    judge = RubricJudge.load(args.grader, device=args.device, dtype=args.dtype, batch_size=args.batch_size,
                             scoring=args.scoring)
    loaded = time.perf_counter()
    prompts = [r["prompt"] for _, _, rows in sets for r in rows]
    texts = judged_texts([r["response"] for _, _, rows in sets for r in rows], args.judge_text)
    verdicts = judge.grade(prompts, texts)
    graded = time.perf_counter()
    print(f"grader {args.grader}: loaded in {loaded - start:.1f} s; {n} completions graded in {graded - loaded:.1f} s "
          f"({(graded - loaded) / max(n, 1):.2f} s each, batch {args.batch_size})")

    baseline: dict[str, list[bool | None]] = {}
    at = 0
    print(f"\n{'intervention':44} {'dataset':16} {'score [95% CI]':24} {'success [95% CI]':24} {'p':>6} {'unparsed':>9}")
    saved = []
    for name, d, rows in sets:
        chunk = verdicts[at : at + len(rows)]
        at += len(rows)
        outcome = rubric_outcomes(chunk)
        success = [None if s is None else s > 0 for s in outcome["scores"]]
        if name == "baseline":
            baseline[d] = success
        saved.append({"intervention": name, "dataset": d, **outcome, "verdicts": [asdict(v) for v in chunk]})
        if outcome["n_unparsed"] == outcome["n"]:
            print(f"{name:44} {d:16} {'no parseable answer':24} {'':24} {'':>6} {outcome['n_unparsed']:>4}/{outcome['n']}")
            continue
        score = S.mean_cell(outcome["scores"], args.seed)
        rate = S.binary_cell(success, None if name == "baseline" else baseline.get(d), args.seed)
        p = "" if rate["p_vs_baseline"] is None else f"{rate['p_vs_baseline']:.3f}"
        print(f"{name:44} {d:16} {score['value']:.3f} [{score['ci'][0]:.3f}, {score['ci'][1]:.3f}]{'':4} "
              f"{rate['value']:.3f} [{rate['ci'][0]:.3f}, {rate['ci'][1]:.3f}]{'':4} {p:>6} {outcome['n_unparsed']:>4}/{outcome['n']}")
    print("p: McNemar's exact test of the rubric attack success against the baseline (unadjusted)")
    problems: dict[str, int] = {}
    for v in verdicts:
        if not v.parsed:
            problems[v.problem] = problems.get(v.problem, 0) + 1
    if problems:
        print("\nunparsed grader answers, by problem:")
        for problem, count in sorted(problems.items(), key=lambda kv: -kv[1]):
            print(f"  {count:4}  {problem}")
    if args.out:
        args.out.write_text(json.dumps({"grader": args.grader, "seconds": {"load": loaded - start, "grade": graded - loaded},
                                        "sets": saved}, indent=1))
        print(f"\nverdicts saved to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
