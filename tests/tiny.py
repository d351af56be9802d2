"""Tiny random models and a byte-level tokenizer with a chat template, built without the network."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3_TEMPLATE = (
    "{{ '<|begin_of_text|>' }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
]


def make_tokenizer(chat_template: str | None = CHATML_TEMPLATE) -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (one token per byte, no merges) with ChatML special tokens."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
    )
    tokenizer.chat_template = chat_template
    return tokenizer


VOCAB = 8 + 256  # special tokens + bytes, rounded up

ARCHITECTURES = ["llama", "qwen2", "gemma2", "gemma3_text", "mistral", "phi3"]


def make_config(arch: str, n_layers: int = 3, d_model: int = 64):
    common = dict(
        vocab_size=VOCAB,
        hidden_size=d_model,
        intermediate_size=2 * d_model,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=3,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    if arch == "llama":
        return transformers.LlamaConfig(**common)
    if arch == "qwen2":
        return transformers.Qwen2Config(**common)
    if arch == "mistral":
        return transformers.MistralConfig(**common, sliding_window=None)
    if arch == "phi3":
        return transformers.Phi3Config(**common)
    if arch == "gemma2":
        return transformers.Gemma2Config(**common, head_dim=16, query_pre_attn_scalar=16, sliding_window=8)
    if arch == "gemma3_text":
        return transformers.Gemma3TextConfig(**common, head_dim=16, query_pre_attn_scalar=16, sliding_window=8)
    raise ValueError(arch)


def make_model(arch: str = "qwen2", n_layers: int = 3, d_model: int = 64, seed: int = 0):
    """A tiny random causal LM in float32 on CPU, in eval mode."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(make_config(arch, n_layers, d_model), dtype=torch.float32)
    # Random init is small; scale up so that hidden states and logits vary visibly between prompts.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 2:
                param.normal_(0, 0.2)
    return model.eval().requires_grad_(False)


def make_adapter(arch: str = "qwen2", n_layers: int = 3, d_model: int = 64, seed: int = 0, **kwargs):
    from refusal_directions.models import ModelAdapter

    return ModelAdapter(make_model(arch, n_layers, d_model, seed), make_tokenizer(), name=f"tiny-{arch}", **kwargs)


def save_tiny_model(folder: Path, arch: str = "qwen2", n_layers: int = 3, d_model: int = 64, seed: int = 0) -> Path:
    """Save a tiny model and tokenizer as a standard HF folder (for tests that load by path)."""
    model = make_model(arch, n_layers, d_model, seed)
    model.save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return folder
