"""SSB's backend (also SSL's and (IA)³'s): `D[j_0, j_1, ...] = row[j_0] + col[j_1]`.

Under `lie`/`exp` that is `diag(e^row) W diag(e^col)` per kernel position: a re-weighting of output and
input channels, with `out + in` parameters. An absent vector is 0.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .base import Backend, from_parts

VECTORS = ("both", "row", "col")


class RowCol(Backend):
    """Zero vectors, so `D = 0` (SSB's scales start at 1). `vectors` picks which ones exist."""

    name = "rowcol"
    since = 2
    tensor_names = r"row|col"

    def __init__(self, shape: tuple[int, ...], rank: object = None, vectors: str = "both"):
        super().__init__(shape)
        if vectors not in VECTORS:
            raise ValueError(f"rowcol: unknown vectors {vectors!r}; choose one of {VECTORS}")
        if vectors in ("both", "row"):
            self.row = nn.Parameter(torch.zeros(self.shape[0]))
        if vectors in ("both", "col"):
            self.col = nn.Parameter(torch.zeros(self.shape[1]))

    def factors(self, coefficient: float | torch.Tensor = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        # row[j_0]·1 + 1·col[j_1]: a product of rank 2 (or 1), so the layer can rebuild in place.
        kernel = math.prod(self.shape[2:])
        lefts, rights = [], []
        if hasattr(self, "row"):
            lefts.append(coefficient * self.row)
            rights.append(self.row.new_ones(self.shape[1] * kernel))
        if hasattr(self, "col"):
            lefts.append(self.col.new_ones(self.shape[0]))
            rights.append((coefficient * self.col).repeat_interleave(kernel))
        return torch.stack(lefts, 1), torch.stack(rights, 0)

    def delta_flops(self) -> int:
        return 2 * math.prod(self.shape)

    @classmethod
    def combine(cls, parts):
        names = [name for name in ("row", "col") if hasattr(parts[0][0], name)]
        return from_parts(cls, parts, {n: sum(w * getattr(b, n) for b, w in parts) for n in names})

    @classmethod
    def summary(cls, shapes):
        return "rowcol " + "+".join(name for name in ("row", "col") if name in shapes)

    @classmethod
    def expected_shapes(cls, shape, tensors):
        sizes = {"row": (shape[0],), "col": (shape[1],)}
        present = {name: size for name, size in sizes.items() if name in tensors}
        return present or sizes
