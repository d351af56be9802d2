from __future__ import annotations

import pytest
import torch

from refusal_directions.directions.base import Eraser
from refusal_directions.hooks import Hook, apply_hooks
from refusal_directions.interventions import (
    ActAdd, BakingError, Composite, Removal, applied, bake, check_bakeable, intervene, restore,
)
from tiny import make_adapter, make_tokenizer

PROMPTS = ["hello there", "how do I bake bread", "what?"]


def layer_inputs(adapter, *interventions):
    """Residual stream entering every layer (after any block-input edit), [L, B, S, D]."""
    seen = {}
    capture = [Hook(layer, "input", lambda x, i=i: seen.__setitem__(i, x.clone())) for i, layer in enumerate(adapter.layers)]
    enc = adapter.encode_instructions(PROMPTS)
    with intervene(adapter, *interventions), apply_hooks(capture):
        logits = adapter.model(**enc).logits
    return torch.stack([seen[i] for i in range(adapter.n_layers)]), logits


def unit(d, seed=0):
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(d, generator=g)
    return v / v.norm()


def orthonormal(d, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(d, k, generator=g))[0]


def test_ablation_and_projection_remove_the_component_everywhere():
    adapter = make_adapter("llama", n_layers=4)
    r = unit(64)
    base, _ = layer_inputs(adapter)
    assert (base @ r).abs().max() > 0.1
    ablated, _ = layer_inputs(adapter, Removal(Eraser(r[:, None], r[:, None]), range(4)))
    assert (ablated @ r).abs().max() < 1e-4
    V = orthonormal(64, 3)
    projected, _ = layer_inputs(adapter, Removal(Eraser(V, V), range(4)))
    assert (projected @ V).abs().max() < 1e-4


def test_leace_affine_eraser_keeps_the_readout_at_the_bias():
    adapter = make_adapter("qwen2")
    u, w, b = unit(64, 1), unit(64, 2), torch.randn(64)
    u = u / (u @ w)  # oblique projection: Wᵀ U = 1 so the map is idempotent
    erased, _ = layer_inputs(adapter, Removal(Eraser(u[:, None], w[:, None], b), range(3)))
    assert ((erased - b) @ w).abs().max() < 1e-4


def test_scope_of_one_layer():
    adapter = make_adapter("llama", n_layers=4)
    r = unit(64)
    base, _ = layer_inputs(adapter)
    edited, _ = layer_inputs(adapter, Removal(Eraser(r[:, None], r[:, None]), [2]))
    torch.testing.assert_close(edited[:2], base[:2])
    assert (edited[2] @ r).abs().max() < 1e-4
    assert (edited[3] @ r).abs().max() < 1e-4  # layer 2's writes were erased too


def test_block_input_hooks_only_where_needed():
    e = Eraser(unit(8)[:, None], unit(8)[:, None])
    assert Removal(e, [0, 1, 2, 5, 6]).block_input_layers() == [0, 5]
    assert Removal(e, [0, 1, 2], alpha=2.0, mode="reference").block_input_layers() == [0, 1, 2]
    assert Removal(e, [3, 4, 7], alpha=2.0, mode="consistent").block_input_layers() == [3]


def _writes_without(adapter, r):
    """Make every write orthogonal to r, so the stream's r-component is set by the embedding alone."""
    P = torch.eye(adapter.d_model) - torch.outer(r, r)
    with torch.no_grad():
        for layer in adapter.layers:
            layer.self_attn.o_proj.weight.copy_(P @ layer.self_attn.o_proj.weight)
            layer.mlp.down_proj.weight.copy_(P @ layer.mlp.down_proj.weight)


def test_reflection_reference_mode_alternates_sign_and_consistent_mode_does_not():
    adapter = make_adapter("llama", n_layers=4)
    r = unit(64)
    _writes_without(adapter, r)
    base, _ = layer_inputs(adapter)
    c0 = base[0] @ r
    for l in range(4):  # without intervention the component is the embedding's at every layer
        torch.testing.assert_close(base[l] @ r, c0, atol=1e-4, rtol=1e-4)
    eraser = Eraser(r[:, None], r[:, None])
    ref, _ = layer_inputs(adapter, Removal(eraser, range(4), alpha=2.0, mode="reference"))
    con, _ = layer_inputs(adapter, Removal(eraser, range(4), alpha=2.0, mode="consistent"))
    for l in range(4):
        torch.testing.assert_close(ref[l] @ r, (-1) ** (l + 1) * c0, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(con[l] @ r, -c0, atol=1e-4, rtol=1e-4)


def test_alpha_one_reflection_equals_projection_in_both_modes():
    adapter = make_adapter("qwen2")
    V = orthonormal(64, 2)
    e = Eraser(V, V)
    _, a = layer_inputs(adapter, Removal(e, range(3), alpha=1.0, mode="reference"))
    _, b = layer_inputs(adapter, Removal(e, range(3), alpha=1.0, mode="consistent"))
    torch.testing.assert_close(a, b)


def test_actadd_adds_exactly_at_its_layer():
    adapter = make_adapter("llama", n_layers=4)
    v = 3.0 * unit(64)
    base, _ = layer_inputs(adapter)
    steered, _ = layer_inputs(adapter, ActAdd(v, layer=2))
    torch.testing.assert_close(steered[:2], base[:2])
    torch.testing.assert_close(steered[2] - base[2], v.expand_as(base[2]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "phi3"])
@pytest.mark.parametrize("kind", ["ablation", "projection", "leace", "reflection"])
def test_baked_weights_match_hooks(arch, kind):
    adapter = make_adapter(arch, n_layers=3)
    d = adapter.d_model
    alpha, mode = 1.0, "reference"
    if kind == "ablation":
        r = unit(d)
        eraser = Eraser(r[:, None], r[:, None])
    elif kind == "projection":
        V = orthonormal(d, 4)
        eraser = Eraser(V, V)
    elif kind == "leace":
        u = unit(d, 1)
        w = u + 0.5 * unit(d, 2)  # oblique, well-conditioned, like a real LEACE read-out
        w = w / w.norm()
        eraser = Eraser((u / (u @ w))[:, None], w[:, None], torch.randn(d))
    else:
        V = orthonormal(d, 2)
        eraser, alpha, mode = Eraser(V, V), 2.0, "consistent"
    removal = Removal(eraser, range(3), alpha=alpha, mode=mode)
    enc = adapter.encode_instructions(PROMPTS)
    with intervene(adapter, removal):
        hooked = adapter.model(**enc).logits
    plain = adapter.model(**enc).logits
    with applied(adapter, removal, bake_weights=True) as how:
        assert how == "baked"
        baked = adapter.model(**enc).logits
    assert (baked - hooked).abs().max() <= 1e-4
    torch.testing.assert_close(adapter.model(**enc).logits, plain)  # weights restored


def test_baking_unties_tied_embeddings():
    from refusal_directions.models import ModelAdapter
    from tiny import make_config
    from transformers import AutoModelForCausalLM

    config = make_config("qwen2")
    config.tie_word_embeddings = True
    model = AutoModelForCausalLM.from_config(config).eval()
    adapter = ModelAdapter(model, make_tokenizer(), name="tied")
    assert adapter.lm_head.weight is model.get_input_embeddings().weight
    r = unit(64)
    removal = Removal(Eraser(r[:, None], r[:, None]), range(3))
    enc = adapter.encode_instructions(PROMPTS)
    with intervene(adapter, removal):
        hooked = model(**enc).logits
    originals = bake(adapter, removal)
    assert adapter.lm_head.weight is not model.get_input_embeddings().weight
    assert (model(**enc).logits - hooked).abs().max() <= 1e-4
    restore(adapter, originals)


def test_baking_is_refused_where_not_exact():
    r = unit(64)
    removal = Removal(Eraser(r[:, None], r[:, None]), range(3))
    with pytest.raises(BakingError, match="post-sublayer norms"):
        check_bakeable(make_adapter("gemma2"), removal)
    adapter = make_adapter("llama")
    with pytest.raises(BakingError, match="all layers"):
        check_bakeable(adapter, Removal(removal.eraser, [1]))
    with pytest.raises(BakingError, match="Reference-mode"):
        check_bakeable(adapter, Removal(removal.eraser, range(3), alpha=2.0, mode="reference"))
    with applied(make_adapter("gemma2"), removal, bake_weights=True) as how:
        assert how == "hooks"


@pytest.mark.parametrize("kind", ["projection", "reflection", "actadd", "leace", "none", "composite", "input-only", "weighted"])
def test_slots_equal_hooks(kind):
    from refusal_directions.interventions import InterventionSlots

    adapter = make_adapter("llama", n_layers=4)
    V = orthonormal(64, 3)
    u = unit(64, 1)
    w = u + 0.5 * unit(64, 2)
    w = w / w.norm()
    intervention = {
        "projection": Removal(Eraser(V, V), [0, 1, 3]),
        "reflection": Removal(Eraser(V[:, :1], V[:, :1]), range(4), alpha=2.0, mode="reference"),
        "actadd": ActAdd(2.0 * unit(64, 3), layer=2),
        "leace": Removal(Eraser((u / (u @ w))[:, None], w[:, None], torch.randn(64)), range(4)),
        "none": None,
        "composite": Composite([Removal(Eraser(V[:, :1], V[:, :1]), [1]), Removal(Eraser(V, V), [3])]),
        "input-only": Removal(Eraser(V, V), [1, 2], writes=False),
        "weighted": Removal(Eraser(V, V), [0, 1, 3], layer_alpha={0: 0.5, 1: 1.25, 3: 0.75}),
    }[kind]
    enc = adapter.encode_instructions(PROMPTS)
    with intervene(adapter, intervention):
        expected = adapter.model(**enc).logits
    slots = InterventionSlots(adapter, max_k=4)
    with apply_hooks(slots.hooks()):
        slots.load(Removal(Eraser(V, V), range(4)))  # something else first: load() must reset it
        slots.load(intervention)
        got = adapter.model(**enc).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_slots_are_respected_by_a_compiled_forward():
    """torch.compile ignores hooks added after compilation; slot contents are read at every call."""
    from refusal_directions.interventions import InterventionSlots

    adapter = make_adapter("llama", n_layers=2, d_model=32)
    enc = adapter.encode_instructions(["hello there"])
    slots = InterventionSlots(adapter, max_k=1)
    r = unit(32)
    with apply_hooks(slots.hooks()):
        compiled = torch.compile(adapter.model.forward, backend="eager")
        plain = compiled(**enc).logits
        slots.load(Removal(Eraser(r[:, None], r[:, None]), range(2)))
        edited = compiled(**enc).logits
        slots.load(None)
        again = compiled(**enc).logits
    with intervene(adapter, Removal(Eraser(r[:, None], r[:, None]), range(2))):
        expected = adapter.model(**enc).logits
    torch.testing.assert_close(edited, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(again, plain)
    assert (edited - plain).abs().max() > 1e-3


def test_affine_eraser_with_per_layer_centres():
    """LEACE applied at several layers is centred on each layer's own mean."""
    from refusal_directions.directions.base import DirectionSet
    from refusal_directions.interventions import InterventionSlots, removal_for

    adapter = make_adapter("qwen2", n_layers=3)
    u = unit(64, 1)
    w = u + 0.5 * unit(64, 2)
    w = w / w.norm()
    left, right = (u / (u @ w))[:, None], w[:, None]
    centres = torch.randn(3, 64)
    ds = DirectionSet("leace", [-1], direction=u.expand(1, 3, 64), scale=torch.ones(1, 3),
                      left=left.expand(1, 3, 64, 1).clone(), right=right.expand(1, 3, 64, 1).clone(),
                      bias=centres[None], k=torch.ones(1, 3, dtype=torch.int64))
    removal = removal_for(ds, 0, 1, range(3))
    assert removal.block_input_layers() == [0, 1, 2]
    inputs, logits = layer_inputs(adapter, removal)
    for l in range(3):
        assert ((inputs[l] - centres[l]) @ w).abs().max() < 1e-4
    with pytest.raises(BakingError, match="per-layer centres"):
        check_bakeable(adapter, removal)
    slots = InterventionSlots(adapter, max_k=1)
    enc = adapter.encode_instructions(PROMPTS)
    with apply_hooks(slots.hooks()):
        slots.load(removal)
        torch.testing.assert_close(adapter.model(**enc).logits, logits, atol=1e-4, rtol=1e-4)
    linear = removal_for(ds, 0, 1, range(3), affine=False)
    assert linear.centres is None and linear.block_input_layers() == [0]


def test_input_only_removal_and_composites():
    """writes=False hooks each block input in scope and no write; a composite applies each part."""
    adapter = make_adapter("llama", n_layers=4)
    V = orthonormal(64, 2)
    only_input = Removal(Eraser(V, V), [1, 2], writes=False)
    hooks = only_input.hooks(adapter)
    assert len(hooks) == 2 and all(h.kind == "input" for h in hooks)
    inputs, _ = layer_inputs(adapter, only_input)
    assert (inputs[1] @ V).abs().max() < 1e-4 and (inputs[2] @ V).abs().max() < 1e-4
    assert (inputs[3] @ V).abs().max() > 1e-3  # layer 2's writes put the concept back
    parts = [Removal(Eraser(V[:, :1], V[:, :1]), [1]), Removal(Eraser(V[:, 1:], V[:, 1:]), [3])]
    both = Composite(parts)
    assert both.k == 1 and len(both.hooks(adapter)) == sum(len(p.hooks(adapter)) for p in parts)
    inputs, _ = layer_inputs(adapter, both)
    assert (inputs[1] @ V[:, :1]).abs().max() < 1e-4 and (inputs[3] @ V[:, 1:]).abs().max() < 1e-4
