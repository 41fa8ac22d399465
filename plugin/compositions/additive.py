"""`additive`: `W' = W + c·D` (LoRA, FLoRA, GraLoRA, DiaBlo, ABBA/LoHa)."""

from __future__ import annotations

import torch

from .base import Composition, Term


class Additive(Composition):
    name = "additive"
    bypassable = True
    adds_update = True
    in_place = True

    def term(self, adapter, multiplier, weight):
        return Term("addend", adapter.backend.delta(multiplier * adapter.scale))

    def build_in_place(self, weight: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
        return update.add_(weight)

    def pull_back_in_place(self, grad_adapted, weight, adapted):
        return grad_adapted  # dW'/dU = 1
