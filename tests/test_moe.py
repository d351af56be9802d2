"""Mixture-of-experts models in every stage (issue 16 item 1): the MoE block is the MLP write, baking
edits every expert (fused 3-D or per-expert weights, shared experts, biases) exactly or refuses, and
scoring reads the decoder stack even where ``get_decoder()`` does not return it (Llama-4)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from refusal_directions import interventions
from refusal_directions.activations import cache_activations
from refusal_directions.directions.base import Eraser
from refusal_directions.evaluation.prefix_scorer import check_head, iter_final_hidden, sequence_logprobs
from refusal_directions.generation import generate_tokens
from refusal_directions.interventions import BakingError, Removal, applied, bake, check_bakeable, intervene, restore
from refusal_directions.models import ModelAdapter
from tiny import MOE_ARCHITECTURES, make_adapter, make_model, make_tokenizer

PROMPTS = ["hello there", "how do I bake bread", "what?"]
MLP_NAMES = {"llama4_text": "feed_forward"}


def tiny(arch: str) -> ModelAdapter:
    return make_adapter(arch, n_layers=2, d_model=32, noise=0.3)


def orthonormal(d: int, k: int, seed: int = 0) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(d, k, generator=torch.Generator().manual_seed(seed)))[0]


def removal_of(kind: str, d: int, n_layers: int) -> Removal:
    if kind == "projection":
        V = orthonormal(d, 3)
        return Removal(Eraser(V, V), range(n_layers))
    if kind == "reflection":
        V = orthonormal(d, 2)
        return Removal(Eraser(V, V), range(n_layers), alpha=2.0, mode="consistent")
    u, w = orthonormal(d, 2, seed=1).T  # non-affine LEACE: an oblique rank-1 eraser
    w = (u + 0.5 * w) / (u + 0.5 * w).norm()
    return Removal(Eraser((u / (u @ w))[:, None], w[:, None]), range(n_layers), affine=False)


def assert_baked_equals_hooks(adapter: ModelAdapter, removal: Removal) -> None:
    enc = adapter.encode_instructions(PROMPTS)
    plain = adapter.model(**enc).logits
    with intervene(adapter, removal):
        hooked = adapter.model(**enc).logits
    assert (hooked - plain).abs().max() > 1e-2  # the removal does something
    with applied(adapter, removal, bake_weights=True) as how:
        assert how == "baked"
        baked = adapter.model(**enc).logits
    assert (baked - hooked).abs().max() <= 1e-4
    torch.testing.assert_close(adapter.model(**enc).logits, plain)  # weights restored


@pytest.mark.parametrize("arch", MOE_ARCHITECTURES)
def test_the_moe_block_is_the_mlp_write(arch):
    adapter = tiny(arch)
    for layer, points in zip(adapter.layers, adapter.hook_points):
        mlp = MLP_NAMES.get(arch, "mlp")
        assert points.names[1] == mlp and points.writes[1] is getattr(layer, mlp) and points.checked
        assert hasattr(points.writes[1], "experts") and not points.post_sublayer_norms


@pytest.mark.parametrize("arch", MOE_ARCHITECTURES)
@pytest.mark.parametrize("kind", ["projection", "reflection", "leace-linear"])
def test_baked_experts_match_hooks(arch, kind):
    adapter = tiny(arch)
    assert_baked_equals_hooks(adapter, removal_of(kind, adapter.d_model, adapter.n_layers))


def test_every_expert_and_shared_expert_projection_is_edited():
    adapter = tiny("qwen2_moe")
    removal = removal_of("projection", 32, 2)
    names = set(bake(adapter, removal))
    restore(adapter, {})
    for i in range(2):
        prefix = f"model.layers.{i}."
        assert {prefix + "self_attn.o_proj.weight", prefix + "mlp.experts.down_proj",
                prefix + "mlp.shared_expert.down_proj.weight"} <= names
        assert prefix + "mlp.experts.gate_up_proj" not in names and prefix + "mlp.shared_expert_gate.weight" not in names
    gpt_oss = tiny("gpt_oss")
    names = set(bake(gpt_oss, removal))
    assert {"model.layers.0.mlp.experts.down_proj", "model.layers.0.mlp.experts.down_proj_bias",
            "model.layers.0.self_attn.o_proj.bias"} <= names


class _Expert(nn.Module):
    """One expert as transformers 4.x Mixtral stored it: w1 (gate), w3 (up), w2 (down)."""

    def __init__(self, d: int, inner: int):
        super().__init__()
        self.w1, self.w3 = nn.Linear(d, inner, bias=False), nn.Linear(d, inner, bias=False)
        self.w2 = nn.Linear(inner, d, bias=True)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class PerExpertMoe(nn.Module):
    """A sparse MoE block with a ModuleList of experts (top-2 routing)."""

    def __init__(self, d: int, inner: int, n_experts: int = 4):
        super().__init__()
        self.gate = nn.Linear(d, n_experts, bias=False)
        self.experts = nn.ModuleList(_Expert(d, inner) for _ in range(n_experts))

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])
        logits = self.gate(flat)
        weights, chosen = torch.topk(torch.softmax(logits, dim=-1), 2, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            rows, slot = torch.where(chosen == e)
            if len(rows):
                out.index_add_(0, rows, weights[rows, slot, None] * expert(flat[rows]))
        return out.reshape(x.shape)


def test_per_expert_modules_are_baked_exactly():
    torch.manual_seed(0)
    model = make_model("mixtral", n_layers=2, d_model=32, noise=0.3)
    for layer in model.model.layers:
        layer.mlp = PerExpertMoe(32, 48)
        with torch.no_grad():
            for p in layer.mlp.parameters():
                p.normal_(0, 0.2)
    adapter = ModelAdapter(model.eval(), make_tokenizer(), name="per-expert")
    assert adapter.hook_points[0].names == ("self_attn", "mlp")
    assert_baked_equals_hooks(adapter, removal_of("projection", 32, 2))


@pytest.mark.parametrize("arch, dropped", [("mixtral", "experts"), ("qwen2_moe", "shared_expert"), ("gpt_oss", "bias")])
def test_a_skipped_projection_is_caught_before_baking(monkeypatch, arch, dropped):
    """If the projection finder missed a part of a write (routed experts, a shared expert, a bias),
    the numerical verification refuses instead of baking silently wrong weights."""
    real = interventions._write_projections

    def incomplete(write, d_model):
        projections = real(write, d_model)
        if dropped == "experts":
            return [p for p in projections if p.weight.dim() != 3]
        if dropped == "shared_expert":
            return [p for p in projections if p.weight.dim() == 3]
        return [interventions._Projection(p.weight, None, p.transposed) for p in projections]

    monkeypatch.setattr(interventions, "_write_projections", incomplete)
    adapter = tiny(arch)
    removal = removal_of("projection", 32, 2)
    with pytest.raises(BakingError, match="baked output differs from the hooked edit"):
        check_bakeable(adapter, removal)
    with applied(adapter, removal, bake_weights=True) as how:
        assert how == "hooks"


def test_unbakeable_expert_layouts_are_refused():
    adapter = tiny("mixtral")
    experts = adapter.layers[0].mlp.experts
    experts.has_post_expert_norm = True
    with pytest.raises(BakingError, match="normalises each expert's output"):
        check_bakeable(adapter, removal_of("projection", 32, 2))
    square = nn.Module()
    square.down_proj = nn.Parameter(torch.zeros(4, 32, 32))
    with pytest.raises(BakingError, match="cannot tell which side"):
        interventions._expert_projections(square, 32)
    square.is_transposed = True
    assert interventions._expert_projections(square, 32)[0].transposed


def test_an_embedding_multiplier_refuses_affine_baking_only():
    """Granite multiplies the embeddings before layer 0: linear edits commute with it, affine ones do not."""
    adapter = make_adapter("granite", n_layers=2, d_model=32, noise=0.3)
    assert_baked_equals_hooks(adapter, removal_of("projection", 32, 2))
    V = orthonormal(32, 1)
    with pytest.raises(BakingError, match="scales its embeddings by 2"):
        check_bakeable(adapter, Removal(Eraser(V, V, torch.randn(32)), range(2)))


# ------------------------------------------------------------------ the other stages
@pytest.mark.parametrize("arch", MOE_ARCHITECTURES)
def test_scoring_reads_the_decoder_stack(arch):
    """The reported bug: Llama-4's ``get_decoder()`` is the causal LM itself, whose output has no
    ``last_hidden_state``; scoring now runs ``ModelAdapter.decoder``, the module holding the layers."""
    adapter = tiny(arch)
    check_head(adapter)
    ids = adapter.tokenizer("The quick brown fox jumps over the lazy dog", add_special_tokens=False)["input_ids"]
    seqs, positions = [ids, ids[:20]], [[3, 10, len(ids) - 1], [19]]
    logits = adapter.model(input_ids=torch.tensor([ids])).logits[0]
    hidden = dict(item for batch, rows in iter_final_hidden(adapter, seqs, positions, batch_size=2) for item in zip(batch, rows))
    torch.testing.assert_close(adapter.logits_from_final(hidden[0]), logits[positions[0]].float(), atol=1e-4, rtol=1e-4)
    prefix = ids[:18]
    shared = sequence_logprobs(adapter, [prefix + ids[18:25], prefix + ids[30:34]], [18, 18], groups=["g", "g"])  # 18 >= min_prefix 16
    plain = sequence_logprobs(adapter, [prefix + ids[18:25], prefix + ids[30:34]], [18, 18], share_prefix=False)
    assert shared.logprob_sums == pytest.approx(plain.logprob_sums, abs=1e-4)


@pytest.mark.parametrize("arch", MOE_ARCHITECTURES)
def test_activations_and_generation_with_baked_or_hooked_removal(arch):
    adapter = tiny(arch)
    cache, scores = cache_activations(adapter, PROMPTS, [-2, -1], batch_size=2)
    assert cache.shape == (3, 2, 2, 32) and torch.isfinite(cache).all() and torch.isfinite(scores).all()
    removal = removal_of("projection", 32, 2)
    with intervene(adapter, removal):
        hooked = generate_tokens(adapter, PROMPTS, max_new_tokens=4, batch_size=3)
    with applied(adapter, removal, bake_weights=True) as how:
        baked = generate_tokens(adapter, PROMPTS, max_new_tokens=4, batch_size=3)
    assert how == "baked" and baked == hooked
