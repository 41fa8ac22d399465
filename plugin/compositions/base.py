"""The composition interface and FORMAT.md's rule that combines every adapter on one weight:

    W' = W ⊙ Π_{lie} φ(c_k D_k)  +  Σ_{additive} c_k D_k  +  Σ_{dora} m_k Δ_k,    c_k = m_k · s_k

A composition turns one adapter into one `Term`: a factor on `W` (given as its logarithm where it is
an exponential, so several multiply as one `exp` of a sum), or an addend. `compose` applies the terms;
it knows nothing about any particular method. Everything is float32; the layer casts the result.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..backends.base import scaled

if TYPE_CHECKING:
    from ..layer import Adapter

KINDS = ("exponent", "factor", "addend")


@dataclass(frozen=True)
class Term:
    """One adapter's contribution: `W ⊙ exp(tensor)`, `W ⊙ tensor` or `+ tensor`."""

    kind: str
    tensor: torch.Tensor


class Composition:
    """How one adapter's update meets the weight. Subclasses define `term`; the rest is optional."""

    name: str
    since: int = 1  # the FORMAT.md version that defines it
    bypassable: bool = False  # the term can run on the activations instead (`bypass`)
    bypass_uses_plain: bool = False  # `bypass` needs the layer's `W x`
    adds_update: bool = False  # `W' - W` is the scaled update `c·D` itself (exports use it)
    in_place: bool = False  # `build_in_place`/`pull_back_in_place` exist (one adapter, float32)
    extra_names: tuple[str, ...] = ()  # names of `extra_tensors`, as in a file

    def metadata(self) -> dict[str, str]:
        """The header fields that name this composition in a file."""
        return {"composition": self.name}

    @classmethod
    def from_metadata(cls, metadata: dict[str, str]) -> Composition:
        return cls()

    def extra_tensors(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        """Trainable per-module tensors besides the backend's, at initialisation."""
        return {}

    def extra_shapes(self, shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
        """The shapes of `extra_tensors` for a weight of `shape` (what a file must hold)."""
        return {}

    def term(self, adapter: Adapter, multiplier: float, weight: torch.Tensor) -> Term:
        """The adapter's contribution at user weight `multiplier`, given the original weight `W`."""
        raise NotImplementedError

    def can_bypass(self, adapter: Adapter, layer: torch.nn.Module, fused: bool) -> bool:
        """Whether `bypass` can run this adapter on `layer`'s activations (`fused`: the layer's weight
        has other adapters folded in, so it is not `W`)."""
        return self.bypassable and adapter.backend.can_bypass(layer)

    def bypass(
        self,
        adapter: Adapter,
        multiplier: float,
        layer: torch.nn.Module,
        x: torch.Tensor,
        plain: torch.Tensor,
    ) -> torch.Tensor:
        """What this adapter adds to the layer's output, given its input `x` and (if
        `bypass_uses_plain`) `plain = W x` without the bias: `(W' - W) x` without building `W'`.
        Default: `c · D x` (additive)."""
        return scaled(adapter.backend.bypass(layer, x), adapter.coefficient(multiplier))

    def bypass_flops(self, adapter: Adapter, out_positions: int) -> int:
        """Multiply-adds `bypass` needs beyond the backend's own bypass."""
        return 0

    def build_in_place(self, weight: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
        """`W'` for one adapter whose scaled update `c·D` is in `update`, built in its memory."""
        raise NotImplementedError

    def pull_back_in_place(
        self, grad_adapted: torch.Tensor, weight: torch.Tensor, adapted: torch.Tensor
    ) -> torch.Tensor:
        """dL/d(c·D) from dL/dW' for `build_in_place`, in `grad_adapted`'s memory."""
        raise NotImplementedError

    def effective_delta(self, adapter: Adapter, weight: torch.Tensor) -> torch.Tensor:
        """`W' - W` of this adapter alone at user weight 1, in float32 (exports use it)."""
        return compose(weight, [self.term(adapter, 1.0, weight)]) - weight.float()


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


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether every element is finite. A float32 sum is finite exactly when no element is NaN or inf
    (unless finite values overflow it, then the element-wise check decides): on the CPU a sum is several
    times faster than `isfinite`, which writes a weight-sized mask."""
    return bool(torch.isfinite(tensor.sum(dtype=torch.float32))) or bool(torch.isfinite(tensor).all())


def _sum(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    if not tensors:
        return None
    return tensors[0] if len(tensors) == 1 else torch.stack(tensors).sum(0)


def compose(weight: torch.Tensor, terms: list[Term], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """FORMAT.md's adapted weight from the original `W`: computed in float32, returned as `dtype`."""
    exponent = _sum([t.tensor for t in terms if t.kind == "exponent"])
    factors = [t.tensor for t in terms if t.kind == "factor"]
    addend = _sum([t.tensor for t in terms if t.kind == "addend"])
    if exponent is not None and not factors:
        # Π exp(U_k) = exp(Σ U_k): one exp, and a backward that keeps nothing but W'.
        result_dtype = torch.float32 if addend is not None else dtype
        if torch.is_grad_enabled() and (exponent.requires_grad or weight.requires_grad):
            result = _LieExp.apply(weight, exponent, result_dtype)
        elif len([t for t in terms if t.kind == "exponent"]) > 1:  # a fresh sum: reuse its memory
            result = exponent.exp_().mul_(weight).to(result_dtype)
        else:  # the term's own tensor: leave it as it is
            result = torch.exp(exponent).mul_(weight).to(result_dtype)
    else:
        result = weight.float()
        if exponent is not None:
            result = result * torch.exp(exponent)
        for factor in factors:
            result = result * factor
    if addend is not None:
        result = result + addend
    return result.to(dtype)
