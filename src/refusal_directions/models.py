"""Load any Hugging Face causal LM and derive everything the pipeline needs from it.

``load_model`` accepts a hub id, a local folder, a ``.gguf`` file or ``embedded[:key]``.
``ModelAdapter`` then derives, from the model and tokenizer alone (no per-family classes):

* chat formatting through the tokenizer's chat template;
* the post-instruction ("eoi") tokens: what the template puts after the user message;
* the refusal tokens: the first token of a reply starting with "I" or "As";
* the decoder layers (through the text config on multimodal checkpoints), the block input of
  each layer (the residual stream entering it), and its *write points*: the modules whose
  outputs are added to the residual stream (attention and MLP or mixture-of-experts outputs,
  or the post-sublayer norms on Gemma-2/3-, GLM-4- and OLMo-2-style layers). Names only give a
  first guess: ``check_write_points`` verifies the points on the real model when the adapter is
  built, finds them from the layer's computation where the guess is wrong, or refuses;
* ``d_model``, ``n_layers``, and the final norm / unembedding for reading logits.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Mapping, Sequence

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
    ``names``: the writes' attribute names in the layer (for messages and ``models show``).
    ``checked``: True once a forward of the real model has verified these points
    (``check_write_points``): the layer's increment is the sum of the writes' outputs (each
    times a constant, e.g. Granite's ``residual_multiplier``) and an ablation there leaves no
    component of a test direction in the stream. Weight baking requires it.
    """

    block: nn.Module
    writes: tuple[nn.Module, ...]
    post_sublayer_norms: bool
    names: tuple[str, ...] = ()
    checked: bool = False


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
    text_config = _text_config(getattr(model, "config", None))
    raise ModelLoadError(
        f"Could not find the {n_layers} decoder layers of {type(model).__name__} (num_hidden_layers of "
        f"{type(text_config).__name__}; found ModuleLists of lengths {[len(c) for c in candidates]})."
    )


def find_decoder(model: nn.Module, layers: nn.ModuleList) -> nn.Module:
    """The module whose child is the decoder-layer list ``layers`` (``get_decoder()`` when it is)."""
    get_decoder = getattr(model, "get_decoder", None)
    if callable(get_decoder):
        try:
            decoder = get_decoder()
        except (AttributeError, NotImplementedError):
            decoder = None
        if decoder is not None and getattr(decoder, "layers", None) is layers:
            return decoder
    for module in model.modules():
        if any(child is layers for child in module.children()):
            return module
    raise ModelLoadError(f"Could not find the decoder stack that holds the layers of {type(model).__name__}.")


def find_hook_points(layer: nn.Module) -> LayerHookPoints:
    """The write points of one decoder layer, guessed from module names (see module docstring).

    A first guess only: ``check_write_points`` verifies it on the real model and, where it is
    wrong, finds the right points from the layer's computation instead of its names.
    """
    children = dict(layer.named_children())
    if "post_feedforward_layernorm" in children or "pre_feedforward_layernorm" in children:
        if all(name in children for name in _POST_SUBLAYER_NORMS):
            return LayerHookPoints(layer, tuple(children[n] for n in _POST_SUBLAYER_NORMS), True, _POST_SUBLAYER_NORMS)
    attention = next((n for n in _ATTENTION_NAMES if n in children), None)
    mlp = next((n for n in _MLP_NAMES if n in children), None)
    if attention is None or mlp is None:
        raise ModelLoadError(
            f"Could not find the attention and MLP modules of {type(layer).__name__} "
            f"(children: {sorted(children)})."
        )
    return LayerHookPoints(layer, (children[attention], children[mlp]), False, (attention, mlp))


# -------------------------------------------------------------------- write-point check
_MAX_WRITES = 3  # the largest set of a layer's children searched as its write points
_CHECK_TOKENS = 16  # tokens of the check's forward


def dtype_tolerances(dtype: torch.dtype) -> tuple[float, float]:
    """``(relative, leak)`` tolerances of the write-point check for a model computing in ``dtype``.

    ``relative``: the part of a layer's increment its writes may leave unexplained, beyond
    rounding of the residual additions (``4 eps (|x_in| + |x_out|)`` per token, added separately);
    ``leak``: the largest component of an ablated unit direction left in the stream, relative to
    the stream's norm, per token. float32 rounding leaves about 1e-7; bfloat16 about 1e-3.
    """
    return {
        torch.float64: (1e-8, 1e-10),
        torch.float32: (1e-3, 1e-5),
        torch.float16: (2e-2, 5e-3),
        torch.bfloat16: (5e-2, 3e-2),
    }.get(dtype, (5e-2, 3e-2))


def _first_tensor(value) -> Tensor | None:
    """A module's output as hooks see it: the tensor itself or a tuple's first element."""
    if isinstance(value, (tuple, list)) and value:
        value = value[0]
    return value if isinstance(value, Tensor) else None


def _is_norm_like(module: nn.Module) -> bool:
    """Whether ``module`` can only rescale/normalise (no matrix parameter): a norm, not a sublayer."""
    return not any(p.dim() >= 2 for p in module.parameters())


@dataclass
class _LayerTrace:
    """What one decoder layer saw and produced in the check's forward (float64 on its device)."""

    block_input: Tensor | None = None
    block_output: Tensor | None = None
    children: dict[str, Tensor | None] | None = None  # None value: called more than once


def _fit_writes(trace: _LayerTrace, names: Sequence[str], dtype: torch.dtype) -> tuple[bool, float]:
    """Whether the layer's increment is ``sum_i c_i * output_i`` over ``names`` (constant c_i,
    least squares), within rounding; and the relative residual ``|r|_F / |increment|_F``."""
    x_in, x_out = trace.block_input, trace.block_output
    increment = (x_out - x_in).reshape(-1, x_out.shape[-1])
    columns = []
    for name in names:
        value = trace.children.get(name) if trace.children else None
        if value is None or value.numel() != increment.numel():
            return False, math.inf
        columns.append(value.reshape(-1))
    A = torch.stack(columns, dim=1)
    coefficients = torch.linalg.lstsq(A, increment.reshape(-1, 1)).solution
    if not torch.isfinite(coefficients).all() or (coefficients.abs() < 1e-3).any():
        return False, math.inf
    residual = (increment.reshape(-1) - (A @ coefficients).reshape(-1)).reshape(increment.shape)
    relative, _ = dtype_tolerances(dtype)
    eps = torch.finfo(dtype).eps if dtype.is_floating_point else 0.0
    scale = x_in.reshape(increment.shape).norm(dim=-1) + x_out.reshape(increment.shape).norm(dim=-1)
    bound = relative * increment.norm(dim=-1) + 4 * eps * scale + 1e-30
    passes = bool((residual.norm(dim=-1) <= bound).all())
    return passes, float(residual.norm() / increment.norm().clamp_min(1e-30))


def _choose_writes(layer: nn.Module, trace: _LayerTrace, guess: LayerHookPoints | None, dtype: torch.dtype
                   ) -> LayerHookPoints:
    """The write points of one layer from its traced forward.

    Every set of up to ``_MAX_WRITES`` children called once, with outputs of the residual's size,
    is fitted to the layer's increment (``_fit_writes``). The name-based ``guess`` is kept when it
    passes and no set fits much better (4x smaller residual); otherwise the best passing set,
    where a larger set must halve the residual of a smaller one (rounding lets a subset pass in
    low precision: in bfloat16 a small attention write hides in the rounding of a large stream).
    """
    if trace.block_input is None or trace.block_output is None or trace.children is None:
        raise ModelLoadError(f"The write-point check did not see a forward of {type(layer).__name__}.")
    numel = trace.block_output.numel()
    candidates = [n for n, v in trace.children.items() if v is not None and v.numel() == numel]
    guess_names = tuple(guess.names) if guess is not None else ()
    guess_passes, guess_residual = _fit_writes(trace, guess_names, dtype) if guess_names else (False, math.inf)
    best: tuple[float, tuple[str, ...]] | None = None
    for size in range(1, _MAX_WRITES + 1):
        fits = [(residual, names) for names in itertools.combinations(candidates, size)
                for passes, residual in [_fit_writes(trace, names, dtype)] if passes]
        if fits and (best is None or min(fits)[0] < best[0] / 2):
            best = min(fits)
    eps = torch.finfo(dtype).eps if dtype.is_floating_point else 0.0
    if guess_passes and (best is None or not (best[0] < guess_residual / 4 and guess_residual > 10 * eps)):
        names = guess_names
    elif best is not None:
        names = best[1]
    else:
        increment = (trace.block_output - trace.block_input).norm().item()
        raise ModelLoadError(
            f"{type(layer).__name__}: no set of its sublayers' outputs adds up to what the layer adds to the "
            f"residual stream (increment norm {increment:.3g}; children tried: {candidates}), so refusal "
            "directions cannot be removed exactly from this architecture. It is not supported."
        )
    children = dict(layer.named_children())
    writes = tuple(children[n] for n in names)
    norms = any(_is_norm_like(w) for w in writes)
    return LayerHookPoints(layer, writes, norms, tuple(names), checked=True)


def _ablation_hooks(adapter: "ModelAdapter", points: list[LayerHookPoints], direction: Tensor) -> list:
    """The hooks of ``interventions.Removal`` ablating ``direction`` at every layer's ``points``."""
    from .directions.base import Eraser
    from .interventions import Removal

    previous, adapter.hook_points = adapter.hook_points, points
    try:
        removal = Removal(Eraser(direction[:, None], direction[:, None]), list(range(len(points))))
        return removal.hooks(adapter)
    finally:
        adapter.hook_points = previous


@torch.no_grad()
def _check_forward(adapter: "ModelAdapter", input_ids: Tensor, points: list[LayerHookPoints] | None,
                   direction: Tensor) -> tuple[list[_LayerTrace], list[float]]:
    """One forward, with ``direction`` ablated at ``points`` (None: no edit), that records every
    layer's input, output and direct children's outputs (as added: after the edit), and per layer
    the largest ``|x . r| / |x|`` over tokens of its block input and output."""
    from .hooks import Hook, apply_hooks

    layers = adapter.layers
    traces = [_LayerTrace(children={}) for _ in layers]
    leaks = [0.0] * len(layers)

    def record_child(trace: _LayerTrace, name: str):
        def fn(value):
            tensor = _first_tensor(value)
            if name in trace.children or tensor is None or not tensor.is_floating_point():
                trace.children[name] = None
            else:
                trace.children[name] = tensor.detach().to(torch.float64)
        return fn

    def record(index: int, attribute: str):
        def fn(value):
            tensor = _first_tensor(value)
            if tensor is None:
                return
            trace = traces[index]
            if getattr(trace, attribute) is None:
                setattr(trace, attribute, tensor.detach().to(torch.float64))
            x = tensor.detach().float()
            leak = ((x @ direction.to(x.device)).abs() / x.norm(dim=-1).clamp_min(1e-30)).max().item()
            leaks[index] = max(leaks[index], leak)
        return fn

    hooks = _ablation_hooks(adapter, points, direction) if points is not None else []
    for i, (layer, trace) in enumerate(zip(layers, traces)):
        hooks.append(Hook(layer, "input", record(i, "block_input")))  # after the edit: sees the edited input
        hooks.append(Hook(layer, "output", record(i, "block_output")))
        hooks.extend(Hook(child, "output", record_child(trace, name)) for name, child in layer.named_children())
    with apply_hooks(hooks):
        adapter.model(input_ids=input_ids, use_cache=False)
    return traces, leaks


def check_write_points(adapter: "ModelAdapter") -> list[LayerHookPoints]:
    """Verify (and where needed find) every layer's write points on the real model.

    A forward of a few tokens, in the model's dtype, with a random unit direction ablated at
    the name-based guesses (``find_hook_points``) as ``interventions.Removal`` ablates at every
    layer, records each layer's block input and output and its children's outputs. Per layer:

    1. the increment ``output - input`` must be the sum of the writes' outputs (each times a
       constant), to rounding; where the guess fails (e.g. GLM-4 normalises sublayer outputs with
       norms of other names), the smallest set of children whose outputs do add up is used;
    2. no block input or output may keep a component of the ablated direction
       (``dtype_tolerances``); where the points changed, a second forward checks them.

    Raises ``ModelLoadError`` naming the layer class where no points pass.
    """
    layers, dtype = adapter.layers, adapter.dtype
    text = adapter.format_prompt("Hello! Can you tell me about the weather today?")
    ids = adapter.tokenizer(text, add_special_tokens=False)["input_ids"][:_CHECK_TOKENS] or [0]
    n_vocab = adapter.model.get_input_embeddings().weight.shape[0]
    input_ids = torch.tensor([[i % n_vocab for i in ids]], device=adapter.input_device)
    direction = torch.randn(adapter.d_model, generator=torch.Generator().manual_seed(1234))
    direction = direction / direction.norm()

    guesses: list[LayerHookPoints | None] = []
    for layer in layers:
        try:
            guesses.append(find_hook_points(layer))
        except ModelLoadError:
            guesses.append(None)
    known = all(g is not None for g in guesses)
    try:
        traces, leaks = _check_forward(adapter, input_ids, guesses if known else None, direction)  # type: ignore[arg-type]
    except Exception as exc:  # a multimodal model that cannot run on text alone, an exotic layer...
        raise ModelLoadError(
            f"{type(adapter.model).__name__}: a text-only forward of a few tokens failed ({type(exc).__name__}: {exc}); "
            "refusal-directions runs the model on text alone, which this model class does not support."
        ) from exc
    points = [_choose_writes(layer, trace, guess, dtype) for layer, trace, guess in zip(layers, traces, guesses)]
    changed = [i for i, (p, g) in enumerate(zip(points, guesses)) if g is None or p.names != g.names]
    if changed:
        first = changed[0]
        log.warning("%s: write points %s at %d layer(s), found from the layers' computation (the names suggested %s).",
                    type(layers[first]).__name__, list(points[first].names), len(changed),
                    list(guesses[first].names) if guesses[first] is not None else "none")
        _, leaks = _check_forward(adapter, input_ids, points, direction)
    _, tolerance = dtype_tolerances(dtype)
    worst = max(range(len(layers)), key=lambda i: leaks[i])
    if not leaks[worst] <= tolerance:
        raise ModelLoadError(
            f"{type(layers[worst]).__name__}: ablating a direction at the block inputs and the write points "
            f"{list(points[worst].names)} leaves {leaks[worst]:.2g} of it (relative) in the residual stream "
            f"at layer {worst} (tolerance {tolerance:g} in {str(dtype).replace('torch.', '')}); this layer "
            "does not add its sublayer outputs to the stream in a way refusal-directions can edit exactly. "
            "It is not supported."
        )
    return points


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
        self.hook_points: list[LayerHookPoints] = []  # set (verified) by check_write_points below
        self.final_norm: nn.Module = self._find_final_norm()
        self.logit_softcap: float | None = getattr(text_config, "final_logit_softcapping", None)
        scale = getattr(text_config, "logit_scale", None)  # Cohere multiplies, Granite divides
        scaling = getattr(text_config, "logits_scaling", None)
        self.logit_scale: float = (float(scale) if isinstance(scale, (int, float)) else 1.0) / (
            float(scaling) if isinstance(scaling, (int, float)) and scaling else 1.0)
        self.eoi_token_ids: list[int] = self._derive_eoi_tokens()
        self.refusal_token_ids: list[int] = self._derive_refusal_tokens(refusal_prefixes)
        self.hook_points = check_write_points(self)

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
    @cached_property
    def decoder(self) -> nn.Module:
        """The decoder stack (embeddings, layers, final norm): the module that owns ``layers``.

        Its forward returns ``last_hidden_state`` (after the final norm), and hooks on the layers
        apply to it. ``get_decoder()`` is not enough: Llama-4's causal LM returns itself there.
        """
        return find_decoder(self.model, self.layers)

    def _find_final_norm(self) -> nn.Module:
        for owner in (self.decoder, getattr(self.model, "model", None), self.model):
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

    @torch.inference_mode()
    def last_logits(self, enc: Mapping[str, Tensor]) -> Tensor:
        """Float32 next-token logits ``[B, vocab]`` at the last position of each row of a batch.

        ``enc``: the tokenizer's batch (``input_ids`` and ``attention_mask`` [B, T], left-padded as
        ``encode`` makes them, so the last position is every row's last prompt token). One forward
        of the whole model, with its hooks, computing the LM head at that position only.
        """
        return self.model(**enc, logits_to_keep=1, use_cache=False).logits[:, -1].float()

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
        config = _text_config(self.model.config)  # multimodal models keep them in the text config
        layer_types = getattr(config, "layer_types", None) or []
        if any(kind != "full_attention" for kind in layer_types):
            return True
        return bool(getattr(config, "sliding_window", None)) and getattr(config, "use_sliding_window", True) is not False

    @property
    def pad_id(self) -> int:
        """The token id padding batches (the tokenizer's pad token, else 0)."""
        pad = self.tokenizer.pad_token_id
        return int(pad) if pad is not None else 0

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
            "write_point_names": list(self.hook_points[0].names),
            "post_sublayer_norms": any(p.post_sublayer_norms for p in self.hook_points),
            "fingerprint": self.fingerprint,
        }


def tied_embeddings(model: nn.Module) -> bool:
    """Whether the output head shares the input embedding matrix."""
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    return head is not None and getattr(head, "weight", None) is embedding.weight


@torch.no_grad()
def untie_embeddings(model: nn.Module) -> None:
    """Give the output head its own copy of a tied embedding matrix (before merging an adapter that
    edits the embedding: otherwise the merge changes the head too)."""
    head = model.get_output_embeddings()
    if tied_embeddings(model):
        head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
        for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
            config.tie_word_embeddings = False


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


def _model_class(config, spec: str, trust_remote_code: bool = False):
    """The auto class that builds a generating model with ``config``'s text stack.

    ``AutoModelForCausalLM`` where transformers has a causal LM for the model type (text models,
    and multimodal ones it maps there: Gemma-3, Llama-4, Mllama); else, for image-text-to-text
    checkpoints (Qwen2.5-VL, Mistral-3, LLaVA...), ``AutoModelForImageTextToText``, used on text
    only: the adapter then works on the text decoder (layers from ``config.get_text_config()``).
    """
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
    )

    if config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or trust_remote_code:
        return AutoModelForCausalLM
    if config.model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        log.info("%s is a multimodal %r model; using its text decoder (%s) on text only.", spec, config.model_type,
                 type(config.get_text_config()).__name__)
        return AutoModelForImageTextToText
    raise ModelLoadError(
        f"{spec!r} is a {config.model_type!r} model, which has no causal-LM head in transformers (nor an "
        "image-text-to-text one with a text decoder); refusal-directions needs a decoder-only instruction-tuned model."
    )


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
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    source = _model_source(spec)
    config = _load_config(source, trust_remote_code)
    model_class = _model_class(config, spec, trust_remote_code)
    tokenizer = _load_tokenizer(source, chat_template, trust_remote_code)
    log.info("Loading %s (%s, %s)", spec, device, torch_dtype)
    model = model_class.from_pretrained(source.path, gguf_file=source.gguf_file,
                                        **_load_kwargs(device, torch_dtype, trust_remote_code))
    if device == "cpu":
        model.to("cpu")
    model.eval()
    model.requires_grad_(False)
    return ModelAdapter(
        model,
        tokenizer,
        name=spec,
        alias=source.alias,
        refusal_prefixes=refusal_prefixes,
        fingerprint_extra=source.fingerprint_extra,
    )


@dataclass(frozen=True)
class _ModelSource:
    """Where a model spec's files are: ``path`` (a folder or hub id) and, for a GGUF file, its
    name inside ``path``; the embedded models' alias and checksum (part of the fingerprint)."""

    spec: str
    path: str | Path
    gguf_file: str | None = None
    alias: str | None = None
    fingerprint_extra: str = ""


def _model_source(spec: str) -> _ModelSource:
    """Resolve ``spec`` (embedded, a folder, a .gguf file or a hub id); ``ModelLoadError`` when it
    names no existing file or an unreachable hub id."""
    embedded = embedded_models.parse_embedded_spec(spec)
    if embedded is not None:
        return _ModelSource(spec, embedded_models.ensure_converted(embedded), alias=embedded.alias,
                            fingerprint_extra=embedded.sha256)
    if _looks_like_path(spec):
        path = Path(spec).expanduser()
        if not path.exists():
            raise ModelLoadError(f"No model at {path}: give an existing folder, a .gguf file, a hub id or 'embedded'.")
        if not path.is_file():
            return _ModelSource(spec, path)
        if path.suffix != ".gguf":
            raise ModelLoadError(f"{path} is a file but not a .gguf; give a model folder or a .gguf file.")
        return _ModelSource(spec, path.parent, gguf_file=path.name)
    if reason := hub_unavailable_reason(spec):
        raise ModelLoadError(f"Cannot load {spec!r}: {reason}. Give a local folder, a .gguf file or 'embedded'.")
    return _ModelSource(spec, spec)


def _load_config(source: _ModelSource, trust_remote_code: bool):
    """The model's ``PretrainedConfig``; ``ModelLoadError`` with what to give instead."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source.path, gguf_file=source.gguf_file, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"Could not load a model config for {source.spec!r}: {exc}. Give an existing local folder, a .gguf "
            "file, a hub id you can reach, or 'embedded'."
        ) from exc


def _load_tokenizer(source: _ModelSource, chat_template: str | Path | None, trust_remote_code: bool):
    """The model's tokenizer, with the chat template of file ``chat_template`` if given."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source.path, gguf_file=source.gguf_file, trust_remote_code=trust_remote_code)
    if chat_template is not None:
        template_path = Path(chat_template)
        if not template_path.is_file():
            raise ModelLoadError(f"Chat template file {template_path} does not exist.")
        tokenizer.chat_template = template_path.read_text()
    return tokenizer


def _load_kwargs(device: str, torch_dtype: torch.dtype, trust_remote_code: bool) -> dict:
    """``from_pretrained`` arguments: dtype, device placement (``auto`` sharding over all GPUs for
    ``cuda``), SDPA attention on GPU."""
    kwargs: dict = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code}
    if device == "cuda":
        kwargs["device_map"] = "auto"
    elif device != "cpu":
        kwargs["device_map"] = {"": device}
    if device.startswith("cuda"):
        kwargs.setdefault("attn_implementation", "sdpa")
    return kwargs
