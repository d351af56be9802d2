"""Load any Hugging Face causal LM and derive everything the pipeline needs from it.

``load_model`` accepts a hub id, a local folder, a ``.gguf`` file or ``embedded[:key]``.
``ModelAdapter`` then derives, from the model and tokenizer alone (no per-family classes):

* chat formatting through the tokenizer's chat template;
* the post-instruction ("eoi") tokens: what the template puts after the user message;
* the refusal tokens: the first token of a reply starting with "I" or "As";
* the decoder layers, the block input of each layer (the residual stream entering it), and
  its *write points*: the modules whose outputs are added to the residual stream (attention
  and MLP outputs, or the post-sublayer norms on Gemma-2/3-style layers);
* ``d_model``, ``n_layers``, and the final norm / unembedding for reading logits.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor, nn

from . import embedded as embedded_models

log = logging.getLogger(__name__)

DEFAULT_REFUSAL_PREFIXES = ("I", "As")
_ATTENTION_NAMES = ("self_attn", "attention", "attn", "self_attention")
_MLP_NAMES = ("mlp", "feed_forward", "ffn", "block_sparse_moe")
# Layers with these norms normalise each sublayer's *output* before it is added to the residual
# stream (Gemma-2/3, OLMo-2); there the write points are the norms. Llama, Qwen2 and Mistral also
# have a `post_attention_layernorm`, but it is a pre-norm of the MLP: their writes are the
# attention and MLP outputs.
_POST_SUBLAYER_NORMS = ("post_attention_layernorm", "post_feedforward_layernorm")


class ModelLoadError(RuntimeError):
    """A model could not be loaded or is unsuitable; the message says what to do."""


@dataclass(frozen=True)
class LayerHookPoints:
    """Where one decoder layer reads and writes the residual stream.

    ``block``: the decoder layer; a forward pre-hook on it sees the residual stream entering it.
    ``writes``: modules whose outputs are added to the residual stream inside the layer.
    ``post_sublayer_norms``: True when the writes are post-sublayer norms (weight baking is
    then not exact).
    """

    block: nn.Module
    writes: tuple[nn.Module, ...]
    post_sublayer_norms: bool


def find_decoder_layers(model: nn.Module, n_layers: int) -> nn.ModuleList:
    """The ModuleList of decoder layers: ``get_decoder().layers``, else the ModuleList whose
    elements are of a class listed in ``_no_split_modules`` and whose length is ``n_layers``."""
    candidates: list[nn.ModuleList] = []
    get_decoder = getattr(model, "get_decoder", None)
    if callable(get_decoder):
        try:
            layers = getattr(get_decoder(), "layers", None)
        except (AttributeError, NotImplementedError):
            layers = None
        if isinstance(layers, nn.ModuleList):
            candidates.append(layers)
    no_split = set(getattr(model, "_no_split_modules", None) or [])
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) and type(module[0]).__name__ in no_split:
            candidates.append(module)
    for layers in candidates:
        if len(layers) == n_layers:
            return layers
    raise ModelLoadError(
        f"Could not find the {n_layers} decoder layers of {type(model).__name__} "
        f"(found ModuleLists of lengths {[len(c) for c in candidates]})."
    )


def find_hook_points(layer: nn.Module) -> LayerHookPoints:
    """The write points of one decoder layer, found by module names (see module docstring)."""
    children = dict(layer.named_children())
    if "post_feedforward_layernorm" in children or "pre_feedforward_layernorm" in children:
        if all(name in children for name in _POST_SUBLAYER_NORMS):
            return LayerHookPoints(layer, tuple(children[n] for n in _POST_SUBLAYER_NORMS), True)
    attention = next((children[n] for n in _ATTENTION_NAMES if n in children), None)
    mlp = next((children[n] for n in _MLP_NAMES if n in children), None)
    if attention is None or mlp is None:
        raise ModelLoadError(
            f"Could not find the attention and MLP modules of {type(layer).__name__} "
            f"(children: {sorted(children)})."
        )
    return LayerHookPoints(layer, (attention, mlp), False)


def _text_config(config):
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def _common_suffix(a: Sequence[int], b: Sequence[int]) -> list[int]:
    n = 0
    while n < min(len(a), len(b)) and a[-1 - n] == b[-1 - n]:
        n += 1
    return list(a[len(a) - n :])


class ModelAdapter:
    """A causal LM with its tokenizer and everything derived from them.

    Attributes:
        model, tokenizer: the Hugging Face objects (tokenizer pads on the left).
        name: what the user asked for (hub id, path, ``embedded``...); alias: a folder-safe name.
        layers: the decoder layers; n_layers, d_model: their count and the residual width.
        eoi_token_ids: post-instruction tokens (what follows the user message in the template).
        refusal_token_ids: first tokens of typical refusals ("I", "As").
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        *,
        name: str = "model",
        alias: str | None = None,
        refusal_prefixes: Sequence[str] = DEFAULT_REFUSAL_PREFIXES,
        fingerprint_extra: str = "",
    ):
        config = getattr(model, "config", None)
        if config is None or getattr(config, "is_encoder_decoder", False) or not _can_generate(model):
            raise ModelLoadError(
                f"{name}: {type(model).__name__} is not a decoder-only causal language model; "
                "refusal-directions needs an instruction-tuned causal LM (AutoModelForCausalLM)."
            )
        if not getattr(tokenizer, "chat_template", None):
            raise ModelLoadError(
                f"{name}: the tokenizer has no chat template. Use an instruction-tuned model, or "
                "supply a Jinja template file with --chat-template FILE."
            )
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.alias = alias or _alias_from_name(name)
        self._fingerprint_extra = fingerprint_extra
        tokenizer.padding_side = "left"
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        text_config = _text_config(config)
        self.n_layers: int = int(text_config.num_hidden_layers)
        self.d_model: int = int(text_config.hidden_size)
        self.layers: nn.ModuleList = find_decoder_layers(model, self.n_layers)
        self.hook_points: list[LayerHookPoints] = [find_hook_points(layer) for layer in self.layers]
        self.final_norm: nn.Module = self._find_final_norm()
        self.logit_softcap: float | None = getattr(text_config, "final_logit_softcapping", None)
        scale = getattr(text_config, "logit_scale", None)  # Cohere multiplies, Granite divides
        scaling = getattr(text_config, "logits_scaling", None)
        self.logit_scale: float = (float(scale) if isinstance(scale, (int, float)) else 1.0) / (
            float(scaling) if isinstance(scaling, (int, float)) and scaling else 1.0)
        self.eoi_token_ids: list[int] = self._derive_eoi_tokens()
        self.refusal_token_ids: list[int] = self._derive_refusal_tokens(refusal_prefixes)

    # ---------------------------------------------------------------- chat formatting
    def format_prompt(self, instruction: str) -> str:
        """The chat-formatted prompt for one user instruction, ending where the answer starts."""
        return self.tokenizer.apply_chat_template(
            [{"role": "user", "content": instruction}], tokenize=False, add_generation_prompt=True
        )

    def format_prompts(self, instructions: Sequence[str]) -> list[str]:
        return [self.format_prompt(i) for i in instructions]

    def encode(self, texts: Sequence[str], max_length: int | None = None) -> dict[str, Tensor]:
        """Tokenize already-formatted texts with left padding, on the input device.

        Special tokens are not added: chat templates already write BOS where the model wants it.
        """
        enc = self.tokenizer(
            list(texts),
            padding=True,
            return_tensors="pt",
            add_special_tokens=False,
            truncation=max_length is not None,
            max_length=max_length,
        )
        return {k: v.to(self.input_device) for k, v in enc.items()}

    def encode_instructions(self, instructions: Sequence[str]) -> dict[str, Tensor]:
        return self.encode(self.format_prompts(instructions))

    def _token_ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _derive_eoi_tokens(self) -> list[int]:
        a = self._token_ids(self.format_prompt("Please say hello"))
        b = self._token_ids(self.format_prompt("What time is it?"))
        eoi = _common_suffix(a, b)
        if not eoi:
            raise ModelLoadError(f"{self.name}: could not derive post-instruction tokens from the chat template.")
        return eoi

    def _derive_refusal_tokens(self, prefixes: Sequence[str]) -> list[int]:
        prompt = self.format_prompt("Tell me something.")
        base = self._token_ids(prompt)
        ids: list[int] = []
        for prefix in prefixes:
            full = self._token_ids(prompt + prefix)
            if full[: len(base)] != base or len(full) <= len(base):
                raise ModelLoadError(f"{self.name}: cannot derive a refusal token for {prefix!r}.")
            if full[len(base)] not in ids:
                ids.append(full[len(base)])
        return ids

    # ---------------------------------------------------------------- model structure
    def _find_final_norm(self) -> nn.Module:
        decoder = self.model.get_decoder() if callable(getattr(self.model, "get_decoder", None)) else None
        for owner in (decoder, getattr(self.model, "model", None), self.model):
            for name in ("norm", "final_layernorm", "final_layer_norm", "ln_f"):
                module = getattr(owner, name, None) if owner is not None else None
                if isinstance(module, nn.Module):
                    return module
        raise ModelLoadError(f"{self.name}: could not find the final norm of {type(self.model).__name__}.")

    @property
    def input_device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    @property
    def lm_head(self) -> nn.Module:
        return self.model.get_output_embeddings()

    def logits_from_hidden(self, hidden: Tensor) -> Tensor:
        """Float32 logits from the last decoder layer's output ``[..., d_model]`` (before the final norm)."""
        return self.logits_from_final(self.final_norm(hidden.to(self.final_norm.weight.device)))

    def logits_from_final(self, hidden: Tensor) -> Tensor:
        """Float32 logits from final hidden states (after the final norm): the LM head, then the
        model's logit scaling (Cohere ``logit_scale``, Granite ``logits_scaling``) and soft-capping
        (Gemma-2/3 ``final_logit_softcapping``), as its ``ForCausalLM.forward`` applies them."""
        weight = getattr(self.lm_head, "weight", None)
        if weight is not None:
            hidden = hidden.to(device=weight.device, dtype=weight.dtype)
        logits = self.lm_head(hidden).float()
        if self.logit_scale != 1:
            logits = logits * self.logit_scale
        if self.logit_softcap:
            logits = torch.tanh(logits / self.logit_softcap) * self.logit_softcap
        return logits

    def layer_device(self, layer: int) -> torch.device:
        return next(self.layers[layer].parameters()).device

    @property
    def has_sliding_window(self) -> bool:
        """Whether any attention layer sees only a window of recent tokens (then attention depends
        on how far apart cache slots are, not only on positions). Qwen2.5 sets a window but
        disables it; Gemma 2/3 alternate windowed and full layers; Mistral v0.1 windows them all."""
        config = self.model.config
        layer_types = getattr(config, "layer_types", None) or []
        if any(kind != "full_attention" for kind in layer_types):
            return True
        return bool(getattr(config, "sliding_window", None)) and getattr(config, "use_sliding_window", True) is not False

    @property
    def dtype(self) -> torch.dtype:
        return self.model.get_input_embeddings().weight.dtype

    @cached_property
    def fingerprint(self) -> str:
        """A short hash of the config, chat template, refusal tokens and a sample of every weight."""
        h = hashlib.sha256()
        config = self.model.config.to_dict()
        for key in ("_name_or_path", "transformers_version", "_commit_hash", "quantization_config"):
            config.pop(key, None)
        h.update(json.dumps(config, sort_keys=True, default=str).encode())
        h.update(str(self.tokenizer.chat_template).encode())
        h.update(json.dumps([self.eoi_token_ids, self.refusal_token_ids]).encode())
        h.update(self._fingerprint_extra.encode())
        with torch.no_grad():
            for name, param in self.model.named_parameters():
                h.update(f"{name}{tuple(param.shape)}{param.dtype}".encode())
                if param.device.type == "meta":
                    continue
                flat = param.detach().reshape(-1)
                sample = flat[:: max(1, flat.numel() // 1024)][:1024].double()
                h.update(f"{sample.sum().item():.6e}/{sample.abs().sum().item():.6e}".encode())
        return h.hexdigest()[:16]

    def describe(self) -> dict:
        """A summary for ``refusal-directions models show``."""
        decode = self.tokenizer.convert_ids_to_tokens
        return {
            "name": self.name,
            "alias": self.alias,
            "architecture": type(self.model).__name__,
            "n_layers": self.n_layers,
            "d_model": self.d_model,
            "dtype": str(self.dtype).replace("torch.", ""),
            "device": str(self.input_device),
            "eoi_token_ids": self.eoi_token_ids,
            "eoi_tokens": decode(self.eoi_token_ids),
            "refusal_token_ids": self.refusal_token_ids,
            "refusal_tokens": decode(self.refusal_token_ids),
            "write_points": [f"{type(m).__name__}" for m in self.hook_points[0].writes],
            "fingerprint": self.fingerprint,
        }


def _can_generate(model: nn.Module) -> bool:
    can = getattr(model, "can_generate", None)
    return bool(can()) if callable(can) else False


def _alias_from_name(name: str) -> str:
    stem = Path(name.rstrip("/")).name if ("/" in name or name.endswith(".gguf")) else name
    stem = stem.removesuffix(".gguf")
    return "".join(c if c.isalnum() or c in "-._" else "-" for c in stem.lower()) or "model"


# -------------------------------------------------------------------- loading
def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when available (sharded over all GPUs), else ``cpu``."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"--device {device} was requested but CUDA is not available; use --device cpu.")
    return device


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """``auto`` -> bfloat16 on GPU, float32 on CPU."""
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    except KeyError:
        raise ModelLoadError(f"Unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16.") from None


def hub_unavailable_reason(repo_id: str, timeout: float = 3.0) -> str | None:
    """Why ``repo_id`` cannot be loaded from the Hugging Face hub right now (None: it can, or it is cached).

    Checks the local cache, the offline switch and whether the hub's host resolves, so offline
    machines fail in seconds instead of after minutes of download retries.
    """
    import os
    import socket
    from urllib.parse import urlparse

    try:
        from huggingface_hub import constants, try_to_load_from_cache

        if isinstance(try_to_load_from_cache(repo_id, "config.json"), str):
            return None
        endpoint = constants.ENDPOINT
    except Exception:  # an unusual huggingface_hub: let the real load decide
        return None
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return f"{repo_id} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set"
    host = urlparse(endpoint).hostname or "huggingface.co"
    previous = socket.getdefaulttimeout()
    try:
        socket.setdefaulttimeout(timeout)
        socket.getaddrinfo(host, 443)
    except OSError as exc:
        return f"the Hugging Face hub ({host}) cannot be reached ({exc}) and {repo_id} is not cached locally"
    finally:
        socket.setdefaulttimeout(previous)
    return None


def _looks_like_path(spec: str) -> bool:
    return spec.startswith(("/", "./", "../", "~")) or spec.endswith(".gguf") or Path(spec).exists()


def load_model(
    spec: str = "embedded",
    *,
    device: str = "auto",
    dtype: str = "auto",
    chat_template: str | Path | None = None,
    trust_remote_code: bool = False,
    refusal_prefixes: Sequence[str] = DEFAULT_REFUSAL_PREFIXES,
) -> ModelAdapter:
    """Load a causal LM and its tokenizer and wrap them in a ``ModelAdapter``.

    Args:
        spec: ``embedded`` (default, Qwen2.5-Coder-0.5B-Instruct), ``embedded:1.5b``, a hub id,
            a local model folder, or a ``.gguf`` file.
        device: ``auto`` (all GPUs of this host, else CPU), ``cpu`` or ``cuda:N``.
        dtype: ``auto`` (bfloat16 on GPU, float32 on CPU), ``float32``, ``bfloat16``, ``float16``.
        chat_template: a Jinja template file for tokenizers without one.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    load_kwargs: dict = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code}
    if device == "cuda":
        load_kwargs["device_map"] = "auto"
    elif device != "cpu":
        load_kwargs["device_map"] = {"": device}
    fingerprint_extra = ""
    alias = None

    embedded = embedded_models.parse_embedded_spec(spec)
    if embedded is not None:
        path: str | Path = embedded_models.ensure_converted(embedded)
        gguf_file = None
        alias = embedded.alias
        fingerprint_extra = embedded.sha256
    elif _looks_like_path(spec):
        path = Path(spec).expanduser()
        if not path.exists():
            raise ModelLoadError(f"No model at {path}: give an existing folder, a .gguf file, a hub id or 'embedded'.")
        gguf_file = None
        if path.is_file():
            if path.suffix != ".gguf":
                raise ModelLoadError(f"{path} is a file but not a .gguf; give a model folder or a .gguf file.")
            gguf_file, path = path.name, path.parent
    else:
        path, gguf_file = spec, None
        if reason := hub_unavailable_reason(spec):
            raise ModelLoadError(f"Cannot load {spec!r}: {reason}. Give a local folder, a .gguf file or 'embedded'.")

    try:
        config = AutoConfig.from_pretrained(path, gguf_file=gguf_file, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"Could not load a model config for {spec!r}: {exc}. Give an existing local folder, a .gguf "
            "file, a hub id you can reach, or 'embedded'."
        ) from exc
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not trust_remote_code:
        raise ModelLoadError(
            f"{spec!r} is a {config.model_type!r} model, which has no causal-LM head in transformers; "
            "refusal-directions needs a decoder-only instruction-tuned model."
        )
    tokenizer = AutoTokenizer.from_pretrained(path, gguf_file=gguf_file, trust_remote_code=trust_remote_code)
    if chat_template is not None:
        template_path = Path(chat_template)
        if not template_path.is_file():
            raise ModelLoadError(f"Chat template file {template_path} does not exist.")
        tokenizer.chat_template = template_path.read_text()
    if device.startswith("cuda"):
        load_kwargs.setdefault("attn_implementation", "sdpa")
    log.info("Loading %s (%s, %s)", spec, device, torch_dtype)
    model = AutoModelForCausalLM.from_pretrained(path, gguf_file=gguf_file, **load_kwargs)
    if device == "cpu":
        model.to("cpu")
    model.eval()
    model.requires_grad_(False)
    return ModelAdapter(
        model,
        tokenizer,
        name=spec,
        alias=alias,
        refusal_prefixes=refusal_prefixes,
        fingerprint_extra=fingerprint_extra,
    )
