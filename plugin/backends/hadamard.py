"""ABBA's and LoHa's backend: `D = (w1_a @ w1_b) ⊙ (w2_a @ w2_b)`, reshaped to the weight.

Two low-rank pairs multiplied element-wise reach rank up to r_1·r_2 with (r_1 + r_2)(out + fan_in)
parameters. The tensor names are LyCORIS' LoHa ones, so an additive adapter exports to LoHa exactly.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import Rank, matrix_rank
from .base import Backend, fan_in, principal_triplets

INITS = ("loha", "abba")


class Hadamard(Backend):
    """`init="loha"` (LyCORIS): w1_a, w1_b, w2_b normal(0.1, 1, 1), w2_a zero. `init="abba"` (ABBA):
    the first pair is W's top-r singular triplets split as `U √S`, `√S Vᵀ`; the second pair Kaiming
    down, zero up. Either way one factor is zero, so `D = 0`."""

    name = "hadamard"
    since = 2
    tensor_names = r"hada_w[12]_[ab]"

    def __init__(
        self, shape: tuple[int, ...], rank: Rank = 8, init: str = "loha", weight: torch.Tensor | None = None
    ):
        super().__init__(shape)
        if init not in INITS:
            raise ValueError(f"hadamard: unknown init {init!r}; choose one of {INITS}")
        r = matrix_rank(rank, self.shape, self.name)
        rows, cols = self.shape[0], fan_in(self.shape)
        self.hada_w1_a = nn.Parameter(torch.empty(rows, r))
        self.hada_w1_b = nn.Parameter(torch.empty(r, cols))
        self.hada_w2_a = nn.Parameter(torch.zeros(rows, r))
        self.hada_w2_b = nn.Parameter(torch.empty(r, cols))
        if init == "loha":
            nn.init.normal_(self.hada_w1_a, std=0.1)
            nn.init.normal_(self.hada_w1_b, std=1.0)
            nn.init.normal_(self.hada_w2_b, std=1.0)
        else:
            if weight is None:
                raise ValueError("hadamard: ABBA's initialisation needs the layer's weight")
            self.init_principal(weight, 1.0)

    @torch.no_grad()
    def init_principal(self, weight, scale):
        # ABBA's start: the first pair is W's top-r singular triplets (U √S, √S Vᵀ); the second pair
        # Kaiming down, zero up, so D stays 0 and no residual is needed.
        r = self.hada_w1_a.shape[1]
        u, s, vh = principal_triplets(weight.reshape(self.shape[0], -1), r)
        root = s.sqrt()
        self.hada_w1_a.copy_(u * root)
        self.hada_w1_b.copy_(root[:, None] * vh)
        self.hada_w2_a.zero_()
        nn.init.kaiming_uniform_(self.hada_w2_b, a=math.sqrt(5))
        return False

    def expansion_factors(self):
        return [self.hada_w1_a, self.hada_w1_b.T, self.hada_w2_a, self.hada_w2_b.T]

    def delta(self, coefficient: float | torch.Tensor = 1.0) -> torch.Tensor:
        first = (coefficient * self.hada_w1_a) @ self.hada_w1_b
        return (first * (self.hada_w2_a @ self.hada_w2_b)).reshape(self.shape)

    def delta_flops(self) -> int:
        return math.prod(self.shape) * (self.hada_w1_b.shape[0] + self.hada_w2_b.shape[0] + 1)

    @classmethod
    def summary(cls, shapes):
        return f"hadamard r={shapes['hada_w1_a'][1]}x{shapes['hada_w2_a'][1]}"

    @classmethod
    def expected_shapes(cls, shape, tensors):
        def rank(name: str) -> int:
            return tensors[name][1] if len(tensors.get(name, ())) == 2 else -1

        rows, cols = shape[0], fan_in(shape)
        r1, r2 = rank("hada_w1_a"), rank("hada_w2_a")
        return {
            "hada_w1_a": (rows, r1),
            "hada_w1_b": (r1, cols),
            "hada_w2_a": (rows, r2),
            "hada_w2_b": (r2, cols),
        }
