"""Compositions, one per file: how an adapter's update meets the weight (FORMAT.md)."""

from .additive import Additive
from .base import Composition, Term, all_finite, compose
from .dora import Dora
from .lie import LIE_MAPS, Lie

COMPOSITION_CLASSES: dict[str, type[Composition]] = {cls.name: cls for cls in (Additive, Lie, Dora)}


def composition_from(metadata: dict[str, str]) -> Composition:
    """The composition a file header (or a config, in the same fields) names."""
    name = metadata.get("composition")
    if name not in COMPOSITION_CLASSES:
        raise ValueError(f"unknown composition {name!r}; expected one of {tuple(COMPOSITION_CLASSES)}")
    return COMPOSITION_CLASSES[name].from_metadata(metadata)


__all__ = [
    "COMPOSITION_CLASSES",
    "LIE_MAPS",
    "Additive",
    "Composition",
    "Dora",
    "Lie",
    "Term",
    "all_finite",
    "compose",
    "composition_from",
]
