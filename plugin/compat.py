"""Everything this package needs from torch and TensorLy beyond their documented APIs, in one place.

Two things have no public API: a tensor's version counter (to know that an adapter tensor was edited
in place) and TensorLy's per-thread backend slot (to run TensorLy on torch without changing the
backend a user chose). `tests/test_compat.py` checks both, so a torch or TensorLy upgrade that changes
them fails there, by name, instead of somewhere deep in a forward pass. The convolution helpers use
public ops (`torch.nn.functional`, and `aten.convolution_backward`, which a conv's autograd calls),
kept here so that a layer's padding rules live in one function.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from tensorly.backend import BackendManager
from torch import nn

CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def tensor_version(tensor: torch.Tensor) -> int:
    """How many times `tensor` was modified in place (torch's private `_version` counter)."""
    return tensor._version


def uncompiled(model: nn.Module) -> nn.Module:
    """The model inside `torch.compile`'s wrapper (its private `_orig_mod`), else `model`: adapters are
    found, added and saved on the model itself, so module paths and file keys never gain `_orig_mod.`."""
    return getattr(model, "_orig_mod", model)


def tensorly(fn: Callable, *args):
    """Run a TensorLy function on torch tensors, leaving the user's backend setting as it was.

    `tl.backend_context` restores the previous backend *globally* and pins it on this thread, which
    can undo another thread's `tl.set_backend`. So set it for this thread only and put this thread's
    own setting back exactly (TensorLy keeps it in its private `BackendManager._THREAD_LOCAL_DATA`).
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


def no_autocast(device_type: str) -> contextlib.AbstractContextManager:
    """A region where autocast is off: `torch.autocast(enabled=False)` where it is on, else nothing
    (entering an autocast region costs host time in every layer's forward)."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def conv(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`layer`'s convolution (its stride, padding and padding mode, dilation, groups) with another
    weight and bias: what `ConvNd._conv_forward` does, through the public functional API."""
    dims = weight.ndim - 2
    if layer.padding_mode == "zeros":
        return CONV[dims](x, weight, bias, layer.stride, layer.padding, layer.dilation, layer.groups)
    pad = [p for size in reversed(layer.padding) for p in (size, size)]
    x = F.pad(x, pad, mode=layer.padding_mode)
    return CONV[dims](x, weight, bias, layer.stride, 0, layer.dilation, layer.groups)


def conv_backward(
    layer: nn.Module, x: torch.Tensor, weight: torch.Tensor, grad: torch.Tensor, input_grad: bool
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The gradients of `conv(layer, x, weight, None)` for the input (if `input_grad`) and the weight,
    given the output's gradient, for a zero-padded conv with numeric padding."""
    # One `aten.convolution_backward` for both gradients (what autograd calls for a conv): the
    # `torch.nn.grad` helpers run it once per gradient.
    dims = weight.ndim - 2
    # A ConvNd keeps stride, padding and dilation as tuples, one entry per spatial dimension.
    grad_x, grad_weight, _ = torch.ops.aten.convolution_backward(
        grad, x, weight, None, layer.stride, layer.padding, layer.dilation, False, [0] * dims,
        layer.groups, [input_grad, True, False],
    )  # fmt: skip
    return grad_x, grad_weight
