"""GraLoRA's backend (BHRA's under `lie`): an n x n grid of channel blocks, each with its own LoRA.

Channel block `(a, b)` of `D` (output channels `a·out/n ...`, input channels `b·in/n ...`, the whole
kernel) is `block_up[a, b] @ block_down[a, b]`. With per-block rank `r/n` it has LoRA-rank-r's
parameter count but reaches rank up to `n·r`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import Rank, matrix_rank
from .base import Backend, channel_blocks, from_parts


class BlockLowRank(Backend):
    """`rank` is the total rank r, as in GraLoRA: each block gets `max(1, r // n)`. Kaiming down,
    zero up, so `D = 0`."""

    name = "blocklowrank"
    since = 2
    tensor_names = r"block_up|block_down"

    def __init__(self, shape: tuple[int, ...], rank: Rank = 8, blocks: int = 2):
        super().__init__(shape)
        n = channel_blocks(blocks, self.shape, self.name)
        rows, width = self.shape[0] // n, math.prod(self.shape[1:]) // n
        r = matrix_rank(max(1, matrix_rank(rank, self.shape, self.name) // n), (rows, width), self.name)
        self.block_up = nn.Parameter(torch.zeros(n, n, rows, r))
        self.block_down = nn.Parameter(torch.empty(n, n, r, width))
        for a in range(n):
            for b in range(n):
                nn.init.kaiming_uniform_(self.block_down.data[a, b], a=math.sqrt(5))

    def delta(self, coefficient: float | torch.Tensor = 1.0) -> torch.Tensor:
        # (a, o, b, q): rows a·out/n + o; columns b·width + q are block b's input channels and
        # kernel positions, in the weight's own (channel, kernel) order.
        grid = torch.einsum("abor,abrq->aobq", coefficient * self.block_up, self.block_down)
        return grid.reshape(self.shape)

    def delta_flops(self) -> int:
        return math.prod(self.shape) * self.block_up.shape[-1]

    def can_bypass(self, layer: nn.Module) -> bool:
        return isinstance(layer, nn.Linear)

    def bypass(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        n = self.block_up.shape[0]
        hidden = torch.einsum("...bq,abrq->...abr", x.reshape(*x.shape[:-1], n, -1), self.block_down)
        return torch.einsum("...abr,abor->...ao", hidden, self.block_up).flatten(-2)

    def bypass_flops(self, in_positions: int, out_positions: int) -> int:
        return out_positions * (self.block_up.numel() + self.block_down.numel())

    @classmethod
    def combine(cls, parts):
        # Each block's LoRA concatenates its factors, as `lowrank` does.
        up = torch.cat([w * b.block_up for b, w in parts], -1)
        return from_parts(
            cls, parts, {"block_up": up, "block_down": torch.cat([b.block_down for b, _ in parts], 2)}
        )

    def expansion_factors(self):
        return [self.block_up, self.block_down.mT]

    @classmethod
    def summary(cls, shapes):
        n, _, _, r = shapes["block_up"]
        return f"blocklowrank {n}x{n} blocks r={r}"

    @classmethod
    def expected_shapes(cls, shape, tensors):
        up = tensors.get("block_up", ())
        n = up[0] if len(up) == 4 and up[0] > 0 else -1
        r = up[3] if len(up) == 4 else -1
        if n < 1 or shape[0] % n or shape[1] % n:
            need = f"(n, n, {shape[0]}/n, r) with n dividing {shape[0]} and {shape[1]}"
            return {"block_up": need, "block_down": "(n, n, r, in/n * kernel)"}
        width = math.prod(shape[1:]) // n
        return {"block_up": (n, n, shape[0] // n, r), "block_down": (n, n, r, width)}
