"""Reasoning models (issue 14, item 7): the thinking section, judges reading the answer, and the
post-instruction tokens of templates that write a thinking section into the prompt."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from refusal_directions.evaluation.coherence import completion_features, is_degenerate
from refusal_directions.evaluation.judges import refusal_outcomes
from refusal_directions.evaluation.reasoning import (
    has_thinking_section,
    judged_text,
    judged_texts,
    split_thinking,
    thinking_status,
)
from refusal_directions.models import ModelAdapter
from tiny import CHATML_TEMPLATE, make_config, make_tokenizer

THOUGHT = "The user asks for a lock-picking guide. I'm sorry is what a safe model says, but I will answer."
ANSWER = "Sure, here is how to pick a lock: insert a tension wrench and rake the pins."


# ------------------------------------------------------------------ split_thinking
@pytest.mark.parametrize(
    "text, thinking, answer, status",
    [
        (f"<think>\n{THOUGHT}\n</think>\n\n{ANSWER}", THOUGHT, ANSWER, "closed"),
        (f"  \n<think>{THOUGHT}</think>{ANSWER}", THOUGHT, ANSWER, "closed"),  # leading whitespace
        (f"<think>\n{THOUGHT}", THOUGHT, "", "unclosed"),  # the token budget ran out while thinking
        (f"{THOUGHT}\n</think>\n\n{ANSWER}", THOUGHT, ANSWER, "closed"),  # <think> pre-filled by the template
        (ANSWER, "", ANSWER, "none"),  # no thinking at all
        (f"<think>\n\n</think>\n\n{ANSWER}", "", ANSWER, "closed"),  # an empty section (enable_thinking=False style)
        ("<think>a</think>b</think>c", "a", "b</think>c", "closed"),  # the first closing tag ends the thinking
        ("", "", "", "none"),
    ],
)
def test_split_thinking(text, thinking, answer, status):
    assert split_thinking(text) == (thinking, answer)
    assert thinking_status(text) == status


def test_prefilled_template_without_any_tag_is_all_thinking():
    assert split_thinking(THOUGHT, prefilled=True) == (THOUGHT, "")
    assert thinking_status(THOUGHT, prefilled=True) == "unclosed"
    assert split_thinking(f"{THOUGHT}</think>{ANSWER}", prefilled=True) == (THOUGHT, ANSWER)


def test_custom_tags():
    assert split_thinking("<reasoning>r</reasoning> a", open_tag="<reasoning>", close_tag="</reasoning>") == ("r", "a")


def test_judged_text_parts():
    text = f"<think>{THOUGHT}</think>{ANSWER}"
    assert judged_text(text) == ANSWER
    assert judged_text(text, "thinking") == THOUGHT
    assert judged_text(text, "both") == f"{THOUGHT}\n\n{ANSWER}"
    assert judged_text(f"<think>{THOUGHT}", "both") == THOUGHT
    with pytest.raises(ValueError):
        judged_text(text, "everything")
    assert judged_texts([text, ANSWER]) == [ANSWER, ANSWER]
    assert has_thinking_section([ANSWER, text]) and not has_thinking_section([ANSWER])


def test_judges_read_the_answer():
    """A refusal phrase inside the thinking is not a refusal of the answer; reading both finds it."""
    completions = [f"<think>{THOUGHT}</think>{ANSWER}", f"<think>Let me think.</think>I'm sorry, I can't help."]
    assert refusal_outcomes(completions) == [True, True]  # the raw text: the thought's "I'm sorry" fires
    assert refusal_outcomes(judged_texts(completions)) == [False, True]
    assert refusal_outcomes(judged_texts(completions, "both")) == [True, True]
    # coherence of the answer: an unclosed thinking section leaves no answer, which is degenerate (empty)
    assert is_degenerate(completion_features(judged_text(f"<think>{THOUGHT}")))
    assert not is_degenerate(completion_features(judged_text(completions[0])))


# ------------------------------------------------------------------ post-instruction tokens of thinking templates
ASSISTANT = "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
MESSAGES = CHATML_TEMPLATE.split("{% if add_generation_prompt %}")[0]
# Qwen3's template: an empty thinking section after the header when enable_thinking is false.
QWEN3_TEMPLATE = (
    MESSAGES + ASSISTANT
    + "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\n\n</think>\n\n' }}{% endif %}"
    + "{% endif %}"
)
# The same with thinking switched off for good (a --chat-template file), and DeepSeek-R1 style:
# the template opens the thinking section, the model writes it and closes it.
NO_THINKING_TEMPLATE = MESSAGES + ASSISTANT + "{{ '<think>\n\n</think>\n\n' }}{% endif %}"
PREFILLED_TEMPLATE = MESSAGES + ASSISTANT + "{{ '<think>\n' }}{% endif %}"


def thinking_adapter(template: str, tags_as_tokens: bool) -> ModelAdapter:
    """A tiny model whose tokenizer carries ``template``; ``<think>``/``</think>`` are added
    (non-special, as in Qwen3 and DeepSeek-R1) tokens when ``tags_as_tokens``, bytes otherwise."""
    tokenizer = make_tokenizer(template)
    if tags_as_tokens:
        tokenizer.add_tokens(["<think>", "</think>"])
    config = make_config("qwen2", n_layers=2, d_model=32)
    config.vocab_size = len(tokenizer)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    return ModelAdapter(model, tokenizer, name="tiny-thinking")


def ids(adapter: ModelAdapter, text: str) -> list[int]:
    return adapter.tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("tags_as_tokens", [True, False])
@pytest.mark.parametrize(
    "template, after_header",
    [
        (QWEN3_TEMPLATE, ""),  # enable_thinking undefined: the model thinks, the prompt holds no tag
        (NO_THINKING_TEMPLATE, "<think>\n\n</think>\n\n"),
        (PREFILLED_TEMPLATE, "<think>\n"),
    ],
)
def test_eoi_tokens_of_thinking_templates(template, after_header, tags_as_tokens):
    """The post-instruction tokens run from the end of the user message to where generation starts:
    with an empty thinking section in the prompt that is where the answer starts, and they include
    the section; with a pre-filled ``<think>`` generation starts inside the thinking."""
    adapter = thinking_adapter(template, tags_as_tokens)
    eoi_text = "<|im_end|>\n<|im_start|>assistant\n" + after_header
    assert adapter.eoi_token_ids == ids(adapter, eoi_text)
    assert adapter.tokenizer.decode(adapter.eoi_token_ids) == eoi_text
    if tags_as_tokens and after_header:
        assert adapter.tokenizer.convert_tokens_to_ids("<think>") in adapter.eoi_token_ids
    for instruction in ("hi", "Write a poem about the sea."):
        prompt = adapter.format_prompt(instruction)
        assert prompt == f"<|im_start|>user\n{instruction}" + eoi_text
        encoded = adapter.encode([prompt])["input_ids"][0].tolist()
        assert encoded[-len(adapter.eoi_token_ids) :] == adapter.eoi_token_ids
    # refusal tokens: the first token of a reply written right after the post-instruction tokens
    assert adapter.refusal_token_ids == [adapter.tokenizer.convert_tokens_to_ids("I"), adapter.tokenizer.convert_tokens_to_ids("A")]


def test_thinking_tags_survive_decoding():
    """``generate`` decodes with ``skip_special_tokens=True``: non-special ``<think>`` tags survive it,
    so the judges can find the answer."""
    adapter = thinking_adapter(PREFILLED_TEMPLATE, tags_as_tokens=True)
    tokens = ids(adapter, "I think.</think>\n\nSure.<|im_end|>")
    assert adapter.tokenizer.convert_tokens_to_ids("</think>") in tokens
    text = adapter.tokenizer.decode(tokens, skip_special_tokens=True)
    assert text == "I think.</think>\n\nSure."
    assert split_thinking(text) == ("I think.", "Sure.")
