"""An update trained on top of a frozen earlier one: `D = D_frozen + D_trained`.

Training procedures move the start of training away from `W` (PiSSA starts at `W`'s principal part,
ReLoRA restarts from what it trained so far) but their files stay relative to the original `W`
(FORMAT.md). Keeping the frozen part inside the adapter, rather than folding it into the layer's
weight, makes that exact for every composition (a `linear` lie map or DoRA's norm would not survive
a fold) and never touches the user's weights; the price is rebuilding the frozen part each step,
which for lowrank and tucker is a few more columns in one matrix product.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import Backend


class Continued(Backend):
    """`frozen` (no gradients) plus `trained`, of the same kind. Its file (`plain`) is the two
    combined into one backend of that kind, so anyone's loader reproduces it."""

    def __init__(self, frozen: Backend, trained: Backend):
        super().__init__(trained.shape)
        if type(frozen) is not type(trained):
            raise TypeError(f"cannot continue a {trained.name} update on a {frozen.name} one")
        self.frozen = frozen.requires_grad_(False)
        self.trained = trained
        self.name, self.since = trained.name, trained.since

    def plain(self) -> Backend:
        return type(self.trained).combine([(self.frozen, 1.0), (self.trained, 1.0)])

    @property
    def has_factors(self) -> bool:
        return self.frozen.has_factors and self.trained.has_factors

    def delta(self, coefficient: float | torch.Tensor = 1.0) -> torch.Tensor:
        if self.has_factors:
            return super().delta(coefficient)
        return self.frozen.delta(coefficient) + self.trained.delta(coefficient)

    def factors(self, coefficient: float | torch.Tensor = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        (left_f, right_f), (left_t, right_t) = (
            self.frozen.factors(coefficient),
            self.trained.factors(coefficient),
        )
        return torch.cat([left_f, left_t], 1), torch.cat([right_f, right_t], 0)

    def delta_flops(self) -> int:
        return self.frozen.delta_flops() + self.trained.delta_flops()

    def can_bypass(self, layer: nn.Module) -> bool:
        return self.frozen.can_bypass(layer) and self.trained.can_bypass(layer)

    def bypass(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return self.frozen.bypass(layer, x) + self.trained.bypass(layer, x)

    def bypass_flops(self, in_positions: int, out_positions: int) -> int:
        return sum(b.bypass_flops(in_positions, out_positions) for b in (self.frozen, self.trained))

    def expansion_factors(self) -> list[torch.Tensor]:
        return self.trained.expansion_factors()


def trained_part(backend: Backend) -> Backend:
    return backend.trained if isinstance(backend, Continued) else backend


def frozen_part(backend: Backend) -> Backend | None:
    return backend.frozen if isinstance(backend, Continued) else None


def principal_start(backend: Backend, weight: torch.Tensor, scale: float) -> Backend:
    """PiSSA: `backend` starts at `weight`'s principal part and trains on the residual. The residual is
    `W` minus that start, so the frozen part is the start negated: `W' = W` at first (to rounding) and
    the file stays relative to `W`."""
    if not scale:
        raise ValueError("a principal (PiSSA) start needs a non-zero scale")
    if not backend.init_principal(weight, scale):
        return backend  # the start leaves D = 0 (ABBA's): nothing to subtract
    return Continued(type(backend).combine([(backend, -1.0)]), backend)
