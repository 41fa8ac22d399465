"""LoRA's backend: `D = reshape(lora_up @ lora_down, W.shape)`."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import Rank, matrix_rank
from .base import (
    Backend,
    factored_bypass_flops,
    fan_in,
    from_parts,
    principal_triplets,
    scaled,
    two_products,
)


class LowRank(Backend):
    """Random down (Kaiming, as LoRA), zero up, so `D = 0`."""

    name = "lowrank"
    tensor_names = r"lora_down|lora_up"

    def __init__(self, shape: tuple[int, ...], rank: Rank = 8):
        super().__init__(shape)
        r = matrix_rank(rank, self.shape, self.name)
        self.lora_down = nn.Parameter(torch.empty(r, fan_in(self.shape)))
        self.lora_up = nn.Parameter(torch.zeros(self.shape[0], r))
        nn.init.kaiming_uniform_(self.lora_down, a=math.sqrt(5))

    def factors(self, coefficient: float | torch.Tensor = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        return scaled(self.lora_up, coefficient), self.lora_down

    def delta_flops(self) -> int:
        return math.prod(self.shape) * self.lora_up.shape[1]

    def can_bypass(self, layer: nn.Module) -> bool:
        return getattr(layer, "groups", 1) == 1

    def bypass(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return two_products(layer, x, self.lora_up, self.lora_down, self.shape)

    def bypass_flops(self, in_positions: int, out_positions: int) -> int:
        return factored_bypass_flops(self, out_positions, self.lora_down.shape[0])

    @classmethod
    def combine(cls, parts):
        # Concatenated factors: [w_1 up_1, w_2 up_2, ...] @ [down_1; down_2; ...].
        up = torch.cat([w * b.lora_up for b, w in parts], 1)
        return from_parts(
            cls, parts, {"lora_up": up, "lora_down": torch.cat([b.lora_down for b, _ in parts])}
        )

    @torch.no_grad()
    def init_principal(self, weight, scale):
        # PiSSA: s · up @ down = U_r S_r V_rᵀ, split evenly as U √(S/s) and √(S/s) Vᵀ.
        rank = self.lora_down.shape[0]
        u, s, vh = principal_triplets(weight.reshape(self.shape[0], -1), rank)
        root = (s / scale).sqrt()
        self.lora_up.copy_(u * root)
        self.lora_down.copy_(root[:, None] * vh)
        return True

    def expansion_factors(self):
        return [self.lora_up, self.lora_down.T]

    @classmethod
    def summary(cls, shapes):
        return f"lowrank r={shapes['lora_down'][0]}"

    @classmethod
    def expected_shapes(cls, shape, tensors):
        r = tensors["lora_down"][0] if len(tensors.get("lora_down", ())) == 2 else -1
        return {"lora_down": (r, fan_in(shape)), "lora_up": (shape[0], r)}
