from __future__ import annotations

import pytest
import torch
import transformers

from refusal_directions.hooks import Hook, apply_hooks
from refusal_directions.models import ModelAdapter, ModelLoadError, load_model
from tiny import ARCHITECTURES, LLAMA3_TEMPLATE, make_adapter, make_model, make_tokenizer, save_tiny_model

GEMMA_LIKE = {"gemma2", "gemma3_text"}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_derived_items(arch):
    adapter = make_adapter(arch, n_layers=3, d_model=64)
    tok = adapter.tokenizer
    assert adapter.n_layers == 3 and adapter.d_model == 64
    assert adapter.layers is adapter.model.model.layers
    assert adapter.eoi_token_ids == tok("<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False).input_ids
    assert adapter.refusal_token_ids == [tok.convert_tokens_to_ids("I"), tok.convert_tokens_to_ids("A")]
    for layer, points in zip(adapter.layers, adapter.hook_points):
        assert points.block is layer
        if arch in GEMMA_LIKE:
            assert points.writes == (layer.post_attention_layernorm, layer.post_feedforward_layernorm)
            assert points.post_sublayer_norms
        else:
            assert points.writes == (layer.self_attn, layer.mlp)
            assert not points.post_sublayer_norms
    prompt = adapter.format_prompt("hello")
    assert prompt == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_write_point_hooks_reach_next_layer(arch):
    adapter = make_adapter(arch)
    enc = adapter.encode_instructions(["hello there", "how are you"])
    seen = {}

    def capture(x):
        seen["x"] = x.clone()

    shift = torch.randn(adapter.d_model)
    with apply_hooks([Hook(adapter.layers[1], "input", capture)]):
        adapter.model(**enc)
    base = seen["x"]
    for i, write in enumerate(adapter.hook_points[0].writes):
        with apply_hooks([Hook(write, "output", lambda y: y + shift), Hook(adapter.layers[1], "input", capture)]):
            adapter.model(**enc)
        diff = seen["x"] - base
        assert diff.abs().max() > 1e-3, f"write {i} did not change the next layer's input"
        if i == len(adapter.hook_points[0].writes) - 1:
            # The last write of a layer is added straight to the stream the next layer reads.
            torch.testing.assert_close(diff, shift.expand_as(diff), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_block_input_hook_and_logits_from_hidden(arch):
    adapter = make_adapter(arch)
    enc = adapter.encode_instructions(["what is the capital of France"])
    final = {}
    with apply_hooks([Hook(adapter.layers[-1], "output", lambda h: final.__setitem__("h", h.clone()))]):
        logits = adapter.model(**enc).logits
    torch.testing.assert_close(adapter.logits_from_hidden(final["h"]), logits, atol=1e-4, rtol=1e-4)
    with apply_hooks([Hook(adapter.layers[0], "input", lambda x: x * 0.5)]):
        changed = adapter.model(**enc).logits
    assert (changed - logits).abs().max() > 1e-3


def test_eoi_from_llama3_template():
    tok = make_tokenizer(LLAMA3_TEMPLATE)
    adapter = ModelAdapter(make_model("llama"), tok, name="tiny-llama3")
    expected = tok("<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n", add_special_tokens=False).input_ids
    assert adapter.eoi_token_ids == expected
    assert adapter.tokenizer.convert_ids_to_tokens(expected[:2]) == ["<|eot_id|>", "<|start_header_id|>"]


def test_left_padding_and_encode():
    adapter = make_adapter("qwen2")
    enc = adapter.encode_instructions(["a", "a much longer instruction"])
    assert enc["attention_mask"][0, 0] == 0 and enc["attention_mask"][0, -1] == 1
    eoi = torch.tensor(adapter.eoi_token_ids)
    assert torch.equal(enc["input_ids"][:, -len(eoi):], eoi.expand(2, -1))


def test_missing_chat_template_is_a_clear_error():
    with pytest.raises(ModelLoadError, match="--chat-template"):
        ModelAdapter(make_model("qwen2"), make_tokenizer(chat_template=None), name="x")


def test_non_causal_model_is_refused():
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    bert = transformers.BertModel(config)
    with pytest.raises(ModelLoadError, match="not a decoder-only"):
        ModelAdapter(bert, make_tokenizer(), name="bert")


def test_load_model_from_folder_and_fingerprint(tmp_path):
    folder = save_tiny_model(tmp_path / "tiny", arch="llama")
    a = load_model(str(folder), device="cpu")
    b = load_model(str(folder), device="cpu")
    assert a.n_layers == 3 and a.alias == "tiny"
    assert a.fingerprint == b.fingerprint
    other = save_tiny_model(tmp_path / "other", arch="llama", seed=1)
    assert load_model(str(other), device="cpu").fingerprint != a.fingerprint


def test_load_model_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="No model at"):
        load_model(str(tmp_path / "nope"), device="cpu")
    t5_dir = tmp_path / "t5"
    transformers.T5ForConditionalGeneration(
        transformers.T5Config(vocab_size=100, d_model=32, d_ff=64, num_layers=1, num_heads=2, d_kv=16)
    ).save_pretrained(t5_dir)
    with pytest.raises(ModelLoadError, match="no causal-LM head"):
        load_model(str(t5_dir), device="cpu")


def test_chat_template_flag(tmp_path):
    folder = tmp_path / "m"
    make_model("qwen2").save_pretrained(folder)
    make_tokenizer(chat_template=None).save_pretrained(folder)
    with pytest.raises(ModelLoadError, match="chat template"):
        load_model(str(folder), device="cpu")
    template = tmp_path / "template.jinja"
    template.write_text(LLAMA3_TEMPLATE)
    adapter = load_model(str(folder), device="cpu", chat_template=template)
    assert adapter.format_prompt("x").startswith("<|begin_of_text|>")


@pytest.mark.parametrize(
    "arch, settings, expected",
    [
        ("llama", {}, False),
        ("qwen2", {"sliding_window": 32768, "use_sliding_window": False}, False),  # as Qwen2.5 checkpoints ship
        ("qwen2", {"sliding_window": 32768, "use_sliding_window": True, "max_window_layers": 0}, True),
        ("mistral", {"sliding_window": 4096}, True),
        ("gemma2", {}, True),
        ("gemma3_text", {}, True),
    ],
)
def test_has_sliding_window(arch, settings, expected):
    adapter = make_adapter(arch, n_layers=2)
    for key, value in settings.items():
        setattr(adapter.model.config, key, value)
    if arch == "qwen2" and settings.get("use_sliding_window"):
        adapter.model.config.layer_types = ["sliding_attention"] * 2  # what Qwen2Config derives for these settings
    assert adapter.has_sliding_window is expected
