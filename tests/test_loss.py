"""Cross-entropy of documents, instruction outputs and completions (``evaluation.loss``)."""

from __future__ import annotations

import math

import pytest
import torch

from refusal_directions.evaluation.loss import instruction_loss, on_distribution_loss, text_loss
from refusal_directions.models import ModelAdapter
from tiny import make_adapter, make_model, make_tokenizer

DOCS = [
    {"text": "The cat sat on the mat."},
    {"text": "A much longer document about dragons, castles and the knights who fought them long ago."},
    {"text": "Short."},
    "a plain string document works too",
]


def manual_nll(adapter: ModelAdapter, ids: list[int], start: int) -> tuple[float, int]:
    """Sum of -log p(ids[t] | ids[:t]) for t >= start, from the model's own full logits."""
    with torch.no_grad():
        logits = adapter.model(input_ids=torch.tensor([ids])).logits[0].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    total = -sum(logprobs[t - 1, ids[t]].item() for t in range(start, len(ids)))
    return total, len(ids) - start


def token_ids(adapter: ModelAdapter, text: str) -> list[int]:
    return adapter.tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.fixture(scope="module")
def adapter() -> ModelAdapter:
    return make_adapter("qwen2", n_layers=2)


def test_text_loss_equals_manual_per_token_computation(adapter):
    result = text_loss(adapter, DOCS, max_length=40, batch_size=3)
    total, count = 0.0, 0
    per_doc = []
    for doc in DOCS:
        ids = token_ids(adapter, doc if isinstance(doc, str) else doc["text"])[:40]
        nll, n = manual_nll(adapter, ids, 1)
        total, count = total + nll, count + n
        per_doc.append((nll / n, n))
    assert result.n_tokens == count and result.n_documents == len(DOCS) and result.n_nonfinite == 0
    assert result.mean_loss == pytest.approx(total / count, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(total / count), rel=1e-5)
    assert result.doc_tokens == [n for _, n in per_doc]
    assert result.doc_losses == pytest.approx([l for l, _ in per_doc], rel=1e-5)
    assert result.doc_tokens[1] == 39  # truncated to max_length tokens: 39 predicted


def test_padding_and_batch_size_do_not_change_losses(adapter):
    one = text_loss(adapter, DOCS, max_length=64, batch_size=1)
    many = text_loss(adapter, DOCS, max_length=64, batch_size=4)
    assert many.doc_losses == pytest.approx(one.doc_losses, abs=1e-5)
    assert many.mean_loss == pytest.approx(one.mean_loss, abs=1e-6)


def test_bos_is_prepended_when_the_tokenizer_has_one():
    tokenizer = make_tokenizer()
    tokenizer.bos_token = "<|begin_of_text|>"
    bos_adapter = ModelAdapter(make_model("llama", n_layers=2), tokenizer, name="tiny-bos")
    text = "hello world"
    with_bos = text_loss(bos_adapter, [text])
    without = text_loss(bos_adapter, [text], add_bos=False)
    ids = token_ids(bos_adapter, text)
    assert with_bos.n_tokens == len(ids) and without.n_tokens == len(ids) - 1
    nll, n = manual_nll(bos_adapter, [tokenizer.bos_token_id] + ids, 1)
    assert with_bos.mean_loss == pytest.approx(nll / n, rel=1e-5)


def test_instruction_loss_scores_only_the_output(adapter):
    records = [
        {"instruction": "Name a colour.", "input": "", "output": "Blue is a colour."},
        {"instruction": "Translate", "input": "bonjour", "output": "hello"},
    ]
    result = instruction_loss(adapter, records, batch_size=2)
    total, count = 0.0, 0
    for r in records:
        user = r["instruction"] + ("\n\n" + r["input"] if r["input"] else "")
        assert ("\n\nbonjour" in user) == (r["input"] == "bonjour")
        prompt = token_ids(adapter, adapter.format_prompt(user))
        output = token_ids(adapter, r["output"])
        nll, n = manual_nll(adapter, prompt + output, len(prompt))
        assert n == len(output)
        total, count = total + nll, count + n
    assert result.n_tokens == count
    assert result.mean_loss == pytest.approx(total / count, rel=1e-5)
    same = on_distribution_loss(adapter, ["Name a colour."], ["Blue is a colour."])
    assert same.doc_losses[0] == pytest.approx(result.doc_losses[0], rel=1e-6)
