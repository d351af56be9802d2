"""Write points checked on the real model (issue 16 items 0 and 2): every architecture the tests build,
GLM-4's differently named post-sublayer norms, clear refusals, and multimodal checkpoints' text stacks."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from refusal_directions.directions.base import Eraser
from refusal_directions.hooks import Hook, apply_hooks
from refusal_directions.interventions import BakingError, Removal, check_bakeable, intervene
from refusal_directions.models import LayerHookPoints, ModelAdapter, ModelLoadError, check_write_points, load_model
from tiny import (
    ARCHITECTURES, DENSE_ARCHITECTURES, MOE_ARCHITECTURES, MULTIMODAL_ARCHITECTURES, POST_NORM_ARCHITECTURES,
    make_adapter, make_model, make_tokenizer, save_tiny_model,
)

ALL = ARCHITECTURES + DENSE_ARCHITECTURES + MOE_ARCHITECTURES + MULTIMODAL_ARCHITECTURES
PROMPTS = ["hello there", "how do I bake bread"]


def tiny(arch: str, **kwargs) -> ModelAdapter:
    """2 layers, d_model 32, norm weights and biases perturbed (as trained: at init they hide mistakes)."""
    return make_adapter(arch, n_layers=2, d_model=32, noise=0.3, **kwargs)


def unit(d: int, seed: int = 0) -> torch.Tensor:
    v = torch.randn(d, generator=torch.Generator().manual_seed(seed))
    return v / v.norm()


def trace(adapter: ModelAdapter, points: list[LayerHookPoints], *interventions):
    """Per layer: block input, block output and the outputs of ``points``' writes (as added)."""
    seen: dict = {}

    def keep(key):
        def fn(x):
            seen[key] = x.detach().clone()
        return fn

    hooks = []
    for i, (layer, p) in enumerate(zip(adapter.layers, points)):
        hooks += [Hook(layer, "input", keep((i, "in"))), Hook(layer, "output", keep((i, "out")))]
        hooks += [Hook(w, "output", keep((i, j))) for j, w in enumerate(p.writes)]
    with intervene(adapter, *interventions), apply_hooks(hooks):
        adapter.model(**adapter.encode_instructions(PROMPTS))
    return seen


def leak(x: torch.Tensor, r: torch.Tensor) -> float:
    """Largest |x . r| / |x| over tokens."""
    x = x.float()
    return ((x @ r).abs() / x.norm(dim=-1)).max().item()


@pytest.mark.parametrize("arch", ALL)
def test_write_points_add_up_and_ablation_leaves_nothing(arch):
    adapter = tiny(arch)
    points = adapter.hook_points
    assert all(p.checked for p in points)
    assert all(p.post_sublayer_norms == (arch in POST_NORM_ARCHITECTURES) for p in points)
    multiplier = getattr(adapter.model.config.get_text_config(), "residual_multiplier", 1.0)  # Granite
    seen = trace(adapter, points)
    for i, p in enumerate(points):
        increment = seen[(i, "out")] - seen[(i, "in")]
        writes = sum(seen[(i, j)].reshape(increment.shape) for j in range(len(p.writes)))
        torch.testing.assert_close(increment, multiplier * writes, atol=1e-5, rtol=1e-4)
    r = unit(adapter.d_model)
    seen = trace(adapter, points, Removal(Eraser(r[:, None], r[:, None]), range(adapter.n_layers)))
    for i in range(adapter.n_layers):  # the capture hooks run after the intervention's: they see the edited stream
        assert leak(seen[(i, "in")], r) < 1e-5, f"layer {i} input"
        assert leak(seen[(i, "out")], r) < 1e-5, f"layer {i} output"


def test_glm4_writes_are_its_post_sublayer_norms_whatever_their_names(caplog):
    with caplog.at_level(logging.WARNING):
        adapter = tiny("glm4")
    for layer, p in zip(adapter.layers, adapter.hook_points):
        assert p.names == ("post_self_attn_layernorm", "post_mlp_layernorm")
        assert p.writes == (layer.post_self_attn_layernorm, layer.post_mlp_layernorm) and p.post_sublayer_norms
    assert "found from the layers' computation" in caplog.text
    # What the name-based guess hooked before: the sublayer outputs before those norms leave a lot behind.
    guessed = [LayerHookPoints(l, (l.self_attn, l.mlp), False, ("self_attn", "mlp")) for l in adapter.layers]
    r = unit(adapter.d_model)
    adapter.hook_points = guessed
    seen = trace(adapter, guessed, Removal(Eraser(r[:, None], r[:, None]), range(2)))
    assert leak(seen[(1, "out")], r) > 1e-2
    adapter.hook_points = check_write_points(adapter)
    with pytest.raises(BakingError, match="post-sublayer norms"):
        check_bakeable(adapter, Removal(Eraser(r[:, None], r[:, None]), range(2)))


def test_unverified_write_points_are_not_baked():
    adapter = tiny("llama")
    r = unit(adapter.d_model)
    adapter.hook_points = [LayerHookPoints(p.block, p.writes, False, p.names) for p in adapter.hook_points]
    with pytest.raises(BakingError, match="not verified"):
        check_bakeable(adapter, Removal(Eraser(r[:, None], r[:, None]), range(2)))


def test_a_layer_whose_increment_no_sublayer_explains_is_refused():
    model = make_model("llama", n_layers=2, d_model=32)
    model.model.layers[1].register_forward_hook(lambda m, a, out: out * 1.5)  # rescales the whole stream
    with pytest.raises(ModelLoadError, match="LlamaDecoderLayer: no set of its sublayers' outputs adds up"):
        ModelAdapter(model, make_tokenizer(), name="rescaled")


def test_a_stream_edited_between_layers_fails_the_ablation_check():
    model = make_model("llama", n_layers=2, d_model=32)
    shift = 3 * torch.randn(32)

    def add_shift(module, args, kwargs):  # a constant added to the stream between the layers
        if args:
            return (args[0] + shift, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": kwargs["hidden_states"] + shift}

    model.model.layers[1].register_forward_pre_hook(add_shift, with_kwargs=True)
    with pytest.raises(ModelLoadError, match=r"LlamaDecoderLayer: ablating a direction .* leaves"):
        ModelAdapter(model, make_tokenizer(), name="shifted")


def test_unknown_module_names_are_found_from_the_computation():
    model = make_model("llama", n_layers=2, d_model=32)
    for layer in model.model.layers:  # rename the sublayers: the name-based guess finds nothing
        layer.add_module("mixer", layer.self_attn)
        layer.add_module("ffn_block", layer.mlp)
        del layer._modules["self_attn"], layer._modules["mlp"]
        forward = type(layer).forward

        def patched(self, *args, _forward=forward, **kwargs):
            self.__dict__["self_attn"], self.__dict__["mlp"] = self.mixer, self.ffn_block
            try:
                return _forward(self, *args, **kwargs)
            finally:
                del self.__dict__["self_attn"], self.__dict__["mlp"]

        layer.forward = patched.__get__(layer)
    adapter = ModelAdapter(model, make_tokenizer(), name="renamed")
    assert all(p.names == ("mixer", "ffn_block") and not p.post_sublayer_norms for p in adapter.hook_points)


@pytest.mark.parametrize("arch, dtype", [("glm4", torch.bfloat16), ("llama", torch.bfloat16), ("olmo2", torch.float16)])
def test_the_check_passes_in_half_precision(arch, dtype):
    model = make_model(arch, n_layers=2, d_model=32, noise=0.3).to(dtype)
    adapter = ModelAdapter(model, make_tokenizer(), name=arch)
    assert adapter.hook_points[0].names == tiny(arch).hook_points[0].names


# ------------------------------------------------------------------ multimodal checkpoints (item 2)
@pytest.mark.parametrize("arch, class_name, text_model", [
    ("gemma3", "Gemma3ForConditionalGeneration", "Gemma3TextModel"),
    ("llama4", "Llama4ForCausalLM", "Llama4TextModel"),
    ("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLTextModel"),
])
def test_multimodal_checkpoints_use_their_text_stack(tmp_path, arch, class_name, text_model):
    folder = save_tiny_model(tmp_path / arch, arch, n_layers=2, d_model=32, noise=0.3)
    adapter = load_model(str(folder), device="cpu")
    text_config = adapter.model.config.get_text_config()
    assert type(adapter.model).__name__ == class_name and type(adapter.decoder).__name__ == text_model
    assert adapter.n_layers == text_config.num_hidden_layers == 2 and adapter.d_model == text_config.hidden_size
    assert adapter.decoder.layers is adapter.layers and all(p.checked for p in adapter.hook_points)
    assert adapter.has_sliding_window == (arch != "qwen2_5_vl")  # from the text config: Gemma-3 sliding, Llama-4 chunked
    enc = adapter.encode_instructions(PROMPTS)
    final = {}
    with apply_hooks([Hook(adapter.layers[-1], "output", lambda h: final.__setitem__("h", h))]):
        logits = adapter.model(**enc).logits
    torch.testing.assert_close(adapter.logits_from_hidden(final["h"]), logits.float(), atol=1e-4, rtol=1e-4)
    assert adapter.describe()["write_point_names"] == list(adapter.hook_points[0].names)


def test_a_multimodal_model_that_cannot_run_on_text_alone_is_a_clear_error():
    model = make_model("gemma3", n_layers=2, d_model=32)

    def needs_images(*args, **kwargs):
        raise ValueError("pixel_values are required")

    model.model.forward = needs_images
    with pytest.raises(ModelLoadError, match="Gemma3ForConditionalGeneration: a text-only forward .* pixel_values"):
        ModelAdapter(model, make_tokenizer(), name="needs-images")


def test_a_model_type_without_a_text_decoder_is_named(tmp_path):
    import transformers

    folder = tmp_path / "clip"
    transformers.CLIPModel(transformers.CLIPConfig(
        text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8))).save_pretrained(folder)
    with pytest.raises(ModelLoadError, match="'clip' model, which has no causal-LM head"):
        load_model(str(folder), device="cpu")


@pytest.mark.parametrize("with_guess", [True, False])
def test_a_small_write_is_not_dropped_in_low_precision(with_guess):
    """In bfloat16 a small attention write hides in the rounding of a large stream, so the MLP alone
    also 'passes' (seen on the embedded Qwen2.5 in bfloat16): the full set, which fits far better, wins."""
    from refusal_directions.models import _choose_writes, _LayerTrace

    layer = nn.Module()
    layer.self_attn, layer.mlp, layer.input_layernorm = nn.Linear(4, 4), nn.Linear(4, 4), nn.LayerNorm(4)
    g = torch.Generator().manual_seed(0)
    x = 300 * torch.randn(1, 6, 32, generator=g, dtype=torch.float64)
    attn, mlp = 0.05 * torch.randn(x.shape, generator=g, dtype=torch.float64), torch.randn(x.shape, generator=g, dtype=torch.float64)
    trace = _LayerTrace(x, x + attn + mlp, {"self_attn": attn, "mlp": mlp, "input_layernorm": x / x.norm(dim=-1, keepdim=True)})
    guess = LayerHookPoints(layer, (layer.self_attn, layer.mlp), False, ("self_attn", "mlp")) if with_guess else None
    assert _choose_writes(layer, trace, guess, torch.bfloat16).names == ("self_attn", "mlp")
