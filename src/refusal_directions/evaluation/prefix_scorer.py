"""The prefix-sharing token scorer: log-probabilities of chosen tokens of many sequences, batched.

Owns everything between token ids and per-token log-probabilities: batching, prefix sharing,
packing, the KV-cache plumbing and the LM head at selected positions. ``loss`` (cross-entropy),
``benchmarks`` (MMLU, ARC) and ``coherence`` (completion cross-entropy) build on it; it knows
nothing of corpora, prompts or benchmarks.

Token sequences are right-padded into batches, run through the model's decoder stack
(``ModelAdapter.decoder``, so hooks on decoder layers apply), and the LM head is applied only to
the final hidden states at the positions being scored, in chunks of at most ``max_rows`` rows.
With Qwen's 151,936-token vocabulary, full float32 logits for a batch of long prompts would take
gigabytes; this keeps one ``[max_rows, vocab]`` block alive.

Sequences that share a long token prefix (MMLU questions of one subject share the 5-shot
prefix; the choices of one ARC question share the question) can be grouped: the prefix is run
once with a KV cache and only the suffixes are batched (``share_prefix``); where the model
allows it, several suffixes of one prefix share a row, each attending to the cached prefix and
causally to itself only (a 4-D attention mask and explicit positions). That is exact for hooks
that act on each token independently (all interventions of this project), and it is what makes
5-shot MMLU cheap on a CPU.

Non-finite logits: a scored position whose logits hold NaN or inf is counted in
``n_nonfinite``; its logits are then made finite (``nan_to_num`` with NaN -> 0, +-inf -> +-1e4,
then clamped to [-1e4, 1e4]) before ``log_softmax``, so one broken position cannot turn the
mean into NaN, and the count says whether that happened.
"""

from __future__ import annotations

import copy
import functools
import logging
import weakref
from dataclasses import dataclass
from typing import Hashable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..models import ModelAdapter
from ..shared_prefix import cache_keyword, common_prefix_length
from .attention import scoring_forward

log = logging.getLogger(__name__)

LOGIT_LIMIT = 1e4  # non-finite logits are replaced and everything clamped to [-LOGIT_LIMIT, LOGIT_LIMIT]
PACK_TOKENS = 1024  # suffixes of one unit packed into a row, up to this many tokens
MAX_PADDING = 0.15  # a batch's padding may reach this fraction of its real tokens
DEFAULT_MAX_ROWS = 512  # LM-head rows computed at once: 512 x 151,936 float32 = 311 MB


# ------------------------------------------------------------------ model plumbing
def _decoder(adapter: ModelAdapter) -> nn.Module:
    """The decoder stack (``ModelAdapter.decoder``: the module holding the layers; its output has
    ``last_hidden_state``). Not ``get_decoder()``: Llama-4's causal LM returns itself there."""
    return adapter.decoder


def _output_cache(output):
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


def project_to_logits(adapter: ModelAdapter, hidden: Tensor) -> Tensor:
    """Float32 logits ``[..., vocab]`` from *final* hidden states (the decoder output, after the
    final norm): ``ModelAdapter.logits_from_final`` (LM head, logit scaling, soft-capping)."""
    return adapter.logits_from_final(hidden)


_HEAD_CHECKED: "weakref.WeakKeyDictionary[nn.Module, bool]" = weakref.WeakKeyDictionary()


@torch.inference_mode()
def check_head(adapter: ModelAdapter) -> None:
    """Once per model: the decoder + ``project_to_logits`` path must reproduce ``model(...).logits``.

    Raises ``RuntimeError`` for architectures whose causal-LM forward does something else to the
    logits (then selected-position scoring would be wrong).
    """
    if _HEAD_CHECKED.get(adapter.model):
        return
    ids = adapter.tokenizer("The quick brown fox", add_special_tokens=False)["input_ids"][:8] or [0]
    input_ids = torch.tensor([ids], device=adapter.input_device)
    reference = adapter.model(input_ids=input_ids, use_cache=False).logits[0, -1].float()
    hidden = _decoder(adapter)(input_ids=input_ids, use_cache=False).last_hidden_state[0, -1]
    ours = project_to_logits(adapter, hidden).to(reference.device)
    tolerance = (1e-3 if adapter.dtype == torch.float32 else 2e-2) * max(1.0, reference.abs().max().item())
    if not torch.allclose(ours, reference, atol=tolerance, rtol=0):
        raise RuntimeError(
            f"{type(adapter.model).__name__}: logits from the decoder output and the LM head differ from the "
            f"model's own logits (max diff {(ours - reference).abs().max().item():.3g}); this architecture "
            "transforms its logits in a way refusal-directions does not know."
        )
    _HEAD_CHECKED[adapter.model] = True


@dataclass
class _Unit:
    """A set of sequences scored together: ``prefix_len`` tokens shared and run once (0 = none)."""

    members: list[int]
    prefix_len: int


def _plan(
    sequences: Sequence[Sequence[int]],
    positions: Sequence[Sequence[int]],
    groups: Sequence[Hashable] | None,
    share_prefix: bool,
    min_prefix: int,
) -> list[_Unit]:
    loose: list[int] = []
    units: list[_Unit] = []
    if groups is None or not share_prefix:
        return [_Unit(list(range(len(sequences))), 0)]
    by_group: dict[Hashable, list[int]] = {}
    for i, g in enumerate(groups):
        by_group.setdefault(g, []).append(i)
    for members in by_group.values():
        prefix = common_prefix_length([sequences[i] for i in members])
        # every scored position must lie after the cached prefix, and every suffix be non-empty
        for i in members:
            prefix = min(prefix, len(sequences[i]) - 1, _span(positions[i])[0])
        if len(members) < 2 or prefix < min_prefix:
            loose.extend(members)
        else:
            units.append(_Unit(members, prefix))
    if loose:
        units.append(_Unit(sorted(loose), 0))
    return units


def _batches(lengths: Sequence[int], batch_size: int, max_padding: float = MAX_PADDING,
             max_tokens: int | None = None, context: int = 0) -> list[list[int]]:
    """Indices into ``lengths`` grouped into batches for one padded forward each.

    Longest first; a batch holds at most ``batch_size`` items, and an item that would make the
    batch's padding exceed ``max_padding`` times its real tokens starts a new batch (MMLU's 5-shot
    prefixes range from ~200 to ~2,500 tokens, its questions from ~30 to ~1,000). With
    ``max_tokens``, a batch also closes before ``items x (longest + context)`` would exceed it
    (``context``: cached tokens every row attends to, which its KV cache copy holds).
    """
    batches: list[list[int]] = []
    real = 0
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        batch = batches[-1] if batches else []
        longest = lengths[batch[0]] if batch else 0
        padded = (len(batch) + 1) * longest
        fits = max_tokens is None or (len(batch) + 1) * (longest + context) <= max_tokens
        if batch and len(batch) < batch_size and fits and padded <= (1 + max_padding) * (real + lengths[i]):
            batch.append(i)
            real += lengths[i]
        else:
            batches.append([i])
            real = lengths[i]
    return batches


def iter_final_hidden(
    adapter: ModelAdapter,
    sequences: Sequence[Sequence[int]],
    positions: Sequence[Sequence[int]],
    *,
    groups: Sequence[Hashable] | None = None,
    batch_size: int = 8,
    share_prefix: bool = True,
    min_prefix: int = 16,
    max_padding: float = MAX_PADDING,
    max_tokens: int | None = None,
    desc: str = "scoring",
) -> Iterator[tuple[list[int], list[Tensor]]]:
    """Final hidden states (decoder output) of each sequence at the requested positions.

    Args:
        sequences: token id lists (already including any BOS).
        positions: for each sequence, the 0-based positions whose hidden states are wanted
            (the position *predicting* token ``p + 1``).
        groups: optional group key per sequence; members of a group that share a token prefix
            of at least ``min_prefix`` tokens have it computed once (KV cache), see module doc.
        batch_size: rows per forward (at most); a row holds one sequence, a group's prefix, or
            (where the model allows it) up to ``PACK_TOKENS`` tokens of a group's suffixes. Rows
            are sorted by length (longest first), and a batch closes early rather than let
            padding exceed ``max_padding`` of its real tokens (wasted compute).
        max_tokens: optional cap on a forward's padded tokens, a row's cached prefix included
            (``_batches``). On a GPU, short sequences need many per forward to keep it busy:
            a large ``batch_size`` with a token cap sizes batches by work, not by count.

    Yields ``(indices, hidden)`` per batch: ``hidden[j]`` is ``[len(positions[indices[j]]), d_model]``
    on the model's output device, in the order of the requested positions.
    """
    _check_requests(sequences, positions, groups)
    forward = _Forward.of(adapter, batch_size, max_padding, max_tokens)
    units = _plan(sequences, positions, groups, share_prefix, min_prefix)
    shared = [u for u in units if u.prefix_len]
    waves = [[shared[j] for j in b] for b in _batches([u.prefix_len for u in shared], batch_size, max_padding, max_tokens)]
    loose = [i for u in units if not u.prefix_len for i in u.members]
    with tqdm(total=len(sequences), desc=desc, unit="seq", leave=False) as bar:
        for wave in waves:
            for batch, hidden in _wave_batches(forward, wave, sequences, positions):
                yield batch, hidden
                bar.update(len(batch))
        for batch, hidden in _loose_batches(forward, loose, sequences, positions):
            yield batch, hidden
            bar.update(len(batch))


def _check_requests(
    sequences: Sequence[Sequence[int]], positions: Sequence[Sequence[int]], groups: Sequence[Hashable] | None
) -> None:
    """``ValueError`` unless there is one positions list (and group key) per sequence, each position inside it."""
    if len(sequences) != len(positions):
        raise ValueError("one positions list per sequence is needed")
    if groups is not None and len(groups) != len(sequences):
        raise ValueError("one group key per sequence is needed")
    for i, (seq, pos) in enumerate(zip(sequences, positions)):
        if not len(pos):
            continue
        low, high = _span(pos)
        if low < 0 or high >= len(seq):
            raise ValueError(f"sequence {i}: positions {list(pos)} outside 0..{len(seq) - 1}")


def _span(positions: Sequence[int]) -> tuple[int, int]:
    """(smallest, largest) of non-empty ``positions``; O(1) for a ``range`` of step 1 (the scorer's
    own requests: a sequence's scored positions are consecutive)."""
    if isinstance(positions, range) and positions.step == 1:
        return positions.start, positions.stop - 1
    return min(positions), max(positions)


@dataclass(frozen=True)
class _Forward:
    """How ``iter_final_hidden`` calls the decoder for one model.

    ``left``: with sliding-window attention, prefixes are left-padded so that each ends where its
    suffix starts (cache slots as far apart as positions), and suffixes are not packed. ``pack``:
    the token budget of a packed suffix row (0: one suffix per row). ``batch_size``, ``max_padding``
    and ``max_tokens``: ``_batches``.
    """

    decoder: object  # the decoder under ``attention.scoring_forward``
    cache_kw: str
    pad: int
    device: torch.device
    dtype: torch.dtype
    left: bool
    pack: int
    batch_size: int
    max_padding: float
    max_tokens: int | None

    @classmethod
    def of(cls, adapter: ModelAdapter, batch_size: int, max_padding: float, max_tokens: int | None) -> "_Forward":
        module = _decoder(adapter)
        device = adapter.input_device
        return cls(scoring_forward(module, device), cache_keyword(module), adapter.pad_id, device, adapter.dtype,
                   adapter.has_sliding_window, PACK_TOKENS if _can_pack(adapter) else 0, batch_size, max_padding,
                   max_tokens)


def _wave_batches(
    forward: _Forward, wave: Sequence[_Unit], sequences: Sequence[Sequence[int]], positions: Sequence[Sequence[int]]
) -> Iterator[tuple[list[int], list[Tensor]]]:
    """``iter_final_hidden``'s batches for a wave of prefixed units of similar prefix length.

    One batched forward computes the wave's prefixes. Each suffix row then reads its own unit's
    prefix from the KV cache, so rows of different groups share a batch; a row packs several
    suffixes of one unit (``forward.pack`` tokens at most), each attending to the prefix and
    causally to itself only.
    """
    prefixes = [sequences[u.members[0]][: u.prefix_len] for u in wave]
    prefix_cache, prefix_mask = _prefix_cache(forward.decoder, prefixes, forward.pad, forward.left, forward.device)
    suffix_length = {i: len(sequences[i]) - u.prefix_len for u in wave for i in u.members}
    rows = [(k, packed) for k, u in enumerate(wave) for packed in _pack(u.members, suffix_length, forward.pack)]
    row_lengths = [sum(suffix_length[i] for i in members) for _, members in rows]
    batches = _batches(row_lengths, forward.batch_size, forward.max_padding, forward.max_tokens, prefix_mask.shape[1])
    for rows_of_batch in batches:
        chunk = [rows[r] for r in rows_of_batch]
        inputs, unit_of_row, starts = _suffix_inputs(chunk, wave, sequences, prefix_mask, forward.pad, forward.pack > 0,
                                                     forward.dtype, forward.device)
        cache = _cache_rows(prefix_cache, unit_of_row)
        out = forward.decoder(**inputs, use_cache=True, **{forward.cache_kw: cache})
        del cache
        batch = [i for _, members in chunk for i in members]
        row_of = [r for r, (_, members) in enumerate(chunk) for _ in members]
        shifts = [starts[i] - wave[k].prefix_len for k, members in chunk for i in members]
        yield batch, _select_rows(out.last_hidden_state, [positions[i] for i in batch], row_of, shifts)


def _loose_batches(
    forward: _Forward, loose: Sequence[int], sequences: Sequence[Sequence[int]], positions: Sequence[Sequence[int]]
) -> Iterator[tuple[list[int], list[Tensor]]]:
    """``iter_final_hidden``'s batches for the sequences scored whole (no shared prefix).

    Right-padded and run without an attention mask: under causal attention no real token sees
    the padding after it, and without a mask SDPA can use its fastest (flash) kernels.
    """
    for rows_of_batch in _batches([len(sequences[i]) for i in loose], forward.batch_size, forward.max_padding,
                                  forward.max_tokens):
        batch = [loose[r] for r in rows_of_batch]
        ids, _ = _pad_batch([sequences[i] for i in batch], forward.pad)
        out = forward.decoder(input_ids=_to_device(ids, forward.device), use_cache=False)
        yield batch, _select_rows(out.last_hidden_state, [positions[i] for i in batch])


def _can_pack(adapter: ModelAdapter) -> bool:
    """Whether suffixes may share a row under a custom 4-D attention mask: the model's attention
    must take such a mask as given (SDPA, eager) and have no sliding window (which transformers
    would otherwise add to its own masks)."""
    return not adapter.has_sliding_window and getattr(adapter.model.config, "_attn_implementation", None) in ("sdpa", "eager")


def _pack(members: Sequence[int], lengths: Mapping[int, int], budget: int) -> list[list[int]]:
    """``members`` in rows of at most ``budget`` tokens (longest first, each into the first row
    with room; a longer member gets a row of its own). ``budget == 0``: one member per row."""
    if budget <= 0:
        return [[i] for i in members]
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(members, key=lambda i: -lengths[i]):
        fits = next((r for r, left in enumerate(room) if lengths[i] <= left), None)
        if fits is None:
            rows.append([i])
            room.append(budget - lengths[i])
        else:
            rows[fits].append(i)
            room[fits] -= lengths[i]
    return rows


def _suffix_inputs(
    chunk: Sequence[tuple[int, list[int]]],
    wave: Sequence[_Unit],
    sequences: Sequence[Sequence[int]],
    prefix_mask: Tensor,
    pad: int,
    packed: bool,
    dtype: torch.dtype,
    device: torch.device,
) -> tuple[dict[str, Tensor], Tensor, dict[int, int]]:
    """Decoder inputs for rows of suffixes that continue cached prefixes.

    ``chunk``: per row, (unit index in ``wave``, the sequences whose suffixes it holds, in order).
    Returns the keyword inputs (``input_ids`` [B, S], ``position_ids`` [B, S] continuing each
    prefix, ``attention_mask``), each row's unit (its row in the prefix cache), and where each
    sequence's suffix starts in its row. The mask covers the cache slots then the row: a 2-D
    padding mask for one suffix per row, otherwise an additive [B, 1, S, cache + S] mask in which
    each token sees its prefix's real slots and, causally, its own suffix.
    """
    starts: dict[int, int] = {}
    width = max(sum(len(sequences[i]) - wave[k].prefix_len for i in members) for k, members in chunk)
    table = np.zeros((len(chunk), 3, width), dtype=np.int64)  # per row: token ids, segment, position in segment
    table[:, 0], table[:, 1] = pad, -1
    counting = np.arange(width, dtype=np.int64)
    for b, (k, members) in enumerate(chunk):
        column = 0
        for r, i in enumerate(members):
            suffix = sequences[i][wave[k].prefix_len :]
            end = column + len(suffix)
            table[b, 0, column:end] = suffix
            table[b, 1, column:end] = r
            table[b, 2, column:end] = counting[: len(suffix)]
            starts[i] = column
            column = end
    table = _to_device(torch.from_numpy(table), device)
    input_ids, segment_ids, local_positions = table.unbind(1)
    unit_of_row, prefix_len = _to_device(torch.tensor([[k, wave[k].prefix_len] for k, _ in chunk]).T, device)
    cached = prefix_mask[unit_of_row]  # [B, L], 1 = a real prefix slot
    real = segment_ids >= 0
    if not packed:
        mask = torch.cat([cached, real.long()], dim=1)
    else:
        causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
        own = (segment_ids[:, :, None] == segment_ids[:, None, :]) & real[:, None, :] & causal
        seen = torch.cat([cached.bool()[:, None, :].expand(-1, width, -1), own], dim=2)
        mask = torch.zeros(seen.shape, dtype=dtype, device=device).masked_fill_(~seen, torch.finfo(dtype).min)[:, None]
    inputs = {"input_ids": input_ids, "attention_mask": mask, "position_ids": prefix_len[:, None] + local_positions}
    return inputs, unit_of_row, starts


def _prefix_cache(decoder, prefixes: Sequence[Sequence[int]], pad: int, left: bool, device: torch.device):
    """KV cache of one padded forward over ``prefixes``, and its attention mask [n, T].

    Right-padded without a mask, or (``left``) left-padded with a mask and positions.
    """
    ids, mask = _pad_batch(prefixes, pad, left=left)
    ids, mask = _to_device(ids, device), _to_device(mask, device)
    if left:
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        output = decoder(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
    else:
        output = decoder(input_ids=ids, use_cache=True)
    return _output_cache(output), mask


def _cache_rows(cache, rows: Tensor):
    """A new KV cache holding batch rows ``rows`` of ``cache`` (which is left untouched)."""
    if not hasattr(cache, "layers"):
        selected = copy.deepcopy(cache)
    else:  # shallow copies suffice: ``batch_select_indices`` replaces each layer's tensors
        selected = copy.copy(cache)
        selected.layers = [copy.copy(layer) for layer in cache.layers]
    selected.batch_select_indices(rows)
    for layer in getattr(selected, "layers", []):
        layer.update = functools.partial(_update_with_contiguous_states, layer.update)
    return selected


def _update_with_contiguous_states(update, key_states: Tensor, value_states: Tensor, *args, **kwargs):
    """A cache layer's ``update`` given contiguous new key/value states.

    The model hands them over transposed (strided); ``torch.cat`` of the cached prefix with a
    strided tensor then takes PyTorch's generic strided-copy kernel for the whole (large) cache
    instead of its vectorised one. Copying the few new tokens first avoids that.
    """
    return update(key_states.contiguous(), value_states.contiguous(), *args, **kwargs)


def _pad_batch(rows: Sequence[Sequence[int]], pad: int, left: bool = False) -> tuple[Tensor, Tensor]:
    """Token rows padded to one length (on the right, or the left): ids and attention mask [B, T]."""
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for b, r in enumerate(rows):
        span = slice(T - len(r), T) if left else slice(0, len(r))
        ids[b, span] = torch.as_tensor(list(r), dtype=torch.long)
        mask[b, span] = 1
    return ids, mask


def _to_device(tensor: Tensor, device: torch.device) -> Tensor:
    """A host tensor copied to ``device`` without making the host wait for the GPU.

    A plain ``.to("cuda")`` synchronises with the stream: the host would idle until the previous
    batch finished instead of queueing the next one. A pinned copy with ``non_blocking`` does not.
    """
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def _select_rows(hidden: Tensor, positions: Sequence[Sequence[int]], rows: Sequence[int] | None = None,
                 shifts: Sequence[int] | None = None) -> list[Tensor]:
    """``hidden[rows[j], positions[j] + shifts[j]]`` for every item j (``rows`` defaults to 0, 1, ...,
    ``shifts`` to 0): a list of [len(positions[j]), d_model]."""
    sizes = [len(p) for p in positions]
    rows = np.arange(len(positions)) if rows is None else np.asarray(rows, dtype=np.int64)
    cols = np.concatenate([_as_array(p) for p in positions]) if positions else np.zeros(0, dtype=np.int64)
    if shifts is not None:
        cols = cols + np.repeat(np.asarray(shifts, dtype=np.int64), sizes)
    index = torch.from_numpy(np.stack([np.repeat(rows, sizes), cols]))
    row_index, col_index = _to_device(index, hidden.device)
    return list(hidden[row_index, col_index].split(sizes))


def _as_array(positions: Sequence[int]) -> np.ndarray:
    if isinstance(positions, range):
        return np.arange(positions.start, positions.stop, positions.step, dtype=np.int64)
    return np.asarray(positions, dtype=np.int64).reshape(-1)


def _safe_log_softmax(logits: Tensor) -> tuple[Tensor, Tensor]:
    """``(log_softmax over the vocabulary, bool mask of rows that had non-finite logits)``."""
    low, high = torch.aminmax(logits, dim=-1)  # NaN propagates to both
    nonfinite = ~(torch.isfinite(low) & torch.isfinite(high))
    # nan_to_num and the clamp leave finite logits within the limit unchanged, so they run only on
    # blocks that need them: two passes over [rows, vocab] (and their copies) saved on every other
    # block, for one host check per block (the GPU is far ahead of it only in long forwards)
    if bool((nonfinite | (low < -LOGIT_LIMIT) | (high > LOGIT_LIMIT)).any()):
        logits = torch.nan_to_num(logits, nan=0.0, posinf=LOGIT_LIMIT, neginf=-LOGIT_LIMIT).clamp(-LOGIT_LIMIT, LOGIT_LIMIT)
    return torch.log_softmax(logits, dim=-1), nonfinite


@dataclass
class SequenceScores:
    """Per-sequence sums over the scored tokens: log-probabilities, token counts, non-finite rows."""

    logprob_sums: np.ndarray  # [n] float64
    n_tokens: np.ndarray  # [n] int64
    n_nonfinite: np.ndarray  # [n] int64


@torch.inference_mode()
def sequence_logprobs(
    adapter: ModelAdapter,
    sequences: Sequence[Sequence[int]],
    score_from: Sequence[int],
    *,
    groups: Sequence[Hashable] | None = None,
    batch_size: int = 8,
    share_prefix: bool = True,
    max_rows: int = DEFAULT_MAX_ROWS,
    max_tokens: int | None = None,
    desc: str = "scoring",
) -> SequenceScores:
    """Sum of ``log p(token_t | tokens_<t)`` over ``t = score_from[i] .. len - 1`` of each sequence.

    ``score_from[i] >= 1`` (the first token has no prediction); ``score_from[i] == len`` scores
    nothing (sum 0, count 0). Logits are computed only for the scored positions. ``batch_size``
    and ``max_tokens``: ``iter_final_hidden``.
    """
    check_head(adapter)
    n = len(sequences)
    positions: list[range] = []
    for i, (seq, start) in enumerate(zip(sequences, score_from)):
        if start < 1 or start > len(seq):
            raise ValueError(f"sequence {i}: score_from {start} outside 1..{len(seq)}")
        positions.append(range(start - 1, len(seq) - 1))
    sums = np.zeros(n, dtype=np.float64)
    counts = np.array([len(p) for p in positions], dtype=np.int64)
    bad = np.zeros(n, dtype=np.int64)
    scored = [i for i in range(n) if positions[i]]
    if not scored:
        return SequenceScores(sums, counts, bad)
    sub_groups = None if groups is None else [groups[i] for i in scored]
    pending: list[tuple[np.ndarray, Tensor, Tensor]] = []  # (owner, log p, non-finite) per row; copied to host at the end
    for batch, rows in iter_final_hidden(
        adapter,
        [sequences[i] for i in scored],
        [positions[i] for i in scored],
        groups=sub_groups,
        batch_size=batch_size,
        share_prefix=share_prefix,
        max_tokens=max_tokens,
        desc=desc,
    ):
        members = [scored[j] for j in batch]
        owners = np.repeat(np.asarray(members, dtype=np.int64), [len(r) for r in rows])
        targets = torch.from_numpy(np.concatenate([np.asarray(sequences[i][score_from[i] :], dtype=np.int64) for i in members]))
        hidden = torch.cat(rows, dim=0)
        targets = _to_device(targets, hidden.device)
        for start in range(0, hidden.shape[0], max_rows):
            logprobs, nonfinite = _safe_log_softmax(project_to_logits(adapter, hidden[start : start + max_rows]))
            tgt = targets[start : start + max_rows].to(logprobs.device)
            pending.append((owners[start : start + max_rows], logprobs.gather(-1, tgt[:, None])[:, 0].double(), nonfinite))
    for who, picked, nonfinite in pending:
        np.add.at(sums, who, picked.cpu().numpy())
        np.add.at(bad, who, nonfinite.cpu().numpy().astype(np.int64))
    return SequenceScores(sums, counts, bad)


@torch.inference_mode()
def next_token_logprobs(
    adapter: ModelAdapter,
    sequences: Sequence[Sequence[int]],
    candidate_ids: Sequence[int],
    *,
    groups: Sequence[Hashable] | None = None,
    batch_size: int = 8,
    share_prefix: bool = True,
    max_tokens: int | None = None,
    desc: str = "scoring",
) -> tuple[np.ndarray, np.ndarray]:
    """Log-probabilities of ``candidate_ids`` as the token after each whole sequence.

    One logit row per sequence (the last position). Returns ``(logprobs [n, k] float64,
    nonfinite [n] bool)``; the log-softmax is over the full vocabulary.
    """
    check_head(adapter)
    n = len(sequences)
    out = np.zeros((n, len(candidate_ids)), dtype=np.float64)
    bad = np.zeros(n, dtype=bool)
    candidates = torch.as_tensor(list(candidate_ids), dtype=torch.long)
    pending: list[tuple[list[int], Tensor, Tensor]] = []  # copied to host at the end (no per-batch sync)
    for batch, rows in iter_final_hidden(
        adapter,
        sequences,
        [[len(s) - 1] for s in sequences],
        groups=groups,
        batch_size=batch_size,
        share_prefix=share_prefix,
        max_tokens=max_tokens,
        desc=desc,
    ):
        logprobs, nonfinite = _safe_log_softmax(project_to_logits(adapter, torch.cat(rows, dim=0)))
        candidates = candidates.to(logprobs.device)  # once: later calls are no-ops
        pending.append((batch, logprobs[:, candidates].double(), nonfinite))
    for batch, picked, nonfinite in pending:
        out[batch] = picked.cpu().numpy()
        bad[batch] = nonfinite.cpu().numpy()
    return out, bad
