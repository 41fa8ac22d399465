"""Matrix pattern constraints (MPC), from the Subspace-Tuning paper (Si, Yang and Shen 2024, "See
Further for Parameter Efficient Fine-tuning by Standing on the Shoulders of Decomposition").

The paper reads an adapter as reconstructing and extending the subspace of `W` and proposes
constraining the pattern of the matrices that extend it. No public code implements them; this is
our reading. Each constraint is a penalty added to the training loss (no parameters, so the adapter
stays fusable), on every "expansion factor" `F` (`d x r`: a factor mapping the rank space to one of
the weight's modes: LoRA's up and downᵀ, Tucker's and CP's factors, LoHa's four, GraLoRA's per block):

- `orthogonal`: `FᵀF = I`, penalty `mean((FᵀF - I)²)` (AdaLoRA-style orthonormal directions);
- `diagonal`: `FᵀF` diagonal, penalty `mean(offdiag(FᵀF)²)` (orthogonal directions, free norms);
- `nonnegative`: `F ≥ 0`, penalty `mean(min(F, 0)²)`.

A zero-initialised factor (LoRA's up) is a stationary point of all three, so none moves an adapter
off `W' = W` by itself. The penalty is the mean over all factors, so its weight does not depend on
the model's size.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from ..backends import BACKEND_CLASSES, Backend, trained_part
from ..config import AdapterConfig
from ..inject import adapters_named


def _gram(factor: torch.Tensor) -> torch.Tensor:
    return factor.mT @ factor


def _orthogonal(factor: torch.Tensor) -> torch.Tensor:
    gram = _gram(factor)
    return (gram - torch.eye(gram.shape[-1], device=gram.device)).square().mean()


def _diagonal(factor: torch.Tensor) -> torch.Tensor:
    gram = _gram(factor)
    return (gram - torch.diag_embed(gram.diagonal(dim1=-2, dim2=-1))).square().mean()


def _nonnegative(factor: torch.Tensor) -> torch.Tensor:
    return factor.clamp(max=0).square().mean()


CONSTRAINTS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "orthogonal": _orthogonal,
    "diagonal": _diagonal,
    "nonnegative": _nonnegative,
}


def check_constrainable(config: AdapterConfig) -> None:
    """Refuse, before training, an adapter with no expansion factors to constrain."""
    for name in sorted({config.backend_for(2), config.backend_for(4)}):
        if BACKEND_CLASSES[name].expansion_factors is Backend.expansion_factors:
            raise ValueError(
                f"MPC constrains the factors that expand an update's rank space, and the {name} backend has "
                "none (it trains blocks or vectors); choose a preset with lowrank, tucker, cp, hadamard or "
                "blocklowrank updates"
            )


def expansion_factors(models: Iterable[nn.Module], adapter_name: str) -> list[torch.Tensor]:
    factors = []
    for model in models:
        for adapter in adapters_named(model, adapter_name).values():
            factors += trained_part(adapter.backend).expansion_factors()
    return factors


def mpc_penalty(models: Iterable[nn.Module], adapter_name: str, constraint: str) -> torch.Tensor:
    """The mean `constraint` penalty over the adapter's trained expansion factors (float32)."""
    if constraint not in CONSTRAINTS:
        raise ValueError(f"unknown MPC constraint {constraint!r}; choose one of {sorted(CONSTRAINTS)}")
    factors = expansion_factors(models, adapter_name)
    if not factors:
        raise ValueError(f"adapter {adapter_name!r} has no expansion factors for MPC to constrain")
    # Factors of one shape are stacked and penalised together (every penalty is a mean over its last
    # two dims, so a stack's mean is the mean of its factors'): a few kernels a step, not hundreds.
    penalty, groups = CONSTRAINTS[constraint], {}
    for factor in factors:
        groups.setdefault(tuple(factor.shape), []).append(factor)
    total = sum(len(group) * penalty(torch.stack(group).float()) for group in groups.values())
    return total / len(factors)
