"""`lie`: `W' = W ⊙ φ(c·D)`, the update living in the Lie algebra of the element-wise product group.

`φ = exp` (LieRA; the exact group map: lie adapters commute and invert) or `φ(X) = 1 + X` (its first
order, `W + W ⊙ c·D`: HiRA with a lowrank `D` and `s = 1`).
"""

from __future__ import annotations

import torch

from .base import Composition, Term

LIE_MAPS = ("exp", "linear")


class Lie(Composition):
    name = "lie"
    in_place = True

    def __init__(self, lie_map: str = "exp"):
        if lie_map not in LIE_MAPS:
            raise ValueError(f"unknown lie_map {lie_map!r}; choose one of {LIE_MAPS}")
        self.lie_map = lie_map

    def metadata(self) -> dict[str, str]:
        return {"composition": self.name, "lie_map": self.lie_map}

    @classmethod
    def from_metadata(cls, metadata: dict[str, str]) -> Lie:
        return cls(metadata.get("lie_map", "exp"))

    def term(self, adapter, multiplier, weight):
        update = adapter.backend.delta(multiplier * adapter.scale)
        return Term("exponent", update) if self.lie_map == "exp" else Term("factor", 1 + update)

    def build_in_place(self, weight: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
        mapped = update.exp_() if self.lie_map == "exp" else update.add_(1)
        return mapped.mul_(weight)

    def pull_back_in_place(self, grad_adapted, weight, adapted):
        # dW'/dU is W ⊙ exp(U) = W' for exp, W for the linear map.
        return grad_adapted.mul_(adapted if self.lie_map == "exp" else weight)

    def effective_delta(self, adapter, weight):
        # W ⊙ (φ(s·D) - 1), with `expm1`: accurate for small updates.
        update = adapter.backend.delta(adapter.scale).float()
        return weight.float() * (torch.expm1(update) if self.lie_map == "exp" else update)
