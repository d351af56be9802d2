"""Metrics of an (intervened) model and its completions; nothing here knows the run folder.

Scoring text under the model: ``prefix_scorer`` (the batched, prefix-sharing token scorer, with
``attention`` for how attention runs inside it), and on it ``loss`` (cross-entropy of corpora and
completions) and ``benchmarks`` (MMLU, ARC-Challenge); ``divergence`` (KL from the unmodified model).
Judging completions: ``judges`` (substring, LlamaGuard, HarmBench), ``coherence`` (degenerate
text), ``reasoning`` (the thinking section and the answer). Turning outcomes into numbers:
``stats`` (intervals, paired tests, Holm) and ``summary`` (the cells of ``evaluate/summary.json``).
"""
