"""Cross-entropy throughput at 8B scale, as a fraction of the bf16 peak (issue 17 item 3).

The evaluate stage's general-text cross-entropy (``prefix_scorer.sequence_logprobs``, what
``loss.text_loss`` calls after tokenising) on the Llama-3-8B-shaped random model of
``bench/end_to_end.py``: ``--docs`` documents of exactly ``--length`` tokens (BOS plus seeded random
token ids: speed does not depend on token values; the Pile's documents are at least that long, so
every document fills the window). Variants differ in documents per forward (``--batches``) and
LM-head rows per chunk (``--max-rows``); the first variant is the pipeline's setting on a GPU
(``_metric_batch_size``: 32 documents, 512 rows) and the reference of every ratio, all in the same
process. Each variant first warms kernels and the allocator on two batches, then is timed once
over every document. Prints one JSON line per variant: tokens/s, achieved TFLOP/s, the fraction of
``--peak-tflops`` (H200 dense bf16: 989), the ratio to the reference and the largest difference
of the per-document log-probability sums from it.

FLOPs per scored token: 2 x (the decoder's matrix parameters + the LM head) plus attention's
2 x 2 x layers x d_model x (mean causal context, length / 2).

    python bench/ce_8b.py --tokenizer .gpu/tokenizer --batches 32 64 128 --max-rows 512 2048

``--compile`` repeats every variant with each decoder layer under ``torch.compile`` (fused norms,
rotary and activations; the GEMMs stay cuBLAS's), after a warm-up that compiles. ``--profile`` prints the CUDA kernels of one batch of the pipeline's setting, by
total time, and the share of the matrix multiplications (``torch.profiler``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from end_to_end import Timer, build_adapter, emit, peak_gb  # noqa: E402
from refusal_directions.evaluation.prefix_scorer import sequence_logprobs  # noqa: E402


def flops_per_token(model: torch.nn.Module, length: int) -> float:
    """2 x matrix parameters of the decoder layers and the LM head, plus causal attention."""
    config = model.config
    layers = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and ".layers." in n)
    head = model.get_output_embeddings().weight.numel()
    attention = 2 * 2 * config.num_hidden_layers * config.hidden_size * (length / 2)
    return 2 * (layers + head) + attention


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--layers", type=int, default=None, help="fewer layers (a CPU smoke test)")
    parser.add_argument("--docs", type=int, default=4096)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--batches", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--max-rows", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    parser.add_argument("--compile", action="store_true", help="add the pipeline's setting with compiled decoder layers")
    parser.add_argument("--profile", action="store_true", help="print the kernel time table of one batch")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    adapter = build_adapter(args.tokenizer, args.device, args.layers)
    vocab = adapter.model.config.vocab_size
    rng = np.random.default_rng(0)
    bos = adapter.tokenizer.bos_token_id
    start = [] if bos is None else [bos]
    sequences = [start + rng.integers(0, vocab, args.length - len(start)).tolist() for _ in range(args.docs)]
    per_token = flops_per_token(adapter.model, args.length)
    variants = [(32, 512, False)] + [(b, r, False) for b in args.batches for r in args.max_rows if (b, r) != (32, 512)]
    variants += [(b, r, True) for b, r, _ in variants] if args.compile else []
    if args.profile:
        profile_batch(adapter, sequences[:32])
    reference_seconds, reference_sums = None, None
    for batch, rows, compiled in variants:
        if compiled:
            for layer in adapter.layers:
                layer.compile(dynamic=False)
        warm = sequences[: 2 * batch]
        sequence_logprobs(adapter, warm, [1] * len(warm), batch_size=batch, max_rows=rows, desc="warm-up")
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        with Timer() as t:
            scores = sequence_logprobs(adapter, sequences, [1] * len(sequences), batch_size=batch, max_rows=rows,
                                       desc=f"CE batch {batch} rows {rows}")
        tokens = int(scores.n_tokens.sum())
        tflops = tokens * per_token / t.seconds / 1e12
        if reference_seconds is None:
            reference_seconds, reference_sums = t.seconds, scores.logprob_sums
        emit(stage="ce", batch=batch, max_rows=rows, compiled=compiled, docs=args.docs, length=args.length, tokens=tokens,
             seconds=round(t.seconds, 2), tokens_per_s=round(tokens / t.seconds), tflops=round(tflops, 1),
             fraction_of_peak=round(tflops / args.peak_tflops, 3), speedup_vs_pipeline=round(reference_seconds / t.seconds, 3),
             max_abs_sum_difference=float(np.abs(scores.logprob_sums - reference_sums).max()),
             nonfinite=int(scores.n_nonfinite.sum()), peak_gpu_gb=peak_gb())


def profile_batch(adapter, batch: list[list[int]]) -> None:
    """The CUDA kernels of scoring one batch (after a warm-up), by total time; the GEMMs' share."""
    from torch.profiler import ProfilerActivity, profile

    sequence_logprobs(adapter, batch, [1] * len(batch), batch_size=len(batch), desc="profile warm-up")
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        sequence_logprobs(adapter, batch, [1] * len(batch), batch_size=len(batch), desc="profile")
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_time_total > 0 and e.device_type.name == "CUDA"]
    total = sum(e.device_time_total for e in events)
    gemm = sum(e.device_time_total for e in events if any(k in e.key.lower() for k in ("gemm", "matmul", "cutlass", "nvjet", "sm90")))
    print(prof.key_averages().table(sort_by="device_time_total", row_limit=25), flush=True)
    emit(stage="profile", kernel_ms=round(total / 1e3, 2), gemm_ms=round(gemm / 1e3, 2), gemm_share=round(gemm / total, 3))


if __name__ == "__main__":
    main()
