"""DiaBlo's backend: `D` is zero except `n` full diagonal channel blocks.

Block `b` covers output channels `b·out/n ...` and input channels `b·in/n ...` with the whole kernel,
so an additive update is also a grouped convolution (or a batched matmul) with `groups = n`.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import CONV, Backend, channel_blocks, from_parts


class BlockDiag(Backend):
    """Zero blocks, so `D = 0` (DiaBlo initialises its blocks to zero)."""

    name = "blockdiag"
    since = 2
    tensor_names = r"blockdiag_blocks"

    def __init__(self, shape: tuple[int, ...], rank: object = None, blocks: int = 8):
        super().__init__(shape)
        n = channel_blocks(blocks, self.shape, self.name)
        self.blockdiag_blocks = nn.Parameter(
            torch.zeros(n, self.shape[0] // n, self.shape[1] // n, *self.shape[2:])
        )

    def delta(self, coefficient: float | torch.Tensor = 1.0) -> torch.Tensor:
        n, rows, cols, *kernel = self.blockdiag_blocks.shape
        blocks = coefficient * self.blockdiag_blocks
        delta = blocks.new_zeros(n, rows, n, cols, *kernel)
        index = torch.arange(n, device=blocks.device)
        delta[index, :, index] = blocks  # advanced indices around a slice: (n, rows, cols, *kernel)
        return delta.reshape(self.shape)

    def can_bypass(self, layer: nn.Module) -> bool:
        return getattr(layer, "groups", 1) == 1 and getattr(layer, "padding_mode", "zeros") == "zeros"

    def bypass(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        n = self.blockdiag_blocks.shape[0]
        if isinstance(layer, nn.Linear):
            grouped = x.reshape(*x.shape[:-1], n, -1)
            return torch.einsum("...bj,bij->...bi", grouped, self.blockdiag_blocks).flatten(-2)
        weight = self.blockdiag_blocks.reshape(self.shape[0], self.shape[1] // n, *self.shape[2:])
        return CONV[x.ndim - 2](x, weight, None, layer.stride, layer.padding, layer.dilation, n)

    def bypass_flops(self, in_positions: int, out_positions: int) -> int:
        return out_positions * self.blockdiag_blocks.numel()

    @classmethod
    def combine(cls, parts):
        return from_parts(cls, parts, {"blockdiag_blocks": sum(w * b.blockdiag_blocks for b, w in parts)})

    @classmethod
    def summary(cls, shapes):
        return f"blockdiag {shapes['blockdiag_blocks'][0]} blocks"

    @classmethod
    def expected_shapes(cls, shape, tensors):
        found = tensors.get("blockdiag_blocks", ())
        n = found[0] if len(found) == len(shape) + 1 and found[0] > 0 else -1
        if n < 1 or shape[0] % n or shape[1] % n:
            return {
                "blockdiag_blocks": f"(n, {shape[0]}/n, {shape[1]}/n, *{tuple(shape[2:])}) with n dividing both"
            }
        return {"blockdiag_blocks": (n, shape[0] // n, shape[1] // n, *shape[2:])}
