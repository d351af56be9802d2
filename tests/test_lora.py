"""LoRA export (refusal_directions.lora): base + adapter (peft, unmerged and merged) = baked weights = hooks."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from peft import PeftModel

from refusal_directions.directions.base import DirectionSet, Eraser
from refusal_directions.directions.diff_in_means import fit_diff_in_means
from refusal_directions.directions.inlp import fit_inlp
from refusal_directions.directions.leace import fit_leace
from refusal_directions.interventions import Removal, bake, intervene, removal_for, restore
from refusal_directions.lora import (LoraExportError, lora_adapter_for, lora_edits, save_lora_adapter, tied_embeddings,
                                     untie_embeddings)
from refusal_directions.models import ModelAdapter
from tiny import make_config, make_model, make_tokenizer, model_from_config

N_LAYERS, D_MODEL = 2, 32
TOLERANCE = 1e-4  # max |logit difference| relative to the largest logit, float32


@pytest.fixture(scope="module")
def direction_sets() -> dict[str, DirectionSet]:
    """The three methods fitted on synthetic activations [N, 1, L, D]: anisotropic classes, so that
    LEACE's eraser is an oblique projection and INLP finds several directions."""
    g = torch.Generator().manual_seed(0)
    scales = torch.linspace(0.2, 3.0, D_MODEL)
    shift = 1.5 * torch.randn(D_MODEL, generator=g)
    harmless = torch.randn(64, 1, N_LAYERS, D_MODEL, generator=g) * scales
    harmful = torch.randn(64, 1, N_LAYERS, D_MODEL, generator=g) * scales + shift
    return {"diff_in_means": fit_diff_in_means(harmful, harmless, [-1]),
            "inlp": fit_inlp(harmful, harmless, positions=[-1], progress=False),
            "leace": fit_leace(harmful, harmless, [-1])}


def removal(sets: dict[str, DirectionSet], method: str, **kwargs) -> Removal:
    """The method's removal of component (0, 1) at every layer; INLP with k = 3, LEACE non-affine."""
    k = 3 if method == "inlp" else None
    return removal_for(sets[method], 0, 1, range(N_LAYERS), k, affine=method != "leace", **kwargs)


def tiny(arch: str, tied: bool = False):
    """A tiny random model with noisy norms, biases and expert weights (``tiny.make_model(noise=0.1)``),
    optionally with tied input/output embeddings."""
    if not tied:
        return make_model(arch, N_LAYERS, D_MODEL, noise=0.1)
    config = make_config(arch, N_LAYERS, D_MODEL)
    config.tie_word_embeddings = True
    model = model_from_config(config)
    model.tie_weights()
    return model


def adapter_for(arch: str, tied: bool = False) -> ModelAdapter:
    return ModelAdapter(tiny(arch, tied), make_tokenizer(), name=f"tiny-{arch}")


IDS = torch.randint(8, 264, (2, 12), generator=torch.Generator().manual_seed(3))


@torch.no_grad()
def logits(model) -> torch.Tensor:
    return model(input_ids=IDS).logits.float()


def hooks_baked_lora(arch: str, edit: Removal, tmp_path, tied: bool = False) -> dict[str, torch.Tensor]:
    """Logits of the same prompts: base, hooks, baked weights, base + adapter unmerged and merged
    (the adapter loaded by peft from the saved folder onto a fresh copy of the base)."""
    adapter = adapter_for(arch, tied)
    out = {"base": logits(adapter.model)}
    with intervene(adapter, edit):
        out["hooks"] = logits(adapter.model)
    folder = save_lora_adapter(adapter, edit, tmp_path / "lora")
    out["after_export"] = logits(adapter.model)
    originals = bake(adapter, edit)
    out["baked"] = logits(adapter.model)
    restore(adapter, originals)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = PeftModel.from_pretrained(tiny(arch, tied), folder)
        out["unmerged"] = logits(peft_model)
        base = peft_model.base_model.model
        if tied:
            untie_embeddings(base)  # merging into a shared matrix would edit the output head too
        out["merged"] = logits(peft_model.merge_and_unload())
    return out


def assert_all_equal(out: dict[str, torch.Tensor]) -> None:
    scale = out["hooks"].abs().max()
    assert (out["base"] - out["hooks"]).abs().max() > 0.05 * scale  # the removal changes the logits visibly
    assert torch.equal(out["after_export"], out["base"])  # building the adapter leaves the model as it was
    for name in ("baked", "unmerged", "merged"):
        error = float((out[name] - out["hooks"]).abs().max() / scale)
        assert error <= TOLERANCE, f"{name} differs from the hooks by {error:.2g}"


DENSE_CASES = [("llama", m) for m in ("diff_in_means", "inlp", "leace")] + \
              [("qwen2", m) for m in ("diff_in_means", "leace")] + \
              [("gpt_neox", "inlp"), ("gpt_neox", "leace")]  # GPT-NeoX: biases on both write projections
# (qwen2 with INLP: test_tied_embeddings_...; gemma2: test_post_sublayer_norms_are_refused)
MOE_CASES = [("mixtral", "inlp"),  # fused F.linear experts [E, D, I]
             ("qwen2_moe", "leace"),  # fused experts + a gated shared expert (nn.Linear)
             ("llama4_text", "inlp"),  # fused x @ W experts [E, I, D] without is_transposed
             ("gpt_oss", "leace")]  # x @ W experts with expert biases [E, D]; o_proj bias


@pytest.mark.parametrize("arch,method", DENSE_CASES + MOE_CASES)
def test_base_plus_adapter_equals_baked_equals_hooks(arch, method, direction_sets, tmp_path):
    assert_all_equal(hooks_baked_lora(arch, removal(direction_sets, method), tmp_path))


def test_the_test_removals_have_the_intended_structure(direction_sets):
    dim, inlp, leace = (removal(direction_sets, m) for m in ("diff_in_means", "inlp", "leace"))
    assert dim.k == 1 and inlp.k == 3
    assert torch.allclose(inlp.eraser.left, inlp.eraser.right)  # orthogonal projection V Vᵀ
    assert not torch.allclose(leace.eraser.left, leace.eraser.right, atol=1e-3)  # oblique: P ≠ Pᵀ
    assert leace.eraser.bias is None and not leace.affine


def test_tied_embeddings_unmerged_exact_and_merged_after_untying(direction_sets, tmp_path):
    adapter = adapter_for("qwen2", tied=True)
    assert tied_embeddings(adapter.model)
    summary = json.loads((save_lora_adapter(adapter, removal(direction_sets, "inlp"), tmp_path / "t") /
                          "refusal_directions.json").read_text())
    assert summary["tied_embeddings"] is True
    assert_all_equal(hooks_baked_lora("qwen2", removal(direction_sets, "inlp"), tmp_path, tied=True))


def test_consistent_reflection_is_exported_with_its_alpha(direction_sets, tmp_path):
    edit = removal(direction_sets, "inlp", alpha=2.0, mode="consistent")
    assert_all_equal(hooks_baked_lora("llama", edit, tmp_path))


def test_adapter_config_and_state_dict(direction_sets, tmp_path):
    adapter = adapter_for("gpt_neox")
    edit = removal(direction_sets, "inlp")
    config, state = lora_adapter_for(adapter, edit, base_model="someone/tiny-neox")
    assert config.r == config.lora_alpha == 3 and config.lora_dropout == 0.0 and not config.use_rslora
    assert config.bias == "lora_only" and config.base_model_name_or_path == "someone/tiny-neox"
    assert set(config.target_modules) == {"gpt_neox.embed_in"} | {
        f"gpt_neox.layers.{l}.{m}" for l in range(N_LAYERS) for m in ("attention.dense", "mlp.dense_4h_to_h")}
    assert all(v.dtype == torch.float32 and v.device.type == "cpu" for v in state.values())
    assert state["base_model.model.gpt_neox.embed_in.lora_embedding_A"].shape == (3, adapter.model.config.vocab_size)
    assert state["base_model.model.gpt_neox.layers.0.attention.dense.lora_B.weight"].shape == (D_MODEL, 3)
    bias = adapter.model.gpt_neox.layers[0].attention.dense.bias
    U, W = edit.eraser.left, edit.eraser.right
    assert torch.allclose(state["base_model.model.gpt_neox.layers.0.attention.dense.base_layer.bias"],
                          bias - (bias @ W) @ U.T, atol=1e-6)
    assert all(not p.requires_grad for p in adapter.model.parameters())  # peft's trainable flags are undone
    assert all(type(m).__module__.startswith("torch") for m in adapter.model.gpt_neox.layers[0].attention.children())
    _, half = lora_adapter_for(adapter, edit, dtype=torch.bfloat16)
    assert half.keys() == state.keys() and all(v.dtype == torch.bfloat16 for v in half.values())


def test_saved_folder_is_a_peft_adapter(direction_sets, tmp_path):
    adapter = adapter_for("llama")
    folder = save_lora_adapter(adapter, removal(direction_sets, "diff_in_means"), tmp_path / "out",
                               metadata={"method": "diff_in_means"})
    assert {"adapter_config.json", "adapter_model.safetensors", "refusal_directions.json"} <= {p.name for p in folder.iterdir()}
    saved = json.loads((folder / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and saved["r"] == 1 and saved["base_model_name_or_path"] == "tiny-llama"
    meta = json.loads((folder / "refusal_directions.json").read_text())
    assert meta["method"] == "diff_in_means" and meta["format"] == "peft-lora" and meta["replaced_biases"] == []
    (folder / "stale.txt").write_text("x")
    save_lora_adapter(adapter, removal(direction_sets, "diff_in_means"), folder)  # replaced atomically
    assert not (folder / "stale.txt").exists() and not (tmp_path / ".out.partial").exists()


def test_edits_factorise_what_baking_writes(direction_sets):
    adapter = adapter_for("mixtral")
    edit = removal(direction_sets, "leace")
    edits = lora_edits(adapter, edit)
    params = dict(adapter.model.named_parameters())
    before = {e.name: params[e.name].detach().clone() for e in edits}
    bake(adapter, edit)
    for e in edits:
        assert e.kind in ("embedding", "linear", "parameter")
        assert torch.allclose(before[e.name] + e.delta(), params[e.name], atol=1e-5), e.name


def test_post_sublayer_norms_are_refused(direction_sets):
    with pytest.raises(LoraExportError, match="post-sublayer norms"):
        lora_adapter_for(adapter_for("gemma2"), removal(direction_sets, "diff_in_means"))


@pytest.mark.parametrize("case", ["one layer", "affine", "block inputs only", "k = 0"])
def test_non_linear_or_partial_removals_are_refused(case, direction_sets):
    sets = direction_sets
    edits = {
        "one layer": (removal_for(sets["inlp"], 0, 1, [1]), "all layers"),
        "affine": (Removal(Eraser(sets["leace"].left[0, 1, :, :1], sets["leace"].right[0, 1, :, :1],
                                  sets["leace"].bias[0, 1]), list(range(N_LAYERS))), "non-affine"),
        "block inputs only": (removal(sets, "inlp", writes=False), "writes=False"),
        "k = 0": (Removal(Eraser(torch.zeros(D_MODEL, 0), torch.zeros(D_MODEL, 0)), list(range(N_LAYERS))), "k = 0"),
    }
    edit, message = edits[case]
    with pytest.raises(LoraExportError, match=message):
        lora_adapter_for(adapter_for("llama"), edit)
