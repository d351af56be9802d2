"""Capability benchmarks in lm-evaluation-harness format: MMLU (5-shot) and ARC-Challenge.

Plain text prompts (no chat template), tokenized with the tokenizer's default special tokens
(as lm-evaluation-harness 0.4 does when ``add_bos_token`` is unset: Llama-3 gets its BOS, Qwen
none).

MMLU (``cais/mmlu``): the prompt is the subject header ``"The following are multiple choice
questions (with answers) about {subject}.\\n\\n"`` (underscores in the subject name become
spaces), the first ``n_shots`` dev questions of the same subject, each
``"{question}\\nA. {c0}\\nB. {c1}\\nC. {c2}\\nD. {c3}\\nAnswer: {letter}\\n\\n"``, then the test
question ending with ``"Answer:"`` (questions are ``.strip()``-ed as lm-eval does). The
prediction is the letter whose token (``" A"`` .. ``" D"``) has the highest log-probability at
the last position: one logit row per question. Questions of one subject share the few-shot
prefix, which is computed once (see ``prefix_scorer.iter_final_hidden``).

ARC-Challenge (``allenai/ai2_arc``): ``"Question: {question}\\nAnswer:"`` with shots
``"Question: {q}\\nAnswer: {correct choice}"`` joined by ``"\\n\\n"``; each choice is the
continuation ``" " + text``. ``acc``: argmax of the summed log-likelihood of the continuation
tokens; ``acc_norm``: argmax of that sum divided by ``len(choice text)`` (characters of the
choice without the leading space, exactly what lm-eval's ``acc_norm`` divides by; equal to the
byte length for ASCII text). Shots come from the train split: ``n_shots`` drawn per question with
``random.Random(f"{shot_seed}:{question id}")``, so a question's shots do not depend on which
other questions are evaluated.

Both return per-question outcomes (for McNemar / paired bootstrap), a bootstrap interval, and
``chance_level`` with ``above_chance`` (the interval's lower end is above chance) so a report can
flag benchmarks that cannot show capability damage for a model.
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from ..models import ModelAdapter
from .prefix_scorer import next_token_logprobs, sequence_logprobs
from .stats import bootstrap_ci

MMLU_LETTERS = ("A", "B", "C", "D")
MMLU_CHANCE = 0.25


# ------------------------------------------------------------------ shared helpers
def _encode(adapter: ModelAdapter, text: str, add_special_tokens: bool) -> list[int]:
    return list(adapter.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def _encode_all(adapter: ModelAdapter, texts: Sequence[str], add_special_tokens: bool) -> list[list[int]]:
    """``_encode`` of every text in one tokenizer call (fast tokenizers encode a list in parallel)."""
    return [list(ids) for ids in adapter.tokenizer(list(texts), add_special_tokens=add_special_tokens)["input_ids"]]


def _move_trailing_space(context: str, continuation: str) -> tuple[str, str]:
    """lm-evaluation-harness's split: trailing whitespace of the context belongs to the continuation."""
    n_spaces = len(context) - len(context.rstrip())
    return (context[:-n_spaces], context[-n_spaces:] + continuation) if n_spaces else (context, continuation)


def encode_pair(adapter: ModelAdapter, context: str, continuation: str, add_special_tokens: bool = True) -> tuple[list[int], list[int]]:
    """Token ids of (context, continuation) as lm-evaluation-harness splits them.

    Trailing whitespace of the context moves to the continuation; the whole string is encoded
    and the continuation is what follows the separately encoded context's length.
    """
    return encode_pairs(adapter, [(context, continuation)], add_special_tokens)[0]


def encode_pairs(adapter: ModelAdapter, pairs: Sequence[tuple[str, str]],
                 add_special_tokens: bool = True) -> list[tuple[list[int], list[int]]]:
    """``encode_pair`` of every (context, continuation), in two tokenizer calls: the distinct
    contexts (each once) and the whole strings."""
    split = [_move_trailing_space(context, continuation) for context, continuation in pairs]
    contexts = list(dict.fromkeys(context for context, _ in split))
    context_ids = dict(zip(contexts, _encode_all(adapter, contexts, add_special_tokens)))
    wholes = _encode_all(adapter, [context + continuation for context, continuation in split], add_special_tokens)
    return [(context_ids[context], whole[len(context_ids[context]):]) for (context, _), whole in zip(split, wholes)]


def _select(n_total: int, n_questions: int | None, seed: int) -> list[int]:
    """Indices of the evaluated questions: all, or ``n_questions`` drawn with ``seed``, in original order."""
    if n_questions is None or n_questions >= n_total:
        return list(range(n_total))
    return sorted(random.Random(seed).sample(range(n_total), n_questions))


def _accuracy_summary(correct: np.ndarray, chance: float, n_boot: int, seed: int) -> dict:
    ci = bootstrap_ci(correct.astype(float), n_boot=n_boot, seed=seed)
    return {"accuracy": float(correct.mean()), "ci": [ci["low"], ci["high"]], "above_chance": bool(ci["low"] > chance)}


# ------------------------------------------------------------------ MMLU
def mmlu_subject_header(subject: str) -> str:
    return f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"


def mmlu_question_text(record: Mapping, answer: bool = False) -> str:
    """``"{question}\\nA. ..\\nD. ..\\nAnswer:"``, plus ``" {letter}"`` for a shot (``answer=True``)."""
    choices = record["choices"]
    if len(choices) != 4:
        raise ValueError(f"MMLU questions have 4 choices, got {len(choices)}")
    lines = [record["question"].strip()] + [f"{letter}. {choice}" for letter, choice in zip(MMLU_LETTERS, choices)]
    text = "\n".join(lines) + "\nAnswer:"
    return text + f" {MMLU_LETTERS[int(record['answer'])]}" if answer else text


def mmlu_prompt(record: Mapping, shots: Sequence[Mapping]) -> str:
    """The full lm-eval-format prompt of one test question with its few-shot examples."""
    prefix = "".join(mmlu_question_text(shot, answer=True) + "\n\n" for shot in shots)
    return mmlu_subject_header(record["subject"]) + prefix + mmlu_question_text(record)


def mmlu_shots(dev: Sequence[Mapping], n_shots: int = 5) -> dict[str, list[Mapping]]:
    """The first ``n_shots`` dev questions of every subject, in file order."""
    shots: dict[str, list[Mapping]] = defaultdict(list)
    for record in dev:
        if len(shots[record["subject"]]) < n_shots:
            shots[record["subject"]].append(record)
    return dict(shots)


def _single_token_ids(adapter: ModelAdapter, context: str, continuations: Sequence[str], add_special_tokens: bool) -> list[int] | None:
    pairs = encode_pairs(adapter, [(context, continuation) for continuation in continuations], add_special_tokens)
    return [cont[0] for _, cont in pairs] if all(len(cont) == 1 for _, cont in pairs) else None


def evaluate_mmlu(
    adapter: ModelAdapter,
    questions: Sequence[Mapping],
    dev: Sequence[Mapping],
    *,
    n_shots: int = 5,
    n_questions: int | None = None,
    n_subjects: int | None = None,
    seed: int = 0,
    batch_size: int = 8,
    share_prefix: bool = True,
    add_special_tokens: bool = True,
    n_boot: int = 2000,
) -> dict:
    """MMLU accuracy, micro (over questions) and macro (mean over subjects).

    Args:
        questions: MMLU test records ``{"subject", "question", "choices"[4], "answer"}``.
        dev: dev records (the few-shot pool); shots are the first ``n_shots`` of the subject.
        n_questions, seed: evaluate a seeded random subset (indices refer to ``questions``).
        n_subjects: first restrict to this many seeded random subjects (few subjects with several
            questions each share their few-shot prefixes: the cheap way to a small sample).
        share_prefix: compute each subject's few-shot prefix once (exact for per-token hooks).

    Returns a dict: ``benchmark``, ``n_shots``, ``n`` (questions evaluated), ``n_available``,
    ``seed``, ``accuracy`` (micro), ``accuracy_macro``, ``ci`` (95% bootstrap of the micro
    accuracy), ``chance_level`` (0.25), ``above_chance``, ``n_nonfinite``, ``by_subject``
    ``{subject: {"n", "accuracy"}}``, ``questions`` (per question: ``index`` into ``questions``,
    ``subject``, ``answer``, ``pred``, ``correct``, ``logprobs`` of A-D), ``scoring``
    (``"next-token"`` or ``"continuation"`` when the letters are not single tokens).
    """
    inputs = mmlu_inputs(adapter, questions, dev, n_shots=n_shots, n_questions=n_questions, n_subjects=n_subjects,
                         seed=seed, add_special_tokens=add_special_tokens)
    return score_mmlu(adapter, inputs, batch_size=batch_size, share_prefix=share_prefix, n_boot=n_boot)


@dataclass
class MmluInputs:
    """The tokenized MMLU workload of ``evaluate_mmlu`` (independent of the model's weights, so one
    instance serves every intervention). ``scoring`` is ``"next-token"`` when each letter
    (``" A"`` .. ``" D"``) is one token: one sequence per question (its prompt) and
    ``letter_ids``; else ``"continuation"``: four sequences per question (prompt + letter) scored
    from ``starts``."""

    settings: dict  # n_shots, n_available, seed (echoed in the result)
    selected: list[int]  # indices into the questions
    records: list[Mapping]
    groups: list[str]  # prefix-sharing group of each sequence: the subject
    scoring: str
    sequences: list[list[int]]
    letter_ids: list[int] | None = None
    starts: list[int] | None = None


def mmlu_inputs(
    adapter: ModelAdapter,
    questions: Sequence[Mapping],
    dev: Sequence[Mapping],
    *,
    n_shots: int = 5,
    n_questions: int | None = None,
    n_subjects: int | None = None,
    seed: int = 0,
    add_special_tokens: bool = True,
) -> MmluInputs:
    """Select and tokenize ``evaluate_mmlu``'s questions (arguments as there)."""
    shots = mmlu_shots(dev, n_shots)
    selected = _mmlu_selection(questions, shots, n_shots, n_questions, n_subjects, seed)
    records = [questions[i] for i in selected]
    prompts = [mmlu_prompt(r, shots[r["subject"]]) for r in records]
    groups = [r["subject"] for r in records]
    settings = {"n_shots": n_shots, "n_available": len(questions), "seed": seed}
    continuations = [" " + letter for letter in MMLU_LETTERS]
    letter_ids = _single_token_ids(adapter, prompts[0], continuations, add_special_tokens)
    if letter_ids is not None:
        return MmluInputs(settings, selected, records, groups, "next-token", _encode_all(adapter, prompts, add_special_tokens),
                          letter_ids=letter_ids)
    pairs = encode_pairs(adapter, [(prompt, c) for prompt in prompts for c in continuations], add_special_tokens)
    return MmluInputs(settings, selected, records, [g for g in groups for _ in continuations], "continuation",
                      [ctx + cont for ctx, cont in pairs], starts=[len(ctx) for ctx, _ in pairs])


def score_mmlu(adapter: ModelAdapter, inputs: MmluInputs, *, batch_size: int = 8, max_tokens: int | None = None,
               share_prefix: bool = True, n_boot: int = 2000) -> dict:
    """``evaluate_mmlu``'s result for tokenized ``inputs`` (``mmlu_inputs``) under the model as it is now."""
    logprobs, n_nonfinite = _mmlu_letter_logprobs(adapter, inputs, batch_size=batch_size, max_tokens=max_tokens,
                                                  share_prefix=share_prefix)
    settings = inputs.settings
    outcomes = _mmlu_outcomes(inputs.selected, inputs.records, logprobs, n_boot, settings["seed"])
    by_subject, per_question = outcomes.pop("by_subject"), outcomes.pop("questions")
    return {
        "benchmark": "mmlu",
        "n_shots": settings["n_shots"],
        "n": len(inputs.records),
        "n_available": settings["n_available"],
        "seed": settings["seed"],
        **outcomes,
        "n_nonfinite": n_nonfinite,
        "scoring": inputs.scoring,
        "by_subject": by_subject,
        "questions": per_question,
    }


def _mmlu_selection(
    questions: Sequence[Mapping],
    shots: Mapping[str, Sequence[Mapping]],
    n_shots: int,
    n_questions: int | None,
    n_subjects: int | None,
    seed: int,
) -> list[int]:
    """Indices into ``questions`` of the evaluated ones (``evaluate_mmlu``'s ``n_subjects``, then
    ``n_questions``, both seeded); raises ``ValueError`` when none is left or a subject has too few shots."""
    pool = list(range(len(questions)))
    if n_subjects is not None:
        subjects = sorted({r["subject"] for r in questions})
        chosen = set(random.Random(seed).sample(subjects, min(n_subjects, len(subjects))))
        pool = [i for i in pool if questions[i]["subject"] in chosen]
    selected = [pool[i] for i in _select(len(pool), n_questions, seed)]
    if not selected:
        raise ValueError("no MMLU questions to evaluate")
    for i in selected:
        subject = questions[i]["subject"]
        if len(shots.get(subject, [])) < n_shots:
            raise ValueError(f"the dev split has fewer than {n_shots} questions for subject {subject!r}")
    return selected


def _mmlu_letter_logprobs(adapter: ModelAdapter, inputs: MmluInputs, *, batch_size: int, max_tokens: int | None,
                          share_prefix: bool) -> tuple[np.ndarray, int]:
    """``(log p of " A" .. " D" [n, 4] float64, non-finite positions)`` of every question: one
    logit row per question (``"next-token"``) or each letter scored as a continuation."""
    if inputs.scoring == "next-token":
        logprobs, nonfinite = next_token_logprobs(adapter, inputs.sequences, inputs.letter_ids, groups=inputs.groups,
                                                  batch_size=batch_size, max_tokens=max_tokens, share_prefix=share_prefix,
                                                  desc="MMLU")
        return logprobs, int(nonfinite.sum())
    scores = sequence_logprobs(adapter, inputs.sequences, inputs.starts, groups=inputs.groups, batch_size=batch_size,
                               max_tokens=max_tokens, share_prefix=share_prefix, desc="MMLU")
    return scores.logprob_sums.reshape(len(inputs.records), 4), int(scores.n_nonfinite.sum())


def _mmlu_outcomes(selected: Sequence[int], records: Sequence[Mapping], logprobs: np.ndarray, n_boot: int, seed: int) -> dict:
    """Predictions (argmax of ``logprobs`` [n, 4]) against the answers: ``accuracy``, ``accuracy_macro``,
    ``ci``, ``chance_level``, ``above_chance``, ``by_subject`` and per-question ``questions``."""
    groups = [r["subject"] for r in records]
    preds = logprobs.argmax(axis=1)
    answers = np.array([int(r["answer"]) for r in records])
    correct = preds == answers
    by_subject: dict[str, dict] = {}
    for subject in sorted(set(groups)):
        mask = np.array([g == subject for g in groups])
        by_subject[subject] = {"n": int(mask.sum()), "accuracy": float(correct[mask].mean())}
    summary = _accuracy_summary(correct, MMLU_CHANCE, n_boot, seed)
    return {
        "accuracy": summary["accuracy"],
        "accuracy_macro": float(np.mean([s["accuracy"] for s in by_subject.values()])),
        "ci": summary["ci"],
        "chance_level": MMLU_CHANCE,
        "above_chance": summary["above_chance"],
        "by_subject": by_subject,
        "questions": [
            {
                "index": int(i),
                "subject": r["subject"],
                "answer": int(a),
                "pred": int(p),
                "correct": bool(c),
                "logprobs": [float(x) for x in lp],
            }
            for i, r, a, p, c, lp in zip(selected, records, answers, preds, correct, logprobs)
        ],
    }


# ------------------------------------------------------------------ ARC-Challenge
def arc_question_text(record: Mapping) -> str:
    return f"Question: {record['question']}\nAnswer:"


def arc_prompt(record: Mapping, shots: Sequence[Mapping]) -> str:
    """Context of one ARC question: shots (with their correct answer) then the question."""
    parts = [arc_question_text(s) + " " + s["choices"][int(s["answer"])] for s in shots]
    return "\n\n".join(parts + [arc_question_text(record)])


def arc_shots(record: Mapping | None, train: Sequence[Mapping], n_shots: int, shot_seed: int) -> list[Mapping]:
    """``n_shots`` train questions for ``record``, fixed by ``shot_seed`` and the question's id;
    with ``record=None`` one seeded set shared by every question."""
    if n_shots == 0:
        return []
    if record is None:
        if len(train) < n_shots:
            raise ValueError(f"the ARC train split has {len(train)} questions; {n_shots} shots requested")
        return random.Random(f"{shot_seed}:shared").sample(list(train), n_shots)
    key = record.get("id") or record["question"]
    pool = [t for t in train if (t.get("id") or t["question"]) != key]
    if len(pool) < n_shots:
        raise ValueError(f"the ARC train split has {len(pool)} questions; {n_shots} shots requested")
    return random.Random(f"{shot_seed}:{key}").sample(pool, n_shots)


def evaluate_arc(
    adapter: ModelAdapter,
    questions: Sequence[Mapping],
    train: Sequence[Mapping],
    *,
    n_shots: int = 5,
    shot_seed: int = 1234,
    shared_shots: bool = True,
    n_questions: int | None = None,
    seed: int = 0,
    batch_size: int = 8,
    share_prefix: bool = True,
    add_special_tokens: bool = True,
    n_boot: int = 2000,
) -> dict:
    """ARC-Challenge ``acc`` and ``acc_norm`` (5-shot by default; 25 is the leaderboard setting).

    ``shared_shots`` (default): one seeded set of shots for every question (as the reference tool,
    which takes fixed train shots), so the few-shot prefix is computed once for all questions;
    otherwise shots are drawn per question (as lm-evaluation-harness does), which costs a prefix
    per question.

    Args:
        questions: ARC records ``{"id", "question", "choices", "labels", "answer"}`` (test split).
        train: the few-shot pool (train split).
        n_shots, shot_seed: shots per question, drawn as ``arc_shots`` describes.
        n_questions, seed: evaluate a seeded random subset.

    Returns a dict: ``benchmark``, ``n_shots``, ``shot_seed``, ``n``, ``n_available``, ``seed``,
    ``acc``, ``acc_ci``, ``acc_norm``, ``acc_norm_ci``, ``chance_level`` (mean of
    ``1 / n_choices``), ``above_chance`` (for acc_norm), ``above_chance_acc``, ``n_nonfinite``,
    ``questions`` (per question: ``index``, ``id``, ``answer``, ``pred``, ``pred_norm``,
    ``correct``, ``correct_norm``, ``loglikelihoods``, ``n_choices``).
    """
    inputs = arc_inputs(adapter, questions, train, n_shots=n_shots, shot_seed=shot_seed, shared_shots=shared_shots,
                        n_questions=n_questions, seed=seed, add_special_tokens=add_special_tokens)
    return score_arc(adapter, inputs, batch_size=batch_size, share_prefix=share_prefix, n_boot=n_boot)


@dataclass
class ArcInputs:
    """The tokenized ARC workload of ``evaluate_arc`` (what does not depend on the model's weights,
    so one instance serves every intervention): the selected questions and one scored sequence
    per (question, choice), questions in order, choices in order."""

    settings: dict  # n_shots, shot_seed, shared_shots, n_available, seed (echoed in the result)
    selected: list[int]  # indices into the questions
    records: list[Mapping]
    sequences: list[list[int]]  # token ids of context + " choice"
    starts: list[int]  # where the choice's tokens start
    groups: list[int]  # prefix-sharing group: 0 for all with shared shots, else the question's index
    owners: list[int]  # the question's index in ``records``
    char_lens: list[float]  # len(choice): acc_norm's divisor


def arc_inputs(
    adapter: ModelAdapter,
    questions: Sequence[Mapping],
    train: Sequence[Mapping],
    *,
    n_shots: int = 5,
    shot_seed: int = 1234,
    shared_shots: bool = True,
    n_questions: int | None = None,
    seed: int = 0,
    add_special_tokens: bool = True,
) -> ArcInputs:
    """Select and tokenize ``evaluate_arc``'s questions (arguments as there)."""
    selected = _select(len(questions), n_questions, seed)
    if not selected:
        raise ValueError("no ARC questions to evaluate")
    records = [questions[i] for i in selected]
    common_shots = arc_shots(None, train, n_shots, shot_seed) if shared_shots else None
    contexts = [arc_prompt(r, common_shots if shared_shots else arc_shots(r, train, n_shots, shot_seed)) for r in records]
    owners = [q for q, r in enumerate(records) for _ in r["choices"]]
    choices = [choice for r in records for choice in r["choices"]]
    pairs = encode_pairs(adapter, [(contexts[q], " " + choice) for q, choice in zip(owners, choices)], add_special_tokens)
    settings = {"n_shots": n_shots, "shot_seed": shot_seed, "shared_shots": shared_shots,
                "n_available": len(questions), "seed": seed}
    return ArcInputs(settings, selected, records, sequences=[ctx + cont for ctx, cont in pairs],
                     starts=[len(ctx) for ctx, _ in pairs], groups=[0 if shared_shots else q for q in owners],
                     owners=owners, char_lens=[float(len(choice)) for choice in choices])


def score_arc(adapter: ModelAdapter, inputs: ArcInputs, *, batch_size: int = 8, max_tokens: int | None = None,
              share_prefix: bool = True, n_boot: int = 2000) -> dict:
    """``evaluate_arc``'s result for tokenized ``inputs`` (``arc_inputs``) under the model as it is now."""
    records = inputs.records
    scores = sequence_logprobs(adapter, inputs.sequences, inputs.starts, groups=inputs.groups, batch_size=batch_size,
                               max_tokens=max_tokens, share_prefix=share_prefix, desc="ARC")
    lls, preds, preds_norm = _arc_predictions(scores.logprob_sums, inputs.owners, inputs.char_lens, len(records))
    answers = np.array([int(r["answer"]) for r in records])
    correct, correct_norm = preds == answers, preds_norm == answers
    chance = float(np.mean([1.0 / len(r["choices"]) for r in records]))
    settings = inputs.settings
    acc = _accuracy_summary(correct, chance, n_boot, settings["seed"])
    acc_norm = _accuracy_summary(correct_norm, chance, n_boot, settings["seed"])
    return {
        "benchmark": "arc_challenge", "n_shots": settings["n_shots"], "shot_seed": settings["shot_seed"],
        "shared_shots": settings["shared_shots"], "n": len(records), "n_available": settings["n_available"],
        "seed": settings["seed"],
        "acc": acc["accuracy"], "acc_ci": acc["ci"], "acc_norm": acc_norm["accuracy"], "acc_norm_ci": acc_norm["ci"],
        "chance_level": chance, "above_chance": acc_norm["above_chance"], "above_chance_acc": acc["above_chance"],
        "n_nonfinite": int(scores.n_nonfinite.sum()),
        "questions": _arc_question_rows(inputs.selected, records, lls, preds, preds_norm),
    }


def _arc_question_rows(selected: Sequence[int], records: Sequence[Mapping], lls: Sequence[np.ndarray],
                       preds: np.ndarray, preds_norm: np.ndarray) -> list[dict]:
    """``evaluate_arc``'s per-question outcomes (``index`` into the questions, ``id``, ``answer``,
    ``pred``, ``pred_norm``, ``correct``, ``correct_norm``, ``loglikelihoods``, ``n_choices``)."""
    answers = np.array([int(r["answer"]) for r in records])
    correct, correct_norm = preds == answers, preds_norm == answers
    return [
        {"index": int(i), "id": r.get("id", ""), "answer": int(a), "pred": int(p), "pred_norm": int(pn),
         "correct": bool(c), "correct_norm": bool(cn), "loglikelihoods": [float(x) for x in ll],
         "n_choices": len(r["choices"])}
        for i, r, a, p, pn, c, cn, ll in zip(selected, records, answers, preds, preds_norm, correct, correct_norm, lls)
    ]


def _arc_predictions(
    logprob_sums: np.ndarray, owners: Sequence[int], char_lens: Sequence[float], n_questions: int
) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """Per question: the choices' log-likelihoods, the ``acc`` prediction (argmax) and the ``acc_norm``
    one (argmax of log-likelihood / characters, at least 1)."""
    owners_arr = np.array(owners)
    lls = [logprob_sums[owners_arr == q] for q in range(n_questions)]
    lens = [np.array(char_lens)[owners_arr == q] for q in range(n_questions)]
    preds = np.array([int(np.argmax(ll)) for ll in lls])
    preds_norm = np.array([int(np.argmax(ll / np.maximum(ln, 1.0))) for ll, ln in zip(lls, lens)])
    return lls, preds, preds_norm
