from __future__ import annotations

import logging

import pytest
import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from greedy_reference import LEAKY_NAMES, argmax_decode, leaky_settings, make_eos_prone, reload, save_with_generation_config
from refusal_directions.generation import generate, generate_tokens, stop_token_ids
from refusal_directions.interventions import ActAdd, intervene
from refusal_directions.models import ModelAdapter
from tiny import CHATML_TEMPLATE, LLAMA3_TEMPLATE, make_adapter, make_model, make_tokenizer

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


# ------------------------------------------------------------------ pure greedy decoding
GREEDY_NEW_TOKENS = 10


@pytest.fixture(scope="module")
def eos_prone_llama():
    """A tiny Llama whose argmax decoding of PROMPTS[0] stops at EOS on its third token, with its references."""
    model = make_model("llama")
    adapter = ModelAdapter(model, make_tokenizer(), name="tiny-llama")
    prompt_ids = [adapter.tokenizer(p, add_special_tokens=False)["input_ids"] for p in adapter.format_prompts(PROMPTS)]
    eos = adapter.tokenizer.eos_token_id
    first = argmax_decode(model, prompt_ids[0], GREEDY_NEW_TOKENS, [])
    make_eos_prone(model, first[2], eos)
    references = [argmax_decode(model, ids, GREEDY_NEW_TOKENS, {eos}) for ids in prompt_ids]
    assert references[0][-1] == eos and len(references[0]) == 3
    assert any(len(r) == GREEDY_NEW_TOKENS for r in references)
    return model, references


@pytest.mark.parametrize(
    "name, cache_implementation",
    [(name, None) for name in LEAKY_NAMES] + [(name, "static") for name in ("min_new_tokens", "qwen2.5_instruct", "everything")],
)
def test_the_models_generation_config_never_changes_greedy_tokens(eos_prone_llama, tmp_path, name, cache_implementation):
    """A saved generation_config with hub-style settings: generation still equals hand-written argmax decoding."""
    model, references = eos_prone_llama
    settings = leaky_settings(references[1])[name]
    save_with_generation_config(model, tmp_path, settings)
    reloaded = reload(tmp_path)
    for key in settings:  # the hub-style settings survived saving and loading
        assert getattr(reloaded.generation_config, key) is not None, key
    adapter = ModelAdapter(reloaded, make_tokenizer(), name="tiny-llama")
    assert stop_token_ids(adapter) == [adapter.tokenizer.eos_token_id]
    before = reloaded.generation_config.to_dict()
    out = generate_tokens(adapter, PROMPTS, max_new_tokens=GREEDY_NEW_TOKENS, batch_size=3,
                          cache_implementation=cache_implementation)
    assert out == references
    assert reloaded.generation_config.to_dict() == before  # the model's own config is left as it was


# ------------------------------------------------------------------ stop tokens
def chat_tokenizer(specials: list[str], template: str, eos: str, bos: str | None = None) -> PreTrainedTokenizerFast:
    """A byte-level tokenizer whose ``specials`` are added tokens marked special (as in hub tokenizer.json files).

    Only eos (and bos) are named special tokens: end-of-turn tokens such as ``<|eot_id|>`` are found
    through the added-token table, as with the hub's Llama-3 and Gemma tokenizers.
    """
    vocab = {tok: i for i, tok in enumerate(specials)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=eos, bos_token=bos)
    tokenizer.chat_template = template
    return tokenizer


LLAMA2_TEMPLATE = (  # as meta-llama/Llama-2-7b-chat-hf ships it, without the system-prompt branch
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + message['content'].strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'].strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)
MISTRAL_TEMPLATE = (  # Mistral-7B-Instruct-v0.3 style: [INST] and [/INST] are control tokens
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + '[/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
)
GEMMA_TEMPLATE = (  # google/gemma-2-2b-it style
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]

# family: (specials, template, eos, bos, expected stop tokens, expected post-instruction text)
CHAT_FAMILIES = {
    "chatml": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], CHATML_TEMPLATE, "<|endoftext|>", None,
               ["<|endoftext|>", "<|im_end|>"], "<|im_end|>\n<|im_start|>assistant\n"),
    "llama3": (LLAMA3_SPECIALS, LLAMA3_TEMPLATE.replace("'<|begin_of_text|>'", "bos_token"), "<|end_of_text|>",
               "<|begin_of_text|>", ["<|end_of_text|>", "<|eot_id|>"],
               "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"),
    "llama2": (["<unk>", "<s>", "</s>"], LLAMA2_TEMPLATE, "</s>", "<s>", ["</s>"], " [/INST]"),
    "mistral": (["<unk>", "<s>", "</s>", "[INST]", "[/INST]"], MISTRAL_TEMPLATE, "</s>", "<s>", ["</s>"], "[/INST]"),
    "gemma": (["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"], GEMMA_TEMPLATE, "<eos>", "<bos>",
              ["<eos>", "<end_of_turn>"], "<end_of_turn>\n<start_of_turn>model\n"),
}


def adapter_for(tokenizer: PreTrainedTokenizerFast) -> ModelAdapter:
    """A tiny Llama for ``tokenizer``; its model config and generation config carry the tokenizer's eos and bos."""
    model = make_model("llama")
    for config in (model.config, model.generation_config):
        config.eos_token_id = tokenizer.eos_token_id
        config.bos_token_id = tokenizer.bos_token_id
        config.pad_token_id = None
    return ModelAdapter(model, tokenizer, name="tiny")


def family_adapter(family: str) -> ModelAdapter:
    """A tiny Llama with the chat family's tokenizer and template."""
    specials, template, eos, bos, _, _ = CHAT_FAMILIES[family]
    return adapter_for(chat_tokenizer(specials, template, eos, bos))


@pytest.mark.parametrize("family", list(CHAT_FAMILIES))
def test_stop_tokens_are_the_special_end_of_sequence_and_end_of_turn_tokens(family):
    adapter = family_adapter(family)
    tok = adapter.tokenizer
    expected, eoi_text = CHAT_FAMILIES[family][4:]
    assert stop_token_ids(adapter) == sorted(tok.convert_tokens_to_ids(expected))
    assert adapter.eoi_token_ids == tok(eoi_text, add_special_tokens=False)["input_ids"]
    assert adapter.format_prompt("hi").endswith(eoi_text)


@pytest.mark.parametrize("family", list(CHAT_FAMILIES))
def test_an_ordinary_token_never_stops_generation(family):
    adapter = family_adapter(family)
    special = set(adapter.tokenizer.all_special_ids) | {
        i for i, t in adapter.tokenizer.added_tokens_decoder.items() if t.special}
    assert set(stop_token_ids(adapter)) <= special
    # the first post-instruction token when it is ordinary (" " of " [/INST]"), else the letter "a"
    first = adapter.eoi_token_ids[0]
    ordinary = first if first not in special else adapter.tokenizer.convert_tokens_to_ids("a")
    with torch.no_grad():  # make the model always predict the ordinary token
        adapter.lm_head.weight.zero_()
        adapter.lm_head.weight[ordinary] = 1.0
        adapter.final_norm.weight.fill_(1.0)
    with intervene(adapter, ActAdd(torch.ones(adapter.d_model) * 50, layer=adapter.n_layers - 1)):
        out = generate_tokens(adapter, ["hi", "why is the sky blue?"], max_new_tokens=5)
    assert out == [[ordinary] * 5] * 2


def test_end_of_turn_falls_back_to_a_special_post_instruction_token():
    """A template that cannot render an assistant turn: its first post-instruction token counts if special."""
    template = ("{% for message in messages %}{% if message['role'] != 'user' %}{{ raise_exception('user only') }}"
                "{% endif %}{{ '<|im_start|>user\n' + message['content'] + '<|im_end|>\n' }}{% endfor %}"
                "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    tokenizer = chat_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>"], template, "<|endoftext|>")
    adapter = adapter_for(tokenizer)
    assert stop_token_ids(adapter) == sorted(tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"]))
