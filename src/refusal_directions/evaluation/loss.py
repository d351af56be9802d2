"""Cross-entropy and perplexity of general text, instruction outputs and the model's own completions.

Owns the corpora's tokenization (documents truncated to ``max_length`` tokens, chat-formatted
instruction/output pairs) and ``LossResult``; the scoring itself is ``prefix_scorer.sequence_logprobs``.

Loss results (``LossResult``) are token-weighted means of the negative log-likelihood:
``mean_loss = sum of token NLLs / number of scored tokens``; ``perplexity = exp(mean_loss)``.
Per-document mean losses and token counts are kept for paired bootstraps. Positions with
non-finite logits are counted in ``n_nonfinite`` (see ``prefix_scorer``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Mapping, Sequence

from ..models import ModelAdapter
from .prefix_scorer import DEFAULT_MAX_ROWS, SequenceScores, sequence_logprobs


# ------------------------------------------------------------------ cross-entropy
@dataclass
class LossResult:
    """Token-weighted cross-entropy of one corpus.

    ``doc_losses[i]`` is document i's mean NLL over its ``doc_tokens[i]`` scored tokens (documents
    with no scored token are dropped and counted in ``n_skipped``), so
    ``mean_loss == sum(doc_losses * doc_tokens) / sum(doc_tokens)``.
    """

    corpus: str
    mean_loss: float
    perplexity: float
    n_tokens: int
    n_documents: int
    n_nonfinite: int
    n_skipped: int
    doc_losses: list[float] = field(repr=False)
    doc_tokens: list[int] = field(repr=False)
    max_length: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _loss_result(corpus: str, scores: SequenceScores, max_length: int | None, n_skipped: int) -> LossResult:
    keep = scores.n_tokens > 0
    n_tokens = int(scores.n_tokens[keep].sum())
    total_nll = float(-scores.logprob_sums[keep].sum())
    mean = total_nll / n_tokens if n_tokens else float("nan")
    return LossResult(
        corpus=corpus,
        mean_loss=mean,
        perplexity=math.exp(mean) if n_tokens and mean < 700 else float("inf") if n_tokens else float("nan"),
        n_tokens=n_tokens,
        n_documents=int(keep.sum()),
        n_nonfinite=int(scores.n_nonfinite.sum()),
        n_skipped=n_skipped + int((~keep).sum()),
        doc_losses=(-scores.logprob_sums[keep] / scores.n_tokens[keep]).tolist(),
        doc_tokens=scores.n_tokens[keep].astype(int).tolist(),
        max_length=max_length,
    )


def _tokens(adapter: ModelAdapter, text: str) -> list[int]:
    return list(adapter.tokenizer(text, add_special_tokens=False)["input_ids"])


def _leading_tokens(adapter: ModelAdapter, text: str, n: int) -> list[int]:
    """The first ``n`` tokens of ``text`` without tokenizing all of a very long document."""
    cut = max(64, 8 * n)
    while True:
        ids = _tokens(adapter, text[:cut])
        if cut >= len(text) or len(ids) >= n + 8:  # tokens well before the cut are unaffected by it
            return ids[:n]
        cut *= 2


def text_loss(
    adapter: ModelAdapter,
    documents: Sequence[Mapping | str],
    *,
    max_length: int = 256,
    add_bos: bool = True,
    batch_size: int = 8,
    max_rows: int = DEFAULT_MAX_ROWS,
    max_tokens: int | None = None,
    corpus: str = "text",
) -> LossResult:
    """Cross-entropy of general text: every predicted token of each document's first ``max_length`` tokens.

    Documents are ``{"text": ...}`` records (``data.load_dataset`` kind ``text``) or strings. The
    tokenizer's BOS token is prepended when it has one (``add_bos``); it counts toward
    ``max_length`` and is never a target. A document of ``L`` tokens contributes ``L - 1`` targets.
    ``batch_size`` (sequences per forward) and ``max_tokens`` (padded tokens per forward, optional):
    ``prefix_scorer.iter_final_hidden``.
    """
    sequences = text_sequences(adapter, documents, max_length=max_length, add_bos=add_bos)
    return sequences_loss(adapter, sequences, max_length=max_length, batch_size=batch_size, max_rows=max_rows,
                          max_tokens=max_tokens, corpus=corpus)


def text_sequences(adapter: ModelAdapter, documents: Sequence[Mapping | str], *, max_length: int = 256,
                   add_bos: bool = True) -> list[list[int]]:
    """``text_loss``'s token ids of each document: [BOS] + its first tokens, ``max_length`` in all."""
    bos = adapter.tokenizer.bos_token_id if add_bos else None
    budget = max_length - (1 if bos is not None else 0)
    head = [bos] if bos is not None else []
    return [head + _leading_tokens(adapter, doc if isinstance(doc, str) else doc["text"], budget) for doc in documents]


def sequences_loss(adapter: ModelAdapter, sequences: Sequence[Sequence[int]], *, max_length: int | None = None,
                   batch_size: int = 8, max_rows: int = DEFAULT_MAX_ROWS, max_tokens: int | None = None,
                   corpus: str = "text") -> LossResult:
    """``text_loss`` of already tokenized documents (``text_sequences``): every token but the
    first is a target; documents shorter than 2 tokens are skipped (``n_skipped``)."""
    keep = [i for i, s in enumerate(sequences) if len(s) >= 2]
    scores = sequence_logprobs(
        adapter, [sequences[i] for i in keep], [1] * len(keep), batch_size=batch_size, max_rows=max_rows,
        max_tokens=max_tokens, desc=f"loss {corpus}"
    )
    return _loss_result(corpus, scores, max_length, len(sequences) - len(keep))


def instruction_text(record: Mapping) -> str:
    """The user message of an Alpaca record: the instruction, plus ``"\\n\\n" + input`` when there is one."""
    extra = record.get("input") or ""
    return record["instruction"] + ("\n\n" + extra if extra.strip() else "")


def instruction_loss(
    adapter: ModelAdapter,
    records: Sequence[Mapping],
    *,
    max_length: int | None = None,
    batch_size: int = 8,
    max_rows: int = DEFAULT_MAX_ROWS,
    max_tokens: int | None = None,
    corpus: str = "alpaca",
    share_prefix: bool = True,
) -> LossResult:
    """Cross-entropy of the outputs of ``{"instruction", "input", "output"}`` records, in the chat format.

    Each sequence is ``tokens(adapter.format_prompt(instruction_text(record)))`` followed by
    ``tokens(output)``; only the output tokens are scored. ``max_length`` (optional) truncates
    the whole sequence, dropping output tokens beyond it. With ``share_prefix`` the sequences'
    common opening (the chat template's, e.g. a default system prompt) is computed once
    (``prefix_scorer``; equal to scoring each sequence whole up to float rounding).
    """
    sequences, starts = [], []
    for record in records:
        prompt = _tokens(adapter, adapter.format_prompt(instruction_text(record)))
        output = _tokens(adapter, record["output"])
        seq = prompt + output
        if max_length is not None:
            seq = seq[:max_length]
        sequences.append(seq)
        starts.append(min(len(prompt), len(seq)))
    keep = [i for i in range(len(sequences)) if 1 <= starts[i] < len(sequences[i])]
    scores = sequence_logprobs(
        adapter,
        [sequences[i] for i in keep],
        [starts[i] for i in keep],
        groups=[0] * len(keep),
        batch_size=batch_size,
        share_prefix=share_prefix,
        max_rows=max_rows,
        max_tokens=max_tokens,
        desc=f"loss {corpus}",
    )
    return _loss_result(corpus, scores, max_length, len(records) - len(keep))


def on_distribution_loss(
    adapter: ModelAdapter,
    instructions: Sequence[str],
    completions: Sequence[str],
    *,
    max_length: int | None = None,
    batch_size: int = 8,
    max_rows: int = DEFAULT_MAX_ROWS,
    max_tokens: int | None = None,
    corpus: str = "on_distribution",
    share_prefix: bool = True,
) -> LossResult:
    """``instruction_loss`` on (instruction, the baseline model's own completion) pairs."""
    if len(instructions) != len(completions):
        raise ValueError(f"{len(instructions)} instructions but {len(completions)} completions")
    records = [{"instruction": i, "input": "", "output": c} for i, c in zip(instructions, completions)]
    return instruction_loss(adapter, records, max_length=max_length, batch_size=batch_size, max_rows=max_rows,
                            max_tokens=max_tokens, corpus=corpus, share_prefix=share_prefix)
