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
# More dense families (GLM-4, OLMo-2 and Exaone-4 normalise sublayer outputs, under other names than Gemma's).
DENSE_ARCHITECTURES = ["glm4", "olmo2", "exaone4", "granite", "cohere", "gpt_neox", "stablelm", "qwen3", "smollm3"]
# Mixture-of-experts families: fused 3-D expert weights (Mixtral, Qwen-MoE, Llama-4, gpt-oss with biases),
# shared experts (Qwen2-MoE with a gated one, Llama-4).
MOE_ARCHITECTURES = ["mixtral", "qwen3_moe", "qwen2_moe", "llama4_text", "gpt_oss"]
# Multimodal checkpoints whose text stack the adapter uses (built with a tiny vision tower).
MULTIMODAL_ARCHITECTURES = ["gemma3", "llama4", "qwen2_5_vl"]
# Families whose layers normalise each sublayer's output before adding it to the residual stream.
POST_NORM_ARCHITECTURES = {"gemma2", "gemma3_text", "gemma3", "glm4", "olmo2", "exaone4"}


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
    return _more_configs(arch, common)


def _more_configs(arch: str, common: dict):
    """The configs of DENSE_, MOE_ and MULTIMODAL_ARCHITECTURES (see make_config)."""
    d_model, head_dim = common["hidden_size"], common["hidden_size"] // common["num_attention_heads"]
    dense = {
        "glm4": transformers.Glm4Config, "olmo2": transformers.Olmo2Config, "exaone4": transformers.Exaone4Config,
        "granite": transformers.GraniteConfig, "cohere": transformers.CohereConfig, "stablelm": transformers.StableLmConfig,
        "qwen3": transformers.Qwen3Config, "smollm3": transformers.SmolLM3Config, "gpt_neox": transformers.GPTNeoXConfig,
    }
    if arch == "granite":
        return transformers.GraniteConfig(**common, residual_multiplier=0.4, embedding_multiplier=2.0, logits_scaling=2.0)
    if arch in dense:
        return dense[arch](**common)
    experts = dict(num_experts_per_tok=2)
    if arch == "mixtral":
        return transformers.MixtralConfig(**common, num_local_experts=4, **experts, sliding_window=None)
    if arch == "qwen3_moe":
        return transformers.Qwen3MoeConfig(**common, num_experts=4, moe_intermediate_size=d_model, **experts)
    if arch == "qwen2_moe":
        return transformers.Qwen2MoeConfig(**common, num_experts=4, moe_intermediate_size=d_model,
                                           shared_expert_intermediate_size=d_model + 8, **experts)
    if arch == "llama4_text":
        return transformers.Llama4TextConfig(**common, num_local_experts=4, num_experts_per_tok=1, head_dim=head_dim,
                                             intermediate_size_mlp=2 * d_model)
    if arch == "gpt_oss":
        return transformers.GptOssConfig(**common, num_local_experts=4, **experts, head_dim=head_dim, sliding_window=64)
    text = {k: v for k, v in common.items() if k != "tie_word_embeddings"}
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8)
    if arch == "gemma3":
        return transformers.Gemma3Config(
            text_config=dict(text, head_dim=head_dim, query_pre_attn_scalar=head_dim, sliding_window=64),
            vision_config=vision, mm_tokens_per_image=4, image_token_index=7, tie_word_embeddings=False)
    if arch == "llama4":
        return transformers.Llama4Config(
            text_config=dict(text, num_local_experts=4, num_experts_per_tok=1, head_dim=head_dim, intermediate_size_mlp=2 * d_model),
            vision_config=dict(vision, vision_output_dim=32, projector_input_dim=32, projector_output_dim=32),
            tie_word_embeddings=False)
    if arch == "qwen2_5_vl":
        rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [head_dim // 8, head_dim // 8, head_dim // 4]}
        return transformers.Qwen2_5_VLConfig(
            text_config=dict(text, rope_parameters=rope),
            vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=d_model,
                               patch_size=4, window_size=8, fullatt_block_indexes=[0]),
            tie_word_embeddings=False)
    raise ValueError(arch)


def _auto_class(config):
    """AutoModelForCausalLM, or the image-text-to-text class for multimodal models without a causal-LM one."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return AutoModelForCausalLM
    return transformers.AutoModelForImageTextToText


def make_model(arch: str = "qwen2", n_layers: int = 3, d_model: int = 64, seed: int = 0, noise: float = 0.0):
    """A tiny random causal LM of ``make_config(arch, n_layers, d_model)`` (``model_from_config``)."""
    return model_from_config(make_config(arch, n_layers, d_model), seed, noise)


def model_from_config(config, seed: int = 0, noise: float = 0.0):
    """A random causal LM of ``config`` in float32 on CPU, in eval mode.

    ``noise`` > 0 (new architectures' tests): fused 3-D expert weights get random values too, and
    every 1-D weight and bias (norm weights, biases) ``1 + noise * N(0, 1)`` resp. ``noise * N(0, 1)``,
    as in a trained model (at init, norm weights are all ones and biases zero, which hides mistakes).
    """
    torch.manual_seed(seed)
    model = _auto_class(config).from_config(config, dtype=torch.float32)
    # Random init is small; scale up so that hidden states and logits vary visibly between prompts.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 2:
                param.normal_(0, 0.2)
        if noise > 0:
            for name, param in model.named_parameters():
                if param.dim() == 3:
                    param.normal_(0, 0.2)
                elif param.dim() == 1 and name.endswith("weight"):
                    param.copy_(1 + noise * torch.randn_like(param))
                elif param.dim() in (1, 2) and "bias" in name:
                    param.normal_(0, noise)
    return model.eval().requires_grad_(False)


def make_adapter(arch: str = "qwen2", n_layers: int = 3, d_model: int = 64, seed: int = 0, noise: float = 0.0, **kwargs):
    from refusal_directions.models import ModelAdapter

    model = make_model(arch, n_layers, d_model, seed, noise)
    return ModelAdapter(model, make_tokenizer(), name=f"tiny-{arch}", **kwargs)


def save_tiny_model(folder: Path, arch: str = "qwen2", n_layers: int = 3, d_model: int = 64, seed: int = 0,
                    noise: float = 0.0) -> Path:
    """Save a tiny model and tokenizer as a standard HF folder (for tests that load by path)."""
    model = make_model(arch, n_layers, d_model, seed, noise)
    model.save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return folder
