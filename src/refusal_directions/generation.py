"""Batched greedy generation (left padding), under whatever intervention the caller installed.

Pure greedy decoding
    Every ``generate`` call (here and in the generative judges) starts from a fresh
    ``GenerationConfig`` (``greedy_generation_config``): argmax decoding of ``max_new_tokens``
    tokens, stopping at the given EOS ids. Nothing of the model's own ``generation_config``
    (hub checkpoints ship ``repetition_penalty``, ``temperature``, ``top_k``, ``top_p``,
    ``min_length``, ``bad_words_ids``, forced tokens, beams ...) may change the tokens. In
    transformers 5 a passed config is *merged* with the model's one: every field left ``None``
    is filled from ``model.generation_config`` (``GenerationMixin._prepare_generation_config``).
    So the fields with a neutral value are set to it explicitly (``GREEDY_NEUTRAL``), and for
    the fields whose only neutral value is ``None`` (``bad_words_ids``, ``suppress_tokens``,
    ``forced_eos_token_id``, ``sequence_bias``, ``stop_strings``, ``max_time`` ...)
    ``greedy_generate`` hides the model's config during the call (an empty one stands in).

Stop tokens
    Only special tokens stop generation (``stop_token_ids``): the EOS ids of the model's
    generation config, its config and the tokenizer, plus the chat template's end-of-turn
    token when that is a special token of the tokenizer (``end_of_turn_token_id``: the first
    special token the template writes after an assistant message, e.g. ChatML ``<|im_end|>``,
    Llama-3 ``<|eot_id|>``, Gemma ``<end_of_turn>``; Llama-2 and Mistral templates end an
    assistant turn with EOS itself, and Mistral's ``[/INST]`` control token, which ends the
    *user's* turn, is not a stop token). An ordinary token (the space or ``[`` of Llama-2's
    `` [/INST]``) never stops generation.
"""

from __future__ import annotations

import logging
import weakref
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

import torch
from tqdm.auto import tqdm

from . import shared_prefix as sp
from .models import ModelAdapter

if TYPE_CHECKING:
    from transformers import GenerationConfig

log = logging.getLogger(__name__)

#: Values of ``GenerationConfig`` fields under which they leave greedy decoding untouched (those of
#: ``GenerationConfig._get_default_generation_params`` where it has them), set explicitly so that a
#: model's own generation_config cannot fill them in.
GREEDY_NEUTRAL: dict[str, Any] = {
    "do_sample": False,
    "num_beams": 1,
    "num_beam_groups": 1,
    "num_return_sequences": 1,
    "diversity_penalty": 0.0,
    "early_stopping": False,
    "length_penalty": 1.0,
    "temperature": 1.0,
    "top_k": 50,
    "top_p": 1.0,
    "typical_p": 1.0,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
    "repetition_penalty": 1.0,
    "encoder_repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0,
    "min_new_tokens": 0,  # transformers then sets min_length to the prompt length: neutral too
    "guidance_scale": 1.0,
    "renormalize_logits": False,
    "remove_invalid_values": False,
    "token_healing": False,
    "use_cache": True,
    "output_attentions": False,
    "output_hidden_states": False,
    "output_scores": False,
    "output_logits": False,
    "return_dict_in_generate": False,
}


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def _as_id_list(value: Any) -> list[int]:
    """An ``eos_token_id``-style value (None, an int, a list or a tensor of ints) as a list of ints."""
    if value is None:
        return []
    if isinstance(value, torch.Tensor):
        return [int(v) for v in value.flatten().tolist()]
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    return [int(value)]


def eos_token_ids(model: torch.nn.Module, tokenizer: Any) -> list[int]:
    """EOS ids of the model's generation config, of its config and of the tokenizer, sorted, without repeats."""
    ids: list[int] = []
    for source in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        ids.extend(_as_id_list(getattr(source, "eos_token_id", None)))
    ids.extend(_as_id_list(tokenizer.eos_token_id))
    return sorted(set(ids))


def special_token_ids(tokenizer: Any) -> set[int]:
    """Ids of the tokenizer's special tokens: the named ones (eos, bos, pad, ...) and every added token marked special.

    Hub tokenizers often mark end-of-turn tokens (``<|eot_id|>``, ``<end_of_turn>``) as special
    only in their added-token table, not as named special tokens.
    """
    ids = {int(i) for i in tokenizer.all_special_ids}
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    ids.update(int(i) for i, token in added.items() if getattr(token, "special", False))
    return ids


_PROBE_USER, _PROBE_REPLY, _PROBE_NEXT = "Please say hello", "Hello there, my friend", "What time is it?"


def _text_after_assistant_turn(tokenizer: Any) -> str | None:
    """What the chat template writes between an assistant message and the next user message.

    Renders ``[user, assistant, user]`` (else ``[user, assistant]``, then the text runs to the end).
    None when the template cannot render an assistant turn.
    """
    conversations = (
        [("user", _PROBE_USER), ("assistant", _PROBE_REPLY), ("user", _PROBE_NEXT)],
        [("user", _PROBE_USER), ("assistant", _PROBE_REPLY)],
    )
    for conversation in conversations:
        messages = [{"role": role, "content": content} for role, content in conversation]
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False)
        except Exception:  # templates may refuse a conversation (jinja raise_exception)
            continue
        if not isinstance(text, str) or (start := text.find(_PROBE_REPLY, text.find(_PROBE_USER) + 1)) < 0:
            continue
        tail = text[start + len(_PROBE_REPLY) :]
        end = tail.find(_PROBE_NEXT) if len(conversation) == 3 else -1
        return tail[:end] if end >= 0 else tail
    return None


def end_of_turn_token_id(tokenizer: Any, post_instruction_ids: Sequence[int] = ()) -> int | None:
    """The special token the chat template writes right after an assistant message, or None.

    The first special token (``special_token_ids``) of ``_text_after_assistant_turn``; None when
    the template writes none there. For a template that cannot render an assistant turn, the first
    of ``post_instruction_ids`` (what follows a user message), provided it is a special token.
    """
    special = special_token_ids(tokenizer)
    tail = _text_after_assistant_turn(tokenizer)
    if tail is None:
        first = post_instruction_ids[0] if len(post_instruction_ids) else None
        return first if first in special else None
    return next((t for t in tokenizer(tail, add_special_tokens=False)["input_ids"] if t in special), None)


def stop_token_ids(adapter: ModelAdapter) -> list[int]:
    """The tokens that end a completion: EOS ids (``eos_token_ids``) and the template's special end-of-turn token
    (``end_of_turn_token_id``). Ordinary tokens never stop generation."""
    ids = eos_token_ids(adapter.model, adapter.tokenizer)
    end_of_turn = end_of_turn_token_id(adapter.tokenizer, adapter.eoi_token_ids)
    if end_of_turn is not None:
        ids.append(end_of_turn)
    return sorted(set(ids))


def greedy_generation_config(
    max_new_tokens: int,
    eos_token_id: Sequence[int] | int | None,
    pad_token_id: int | None,
    cache_implementation: str | None = None,
) -> GenerationConfig:
    """A fresh config for pure greedy decoding: ``GREEDY_NEUTRAL`` plus the length, stop, pad ids and cache."""
    from transformers import GenerationConfig

    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        eos_token_id=list(eos_token_id) if isinstance(eos_token_id, (list, tuple)) else eos_token_id,
        pad_token_id=pad_token_id,
        cache_implementation=cache_implementation,
        **GREEDY_NEUTRAL,
    )


@contextmanager
def _model_generation_config_hidden(model: torch.nn.Module) -> Iterator[None]:
    """Replace ``model.generation_config`` by an empty config for the duration of the block.

    transformers fills every ``None`` field of a passed config from the model's own one; with
    an empty stand-in only transformers' global defaults (``do_sample=False``, ...) fill them.
    """
    if not hasattr(model, "generation_config"):
        yield
        return
    from transformers import GenerationConfig

    own = model.generation_config
    model.generation_config = GenerationConfig()
    try:
        yield
    finally:
        model.generation_config = own


def greedy_generate(model: torch.nn.Module, inputs: Mapping[str, torch.Tensor], config: GenerationConfig) -> torch.Tensor:
    """``model.generate(**inputs, generation_config=config)`` with nothing of the model's own generation config.

    Returns the token ids (prompt + new tokens), as ``generate`` does with ``return_dict_in_generate=False``.
    """
    with _model_generation_config_hidden(model):
        return model.generate(**inputs, generation_config=config)


def generate(
    adapter: ModelAdapter,
    instructions: Sequence[str],
    max_new_tokens: int = 512,
    batch_size: int = 32,
    desc: str = "generate",
    cache_implementation: str | None = None,
    shared_prefix: bool = False,
) -> list[str]:
    """Greedy completions (decoded, stripped) of chat-formatted ``instructions``, in input order."""
    ids = generate_tokens(adapter, instructions, max_new_tokens, batch_size, desc, cache_implementation, shared_prefix)
    return [adapter.tokenizer.decode(t, skip_special_tokens=True).strip() for t in ids]


@torch.inference_mode()
def generate_tokens(
    adapter: ModelAdapter,
    instructions: Sequence[str],
    max_new_tokens: int = 512,
    batch_size: int = 32,
    desc: str = "generate",
    cache_implementation: str | None = None,
    shared_prefix: bool = False,
) -> list[list[int]]:
    """Greedy new-token ids of chat-formatted ``instructions``, in input order, cut after the stop token.

    Prompts are sorted by length so each batch has little padding. On out-of-memory the batch
    size is halved (with a warning) and the batch retried. ``cache_implementation="static"``
    preallocates the KV cache, which lets transformers compile the decoding step on GPU.
    ``shared_prefix`` (dynamic cache only): each batch's common prompt prefix is prefilled once
    (batch 1) under the active hooks or weights and shared (``shared_prefix`` module; checked
    once per model against the full prompts).
    """
    if cache_implementation == "static":
        from torch import _dynamo

        # A compiled decoding step must not silently ignore hooks changed after compilation:
        # guard on them (recompiling) instead. Pipelines use persistent slot hooks, which never change.
        _dynamo.config.skip_nnmodule_hook_guards = False
    prompts = adapter.format_prompts(instructions)
    lengths = [len(adapter.tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -lengths[i])
    responses: list[list[int]] = [[] for _ in prompts]
    eos = stop_token_ids(adapter)
    config = greedy_generation_config(max_new_tokens, eos, adapter.tokenizer.pad_token_id, cache_implementation)
    stop = set(eos)
    start = 0
    with tqdm(total=len(prompts), desc=desc, unit="prompt", leave=False) as bar:
        while start < len(order):
            idx = order[start : start + batch_size]
            enc = adapter.encode([prompts[i] for i in idx])
            if shared_prefix and cache_implementation != "static":
                enc = _with_shared_prefix(adapter, [prompts[i] for i in idx], enc, max_new_tokens)
            try:
                out = greedy_generate(adapter.model, enc, config)
            except (torch.cuda.OutOfMemoryError, RuntimeError) as exc:
                if not _is_oom(exc) or batch_size == 1:
                    raise
                batch_size = max(1, batch_size // 2)
                log.warning("Out of memory while generating; retrying with batch size %d.", batch_size)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                continue
            for i, row in zip(idx, out[:, enc["input_ids"].shape[1] :].tolist()):
                ends = [j for j, t in enumerate(row) if t in stop]
                responses[i] = row[: ends[0] + 1] if ends else row
            start += len(idx)
            bar.update(len(idx))
    return responses


_PREFIX_CHECKED: "weakref.WeakKeyDictionary[torch.nn.Module, bool]" = weakref.WeakKeyDictionary()  # check outcome per model


def _with_shared_prefix(adapter: ModelAdapter, prompts: Sequence[str], enc: dict, max_new_tokens: int) -> dict:
    """``enc`` rewritten as prefix + left-padded suffixes with the prefix's KV cache, or ``enc`` unchanged
    (prefix too short, sliding windows shorter than prompt + new tokens, or the one-time check failed)."""
    model = adapter.model
    if not _PREFIX_CHECKED.get(model, True):
        return enc
    sequences = [adapter.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    split = sp.shareable_split(sequences, model, adapter.pad_id, adapter.input_device, extra_tokens=max_new_tokens)
    if split is None:
        return enc
    if model not in _PREFIX_CHECKED:
        _PREFIX_CHECKED[model] = _prefix_check(adapter, split, enc)
        if not _PREFIX_CHECKED[model]:
            return enc
    cache = sp.prefix_cache(model, split.prefix, split.batch_size)
    ids = torch.cat([split.prefix.expand(split.batch_size, -1), split.input_ids], dim=1)
    return {"input_ids": ids, "attention_mask": split.attention_mask, sp.cache_keyword(model): cache}


@torch.inference_mode()
def _prefix_check(adapter: ModelAdapter, split: "sp.SplitBatch", enc: dict) -> bool:
    """Whether the first generated token's distribution with the shared prefix equals the full prompts'."""
    model = adapter.model
    try:
        cache = sp.prefix_cache(model, split.prefix, split.batch_size)
        shared = model(**split.suffix_inputs(), use_cache=True, logits_to_keep=1, **{sp.cache_keyword(model): cache})
        full = model(**enc, use_cache=False, logits_to_keep=1)
        sp.check_close(shared.logits[:, -1], full.logits[:, -1], adapter.dtype, "generation prefill")
    except (sp.SharedPrefixError, *sp.CHECK_ERRORS) as exc:
        log.warning("Shared prompt prefix not used in generation (%s: %s); prefilling full prompts.", type(exc).__name__, exc)
        return False
    return True
