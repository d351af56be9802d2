"""Direction-finding methods; each returns a ``DirectionSet`` (see ``base``)."""

from .base import METHODS, DirectionSet, Eraser

__all__ = ["METHODS", "DirectionSet", "Eraser"]
