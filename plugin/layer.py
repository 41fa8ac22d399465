"""The adapted layer: a Linear/ConvNd that carries named adapters and applies FORMAT.md's rule.

The original layer stays inside, untouched, as `base_layer`, so unloading is putting it back.
Forward either rebuilds `W'` (always for lie adapters) or, for additive adapters whose backend
allows it, runs them as a bypass on the activations, whichever costs fewer multiply-adds here.
"""

from __future__ import annotations

import contextlib
import math
import threading

import torch
from torch import nn

from .backends import Backend, trained_part
from .compat import conv, conv_backward, no_autocast, tensor_version
from .compositions import Composition, Term, all_finite, compose

ADAPTABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def float32_rebuild(like: torch.Tensor) -> contextlib.AbstractContextManager:
    """Adapters rebuild in float32 (FORMAT.md's math) even inside a mixed-precision autocast
    region; only the layer's own operation runs at the autocast dtype, as it would without them."""
    return no_autocast(like.device.type)


class Adapter(nn.Module):
    """One named adapter on one layer: a backend, a composition, its scale `s`, and whatever
    per-module tensors the composition adds (DoRA's `magnitude`)."""

    def __init__(
        self,
        backend: Backend,
        composition: Composition,
        scale: float,
        extra: dict[str, torch.Tensor] | None = None,
    ):
        super().__init__()
        self.backend = backend
        self.composition = composition
        self.register_buffer("scale", torch.tensor(float(scale)))
        self.extra_names = tuple(extra or ())
        for name, tensor in (extra or {}).items():
            setattr(self, name, nn.Parameter(tensor.to(torch.float32, copy=True)))
        self._scale_read: tuple[torch.Tensor, int, float] | None = None  # (buffer, its version, value)

    def coefficient(self, multiplier: float) -> float | torch.Tensor:
        """`c = m·s` as a Python number. On a GPU, `m * scale` would be a kernel per layer and pass
        (steps there are bound by launches, not arithmetic); the buffer is read again, one wait for
        the device, only after it was replaced or edited in place (loading a file copies into it)."""
        scale = self.scale
        if torch.compiler.is_compiling():  # the compiler folds the product; it cannot trace `_version`
            return multiplier * scale
        read = self._scale_read
        if read is None or read[0] is not scale or read[1] != tensor_version(scale):
            read = self._scale_read = (scale, tensor_version(scale), float(scale))
        return multiplier * read[2]

    def term(self, multiplier: float, weight: torch.Tensor) -> Term:
        """This adapter's contribution at user weight `multiplier`, on the original weight `W`."""
        with float32_rebuild(self.scale):
            return self.composition.term(self, multiplier, weight)

    def factors(self, multiplier: float) -> tuple[torch.Tensor, torch.Tensor]:
        """`(F, P)` with the scaled update `c·D = reshape(F @ P, W.shape)` (`Backend.factors`)."""
        with float32_rebuild(self.scale):
            return self.backend.factors(self.coefficient(multiplier))

    def tensors(self, trained_only: bool = False) -> dict[str, torch.Tensor]:
        """FORMAT.md's tensors for this module, by name. With `trained_only`, an update that continues
        a frozen one (`Continued`) gives its trained part's tensors instead of the two combined."""
        backend = trained_part(self.backend) if trained_only else self.backend.plain()
        extra = {name: getattr(self, name) for name in self.extra_names}
        return {**dict(backend.named_parameters()), **extra, "scale": self.scale}


class AdaptedLayer(nn.Module):
    """A Linear or ConvNd with named adapters; forward computes `W'` from the active ones."""

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        if not isinstance(base_layer, ADAPTABLE):
            raise TypeError(f"cannot adapt {type(base_layer).__name__}; supported: Linear, Conv1d/2d/3d")
        self.base_layer = base_layer
        self.adapters = nn.ModuleDict()
        self.active: dict[str, float] = {}  # adapter name -> user weight m
        self.fused: dict[str, float] = {}  # adapter name -> multiplier it was fused with
        self.enabled = True
        self.runtime_scale = 1.0  # diffusers' `cross_attention_kwargs={"scale": x}`
        self._weight_cache: tuple[tuple, torch.Tensor] | None = None
        self._plan: tuple[tuple, bool] | None = None  # (inputs, bypass or not) of `_bypass_is_cheaper`
        # While anything is fused: the original weight, on the CPU (the very tensor, for a CPU layer).
        # Unfusing puts it back, so it is exact in every dtype (FORMAT.md), and `dora` terms, which
        # need `W`, can still be built.
        self._original: torch.Tensor | None = None

    def __getattr__(self, name: str):
        # Code that reads `in_features`, `weight`, `stride`, ... of the layer keeps working.
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["base_layer"], name)

    # --- the forward pass ---------------------------------------------------------------------

    def unfused_terms_active(self) -> list[tuple[Adapter, float]]:
        if not self.enabled or self.runtime_scale == 0:
            return []
        return [
            (self.adapters[name], weight * self.runtime_scale)
            for name, weight in self.active.items()
            if name not in self.fused and weight != 0
        ]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        adapters = self.unfused_terms_active()
        if not adapters:
            return self.base_layer(x)
        if self._bypass_is_cheaper(adapters, x):
            layer = self.base_layer
            out = layer(x)
            plain = None  # W x without the bias, for compositions that scale it (DoRA)
            if any(a.composition.bypass_uses_plain for a, _ in adapters):
                plain = out if layer.bias is None else out - self._bias_for(out, layer.bias)
            # Under autocast the adapter's products run at the autocast dtype anyway: casting the
            # activations up to float32 first would only add a cast there and back.
            autocast = torch.is_autocast_enabled(x.device.type)
            x_adapter = x if autocast else x.to(adapters[0][0].scale.dtype)
            for adapter, multiplier in adapters:
                update = adapter.composition.bypass(adapter, multiplier, layer, x_adapter, plain)
                out = out + update.to(out.dtype)
            return out
        if torch.is_grad_enabled():
            self._weight_cache = None
            # Under torch.compile the compiler decides what backward keeps (its partitioner recomputes
            # cheap tensors such as W' too), and the hand-written backwards would not trace.
            if self._can_recompute_weight() and not torch.compiler.is_compiling():
                if self._rebuilds_in_place(adapters):
                    adapter, multiplier = adapters[0]
                    left, right = adapter.factors(multiplier)
                    if left.requires_grad or right.requires_grad:
                        return _FactoredWeight.apply(self, adapter, x, left, right)
                params = [p for adapter, _ in adapters for p in adapter.parameters() if p.requires_grad]
                if params:
                    return _RecomputedWeight.apply(self, adapters, x, *params)
            return self._forward_with_weight(x, self.adapted_weight(adapters))
        return self._forward_with_weight(x, self._cached_adapted_weight(adapters))

    def _rebuilds_in_place(self, adapters: list[tuple[Adapter, float]]) -> bool:
        """One adapter on an unfused weight, whose update is one matrix product and whose
        composition can build `W'` in that product's memory (float32, whatever the base's dtype)."""
        if len(adapters) != 1 or self.fused:
            return False
        adapter = adapters[0][0]
        return adapter.composition.in_place and adapter.backend.has_factors

    def _can_recompute_weight(self) -> bool:
        layer = self.base_layer
        frozen = not layer.weight.requires_grad and (layer.bias is None or not layer.bias.requires_grad)
        numeric_padding = not isinstance(getattr(layer, "padding", 0), str)  # not "same"/"valid"
        return frozen and getattr(layer, "padding_mode", "zeros") == "zeros" and numeric_padding

    def _cached_adapted_weight(self, adapters: list[tuple[Adapter, float]]) -> torch.Tensor:
        """Inference runs many denoising steps with the same adapters: rebuild `W'` only when a
        multiplier or any tensor changed (in-place edits bump a tensor's `_version`). This costs
        one copy of the weight while unfused; `fuse_adapters` costs none."""
        if torch.compiler.is_compiling():
            # A compiled graph can't keep a Python cache across calls (tensor versions don't trace, and
            # its guards on the key would recompile per layer): it rebuilds `W'`, fused with the rest.
            return self.adapted_weight(adapters)
        tensors = [self.base_layer.weight, *(p for a, _ in adapters for p in a.parameters())]
        key = (
            tuple((id(a), m) for a, m in adapters),
            tuple((id(t), tensor_version(t)) for t in tensors),
            tuple(self.fused.items()),
        )
        if self._weight_cache is None or self._weight_cache[0] != key:
            self._weight_cache = None  # free the old copy before building the new one
            self._weight_cache = (key, self.adapted_weight(adapters))
        return self._weight_cache[1]

    def _forward_with_weight(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        layer = self.base_layer
        if isinstance(layer, nn.Linear):
            return nn.functional.linear(x, weight, layer.bias)
        return conv(layer, x, weight, layer.bias)

    def _bias_for(self, out: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """The bias shaped to broadcast over `out`: output channels are last for a Linear, before
        the spatial axes for a conv."""
        spatial = self.base_layer.weight.ndim - 2
        return bias.reshape(-1, *[1] * spatial) if spatial else bias

    def original_weight(self) -> torch.Tensor:
        """`W`: the base weight with nothing fused into it."""
        weight = self.base_layer.weight
        return weight if self._original is None else self._original.to(weight.device, weight.dtype)

    def adapted_weight(self, adapters: list[tuple[Adapter, float]]) -> torch.Tensor:
        """`W'` in the layer's dtype, from the active unfused adapters and any fused ones."""
        weight = self.original_weight()
        fused = [(self.adapters[name], multiplier) for name, multiplier in self.fused.items()]
        terms = [adapter.term(multiplier, weight) for adapter, multiplier in fused + adapters]
        return compose(weight, terms, weight.dtype)

    def _bypass_is_cheaper(self, adapters: list[tuple[Adapter, float]], x: torch.Tensor) -> bool:
        """Compare multiply-adds: bypass convs/matmuls on the activations vs. rebuilding `W'`. The
        answer depends only on the adapters, the input's shape, training or not, and fusing, so it is
        kept for the next call with the same (a Python cost in every layer's forward otherwise)."""
        if torch.compiler.is_compiling():
            # Shapes are fixed while tracing, so the comparison is decided once per graph; storing the
            # plan on the module would add a guard on it, and a recompile when it changes.
            return self._compare_costs(adapters, x)
        key = (x.shape, torch.is_grad_enabled(), bool(self.fused), *(adapter for adapter, _ in adapters))
        if self._plan is None or self._plan[0] != key:
            self._plan = (key, self._compare_costs(adapters, x))
        return self._plan[1]

    def _compare_costs(self, adapters: list[tuple[Adapter, float]], x: torch.Tensor) -> bool:
        layer = self.base_layer
        # Bypassed terms add on top of whatever is fused (W_f + A_u); a composition that needs the
        # original W (DoRA) says whether it can run on a fused layer.
        if not all(a.composition.can_bypass(a, layer, bool(self.fused)) for a, _ in adapters):
            return False
        in_positions, out_positions = _positions(layer, x)
        training = torch.is_grad_enabled()
        bypass = sum(
            a.backend.bypass_flops(in_positions, out_positions) + a.composition.bypass_flops(a, out_positions)
            for a, _ in adapters
        )
        rebuild = sum(a.backend.delta_flops() for a, _ in adapters) + layer.weight.numel()
        if training:
            # Backward through the bypass is about twice its forward; a rebuilt weight also needs
            # the full-size weight gradient of the layer, which the frozen base never computes.
            bypass *= 3
            rebuild = 3 * rebuild + out_positions * layer.weight.numel()
        return bypass < rebuild

    # --- fusing -------------------------------------------------------------------------------

    @torch.no_grad()
    def fuse(self, names: list[str], scale: float = 1.0) -> bool:
        """Fold adapters into the base weight (with their current user weights times `scale`).
        Refuses, changing nothing, if the fused weight would not be finite. Returns whether it fused."""
        new = {name: self.active.get(name, 1.0) * scale for name in names if name not in self.fused}
        if not new:
            return False
        self._set_fused({**self.fused, **new})
        return True

    @torch.no_grad()
    def unfuse(self) -> None:
        """Take every fused adapter out again: the original weight comes back bit for bit."""
        if not self.fused:
            return
        self._weight_cache = None
        weight = self.base_layer.weight
        if self._original.device == weight.device and self._original.dtype == weight.dtype:
            weight.data = self._original  # the original tensor itself: nothing copied
        else:  # kept on the CPU, or the layer was cast since: copy it back
            weight.copy_(self._original)
        self._original = None
        self.fused = {}

    @torch.no_grad()
    def unfuse_names(self, names: list[str]) -> None:
        """Take only `names` out, keeping the other fused adapters in."""
        rest = {name: m for name, m in self.fused.items() if name not in names}
        if rest:
            self._set_fused(rest)
        else:
            self.unfuse()

    def _set_fused(self, multipliers: dict[str, float]) -> None:
        """Make the base weight `W` with exactly `multipliers`' adapters folded in (from `W` itself)."""
        weight = self.base_layer.weight
        original = self.original_weight()
        if len(multipliers) == 1:
            (name, multiplier), *_ = multipliers.items()
            fused = one_adapted_weight(original, self.adapters[name], multiplier)
        else:
            terms = [self.adapters[name].term(m, original) for name, m in multipliers.items()]
            fused = compose(original, terms, weight.dtype)
        if not all_finite(fused):
            raise ValueError(f"fusing {sorted(multipliers)} would make non-finite weights; nothing was fused")
        self._weight_cache = None
        if self._original is None and weight.device.type == "cpu":
            # Keep the original tensor and give the layer the fused one: no weight-sized copy.
            self._original, weight.data = weight.data, fused
        else:
            if self._original is None:  # accelerator memory is the scarce one: keep W on the CPU
                self._original = weight.detach().to("cpu", copy=True)
            weight.copy_(fused)
        self.fused = multipliers

    def _apply(self, fn, recurse=True):
        """`.to(dtype)`/`.to(device)` move the base layer as asked, but adapters stay float32 (their
        math is float32, FORMAT.md) and the cached `W'` is dropped, not carried over stale."""
        self._weight_cache = None
        self.base_layer._apply(fn, recurse)
        for adapter in self.adapters.values():
            device = fn(adapter.scale).device  # where `fn` sends a tensor (dtype changes are ignored)
            adapter._apply(lambda t, device=device: t.to(device), recurse)
        return self

    def extra_repr(self) -> str:
        return f"adapters={list(self.adapters)}, active={self.active}, fused={list(self.fused)}"


class _RecomputedWeight(torch.autograd.Function):
    """`layer(x)` with the rebuilt weight `W'`, keeping `x` and the adapter tensors for backward
    but not `W'`: a weight-sized copy per layer is what made training memory grow. Backward
    rebuilds `W'` (a few passes over the weight, cheap next to the weight gradient it needs
    anyway), then runs the layer's own backward formulas, not its forward again. The general case
    (several adapters, fused ones, updates that are not one product); `_FactoredWeight` is the
    usual one."""

    @staticmethod
    def forward(ctx, adapted: AdaptedLayer, adapters: list, x: torch.Tensor, *params: torch.Tensor):
        ctx.adapted, ctx.adapters = adapted, adapters
        ctx.save_for_backward(x, *params)
        return adapted._forward_with_weight(x, adapted.adapted_weight(adapters))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, *params = ctx.saved_tensors
        adapted = ctx.adapted
        with torch.enable_grad():
            weight = adapted.adapted_weight(ctx.adapters)
        grad_x, grad_weight = _layer_backward(adapted.base_layer, x, weight, grad, ctx.needs_input_grad[2])
        grad_params = torch.autograd.grad(weight, params, grad_weight.to(weight.dtype), allow_unused=True)
        return (None, None, grad_x, *grad_params)


class _FactoredWeight(torch.autograd.Function):
    """`layer(x)` with `W'` of one adapter whose scaled update is `left @ right` (the usual training
    set-up), built in a per-thread workspace that every layer reuses, with the gradient through it
    in the weight gradient's memory. Like `_RecomputedWeight` it keeps `x`, not `W'`.

    The factors come in as inputs, computed by the caller's autograd graph, so backward returns
    their gradients to the one backward pass instead of running a second one per layer (on a GPU
    a step is bound by the host's launches and such passes, not by arithmetic).
    """

    @staticmethod
    def forward(ctx, adapted: AdaptedLayer, adapter: Adapter, x: torch.Tensor, left, right):
        ctx.adapted, ctx.adapter = adapted, adapter
        ctx.save_for_backward(x, left, right)
        weight = adapted.base_layer.weight
        adapted_weight = _rebuild_in_workspace(weight, adapter, left, right)
        # The layer's operation at the base's dtype, as it runs without adapters (autocast casts to
        # its own dtype either way).
        return adapted._forward_with_weight(x, adapted_weight.to(weight.dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, left, right = ctx.saved_tensors
        layer, adapter = ctx.adapted.base_layer, ctx.adapter
        weight = _rebuild_in_workspace(layer.weight, adapter, left, right)
        grad_x, grad_weight = _layer_backward(layer, x, weight, grad, ctx.needs_input_grad[2])
        grad_update = adapter.composition.pull_back_in_place(grad_weight.float(), layer.weight, weight)
        del weight  # the workspace is the next layer's
        grad_update = grad_update.reshape(left.shape[0], right.shape[1])
        grad_left = grad_update @ right.T if ctx.needs_input_grad[3] else None
        grad_right = left.T @ grad_update if ctx.needs_input_grad[4] else None
        return None, None, grad_x, grad_left, grad_right


def _layer_backward(
    layer: nn.Module, x: torch.Tensor, weight: torch.Tensor, grad: torch.Tensor, input_grad: bool
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The gradients of `layer`'s operation with weight `weight` for its input (if `input_grad`) and
    the weight, given the output's. The operation ran at the gradient's dtype (lower than `W'` under
    autocast); the weight's gradient comes back in that dtype."""
    with torch.no_grad():
        x_op, weight_op = x.to(grad.dtype), weight.to(grad.dtype)
        if isinstance(layer, nn.Linear):
            grad_x = (grad @ weight_op) if input_grad else None
            grad_weight = grad.reshape(-1, grad.shape[-1]).T @ x_op.reshape(-1, x.shape[-1])
            return grad_x, grad_weight
        return conv_backward(layer, x_op, weight_op, grad, input_grad)


class _Workspace(threading.local):
    """A float32 buffer per thread and device, as large as the largest weight rebuilt in it.

    Training rebuilds one layer's `W'` at a time (forward, then again in backward) and is done with
    it before the next layer's. Reusing one buffer saves a fresh weight-sized tensor per layer and
    pass: on the CPU its page faults cost about twice the matrix product that fills it.
    """

    def __init__(self):
        self.buffers: dict[torch.device, torch.Tensor] = {}

    def take(self, rows: int, cols: int, device: torch.device) -> torch.Tensor:
        buffer = self.buffers.get(device)
        if buffer is None or buffer.numel() < rows * cols:
            self.buffers.pop(device, None)  # free the smaller one first
            buffer = self.buffers[device] = torch.empty(rows * cols, dtype=torch.float32, device=device)
        return buffer[: rows * cols].view(rows, cols)


_WORKSPACE = _Workspace()


def _rebuild_in_workspace(
    weight: torch.Tensor, adapter: Adapter, left: torch.Tensor, right: torch.Tensor
) -> torch.Tensor:
    """`W'` for one adapter with update `left @ right`, in this thread's workspace."""
    out = _WORKSPACE.take(left.shape[0], right.shape[1], weight.device)
    with float32_rebuild(weight):
        update = torch.mm(left, right, out=out).view(weight.shape)
    return adapter.composition.build_in_place(weight, update)


def one_adapted_weight(weight: torch.Tensor, adapter: Adapter, multiplier: float) -> torch.Tensor:
    """`W'` of one adapter on `weight`, as a fresh tensor of its dtype: built in the memory of the
    update itself where the backend is one product and the composition works in place (one
    weight-sized allocation instead of two). No autograd: for fusing and checks."""
    if weight.dtype == torch.float32 and adapter.composition.in_place and adapter.backend.has_factors:
        left, right = adapter.factors(multiplier)
        with float32_rebuild(weight):
            update = (left @ right).view(weight.shape)
        return adapter.composition.build_in_place(weight, update)
    return compose(weight, [adapter.term(multiplier, weight)], weight.dtype)


def _positions(layer: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    """Input and output positions (tokens, or batch x pixels) one weight is applied at."""
    if isinstance(layer, nn.Linear):
        tokens = x.numel() // x.shape[-1]
        return tokens, tokens
    spatial = x.shape[2:] if x.ndim == layer.weight.ndim else x.shape[1:]
    batch = x.shape[0] if x.ndim == layer.weight.ndim else 1
    in_positions = batch * math.prod(spatial)
    return in_positions, max(1, in_positions // math.prod(layer.stride))
