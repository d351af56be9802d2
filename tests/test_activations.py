from __future__ import annotations

import torch

from refusal_directions.activations import cache_activations, default_positions
from tiny import make_adapter


def test_cache_matches_unbatched_hidden_states():
    adapter = make_adapter("llama", n_layers=3)
    prompts = ["hi", "tell me a story about a dragon", "why?", "list three colours"]
    positions = [-3, -2, -1]
    cache, scores = cache_activations(adapter, prompts, positions, batch_size=3)
    assert cache.shape == (4, 3, 3, 64) and cache.dtype == torch.float32
    for i, prompt in enumerate(prompts):  # one prompt at a time: no padding at all
        enc = adapter.encode_instructions([prompt])
        hidden = adapter.model(**enc, output_hidden_states=True).hidden_states  # [0] = embeddings = input of layer 0
        for layer in range(3):
            torch.testing.assert_close(cache[i, :, layer], hidden[layer][0, positions], atol=1e-4, rtol=1e-4)
        probs = torch.softmax(adapter.model(**enc).logits[0, -1], -1)
        p = probs[adapter.refusal_token_ids].sum()
        torch.testing.assert_close(scores[i], torch.log(p + 1e-8) - torch.log(1 - p + 1e-8), atol=1e-4, rtol=1e-4)


def test_default_positions_are_the_eoi_tokens():
    adapter = make_adapter("qwen2")
    assert default_positions(adapter) == list(range(-len(adapter.eoi_token_ids), 0))
