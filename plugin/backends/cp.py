"""CANDECOMP/PARAFAC: `D = sum_r w_r F_0[:, r] o F_1[:, r] o ...` (TensorLy's `cp_to_tensor`)."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import Rank, matrix_rank
from .base import Backend, factor_list, from_parts, khatri_rao


class CP(Backend):
    """Zero weights, unit-norm random factors, so `D = 0`."""

    name = "cp"
    tensor_names = r"cp_weights|cp_factor\.\d+"

    def __init__(self, shape: tuple[int, ...], rank: Rank = 8):
        super().__init__(shape)
        r = matrix_rank(rank, self.shape, self.name, clip=False)
        self.cp_weights = nn.Parameter(torch.zeros(r))
        self.cp_factor = factor_list([(size, r) for size in self.shape])
        for factor in self.cp_factor:
            nn.init.normal_(factor)
            factor.data /= factor.data.norm(dim=0, keepdim=True)

    def factors(self, coefficient: float | torch.Tensor = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        # TensorLy's `cp_to_tensor`, stopped before its last product and fold.
        first, *rest = self.cp_factor
        right = khatri_rao(list(rest))
        return first * (coefficient * self.cp_weights), right.T

    def delta_flops(self) -> int:
        return math.prod(self.shape) * self.cp_weights.shape[0] * len(self.shape)

    @classmethod
    def combine(cls, parts):
        # A sum of CP updates is one CP update with all their components.
        tensors = {"cp_weights": torch.cat([w * b.cp_weights for b, w in parts])}
        for i in range(len(parts[0][0].shape)):
            tensors[f"cp_factor.{i}"] = torch.cat([b.cp_factor[i] for b, _ in parts], 1)
        return from_parts(cls, parts, tensors)

    def expansion_factors(self):
        return list(self.cp_factor)

    @classmethod
    def summary(cls, shapes):
        return f"cp R={shapes['cp_weights'][0]}"

    @classmethod
    def expected_shapes(cls, shape, tensors):
        weights = tensors.get("cp_weights", ())
        r = weights[0] if len(weights) == 1 else -1
        expected = {"cp_weights": (r,)}
        expected.update({f"cp_factor.{i}": (d, r) for i, d in enumerate(shape)})
        return expected
