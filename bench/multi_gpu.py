"""Multi-GPU check and timing: an 8B-shaped random model sharded across the GPUs of one host.

The model is split layer-wise with accelerate (``infer_auto_device_map`` + ``dispatch_model``,
what ``--device auto`` does through ``from_pretrained(device_map="auto")``); selection scores,
an intervention's logits and generation are computed sharded, then again with the whole model
on one GPU, and must agree.

    python bench/multi_gpu.py --tokenizer .gpu/tokenizer --data-dir .gpu/data
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from end_to_end import LLAMA3_8B, prompts  # noqa: E402
from refusal_directions.activations import cache_activations  # noqa: E402
from refusal_directions.directions.diff_in_means import fit_diff_in_means  # noqa: E402
from refusal_directions.generation import generate_tokens  # noqa: E402
from refusal_directions.interventions import intervene, removal_for  # noqa: E402
from refusal_directions.models import ModelAdapter  # noqa: E402
from refusal_directions.selection import SelectionSettings, score_candidates  # noqa: E402


def sharded_model(tokenizer, n_gpus: int, layers: int, small: bool = False):
    from accelerate import dispatch_model, infer_auto_device_map, init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = {**LLAMA3_8B, "hidden_size": 256, "intermediate_size": 512} if small else LLAMA3_8B
    config = LlamaConfig(**{**shape, "num_hidden_layers": layers}, vocab_size=len(tokenizer),
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    config._attn_implementation = "sdpa"
    with init_empty_weights():
        model = LlamaForCausalLM(config)
    size_gb = sum(p.numel() for p in model.parameters()) * 2 / 2**30
    if n_gpus:
        budget = {i: f"{size_gb / n_gpus * 1.15:.2f}GiB" for i in range(n_gpus)}  # force a real split
    else:
        budget = {"cpu": "64GiB"}
    device_map = infer_auto_device_map(model, max_memory=budget, no_split_module_classes=model._no_split_modules,
                                       dtype=torch.bfloat16)
    torch.manual_seed(0)
    for name, param in list(model.named_parameters()):
        owner = next(v for k, v in sorted(device_map.items(), key=lambda kv: -len(kv[0]))
                     if name == k or name.startswith(k + ".") or k == "")
        value = torch.empty(param.shape, dtype=torch.bfloat16, device=owner)
        value.normal_(0.0, 0.02) if param.dim() == 2 else value.fill_(1.0)
        set_module_tensor_to_device(model, name, owner, value=value)
    model = dispatch_model(model, device_map)
    return model.eval().requires_grad_(False), device_map


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--small", action="store_true", help="a narrow model (CPU smoke test)")
    args = parser.parse_args()
    from accelerate.hooks import remove_hook_from_module
    from transformers import AutoTokenizer

    torch.set_grad_enabled(False)
    n_gpus = torch.cuda.device_count()
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    model, device_map = sharded_model(tokenizer, n_gpus, args.layers, args.small)
    adapter = ModelAdapter(model, tokenizer, name="llama3-8b-shaped-random-sharded")
    devices = sorted({str(adapter.layer_device(l)) for l in range(adapter.n_layers)})
    print(json.dumps({"gpus": n_gpus, "layer_devices": devices,
                      "split": {d: sum(1 for l in range(adapter.n_layers) if str(adapter.layer_device(l)) == d) for d in devices}}), flush=True)

    harmful, harmless = prompts(args.data_dir, "harmful_train", args.n), prompts(args.data_dir, "harmless_train", args.n)
    val_h, val_b = prompts(args.data_dir, "harmful_val", 8), prompts(args.data_dir, "harmless_val", 8)

    def measure(tag: str):
        start = time.perf_counter()
        h, _ = cache_activations(adapter, harmful, [-1], 16)
        b, _ = cache_activations(adapter, harmless, [-1], 16)
        dim = fit_diff_in_means(h, b, [-1])
        cands = score_candidates(adapter, dim, val_h, val_b, SelectionSettings(actadd_multipliers=[1.0], batch_size=8),
                                 lambda p, l: float(dim.scale[p, l]))
        best = min(cands, key=lambda c: c.bypass)
        removal = removal_for(dim, 0, best.layer, range(adapter.n_layers))
        enc = adapter.encode_instructions(val_h)
        with intervene(adapter, removal):
            logits = adapter.last_logits(enc).cpu()
            tokens = generate_tokens(adapter, val_h, 16, 8)
        seconds = time.perf_counter() - start
        print(json.dumps({"run": tag, "seconds": round(seconds, 1), "best_layer": best.layer}), flush=True)
        return h, [c.bypass for c in cands], logits, tokens

    sharded = measure("sharded")
    remove_hook_from_module(model, recurse=True)
    model.to("cuda:0" if n_gpus else "cpu")
    single = measure("one-gpu")
    print(json.dumps({
        "activations_max_abs_diff": float((sharded[0] - single[0]).abs().max()),
        "bypass_scores_max_abs_diff": max(abs(a - b) for a, b in zip(sharded[1], single[1])),
        "intervened_logits_max_abs_diff": float((sharded[2] - single[2]).abs().max()),
        "generated_tokens_equal_fraction": sum(a == b for a, b in zip(sharded[3], single[3])) / len(single[3]),
    }), flush=True)


if __name__ == "__main__":
    main()
