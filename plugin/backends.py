"""Backends: how an update `D` with the shape of a weight `W` is built from few trainable tensors.

Each backend is a small `nn.Module` whose parameter names are exactly FORMAT.md's tensor names
(`lora_down`, `tucker_core`, `tucker_factor.0`, ...), so a file is just its state dict. `delta()`
rebuilds `D` in float32; additive backends that can also run as a bypass on the activations
(small convolutions/matmuls, never materialising `D`) say so with `bypass()` and their costs.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import tensorly as tl
import torch
import torch.nn.functional as F
from tensorly.backend import BackendManager
from torch import nn

from .config import Rank, matrix_rank, mode_ranks

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _tensorly(fn: Callable, *args):
    """Run a TensorLy function on torch tensors, leaving the user's backend setting as it was.

    `tl.backend_context` restores the previous backend *globally* and pins it on this thread, which
    can undo another thread's `tl.set_backend`. So set it for this thread only and put this thread's
    own setting back exactly (TensorLy keeps it in `BackendManager._THREAD_LOCAL_DATA`).
    """
    local = BackendManager._THREAD_LOCAL_DATA.__dict__
    had_local, previous = "backend" in local, local.get("backend")
    BackendManager.set_backend("pytorch", local_threadsafe=True)
    try:
        return fn(*args)
    finally:
        if had_local:
            local["backend"] = previous
        else:
            local.pop("backend", None)


def _tucker_kernel_modes(core: torch.Tensor, factors: list[torch.Tensor]) -> torch.Tensor:
    """TensorLy's `tucker_to_tensor` without mode 0, multiplying the modes in reverse order.

    `tucker_to_tensor` expands mode 0 (out channels) first, so the kernel modes are then multiplied
    into an almost full-size tensor, unfolded and copied each time. Expanding the small kernel modes
    first leaves mode 0 to one plain matrix product (`Tucker.factors`), the only full-size step.
    """
    result = core
    for mode in reversed(range(1, core.ndim)):
        result = tl.tenalg.mode_dot(result, factors[mode], mode)
    return result


class Backend(nn.Module):
    name: str

    def __init__(self, shape: tuple[int, ...]):
        super().__init__()
        self.shape = tuple(shape)

    def factors(self, coefficient: float | torch.Tensor = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """`(F, P)` with `coefficient * D = reshape(F @ P, shape)`: every backend here ends in one
        matrix product of an `out x r` factor and an `r x rest` one. The coefficient is folded into
        a small tensor (saves a full pass); the full-size tensor is built only by that product, so
        the caller can choose its memory (`torch.mm(F, P, out=...)`)."""
        raise NotImplementedError

    def delta(self, coefficient: float | torch.Tensor = 1.0) -> torch.Tensor:
        """`coefficient * D`, a fresh tensor of the weight's shape."""
        left, right = self.factors(coefficient)
        return (left @ right).reshape(self.shape)

    def delta_flops(self) -> int:
        """Multiply-adds to rebuild `D`."""
        raise NotImplementedError

    def can_bypass(self, layer: nn.Module) -> bool:
        return False

    def bypass(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """`layer`'s operation with weight `D` and no bias, applied to `x` without building `D`."""
        raise NotImplementedError

    def bypass_flops(self, in_positions: int, out_positions: int) -> int:
        raise NotImplementedError

    @classmethod
    def expected_shapes(cls, shape: tuple[int, ...], tensors: dict[str, torch.Size]) -> dict[str, tuple]:
        """The shape each of `tensors` must have to fit a weight of `shape` (ranks read off `tensors`)."""
        raise NotImplementedError

    @classmethod
    def from_tensors(cls, shape: tuple[int, ...], tensors: dict[str, torch.Tensor]) -> Backend:
        """A backend holding `tensors` (validated already by `expected_shapes`)."""
        raise NotImplementedError


def _loaded(tensor: torch.Tensor) -> nn.Parameter:
    # A fresh float32 copy: tensors read from a file can sit at unaligned addresses, where
    # MKL's matmul rounds differently and a reloaded adapter would not match bit for bit.
    return nn.Parameter(tensor.to(torch.float32, copy=True))


def _factor_list(sizes: list[tuple[int, int]]) -> nn.ParameterList:
    return nn.ParameterList([nn.Parameter(torch.empty(rows, cols)) for rows, cols in sizes])


class LowRank(Backend):
    """LoRA: `D = reshape(lora_up @ lora_down, W.shape)`. Random down, zero up, so `D = 0`."""

    name = "lowrank"

    def __init__(self, shape: tuple[int, ...], rank: Rank = 8):
        super().__init__(shape)
        r = matrix_rank(rank, self.shape, self.name)
        fan_in = math.prod(self.shape[1:])
        self.lora_down = nn.Parameter(torch.empty(r, fan_in))
        self.lora_up = nn.Parameter(torch.zeros(self.shape[0], r))
        nn.init.kaiming_uniform_(self.lora_down, a=math.sqrt(5))

    def factors(self, coefficient: float | torch.Tensor = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        return coefficient * self.lora_up, self.lora_down

    def delta_flops(self) -> int:
        return math.prod(self.shape) * self.lora_up.shape[1]

    def can_bypass(self, layer: nn.Module) -> bool:
        return getattr(layer, "groups", 1) == 1

    def bypass(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if isinstance(layer, nn.Linear):
            return F.linear(F.linear(x, self.lora_down), self.lora_up)
        r = self.lora_down.shape[0]
        hidden = layer._conv_forward(x, self.lora_down.reshape(r, *self.shape[1:]), None)
        return _CONV[x.ndim - 2](hidden, self.lora_up.reshape(*self.lora_up.shape, *[1] * (x.ndim - 2)))

    def bypass_flops(self, in_positions: int, out_positions: int) -> int:
        (r, fan_in), out = self.lora_down.shape, self.shape[0]
        return out_positions * r * (fan_in + out)

    @classmethod
    def expected_shapes(cls, shape, tensors):
        r = tensors["lora_down"][0] if len(tensors.get("lora_down", ())) == 2 else -1
        return {"lora_down": (r, math.prod(shape[1:])), "lora_up": (shape[0], r)}

    @classmethod
    def from_tensors(cls, shape, tensors):
        backend = cls(shape, rank=1)
        backend.lora_down = _loaded(tensors["lora_down"])
        backend.lora_up = _loaded(tensors["lora_up"])
        return backend


class Tucker(Backend):
    """FLoRA: `D = core x_0 F_0 x_1 F_1 ...`. Zero core, orthonormal random factors, so `D = 0`."""

    name = "tucker"

    def __init__(self, shape: tuple[int, ...], rank: Rank = 8):
        super().__init__(shape)
        ranks = mode_ranks(rank, self.shape)
        self.tucker_core = nn.Parameter(torch.zeros(ranks))
        self.tucker_factor = _factor_list(list(zip(self.shape, ranks)))
        for factor in self.tucker_factor:
            nn.init.orthogonal_(factor)

    def factors(self, coefficient: float | torch.Tensor = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        core = _tensorly(_tucker_kernel_modes, coefficient * self.tucker_core, list(self.tucker_factor))
        return self.tucker_factor[0], core.reshape(core.shape[0], -1)

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
        # A 1x1 projection to r_1 channels, a small conv with the core times the kernel factors
        # (r_1 -> r_0 channels, the layer's own stride/padding), a 1x1 projection to `out`: LoCon-Tucker.
        out_factor, in_factor, *kernel_factors = self.tucker_factor
        if isinstance(layer, nn.Linear):
            return F.linear(F.linear(F.linear(x, in_factor.T), self.tucker_core), out_factor)
        ones = [1] * (x.ndim - 2)
        conv = _CONV[x.ndim - 2]
        modes = list(range(2, len(self.shape)))
        kernel = _tensorly(tl.tenalg.multi_mode_dot, self.tucker_core, list(kernel_factors), modes)
        hidden = conv(x, in_factor.T.reshape(*in_factor.T.shape, *ones))
        hidden = layer._conv_forward(hidden, kernel, None)
        return conv(hidden, out_factor.reshape(*out_factor.shape, *ones))

    def bypass_flops(self, in_positions: int, out_positions: int) -> int:
        r_out, r_in = self.tucker_core.shape[:2]
        kernel = math.prod(self.shape[2:])
        return in_positions * self.shape[1] * r_in + out_positions * (
            r_in * r_out * kernel + r_out * self.shape[0]
        )

    @classmethod
    def expected_shapes(cls, shape, tensors):
        core = tensors.get("tucker_core", ())
        ranks = list(core) if len(core) == len(shape) else [-1] * len(shape)
        expected = {"tucker_core": tuple(ranks)}
        expected.update({f"tucker_factor.{i}": (d, r) for i, (d, r) in enumerate(zip(shape, ranks))})
        return expected

    @classmethod
    def from_tensors(cls, shape, tensors):
        backend = cls(shape, rank=1)
        backend.tucker_core = _loaded(tensors["tucker_core"])
        backend.tucker_factor = nn.ParameterList(
            [_loaded(tensors[f"tucker_factor.{i}"]) for i in range(len(shape))]
        )
        return backend


class CP(Backend):
    """CANDECOMP/PARAFAC: `D = sum_r w_r F_0[:, r] o F_1[:, r] o ...`. Zero weights, so `D = 0`."""

    name = "cp"

    def __init__(self, shape: tuple[int, ...], rank: Rank = 8):
        super().__init__(shape)
        r = matrix_rank(rank, self.shape, self.name)
        self.cp_weights = nn.Parameter(torch.zeros(r))
        self.cp_factor = _factor_list([(size, r) for size in self.shape])
        for factor in self.cp_factor:
            nn.init.normal_(factor)
            factor.data /= factor.data.norm(dim=0, keepdim=True)

    def factors(self, coefficient: float | torch.Tensor = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        # TensorLy's `cp_to_tensor`, stopped before its last product and fold.
        first, *rest = self.cp_factor
        right = _tensorly(tl.tenalg.khatri_rao, list(rest)) if len(rest) > 1 else rest[0]
        return first * (coefficient * self.cp_weights), right.T

    def delta_flops(self) -> int:
        return math.prod(self.shape) * self.cp_weights.shape[0] * len(self.shape)

    @classmethod
    def expected_shapes(cls, shape, tensors):
        weights = tensors.get("cp_weights", ())
        r = weights[0] if len(weights) == 1 else -1
        expected = {"cp_weights": (r,)}
        expected.update({f"cp_factor.{i}": (d, r) for i, d in enumerate(shape)})
        return expected

    @classmethod
    def from_tensors(cls, shape, tensors):
        backend = cls(shape, rank=1)
        backend.cp_weights = _loaded(tensors["cp_weights"])
        backend.cp_factor = nn.ParameterList([_loaded(tensors[f"cp_factor.{i}"]) for i in range(len(shape))])
        return backend


BACKEND_CLASSES: dict[str, type[Backend]] = {cls.name: cls for cls in (LowRank, Tucker, CP)}
