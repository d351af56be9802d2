from __future__ import annotations

import logging

import torch

from refusal_directions.generation import generate, generate_tokens, stop_token_ids
from refusal_directions.interventions import ActAdd, intervene
from tiny import make_adapter

PROMPTS = ["hello", "tell me a long story about dragons and castles", "why is the sky blue?", "hi"]


def test_batched_generation_matches_one_at_a_time_and_keeps_order():
    adapter = make_adapter("llama")
    batched = generate_tokens(adapter, PROMPTS, max_new_tokens=6, batch_size=3)
    single = [generate_tokens(adapter, [p], max_new_tokens=6, batch_size=1)[0] for p in PROMPTS]
    assert batched == single
    assert all(1 <= len(t) <= 6 for t in batched)
    texts = generate(adapter, PROMPTS, max_new_tokens=6, batch_size=4)
    assert texts == [adapter.tokenizer.decode(t, skip_special_tokens=True).strip() for t in batched]


def test_generation_stops_at_the_end_of_turn_token():
    adapter = make_adapter("qwen2")
    end = adapter.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert end in stop_token_ids(adapter)
    with torch.no_grad():  # make the model always predict <|im_end|>
        adapter.lm_head.weight.zero_()
        adapter.lm_head.weight[end] = 1.0
        adapter.final_norm.weight.fill_(1.0)
    with intervene(adapter, ActAdd(torch.ones(adapter.d_model) * 50, layer=adapter.n_layers - 1)):
        out = generate_tokens(adapter, ["hi"], max_new_tokens=5)
    assert out == [[end]]


def test_out_of_memory_halves_the_batch(monkeypatch, caplog):
    adapter = make_adapter("llama")
    real = adapter.model.generate
    sizes = []

    def flaky(**kwargs):
        sizes.append(kwargs["input_ids"].shape[0])
        if kwargs["input_ids"].shape[0] > 1:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(**kwargs)

    monkeypatch.setattr(adapter.model, "generate", flaky)
    with caplog.at_level(logging.WARNING):
        out = generate_tokens(adapter, PROMPTS, max_new_tokens=3, batch_size=4)
    assert sizes[:3] == [4, 2, 1] and len(out) == 4
    assert "retrying with batch size 2" in caplog.text
