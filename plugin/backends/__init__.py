"""Backends, one per file: how an update `D` with the shape of a weight is built (FORMAT.md's table)."""

import inspect

from .base import Backend, tensorly
from .blockdiag import BlockDiag
from .blocklowrank import BlockLowRank
from .continued import Continued, frozen_part, principal_start, trained_part
from .cp import CP
from .hadamard import Hadamard
from .lowrank import LowRank
from .rowcol import RowCol
from .tucker import Tucker

BACKEND_CLASSES: dict[str, type[Backend]] = {
    cls.name: cls for cls in (LowRank, Tucker, CP, Hadamard, BlockDiag, BlockLowRank, RowCol)
}


def accepted_options(cls: type[Backend], options: dict[str, object]) -> dict[str, object]:
    """The keyword options (`init`, `blocks`, `vectors`, `weight`) that `cls`'s constructor takes."""
    parameters = inspect.signature(cls.__init__).parameters
    return {name: value for name, value in options.items() if name in parameters}


def backend_owning(tensor_name: str) -> type[Backend] | None:
    """The backend whose tensors include `tensor_name` (FORMAT.md: the backend is told by its names)."""
    for cls in BACKEND_CLASSES.values():
        if cls.owns(tensor_name):
            return cls
    return None


__all__ = [
    "BACKEND_CLASSES",
    "CP",
    "Continued",
    "Backend",
    "BlockDiag",
    "BlockLowRank",
    "Hadamard",
    "LowRank",
    "RowCol",
    "Tucker",
    "accepted_options",
    "backend_owning",
    "frozen_part",
    "principal_start",
    "tensorly",
    "trained_part",
]
