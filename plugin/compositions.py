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


class _LieExp(torch.autograd.Function):
    """`W ⊙ exp(U)` cast to `dtype`, keeping only its output for backward.

    Plain autograd would keep `exp(U)` and the conv/linear keeps `W'`: two weight-sized copies.
    Since d(W ⊙ exp(U))/dU = W', the output the layer keeps anyway is all backward needs.
    """

    @staticmethod
    def forward(ctx, weight: torch.Tensor, update: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        result = torch.exp(update).mul_(weight).to(dtype)
        ctx.save_for_backward(result, update if ctx.needs_input_grad[0] else None)
        return result

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        result, update = ctx.saved_tensors
        grad_update = grad.float() * result.float() if ctx.needs_input_grad[1] else None
        grad_weight = (grad.float() * torch.exp(update)).to(grad.dtype) if ctx.needs_input_grad[0] else None
        return grad_weight, grad_update, None


def compose(weight: torch.Tensor, terms: list[Term], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """FORMAT.md's adapted weight: computed in float32, returned as `dtype`."""
    lie = [t for t in terms if t.composition == "lie"]
    total = additive_sum(terms)
    if lie and all(t.lie_map == "exp" for t in lie):
        # Π exp(U_k) = exp(Σ U_k): one exp, and a backward that keeps nothing but W'.
        update = lie[0].update if len(lie) == 1 else sum(t.update for t in lie)
        result_dtype = torch.float32 if total is not None else dtype
        if torch.is_grad_enabled() and (update.requires_grad or weight.requires_grad):
            result = _LieExp.apply(weight, update, result_dtype)
        else:  # nothing to differentiate: `update` is a fresh intermediate, reuse its memory
            result = update.exp_().mul_(weight).to(result_dtype)
    elif lie:
        result = weight.float() * lie_factor(lie)
    else:
        result = weight.float()
    if total is not None:
        result = result + total
    return result.to(dtype)


def compose_one_in_place(
    weight: torch.Tensor, update: torch.Tensor, composition: str, lie_map: str
) -> torch.Tensor:
    """`compose(weight, [Term(composition, lie_map, update)])` for a float32 `weight`, built in the
    memory of `update` (a buffer the caller owns). On the CPU every fresh weight-sized tensor costs
    page faults that take several times longer than the arithmetic, so a rebuild that allocates
    nothing is much faster."""
    if composition == "additive":
        return update.add_(weight)
    if lie_map == "exp":
        return update.exp_().mul_(weight)
    return update.add_(1).mul_(weight)


def pull_back_one_in_place(
    grad_adapted: torch.Tensor, weight: torch.Tensor, adapted: torch.Tensor, composition: str, lie_map: str
) -> torch.Tensor:
    """dL/dU from dL/dW' for `compose_one_in_place`, in `grad_adapted`'s memory:
    dW'/dU is 1 (additive), W' (exp) or W (first order)."""
    if composition == "additive":
        return grad_adapted
    return grad_adapted.mul_(adapted if lie_map == "exp" else weight)


def compose_over_fused(
    fused_weight: torch.Tensor, fused: list[Term], unfused: list[Term], dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The weight with `unfused` applied on top of a weight that already has `fused` folded in.

    The additive part of `fused` must not be multiplied by the new lie factors, so it is taken
    out and added back: W_f = W ⊙ P_f + A_f  =>  W ⊙ P_f ⊙ P_u + A_f + A_u.
    """
    fused_additive = additive_sum(fused)
    if fused_additive is None or not any(t.composition == "lie" for t in unfused):
        return compose(fused_weight, unfused, dtype)
    return (compose(fused_weight.float() - fused_additive, unfused) + fused_additive).to(dtype)


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
