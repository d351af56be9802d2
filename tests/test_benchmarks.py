from __future__ import annotations

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from refusal_directions.evaluation import benchmarks
from refusal_directions.evaluation.benchmarks import (
    arc_prompt,
    arc_shots,
    arc_inputs,
    encode_pair,
    encode_pairs,
    evaluate_arc,
    evaluate_mmlu,
    mmlu_inputs,
    mmlu_prompt,
    score_arc,
    score_mmlu,
)
from refusal_directions.evaluation.prefix_scorer import SequenceScores
from refusal_directions.models import ModelAdapter
from tiny import CHATML_TEMPLATE, SPECIAL_TOKENS, make_adapter, make_config, model_from_config

LETTERS = "ABCD"


def letter_adapter() -> ModelAdapter:
    """A tiny model whose byte-level tokenizer merges " A" .. " D" into single tokens (like real ones)."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    merges = [("\u0120", letter) for letter in LETTERS]  # byte-level "Ġ" is the space
    for a, b in merges:
        vocab[a + b] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>", additional_special_tokens=SPECIAL_TOKENS[1:]
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    config = make_config("qwen2", n_layers=2)
    config.vocab_size = 272
    return ModelAdapter(model_from_config(config), tokenizer, name="tiny-letters")


def question(subject: str, text: str, answer: int, choices=("red", "green", "blue", "black")) -> dict:
    return {"subject": subject, "question": text, "choices": list(choices), "answer": answer}


TEST = [
    question("astronomy", "Which colour is the sky?", 2),
    question("astronomy", "Which colour is grass?", 1),
    question("astronomy", "Which colour is coal?", 3),
    question("high_school_physics", "What is 1+1?", 1, ("1", "2", "3", "4")),
    question("high_school_physics", "What is 2+2?", 3, ("1", "2", "3", "4")),
]
DEV = [
    question("astronomy", "Which colour are roses?", 0),
    question("astronomy", "Which colour is snow? Not listed; pick black.", 3),
    question("astronomy", "unused third dev question", 0),
    question("high_school_physics", "What is 0+1?", 0, ("1", "2", "3", "4")),
    question("high_school_physics", "What is 1+2?", 2, ("1", "2", "3", "4")),
]


def last_logprobs(adapter: ModelAdapter, text: str) -> torch.Tensor:
    ids = adapter.tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return torch.log_softmax(adapter.model(input_ids=ids).logits[0, -1].float(), dim=-1)


def continuation_logprob(adapter: ModelAdapter, context: str, continuation: str) -> float:
    ctx, cont = encode_pair(adapter, context, continuation)
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logprobs = torch.log_softmax(adapter.model(input_ids=ids).logits[0].float(), dim=-1)
    return sum(logprobs[len(ctx) + j - 1, t].item() for j, t in enumerate(cont))


# ------------------------------------------------------------------ MMLU
def test_mmlu_prompt_is_lm_eval_format():
    q = question("high_school_physics", "  What is 1+1? ", 1, ("1", "2", "3", "4"))
    shots = [question("high_school_physics", "What is 2+2?", 0, ("4", "3", "2", "1")), question("x", "Q2", 3, ("a", "b", "c", "d"))]
    expected = (
        "The following are multiple choice questions (with answers) about high school physics.\n\n"
        "What is 2+2?\nA. 4\nB. 3\nC. 2\nD. 1\nAnswer: A\n\n"
        "Q2\nA. a\nB. b\nC. c\nD. d\nAnswer: D\n\n"
        "What is 1+1?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer:"
    )
    assert mmlu_prompt(q, shots) == expected


def test_mmlu_scores_single_letter_tokens_at_the_last_position():
    adapter = letter_adapter()
    result = evaluate_mmlu(adapter, TEST, DEV, n_shots=2, batch_size=2)
    assert result["scoring"] == "next-token" and result["n"] == 5 and result["chance_level"] == 0.25
    letter_ids = [adapter.tokenizer(" " + x, add_special_tokens=False)["input_ids"][0] for x in LETTERS]
    for q, row in zip(TEST, result["questions"]):
        shots = [d for d in DEV if d["subject"] == q["subject"]][:2]
        expected = last_logprobs(adapter, mmlu_prompt(q, shots))[letter_ids]
        assert row["logprobs"] == pytest.approx(expected.tolist(), abs=1e-4)
        assert row["pred"] == int(np.argmax(row["logprobs"])) and row["correct"] == (row["pred"] == q["answer"])
    accuracies = [s["accuracy"] for s in result["by_subject"].values()]
    assert result["accuracy_macro"] == pytest.approx(np.mean(accuracies))
    assert result["accuracy"] == pytest.approx(np.mean([r["correct"] for r in result["questions"]]))


def test_mmlu_batched_equals_one_question_per_forward():
    adapter = letter_adapter()
    single = evaluate_mmlu(adapter, TEST, DEV, n_shots=2, batch_size=1, share_prefix=False)
    batched = evaluate_mmlu(adapter, TEST, DEV, n_shots=2, batch_size=4, share_prefix=True)
    assert [q["pred"] for q in batched["questions"]] == [q["pred"] for q in single["questions"]]
    np.testing.assert_allclose(
        [q["logprobs"] for q in batched["questions"]], [q["logprobs"] for q in single["questions"]], atol=1e-4
    )


def test_mmlu_multi_token_letters_fall_back_to_continuations():
    adapter = make_adapter("qwen2", n_layers=2)  # byte-level: " A" is two tokens
    result = evaluate_mmlu(adapter, TEST[:2], DEV, n_shots=1)
    assert result["scoring"] == "continuation"
    prompt = mmlu_prompt(TEST[0], DEV[:1])
    expected = [continuation_logprob(adapter, prompt, " " + x) for x in LETTERS]
    assert result["questions"][0]["logprobs"] == pytest.approx(expected, abs=1e-4)


def test_mmlu_subsample_is_seeded():
    adapter = letter_adapter()
    a = evaluate_mmlu(adapter, TEST, DEV, n_shots=1, n_questions=3, seed=5)
    b = evaluate_mmlu(adapter, TEST, DEV, n_shots=1, n_questions=3, seed=5)
    assert a["n"] == 3 and a["n_available"] == 5
    assert [q["index"] for q in a["questions"]] == [q["index"] for q in b["questions"]]
    assert sorted(q["index"] for q in a["questions"]) == [q["index"] for q in a["questions"]]


# ------------------------------------------------------------------ ARC
def arc(qid: str, text: str, choices: list[str], answer: int) -> dict:
    return {"id": qid, "question": text, "choices": choices, "labels": list("ABCDE"[: len(choices)]), "answer": answer}


ARC_TEST = [
    arc("t1", "What melts ice?", ["heat", "cold", "dark"], 0),
    arc("t2", "Which is a planet?", ["Mars", "Moon", "Sun", "Comet"], 0),
    arc("t3", "Which is a mammal?", ["shark", "whale", "trout", "eel", "cod"], 1),
]
ARC_TRAIN = [arc(f"s{i}", f"Train question {i}?", ["yes", "no"], i % 2) for i in range(6)]


def test_arc_prompt_and_shots():
    shots = [ARC_TRAIN[0], ARC_TRAIN[1]]
    assert arc_prompt(ARC_TEST[0], shots) == (
        "Question: Train question 0?\nAnswer: yes\n\nQuestion: Train question 1?\nAnswer: no\n\nQuestion: What melts ice?\nAnswer:"
    )
    picked = arc_shots(ARC_TEST[0], ARC_TRAIN, 3, shot_seed=1)
    assert len(picked) == 3 and picked == arc_shots(ARC_TEST[0], ARC_TRAIN, 3, shot_seed=1)
    assert arc_shots(ARC_TRAIN[2], ARC_TRAIN, 5, shot_seed=1) == arc_shots(ARC_TRAIN[2], ARC_TRAIN, 5, shot_seed=1)
    assert ARC_TRAIN[2] not in arc_shots(ARC_TRAIN[2], ARC_TRAIN, 5, shot_seed=1)


def test_arc_loglikelihoods_match_manual_continuations():
    adapter = make_adapter("llama", n_layers=2)
    result = evaluate_arc(adapter, ARC_TEST, ARC_TRAIN, n_shots=2, batch_size=3)
    assert result["n"] == 3
    assert result["chance_level"] == pytest.approx((1 / 3 + 1 / 4 + 1 / 5) / 3)
    shots = arc_shots(None, ARC_TRAIN, 2, shot_seed=1234)  # one shared set by default
    for q, row in zip(ARC_TEST, result["questions"]):
        context = arc_prompt(q, shots)
        expected = [continuation_logprob(adapter, context, " " + c) for c in q["choices"]]
        assert row["loglikelihoods"] == pytest.approx(expected, abs=1e-4)
    per_question = evaluate_arc(adapter, ARC_TEST, ARC_TRAIN, n_shots=2, batch_size=3, shared_shots=False)
    for q, row in zip(ARC_TEST, per_question["questions"]):
        context = arc_prompt(q, arc_shots(q, ARC_TRAIN, 2, shot_seed=1234))
        expected = [continuation_logprob(adapter, context, " " + c) for c in q["choices"]]
        assert row["loglikelihoods"] == pytest.approx(expected, abs=1e-4)
    unbatched = evaluate_arc(adapter, ARC_TEST, ARC_TRAIN, n_shots=2, batch_size=1, share_prefix=False)
    np.testing.assert_allclose(
        np.concatenate([q["loglikelihoods"] for q in unbatched["questions"]]),
        np.concatenate([q["loglikelihoods"] for q in result["questions"]]),
        atol=1e-4,
    )


def test_encode_pairs_equals_encode_pair_one_at_a_time():
    adapter = make_adapter("llama", n_layers=1)
    pairs = [("Question: a?\nAnswer:", " yes"), ("Question: a?\nAnswer:", " no way"), ("Context ends in spaces  ", "x"),
             ("", " lone"), ("Question: b?\nAnswer:", " yes")]
    assert encode_pairs(adapter, pairs) == [encode_pair(adapter, c, x) for c, x in pairs]
    assert encode_pairs(adapter, pairs, add_special_tokens=False) == [encode_pair(adapter, c, x, False) for c, x in pairs]


def test_tokenized_inputs_serve_several_models_like_evaluating_each():
    """One ``arc_inputs`` / ``mmlu_inputs`` scored under two models equals ``evaluate_*`` on each."""
    first, second = make_adapter("llama", n_layers=2, seed=0), make_adapter("llama", n_layers=2, seed=1)
    arc_in = arc_inputs(first, ARC_TEST, ARC_TRAIN, n_shots=2)
    mmlu_in = mmlu_inputs(first, TEST, DEV, n_shots=2)
    for model in (first, second):
        assert score_arc(model, arc_in, batch_size=3) == evaluate_arc(model, ARC_TEST, ARC_TRAIN, n_shots=2, batch_size=3)
        assert score_mmlu(model, mmlu_in, batch_size=2) == evaluate_mmlu(model, TEST, DEV, n_shots=2, batch_size=2)
    assert score_arc(first, arc_in)["questions"] != score_arc(second, arc_in)["questions"]


def test_arc_acc_norm_divides_by_choice_length(monkeypatch):
    """Hand-built: the short choice has the higher total log-likelihood, the long one the higher per-character."""
    q = arc("h1", "Pick one", ["a", "bbbbbbbbbb"], 1)

    def fake_scores(adapter, sequences, starts, **kwargs):
        assert len(sequences) == 2
        return SequenceScores(np.array([-3.0, -5.0]), np.array([1, 10]), np.zeros(2, dtype=np.int64))

    monkeypatch.setattr(benchmarks, "sequence_logprobs", fake_scores)
    result = evaluate_arc(make_adapter("qwen2", n_layers=1), [q], ARC_TRAIN, n_shots=0)
    row = result["questions"][0]
    assert (row["pred"], row["pred_norm"]) == (0, 1)  # -3 > -5, but -5/10 > -3/1
    assert (result["acc"], result["acc_norm"]) == (0.0, 1.0)


# ------------------------------------------------------------------ embedded model
@pytest.mark.embedded
def test_embedded_mmlu_runs(embedded_adapter, data_dir):
    from refusal_directions import load_dataset

    test = load_dataset("mmlu", data_dir, split="test")
    dev = load_dataset("mmlu", data_dir, split="dev")
    result = evaluate_mmlu(embedded_adapter, test, dev, n_questions=20, seed=0)
    assert result["n"] == 20 and result["n_available"] == len(test)
    assert 0.0 <= result["accuracy"] <= 1.0 and result["scoring"] == "next-token"
    assert result["n_nonfinite"] == 0


def test_mmlu_subject_subsample(data_dir):
    from refusal_directions.data import load_dataset

    adapter = make_adapter("llama", n_layers=1, d_model=32)
    test, dev = load_dataset("mmlu", data_dir, split="test"), load_dataset("mmlu", data_dir, split="dev")
    result = evaluate_mmlu(adapter, test, dev, n_questions=4, n_subjects=2, seed=3, batch_size=4)
    assert result["n"] == 4 and 1 <= len(result["by_subject"]) <= 2
    again = evaluate_mmlu(adapter, test, dev, n_questions=4, n_subjects=2, seed=3, batch_size=4)
    assert [q["index"] for q in again["questions"]] == [q["index"] for q in result["questions"]]
