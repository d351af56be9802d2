"""The evaluate stage's teacher-forced passes over chat prompts: shared prefixes (new) vs whole sequences (old).

On the embedded model (Qwen2.5-Coder-0.5B-Instruct, float32, CPU) with the quick preset's shapes, in one
process and on the same inputs, each measurement alternating old and new (``--repeats`` rounds, the order
flipped every round, the best time of each kept; load on the machine hits both alike, so read the ratio):

* coherence CE of ``--interventions`` interventions' completions of ``--n`` JailbreakBench prompts
  (max 48 tokens each) under the unmodified model: old, one ``completion_cross_entropy`` call per
  intervention with whole sequences (``share_prefix=False``, as the stage did); new, one call for all
  (each prompt computed once for its completions, identical completions scored once);
* on-distribution CE of ``--n`` harmless prompts + completions: whole sequences vs the template's
  shared opening (``loss.on_distribution_loss``);
* KL over the first 32 completion tokens under ``--kl-interventions`` ActAdd interventions with the
  baseline's logits reused across them: ``bench/evaluate_reference.py`` (the code before: full logits
  of padded whole sequences) vs ``divergence.completion_kl`` (prefix scorer).

Completions: with ``--run-dir`` the saved completions of a run's first interventions (``infer/``);
otherwise 48-token pieces of LAMBADA passages, the second intervention repeating the first one's
completion for every other prompt (as refusals repeat across interventions). Prints one JSON line per
pass with both times, the ratio and the largest absolute difference of the numbers.

    .venv/bin/python bench/evaluate_passes.py --data-dir ../shared/datasets [--n 32] [--interventions 10] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from evaluate_reference import reference_completion_kl  # noqa: E402
from refusal_directions.artifacts import read_jsonl  # noqa: E402
from refusal_directions.data import instructions, load_dataset, sample  # noqa: E402
from refusal_directions.evaluation import loss  # noqa: E402
from refusal_directions.evaluation.coherence import completion_cross_entropy  # noqa: E402
from refusal_directions.evaluation.divergence import completion_kl  # noqa: E402
from refusal_directions.interventions import ActAdd, intervene  # noqa: E402
from refusal_directions.models import load_model  # noqa: E402


def alternate(old, new, repeats: int) -> tuple[float, float, object, object]:
    """Best times of ``old()`` and ``new()`` over ``repeats`` rounds (order flipped each round), and their last results."""
    times: dict[str, list[float]] = {"old": [], "new": []}
    results: dict[str, object] = {}
    for r in range(repeats):
        for name in (("old", "new") if r % 2 == 0 else ("new", "old")):
            start = time.perf_counter()
            results[name] = (old if name == "old" else new)()
            times[name].append(time.perf_counter() - start)
    return min(times["old"]), min(times["new"]), results["old"], results["new"]


def report(what: str, old_s: float, new_s: float, diff: float, **extra) -> None:
    print(json.dumps({"what": what, "old_s": round(old_s, 2), "new_s": round(new_s, 2), "speedup": round(old_s / new_s, 2),
                      "max_abs_diff": diff, **extra}), flush=True)


def synthetic_completions(adapter, data_dir: str, n: int, k: int) -> list[list[str]]:
    """``k`` interventions' completions of ``n`` prompts: 48-token LAMBADA pieces, intervention 1
    repeating intervention 0's completion for every other prompt."""
    texts = [d["text"] for d in load_dataset("lambada", data_dir, limit=n * k + 16)][16:]
    pieces = [adapter.tokenizer.decode(adapter.tokenizer(t, add_special_tokens=False)["input_ids"][:48]) for t in texts]
    out = [pieces[j * n:(j + 1) * n] for j in range(k)]
    if k > 1:
        out[1] = [out[0][i] if i % 2 == 0 else c for i, c in enumerate(out[1])]
    return out


def run_completions(run_dir: Path, dataset: str, n: int, k: int) -> tuple[list[str], list[list[str]]]:
    """The prompts and the first ``k`` interventions' completions (first ``n`` rows) of a run's ``infer/``."""
    folders = sorted(p for p in (run_dir / "infer").iterdir() if (p / f"{dataset}.jsonl").exists())
    baseline = [p for p in folders if p.name == "baseline"]
    rows = [read_jsonl(p / f"{dataset}.jsonl")[:n] for p in (baseline + [p for p in folders if p.name != "baseline"])[:k]]
    return [r["prompt"] for r in rows[0]], [[r["response"] for r in part] for part in rows]


def bench_coherence(adapter, prompts: list[str], answers: list[list[str]], repeats: int) -> None:
    def old():
        return [completion_cross_entropy(adapter, prompts, part, max_completion_tokens=48, batch_size=8, share_prefix=False)
                for part in answers]

    def new():
        return completion_cross_entropy(adapter, prompts * len(answers), [a for part in answers for a in part],
                                        max_completion_tokens=48, batch_size=8)

    t_old, t_new, r_old, r_new = alternate(old, new, repeats)
    whole = [c for part in r_old for c in part.ce]
    diff = max(abs(a - b) for a, b in zip(whole, r_new.ce) if a == a)
    same_counts = [n for part in r_old for n in part.n_tokens] == r_new.n_tokens
    report("coherence ce", t_old, t_new, diff, completions=len(whole), interventions=len(answers),
           unique=len(set(zip(prompts * len(answers), [a for part in answers for a in part]))), same_token_counts=same_counts)


def bench_on_distribution(adapter, prompts: list[str], answers: list[str], repeats: int) -> None:
    run = lambda share: loss.on_distribution_loss(adapter, prompts, answers, max_length=256, batch_size=8,  # noqa: E731
                                                  share_prefix=share)
    t_old, t_new, r_old, r_new = alternate(lambda: run(False), lambda: run(True), repeats)
    diff = max(abs(a - b) for a, b in zip(r_old.doc_losses, r_new.doc_losses))
    report("ce/on_distribution", t_old, t_new, diff, documents=r_old.n_documents,
           mean_loss_diff=abs(r_old.mean_loss - r_new.mean_loss))


def bench_kl(adapter, prompts: list[str], answers: list[str], n_interventions: int, repeats: int) -> None:
    torch.manual_seed(0)
    steers = [ActAdd(8.0 * torch.nn.functional.normalize(torch.randn(adapter.d_model), dim=0), layer=12)
              for _ in range(n_interventions)]

    def every(kl):
        reuse: dict = {}
        return [kl(adapter, prompts, answers, lambda s=s: intervene(adapter, s), n_tokens=32, batch_size=8, reuse=reuse)
                for s in steers]

    t_old, t_new, r_old, r_new = alternate(lambda: every(reference_completion_kl), lambda: every(completion_kl), repeats)
    diff = max(abs(x - y) for a, b in zip(r_old, r_new) for x, y in
               [*zip(a.first_token, b.first_token), *zip(a.mean_per_token, b.mean_per_token)])
    report("kl/harmless", t_old, t_new, diff, prompts=len(prompts), interventions=n_interventions)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--run-dir", type=Path, default=None, help="a run folder (its infer/ completions as inputs)")
    parser.add_argument("--n", type=int, default=32, help="prompts per set")
    parser.add_argument("--interventions", type=int, default=10, help="interventions whose completions coherence scores")
    parser.add_argument("--kl-interventions", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--only", nargs="*", default=["coherence", "on_distribution", "kl"])
    args = parser.parse_args()
    adapter = load_model("embedded", device="cpu", dtype="float32")
    if args.run_dir:
        harmful, answers = run_completions(args.run_dir, "jailbreakbench", args.n, args.interventions)
        harmless, harmless_answers = run_completions(args.run_dir, "harmless_test", args.n, 1)
        harmless_answers = harmless_answers[0]
    else:
        harmful = instructions(sample(load_dataset("jailbreakbench", args.data_dir), args.n, 42))
        harmless = instructions(sample(load_dataset("harmless_test", args.data_dir), args.n, 42))
        answers = synthetic_completions(adapter, args.data_dir, args.n, args.interventions + 1)
        harmless_answers, answers = answers[-1], answers[:-1]
    completion_cross_entropy(adapter, harmful[:2], answers[0][:2])  # one-time checks (check_head), not timed
    if "coherence" in args.only:
        bench_coherence(adapter, harmful, answers, args.repeats)
    if "on_distribution" in args.only:
        bench_on_distribution(adapter, harmless, harmless_answers, args.repeats)
    if "kl" in args.only:
        bench_kl(adapter, harmless, harmless_answers, args.kl_interventions, args.repeats)


if __name__ == "__main__":
    main()
