"""End-to-end stage timings at 8B scale: a Llama-3-8B-shaped model with random bf16 weights.

Speed does not depend on weight values, so a random model stands in for Llama-3-8B-Instruct; the
embedded model's tokenizer (chat template included) stands in for Llama-3's. Each stage runs
in its own command (one device command may run at most 10 minutes); where a stage's full
workload does not fit, a stated fraction runs and the linear projection is printed.

    python bench/end_to_end.py --stage extract  --tokenizer .bench/tokenizer --data-dir .bench/data
    python bench/end_to_end.py --stage select   ...   # all three methods, full grid
    python bench/end_to_end.py --stage generate ...   # tokens/s: plain, hooks, baked; batch sizes
    python bench/end_to_end.py --stage evaluate ...   # loss and benchmarks on a fraction, projected

Default sizes (the reference's): 5 positions x 32 layers, n_train 128, n_val 32, n_test 100,
max_new_tokens 512, 4096 documents of 256 tokens for cross-entropy, 500 MMLU questions, all
1,172 ARC-Challenge questions. Prints one JSON line per measurement.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from refusal_directions.activations import cache_activations  # noqa: E402
from refusal_directions.data import instructions, load_dataset, sample  # noqa: E402
from refusal_directions.models import ModelAdapter  # noqa: E402

LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=False)


def emit(**fields) -> None:
    print(json.dumps(fields), flush=True)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class Timer:
    def __enter__(self):
        sync()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        sync()
        self.seconds = time.perf_counter() - self.start


def build_adapter(tokenizer_dir: str, device: str, n_layers: int | None = None) -> ModelAdapter:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(**{**LLAMA3_8B, "num_hidden_layers": n_layers or 32}, vocab_size=len(tokenizer),
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with Timer() as t:
        with torch.device(device):
            old = torch.get_default_dtype()
            torch.set_default_dtype(torch.bfloat16)
            model = LlamaForCausalLM(config)
            torch.set_default_dtype(old)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0.0, 0.02) if p.dim() == 2 else p.fill_(1.0)
    model.eval().requires_grad_(False)
    adapter = ModelAdapter(model, tokenizer, name="llama3-8b-shaped-random")
    emit(stage="setup", build_seconds=round(t.seconds, 1), params_b=round(sum(p.numel() for p in model.parameters()) / 1e9, 2),
         device=str(adapter.input_device), gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else None,
         torch=torch.__version__)
    return adapter


def mmlu_questions(data_dir: str, per_subject: int, n_subjects: int | None = None) -> tuple[list[dict], list[dict]]:
    """The first ``per_subject`` MMLU test questions of each subject (of the first ``n_subjects``,
    sorted), in subject order, and the dev split (the shots)."""
    test = load_dataset("mmlu", data_dir, split="test")
    subjects = sorted({r["subject"] for r in test})[:n_subjects]
    questions = [q for s in subjects for q in [r for r in test if r["subject"] == s][:per_subject]]
    return questions, load_dataset("mmlu", data_dir, split="dev")


def peak_gb() -> float:
    return round(torch.cuda.max_memory_allocated() / 2**30, 1) if torch.cuda.is_available() else float("nan")


def prompts(data_dir: str, name: str, n: int, seed: int = 42) -> list[str]:
    return instructions(sample(load_dataset(name, data_dir), n, seed))


def activations(adapter, args):
    positions = list(range(-args.positions, 0))
    with Timer() as t:
        h, _ = cache_activations(adapter, prompts(args.data_dir, "harmful_train", args.n_train), positions, args.batch_size)
        b, _ = cache_activations(adapter, prompts(args.data_dir, "harmless_train", args.n_train), positions, args.batch_size)
    return h, b, positions, t.seconds


def stage_extract(adapter, args) -> None:
    from refusal_directions.directions.diff_in_means import fit_diff_in_means
    from refusal_directions.directions.inlp import INLPConfig, fit_inlp
    from refusal_directions.directions.leace import fit_leace

    h, b, positions, seconds = activations(adapter, args)
    emit(stage="extract", step="activations", seconds=round(seconds, 2), prompts=2 * args.n_train,
         cache_gb=round((h.numel() + b.numel()) * 4 / 2**30, 2), peak_gpu_gb=peak_gb())
    for name, fit in (("diff_in_means", lambda: fit_diff_in_means(h, b, positions)),
                      ("inlp", lambda: fit_inlp(h, b, INLPConfig(), positions, device=adapter.input_device, progress=False)),
                      ("leace", lambda: fit_leace(h, b, positions, device=adapter.input_device))):
        with Timer() as t:
            ds = fit()
        extra = {"mean_rank": round(float(ds.k.float().mean()), 2)} if name == "inlp" else {}
        emit(stage="extract", step=name, seconds=round(t.seconds, 2), pairs=ds.n_positions * ds.n_layers, **extra)


def stage_select(adapter, args) -> None:
    from refusal_directions.directions.diff_in_means import fit_diff_in_means
    from refusal_directions.directions.inlp import INLPConfig, fit_inlp
    from refusal_directions.directions.leace import fit_leace
    from refusal_directions.selection import SelectionSettings, select_method, steering_table

    h, b, positions, _ = activations(adapter, args)
    sets = {"diff_in_means": fit_diff_in_means(h, b, positions),
            "inlp": fit_inlp(h, b, INLPConfig(max_iter=args.inlp_max_iter), positions, device=adapter.input_device, progress=False),
            "leace": fit_leace(h, b, positions, device=adapter.input_device)}
    harmful, harmless = prompts(args.data_dir, "harmful_val", args.n_val), prompts(args.data_dir, "harmless_val", args.n_val)
    settings = SelectionSettings(actadd_multipliers=[0.5, 1.0, 2.0], batch_size=args.n_val)
    best_norm = steering = None
    total = 0.0
    for method, ds in sets.items():
        with Timer() as t:
            result = select_method(adapter, ds, harmful, harmless, settings, "all", None, best_norm, steering)
        total += t.seconds
        if method == "diff_in_means":
            best_norm = float(ds.scale[result.best.pos_index, result.best.layer])
            steering = steering_table(result)
        emit(stage="select", method=method, seconds=round(t.seconds, 2), candidates=len(result.ranked), peak_gpu_gb=peak_gb())
    emit(stage="select", method="all", seconds=round(total, 2))


def stage_generate(adapter, args) -> None:
    """Tokens/s of generation. Dynamic-cache variants apply interventions as hooks or baked weights;
    "-static" variants use a static KV cache (compiled decoding) with persistent slot hooks."""
    from refusal_directions.directions.base import Eraser
    from refusal_directions.generation import generate_tokens
    from refusal_directions.hooks import apply_hooks
    from refusal_directions.interventions import InterventionSlots, Removal, applied

    d = adapter.d_model
    g = torch.Generator().manual_seed(0)
    r = torch.randn(d, generator=g)
    r = r / r.norm()
    V = torch.linalg.qr(torch.randn(d, 8, generator=g))[0]
    interventions = {
        "plain": None,
        "ablation": Removal(Eraser(r[:, None], r[:, None]), range(adapter.n_layers)),
        "projection-k8": Removal(Eraser(V, V), range(adapter.n_layers)),
        "reflection-reference": Removal(Eraser(r[:, None], r[:, None]), range(adapter.n_layers), alpha=2.0),
    }
    pool = prompts(args.data_dir, "jailbreakbench", args.n_test) + prompts(args.data_dir, "harmless_test", args.n_test)
    slots = InterventionSlots(adapter, max_k=8)

    def run(name: str, batch: int, todo: list[str], max_new: int):
        if name == "bare-static":  # static cache with no hook at all: the compiled baseline
            return generate_tokens(adapter, todo, max_new, batch, cache_implementation="static"), "none"
        how = name.split("-")[-1]
        key = name.removesuffix("-" + how)
        intervention = interventions[key]
        if how == "static":
            slots.load(intervention)
            with apply_hooks(slots.hooks()):
                return generate_tokens(adapter, todo, max_new, batch, cache_implementation="static"), "slots"
        with applied(adapter, intervention, bake_weights=(how == "baked")) as applied_as:
            return generate_tokens(adapter, todo, max_new, batch), applied_as

    for batch in args.gen_batches:
        for name in args.variants:
            todo = pool[: batch * args.gen_rounds] if batch < len(pool) else pool
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            with Timer() as t:
                outs, how = run(name, batch, todo, args.max_new_tokens)
            tokens = sum(len(o) for o in outs)
            emit(stage="generate", variant=name, applied_as=how, batch=batch, prompts=len(todo),
                 max_new_tokens=args.max_new_tokens, new_tokens=tokens, seconds=round(t.seconds, 2),
                 tokens_per_s=round(tokens / t.seconds, 1), peak_gpu_gb=peak_gb())
    if args.profile_decode:
        profile_decode(lambda: run(args.variants[-1], args.gen_batches[-1], pool[: args.gen_batches[-1]], args.profile_decode),
                       args.variants[-1], args.profile_decode)
    if args.check_static:
        # The compiled, slot-driven path must apply the intervention like plain hooks do.
        todo, n = pool[:16], 24
        hooked, _ = run("ablation-hooks", 16, todo, n)
        static, _ = run("ablation-static", 16, todo, n)
        plain, _ = run("plain-static", 16, todo, n)
        agree = sum(a == b for x, y in zip(hooked, static) for a, b in zip(x, y)) / sum(len(x) for x in hooked)
        differ = sum(a != b for x, y in zip(plain, static) for a, b in zip(x, y)) / sum(len(x) for x in plain)
        first = sum(x[0] == y[0] for x, y in zip(hooked, static)) / len(todo)
        emit(stage="generate", check="static slots vs dynamic hooks (ablation)", token_agreement=round(agree, 3),
             first_token_agreement=round(first, 3), fraction_differing_from_plain=round(differ, 3))


def profile_decode(generate, variant: str, steps: int) -> None:
    """Where a generate call's time goes (``torch.profiler``, after the timed calls warmed and compiled it):
    wall time per decoding step, the kernels' total time as a share of it (low: the GPU waits for the host),
    and the top CUDA kernels and host-side operations."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        with Timer() as t:
            generate()
    averages = prof.key_averages()
    kernel_us = sum(e.self_device_time_total for e in averages if e.device_type.name == "CUDA")
    print(averages.table(sort_by="self_device_time_total", row_limit=20), flush=True)
    print(averages.table(sort_by="self_cpu_time_total", row_limit=15), flush=True)
    emit(stage="decode-profile", variant=variant, steps=steps, seconds=round(t.seconds, 3),
         ms_per_step=round(1e3 * t.seconds / steps, 2), kernel_ms_per_step=round(kernel_us / 1e3 / steps, 2),
         gpu_busy=round(kernel_us / 1e6 / t.seconds, 3))


def stage_evaluate(adapter, args) -> None:
    from refusal_directions.evaluation import benchmarks, loss

    docs = load_dataset("lambada", args.data_dir, limit=args.loss_docs)
    with Timer() as t:
        res = loss.text_loss(adapter, docs, max_length=256, batch_size=args.eval_batch)
    emit(stage="evaluate", step="ce_general", docs=len(docs), tokens=res.n_tokens, seconds=round(t.seconds, 2),
         projected_seconds_4096_docs=round(t.seconds * 4096 / len(docs), 1), peak_gpu_gb=peak_gb())
    test, dev = load_dataset("mmlu", args.data_dir, split="test"), load_dataset("mmlu", args.data_dir, split="dev")
    with Timer() as t:
        res = benchmarks.evaluate_mmlu(adapter, test, dev, n_questions=args.mmlu_questions, seed=42, batch_size=args.eval_batch)
    emit(stage="evaluate", step="mmlu", questions=res["n"], seconds=round(t.seconds, 2),
         projected_seconds_500=round(t.seconds * 500 / res["n"], 1), peak_gpu_gb=peak_gb())
    test, train = load_dataset("arc_challenge", args.data_dir, split="test"), load_dataset("arc_challenge", args.data_dir, split="train")
    with Timer() as t:
        res = benchmarks.evaluate_arc(adapter, test, train, n_questions=args.arc_questions, seed=42, batch_size=args.eval_batch)
    emit(stage="evaluate", step="arc", questions=res["n"], seconds=round(t.seconds, 2),
         projected_seconds_1172=round(t.seconds * 1172 / res["n"], 1), peak_gpu_gb=peak_gb())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", required=True, nargs="+", choices=["extract", "select", "generate", "evaluate"])
    parser.add_argument("--tokenizer", required=True, help="folder with a tokenizer that has a chat template")
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--layers", type=int, default=None, help="fewer layers (for a CPU smoke test)")
    parser.add_argument("--positions", type=int, default=5)
    parser.add_argument("--n-train", type=int, default=128)
    parser.add_argument("--n-val", type=int, default=32)
    parser.add_argument("--n-test", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--inlp-max-iter", type=int, default=100)
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--gen-batches", type=int, nargs="+", default=[200, 64])
    parser.add_argument("--gen-rounds", type=int, default=1, help="batches per measurement when batch < prompts")
    parser.add_argument("--variants", nargs="+", default=["plain-hooks", "ablation-hooks", "ablation-baked", "plain-static", "ablation-static"],
                        help="<intervention>-<how>: intervention plain, ablation, projection-k8 or reflection-reference; "
                             "how: hooks (dynamic cache), baked (dynamic cache, weights edited) or static "
                             "(static KV cache, compiled decoding, persistent slot hooks); or bare-static "
                             "(static cache, compiled, no hooks)")
    parser.add_argument("--check-static", action="store_true", help="compare static-slot and hook generations")
    parser.add_argument("--no-cudnn-sdpa", action="store_true", help="turn PyTorch's cuDNN attention backend off (flash / memory-efficient kernels instead)")
    parser.add_argument("--profile-decode", type=int, default=0, metavar="STEPS",
                        help="after the timed calls: profile one call of the last variant, last batch size, STEPS new tokens")
    parser.add_argument("--loss-docs", type=int, default=512)
    parser.add_argument("--mmlu-questions", type=int, default=500)
    parser.add_argument("--arc-questions", type=int, default=300)
    parser.add_argument("--eval-batch", type=int, default=32)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    if args.no_cudnn_sdpa:
        torch.backends.cuda.enable_cudnn_sdp(False)
    adapter = build_adapter(args.tokenizer, args.device, args.layers)
    for stage in args.stage:
        {"extract": stage_extract, "select": stage_select, "generate": stage_generate, "evaluate": stage_evaluate}[stage](adapter, args)


if __name__ == "__main__":
    main()
