"""FLoRA's backend: a Tucker decomposition, `D = core x_0 F_0 x_1 F_1 ... x_{N-1} F_{N-1}`."""

from __future__ import annotations

import functools

import tensorly as tl
import torch
from torch import nn

from ..config import Rank, mode_ranks
from .base import (
    Backend,
    factor_list,
    factored_bypass,
    factored_bypass_flops,
    from_parts,
    principal_triplets,
    scaled,
    tensorly,
)


def _unfolded_without_mode_0(core: torch.Tensor, factors: list[torch.Tensor]) -> torch.Tensor:
    """`core ×_1 F_1 ... ×_{N-1} F_{N-1}` unfolded along mode 0, `(r_0, in · kernel)`: TensorLy's
    `tucker_to_tensor` without mode 0, in plain torch.

    `tucker_to_tensor` expands mode 0 (out channels) first, so the other modes are then multiplied
    into an almost full-size tensor. Expanding the small modes first leaves mode 0 to one plain
    matrix product (`Tucker.factors`), the only full-size step. The kernel modes go in as one
    Kronecker product of their factors and the input mode as one batched product: three small
    products whatever the kernel's size (a step on a GPU is bound by its launches).
    """
    r_out, r_in = core.shape[:2]
    unfolded = core.reshape(r_out, r_in, -1)
    if core.ndim > 2:
        kernel = functools.reduce(torch.kron, factors[2:])  # (kernel positions, kernel ranks)
        unfolded = unfolded @ kernel.T
    return torch.matmul(factors[1], unfolded).reshape(r_out, -1)  # F_1 on every r_out slice


INITS = ("zero-core", "zero-out")


class Tucker(Backend):
    """`init="zero-core"` (FLoRA): zero core, orthonormal random factors. `init="zero-out"` (LoRA's
    start in Tucker form): the output factor zero, the other factors orthonormal and the core's
    mode-0 unfolding with orthonormal rows. Either way `D = 0`.

    From a zero core only the core trains at first (the factors' gradients are zero), inside random
    subspaces, until it has grown; from a zero output factor that factor trains from the first step,
    as LoRA's up matrix does, on an input projection with orthonormal rows.
    """

    name = "tucker"
    tensor_names = r"tucker_core|tucker_factor\.\d+"

    def __init__(self, shape: tuple[int, ...], rank: Rank = 8, init: str = "zero-core"):
        super().__init__(shape)
        if init not in INITS:
            raise ValueError(f"tucker: unknown init {init!r}; choose one of {INITS}")
        ranks = mode_ranks(rank, self.shape)
        self.tucker_core = nn.Parameter(torch.zeros(ranks))
        self.tucker_factor = factor_list(list(zip(self.shape, ranks)))
        for factor in self.tucker_factor:
            nn.init.orthogonal_(factor)
        if init == "zero-out":
            nn.init.orthogonal_(self.tucker_core.view(ranks[0], -1))
            nn.init.zeros_(self.tucker_factor[0])

    def factors(self, coefficient: float | torch.Tensor = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        factors = list(self.tucker_factor)
        return factors[0], _unfolded_without_mode_0(scaled(self.tucker_core, coefficient), factors)

    def delta_flops(self) -> int:
        # Mode products one after another, last mode first: each multiplies in one factor.
        size, flops = self.tucker_core.numel(), 0
        for rows, cols in (f.shape for f in reversed(self.tucker_factor)):
            flops += size * rows
            size = size // cols * rows
        return flops

    def can_bypass(self, layer: nn.Module) -> bool:
        return getattr(layer, "groups", 1) == 1

    def bypass(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        # LoRA's two products with the factors `(F_0, core x_1 F_1 ... x_N F_N)`. LyCORIS' Tucker runs
        # three (1x1 to r_1, the core's small conv, 1x1 out) for fewer multiply-adds, but the adapter's
        # products are a few percent of the layer's either way, and on a GPU a step is bound by kernel
        # launches: two products and their casts, not three and the kernel's.
        return factored_bypass(self, layer, x)

    def bypass_flops(self, in_positions: int, out_positions: int) -> int:
        return factored_bypass_flops(self, out_positions, self.tucker_core.shape[0])

    @classmethod
    def combine(cls, parts):
        # A block-diagonal core over concatenated factors. A mode whose summed rank exceeds its size
        # (a 3x3 kernel's modes after two restarts) has its factor multiplied into the core instead,
        # with the identity as factor: exact, and the core stops growing along it.
        ranks = [sum(b.tucker_core.shape[i] for b, _ in parts) for i in range(len(parts[0][0].shape))]
        core = parts[0][0].tucker_core.new_zeros(ranks)
        start = [0] * len(ranks)
        for backend, w in parts:
            block = tuple(slice(o, o + r) for o, r in zip(start, backend.tucker_core.shape))
            core[block] = w * backend.tucker_core
            start = [o + r for o, r in zip(start, backend.tucker_core.shape)]
        factors = [torch.cat([b.tucker_factor[i] for b, _ in parts], 1) for i in range(len(ranks))]
        for mode, factor in enumerate(factors):
            if factor.shape[1] > factor.shape[0]:
                core = tensorly(tl.tenalg.mode_dot, core, factor, mode)
                factors[mode] = torch.eye(factor.shape[0], dtype=factor.dtype, device=factor.device)
        tensors = {"tucker_core": core, **{f"tucker_factor.{i}": f for i, f in enumerate(factors)}}
        return from_parts(cls, parts, tensors)

    @torch.no_grad()
    def init_principal(self, weight, scale):
        # HOSVD, PiSSA's analogue for a Tucker update: each factor spans the principal subspace of its
        # mode (the top left singular vectors of the mode's unfolding; all of a mode kept whole), and
        # the core is W projected on them, over s. TensorLy's `tucker(n_iter_max=0)` computes the same
        # but takes seconds per large conv (a randomised SVD even of the 3-row kernel unfoldings).
        weight = weight.detach().float()
        for mode, factor in enumerate(self.tucker_factor):
            size, rank = factor.shape
            if rank == size:
                factor.copy_(torch.eye(size, device=factor.device))
            else:
                unfolded = weight.movedim(mode, 0).reshape(size, -1)
                factor.copy_(principal_triplets(unfolded, rank)[0])
        factors = list(self.tucker_factor)
        core = tensorly(tl.tenalg.multi_mode_dot, weight, factors, None, None, True)
        self.tucker_core.copy_(core / scale)
        return True

    def expansion_factors(self):
        return list(self.tucker_factor)

    @classmethod
    def summary(cls, shapes):
        return f"tucker core {tuple(shapes['tucker_core'])}"

    @classmethod
    def expected_shapes(cls, shape, tensors):
        core = tensors.get("tucker_core", ())
        ranks = list(core) if len(core) == len(shape) else [-1] * len(shape)
        expected = {"tucker_core": tuple(ranks)}
        expected.update({f"tucker_factor.{i}": (d, r) for i, (d, r) in enumerate(zip(shape, ranks))})
        return expected
