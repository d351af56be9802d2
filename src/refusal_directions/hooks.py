"""The one place where PyTorch hooks are registered.

Two kinds of hook points (see ``models.LayerHookPoints``):

* ``"input"``: a forward pre-hook on a decoder layer; it sees (and may replace) the residual
  stream entering the layer, passed either as the first positional argument or as
  ``hidden_states=`` (both forms occur across transformers versions and architectures);
* ``"output"``: a forward hook on a write-point module; its output is a tensor or a tuple whose
  first element is the tensor that gets added to the residual stream.

A hook function maps a ``[batch, seq, d_model]`` tensor to a tensor of the same shape, or
returns None to leave it unchanged (for read-only hooks such as activation caching).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Literal

from torch import Tensor, nn

HookFn = Callable[[Tensor], "Tensor | None"]


@dataclass(frozen=True)
class Hook:
    module: nn.Module
    kind: Literal["input", "output"]
    fn: HookFn


def _input_hook(fn: HookFn):
    def hook(module, args, kwargs):
        if args:
            new = fn(args[0])
            return None if new is None else ((new, *args[1:]), kwargs)
        new = fn(kwargs["hidden_states"])
        return None if new is None else (args, {**kwargs, "hidden_states": new})

    return hook


def _output_hook(fn: HookFn):
    def hook(module, args, output):
        if isinstance(output, tuple):
            new = fn(output[0])
            return None if new is None else (new, *output[1:])
        return fn(output)

    return hook


@contextmanager
def apply_hooks(hooks: Iterable[Hook]) -> Iterator[None]:
    """Register ``hooks`` for the duration of the block; always removes them."""
    handles = []
    try:
        for hook in hooks:
            if hook.kind == "input":
                handles.append(hook.module.register_forward_pre_hook(_input_hook(hook.fn), with_kwargs=True))
            else:
                handles.append(hook.module.register_forward_hook(_output_hook(hook.fn)))
        yield
    finally:
        for handle in handles:
            handle.remove()
