"""Compositions: how the updates of the adapters on one weight combine with it (FORMAT.md).

    W' = W ⊙ Π_{lie} φ(c_k D_k)  +  Σ_{additive} c_k D_k,    c_k = m_k · s_k

with φ = exp or φ(X) = 1 + X. Everything here is float32 and purely functional; the layer decides
which adapters take part and casts the result to its own dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Term:
    """One adapter's contribution: its composition, its lie map and its scaled update `c·D`."""

    composition: str
    lie_map: str
    update: torch.Tensor


def lie_map(update: torch.Tensor, kind: str) -> torch.Tensor:
    return torch.exp(update) if kind == "exp" else 1 + update


def lie_factor(terms: list[Term]) -> torch.Tensor | None:
    """Π φ(c_k D_k) over the lie terms, or None if there are none."""
    factor = None
    for term in terms:
        if term.composition == "lie":
            mapped = lie_map(term.update, term.lie_map)
            factor = mapped if factor is None else factor * mapped
    return factor


def additive_sum(terms: list[Term]) -> torch.Tensor | None:
    """Σ c_k D_k over the additive terms, or None if there are none."""
    total = None
    for term in terms:
        if term.composition == "additive":
            total = term.update if total is None else total + term.update
    return total


def compose(weight: torch.Tensor, terms: list[Term]) -> torch.Tensor:
    """FORMAT.md's adapted weight, in float32."""
    result = weight.float()
    factor = lie_factor(terms)
    if factor is not None:
        result = result * factor
    total = additive_sum(terms)
    if total is not None:
        result = result + total
    return result


def compose_over_fused(fused_weight: torch.Tensor, fused: list[Term], unfused: list[Term]) -> torch.Tensor:
    """The weight with `unfused` applied on top of a weight that already has `fused` folded in.

    The additive part of `fused` must not be multiplied by the new lie factors, so it is taken
    out and added back: W_f = W ⊙ P_f + A_f  =>  W ⊙ P_f ⊙ P_u + A_f + A_u.
    """
    fused_additive = additive_sum(fused)
    if fused_additive is None or lie_factor(unfused) is None:
        return compose(fused_weight, unfused)
    return compose(fused_weight.float() - fused_additive, unfused) + fused_additive


def decompose(fused_weight: torch.Tensor, fused: list[Term]) -> torch.Tensor:
    """Invert `compose`: the weight before `fused` were folded in (float32)."""
    result = fused_weight.float()
    total = additive_sum(fused)
    if total is not None:
        result = result - total
    for term in fused:
        if term.composition != "lie":
            continue
        if term.lie_map == "exp":
            result = result * torch.exp(-term.update)
        else:
            denominator = 1 + term.update
            if denominator.abs().min() < 1e-6:
                raise ValueError("cannot unfuse a linear-map lie adapter where 1 + s·D is 0")
            result = result / denominator
    return result
