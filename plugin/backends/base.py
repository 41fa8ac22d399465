"""The backend interface: how an update `D` with the shape of a weight `W` is built from few tensors.

A backend is a small `nn.Module` whose parameter names are exactly FORMAT.md's tensor names
(`lora_down`, `tucker_factor.0`, `hada_w1_a`, ...), so a file is just its state dict and a loaded
file is rebuilt by `from_tensors` without any backend-specific code. A backend must define its
tensors (`__init__`, `tensor_names`, `expected_shapes`) and `delta`; everything else is optional
speed: `factors` (D as one matrix product, which lets the layer build `W'` in place), and a
`bypass` that runs an additive update on the activations without materialising `D`. Training
procedures use three more optional hooks: `combine` (a sum of updates as one backend: ReLoRA's
restarts, PiSSA's start), `init_principal` (PiSSA) and `expansion_factors` (MPC).
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import nn

from ..compat import CONV, conv, no_autocast, tensorly  # noqa: F401 (the backends' shared imports)


class Backend(nn.Module):
    name: str
    since: int = 1  # the FORMAT.md version that defines this backend
    tensor_names: str  # regex matching exactly this backend's tensor names

    def __init__(self, shape: tuple[int, ...]):
        super().__init__()
        self.shape = tuple(shape)

    # --- what every backend defines ----------------------------------------------------------

    def delta(self, coefficient: float | torch.Tensor = 1.0) -> torch.Tensor:
        """`coefficient * D`, a fresh float32 tensor of the weight's shape."""
        left, right = self.factors(coefficient)
        return (left @ right).reshape(self.shape)

    @classmethod
    def expected_shapes(cls, shape: tuple[int, ...], tensors: dict[str, torch.Size]) -> dict[str, tuple]:
        """The shape each tensor must have to fit a weight of `shape` (ranks read off `tensors`)."""
        raise NotImplementedError

    # --- optional speed -----------------------------------------------------------------------

    @property
    def has_factors(self) -> bool:
        return type(self).factors is not Backend.factors

    def factors(self, coefficient: float | torch.Tensor = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """`(F, P)` with `coefficient * D = reshape(F @ P, shape)`, for backends whose `D` ends in one
        matrix product of an `out x r` factor and an `r x rest` one. The coefficient is folded into a
        small tensor; the full-size tensor is built only by that product, so the caller can choose
        its memory (`torch.mm(F, P, out=...)`)."""
        raise NotImplementedError(f"the {self.name} backend is not one matrix product")

    def delta_flops(self) -> int:
        """Multiply-adds to rebuild `D` (default: one pass over it)."""
        return math.prod(self.shape)

    def can_bypass(self, layer: nn.Module) -> bool:
        return False

    def bypass(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """`layer`'s operation with weight `D` and no bias, applied to `x` without building `D`."""
        raise NotImplementedError

    def bypass_flops(self, in_positions: int, out_positions: int) -> int:
        raise NotImplementedError

    # --- training procedures (optional) ---------------------------------------------------------

    @classmethod
    def combine(cls, parts: list[tuple[Backend, float]]) -> Backend:
        """`sum_k w_k D_k` of same-kind `parts` `(backend, w_k)` as one backend of this kind, with fresh
        tensors (FORMAT.md: a sum of lowrank updates is a lowrank update of the summed rank...)."""
        raise NotImplementedError(f"a sum of {cls.name} updates is not one {cls.name} update")

    def init_principal(self, weight: torch.Tensor, scale: float) -> bool:
        """Start at `weight`'s principal part (PiSSA): `scale * D` becomes the best approximation of
        `W` this backend's ranks allow. Returns whether `D` is no longer 0."""
        raise NotImplementedError(f"the {self.name} backend has no principal (PiSSA) start")

    def expansion_factors(self) -> list[torch.Tensor]:
        """The trained factors that expand the rank space to the weight's modes, each `(..., d, r)`
        (MPC's constraints act on them); none for backends without such factors."""
        return []

    def plain(self) -> Backend:
        """This update as one backend of FORMAT.md's table (what a file holds)."""
        return self

    # --- files ----------------------------------------------------------------------------------

    @classmethod
    def summary(cls, shapes: dict[str, tuple[int, ...]]) -> str:
        """A module's ranks in a few words, from its tensors' shapes (`inspect`)."""
        return cls.name

    @classmethod
    def owns(cls, tensor_name: str) -> bool:
        return re.fullmatch(cls.tensor_names, tensor_name) is not None

    @classmethod
    def from_tensors(cls, shape: tuple[int, ...], tensors: dict[str, torch.Tensor]) -> Backend:
        """A backend holding `tensors` (validated already by `expected_shapes`): `name.i` tensors
        become a `ParameterList` `name`, the others plain parameters."""
        backend = cls.__new__(cls)
        Backend.__init__(backend, shape)
        lists: dict[str, dict[int, torch.Tensor]] = {}
        for name, tensor in sorted(tensors.items()):
            head, dot, index = name.partition(".")
            if dot:
                lists.setdefault(head, {})[int(index)] = tensor
            else:
                setattr(backend, name, loaded(tensor))
        for head, items in lists.items():
            setattr(backend, head, nn.ParameterList([loaded(items[i]) for i in range(len(items))]))
        return backend


def scaled(tensor: torch.Tensor, coefficient: float | torch.Tensor) -> torch.Tensor:
    """`coefficient * tensor`, or `tensor` itself when the coefficient is the number 1 (the usual
    `m·s`): on a GPU a step is bound by kernel launches, and this one would be a product by one."""
    if isinstance(coefficient, float | int) and coefficient == 1:
        return tensor
    return coefficient * tensor


def factored_bypass(backend: Backend, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`layer`'s operation with weight `D = left @ right` (the backend's `factors`) on `x`, without
    building `D` (`two_products`). The factors are built in float32, autocast or not: cast once by
    the two products, not at every small product that builds them."""
    with no_autocast(x.device.type):
        left, right = backend.factors(1.0)
    return two_products(layer, x, left, right, backend.shape)


def two_products(
    layer: nn.Module, x: torch.Tensor, left: torch.Tensor, right: torch.Tensor, shape: tuple[int, ...]
) -> torch.Tensor:
    """`layer`'s operation with weight `reshape(left @ right, shape)` and no bias on `x`: the
    operation with `right` as an `r`-channel weight, then a 1x1 projection with `left` (LoRA's)."""
    if isinstance(layer, nn.Linear):
        return F.linear(F.linear(x, right), left)
    hidden = conv(layer, x, right.reshape(right.shape[0], *shape[1:]), None)
    return CONV[x.ndim - 2](hidden, left.reshape(*left.shape, *[1] * (x.ndim - 2)))


def factored_bypass_flops(backend: Backend, out_positions: int, rank: int) -> int:
    """Multiply-adds of `factored_bypass` at `out_positions` with factors of inner size `rank`."""
    return out_positions * rank * (fan_in(backend.shape) + backend.shape[0])


def loaded(tensor: torch.Tensor) -> nn.Parameter:
    # A fresh float32 copy: tensors read from a file can sit at unaligned addresses, where
    # MKL's matmul rounds differently and a reloaded adapter would not match bit for bit.
    return nn.Parameter(tensor.to(torch.float32, copy=True))


def khatri_rao(matrices: list[torch.Tensor]) -> torch.Tensor:
    """TensorLy's `khatri_rao` (column-wise Kronecker product, first matrix slowest) in plain torch:
    the rebuilds run every step, and TensorLy's backend dispatch is not traceable by `torch.compile`
    (graph breaks). `tests/test_backends.py` holds it equal to TensorLy's."""
    result = matrices[0]
    for matrix in matrices[1:]:
        result = (result[:, None, :] * matrix[None, :, :]).reshape(-1, result.shape[1])
    return result


def principal_triplets(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, ...]:
    """The top-`rank` singular triplets `(U, S, Vh)` of a float32 matrix. Large matrices use a randomised
    SVD (Halko et al., `torch.svd_lowrank`, drawn from torch's global generator), so starting every layer
    of an SD 1.5 UNet at its principal part takes seconds; small ones an exact SVD."""
    matrix = matrix.detach().float()
    if min(matrix.shape) <= 4 * (rank + 8):
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        return u[:, :rank], s[:rank], vh[:rank]
    u, s, v = torch.svd_lowrank(matrix, q=rank + 8, niter=4)
    return u[:, :rank], s[:rank], v[:, :rank].T


def from_parts(cls: type[Backend], parts: list[tuple[Backend, float]], tensors: dict) -> Backend:
    """A `cls` backend holding `tensors` (detached), shaped like `parts`' weight: `combine`'s result."""
    return cls.from_tensors(parts[0][0].shape, {name: t.detach() for name, t in tensors.items()})


def factor_list(sizes: list[tuple[int, int]]) -> nn.ParameterList:
    return nn.ParameterList([nn.Parameter(torch.empty(rows, cols)) for rows, cols in sizes])


def fan_in(shape: tuple[int, ...]) -> int:
    return math.prod(shape[1:])


def channel_blocks(requested: int, shape: tuple[int, ...], backend: str) -> int:
    """The number of channel blocks for a weight of `shape`: the largest divisor of both channel
    counts up to `requested` (like ranks, which clip to what a layer has)."""
    if not isinstance(requested, int) or isinstance(requested, bool) or requested < 1:
        raise ValueError(f"{backend}: blocks must be a positive integer, got {requested!r}")
    common = math.gcd(shape[0], shape[1])
    return max(n for n in range(1, min(requested, common) + 1) if common % n == 0)
