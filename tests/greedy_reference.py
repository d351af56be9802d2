"""Plain argmax decoding written by hand, and the generation settings a checkpoint may ship.

Used by the greedy-decoding tests of generation and of the generative judges: a tiny model whose saved
``generation_config`` sets one of ``LEAKY_SETTINGS`` must still decode exactly like ``argmax_decode``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import torch
from transformers import AutoModelForCausalLM, GenerationConfig


@torch.inference_mode()
def argmax_decode(model, prompt_ids: list[int], max_new_tokens: int, stop_ids: Iterable[int]) -> list[int]:
    """Greedy decoding without ``generate``: full forward, argmax of the last logits, append.

    Stops after the first token in ``stop_ids`` (which is kept) or after ``max_new_tokens`` tokens.
    """
    stops = set(stop_ids)
    device = model.get_input_embeddings().weight.device
    new: list[int] = []
    while len(new) < max_new_tokens:
        logits = model(torch.tensor([prompt_ids + new], device=device)).logits[0, -1]
        token = int(torch.argmax(logits))
        new.append(token)
        if token in stops:
            break
    return new


def make_eos_prone(model, trigger_id: int, eos_id: int) -> None:
    """Swap the LM-head rows of ``trigger_id`` and ``eos_id``: EOS becomes the argmax wherever ``trigger_id`` was.

    Random tiny models almost never predict EOS; this makes argmax decoding stop early, so that
    settings which hold EOS back (min_length, min_new_tokens, ...) visibly change the tokens.
    """
    head = model.get_output_embeddings().weight
    with torch.no_grad():
        head[[trigger_id, eos_id]] = head[[eos_id, trigger_id]].clone()


def leaky_settings(tokens: list[int]) -> dict[str, dict]:
    """Generation-config settings that change greedy tokens when they leak into ``generate``, by name.

    ``tokens`` are ids that plain argmax decoding emits (the first two of a reference completion):
    settings that ban or force tokens use them, so that they bite.
    """
    first, second = tokens[0], tokens[1]
    single = {
        "repetition_penalty": {"repetition_penalty": 5.0},
        "no_repeat_ngram_size": {"no_repeat_ngram_size": 1},
        "sampling_temperature": {"do_sample": True, "temperature": 5.0},
        "sampling_top_k": {"do_sample": True, "top_k": 3, "temperature": 3.0},
        "sampling_top_p": {"do_sample": True, "top_p": 0.9, "temperature": 3.0},
        "min_length": {"min_length": 4096},
        "min_new_tokens": {"min_new_tokens": 64},
        "num_beams": {"num_beams": 3},
        "bad_words_ids": {"bad_words_ids": [[first]]},
        "suppress_tokens": {"suppress_tokens": [first]},
        "begin_suppress_tokens": {"begin_suppress_tokens": [first]},
        "sequence_bias": {"sequence_bias": [[[first], -100.0]]},
        "forced_eos_token_id": {"forced_eos_token_id": second},
        "exponential_decay_length_penalty": {"exponential_decay_length_penalty": (0, 50.0)},
        "guidance_scale": {"guidance_scale": 3.0},
        "return_dict_in_generate": {"return_dict_in_generate": True, "output_scores": True},
        "stop_strings": {"stop_strings": ["a"]},
        # what hub chat checkpoints ship (Qwen2.5-Instruct, Llama-3-Instruct)
        "qwen2.5_instruct": {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05},
        "llama3_instruct": {"do_sample": True, "temperature": 0.6, "top_p": 0.9},
    }
    everything: dict = {}
    for name, settings in single.items():
        if name not in {"return_dict_in_generate", "stop_strings", "guidance_scale"}:
            everything.update(settings)
    return {**single, "everything": everything}


LEAKY_NAMES = list(leaky_settings([0, 1]))


def save_with_generation_config(model, folder: Path, settings: dict) -> None:
    """Save ``model`` with a generation_config holding its special ids plus ``settings``."""
    config = model.config
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id, **settings
    )
    model.save_pretrained(folder)


def reload(folder: Path):
    """The model saved in ``folder``, loaded back as a hub checkpoint would be (float32, eval mode)."""
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval().requires_grad_(False)
