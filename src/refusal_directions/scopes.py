"""Scopes: where a removal or reflection is applied (DESIGN.md §7, §11).

Kept free of torch so the configuration can validate scope names cheaply.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Protocol, Sequence


class Ranked(Protocol):
    """What a scope reads of a ranked candidate (``selection.Candidate``)."""

    layer: int


class ScopeError(ValueError):
    """A scope that cannot be built from the ranking."""


@dataclass(frozen=True)
class Scope:
    """Where a removal or reflection is applied (DESIGN.md §7, §11).

    "one": the layer of the first component of the unfiltered ranking; "top" with ``fraction``
    f: the layers of its first n = max(1, ceil(f * pool)) components, pool = the shortest ranked
    list over the methods (the reference's shared count; f = 0.01 is the reference tool's
    effective default, its ``--top_percentage 1.0``); "all": every layer; "window" with
    ``half_width`` n: the contiguous layers l0 - n .. l0 + n around the first component's layer l0
    (clipped to the model), each with that component's direction.
    """

    kind: Literal["one", "top", "all", "window"]
    fraction: float | None = None
    half_width: int | None = None

    @classmethod
    def parse(cls, text: str) -> "Scope":
        """``one``, ``all``, ``top:<fraction in (0, 1]>`` or ``window:<n >= 0>``."""
        if text in ("one", "all"):
            return cls(text)  # type: ignore[arg-type]
        if text.startswith("window:") and text[7:].isdigit():
            return cls("window", half_width=int(text[7:]))
        if text.startswith("top:"):
            try:
                fraction = float(text[4:])
            except ValueError:
                fraction = math.nan
            if 0 < fraction <= 1:
                return cls("top", fraction)
        raise ValueError(f"Unknown scope {text!r}: use one, all, top:<fraction> with a fraction in (0, 1], "
                         "e.g. top:0.5 (half) or top:0.01 (the reference tool's default), or window:<n> (the "
                         "first component's layer +- n).")

    @property
    def label(self) -> str:
        """A short name for intervention names and folders: one, top0.5, all, window2."""
        if self.kind == "window":
            return f"window{self.half_width}"
        return f"top{self.fraction:g}" if self.kind == "top" else self.kind

    def components(self, ranked: Sequence[Ranked], pool_size: int) -> list[Ranked]:
        """The ranked components in scope ([] for "all", which means every layer; the first one for "window")."""
        if self.kind == "all":
            return []
        n = max(1, math.ceil(pool_size * float(self.fraction))) if self.kind == "top" else 1
        if n > len(ranked):
            raise ScopeError(f"Scope {self.label} needs {n} components but only {len(ranked)} are ranked.")
        return list(ranked[:n])

    def layers(self, ranked: Sequence[Ranked], pool_size: int, n_layers: int) -> list[int]:
        """The layers in scope, ascending."""
        if self.kind == "all":
            return list(range(n_layers))
        if self.kind == "window":
            centre = self.components(ranked, pool_size)[0].layer
            return list(range(max(0, centre - int(self.half_width or 0)), min(n_layers, centre + int(self.half_width or 0) + 1)))
        return sorted({c.layer for c in self.components(ranked, pool_size)})
