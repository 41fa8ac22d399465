"""`dora` (DoRA): a trainable magnitude per output channel times the direction of `W + s·D`.

    V = W + s·D,   g = magnitude / ||V||,   Δ = g ⊙ V - W,   W' = W + m·Δ

Norms are per output channel (over every mode but the first). As in the DoRA paper's
memory-saving variant, `||V||` is treated as a constant in backward (it is detached), so the
gradient flows through `V`'s direction and the magnitude only.
"""

from __future__ import annotations

import torch

from .base import Composition, Term


def channel_norms(weight: torch.Tensor) -> torch.Tensor:
    """The float32 norm of each output channel, shaped to broadcast against `weight`."""
    return torch.linalg.vector_norm(weight.float(), dim=tuple(range(1, weight.ndim)), keepdim=True)


class Dora(Composition):
    name = "dora"
    since = 2
    bypassable = True
    bypass_uses_plain = True
    extra_names = ("magnitude",)

    def extra_tensors(self, weight):
        return {"magnitude": channel_norms(weight).flatten()}

    def extra_shapes(self, shape):
        return {"magnitude": (shape[0],)}

    def term(self, adapter, multiplier, weight):
        original = weight.float()
        direction = original + adapter.backend.delta(adapter.scale)
        norms = channel_norms(direction).detach()
        magnitude = adapter.magnitude.reshape(norms.shape)
        gain = torch.where(norms > 0, magnitude / norms.clamp_min(torch.finfo(norms.dtype).tiny), 0.0)
        return Term("addend", multiplier * (gain * direction - original))

    # As a bypass: W' x = (g - 1) ⊙ W x + g ⊙ s·D x added to W x, with ||W + sD||² per channel taken
    # from the factors (||W||² + 2<W, sD> + ||sD||²), never building W + sD (as PEFT runs DoRA).

    def can_bypass(self, adapter, layer, fused):
        return not fused and adapter.backend.has_factors and adapter.backend.can_bypass(layer)

    def bypass(self, adapter, multiplier, layer, x, plain):
        weight = layer.weight.detach().float().reshape(layer.weight.shape[0], -1)
        left, right = adapter.backend.factors(adapter.scale)  # s·D = left @ right
        with torch.no_grad():  # the norm is a constant in backward
            cross = ((weight @ right.T) * left).sum(1)
            update_sq = ((left @ (right @ right.T)) * left).sum(1)
            # ||W|| as the magnitude was initialised, times a correction that is exactly 1 for D = 0:
            # a fresh adapter then gives the base's output bit for bit, as the rebuilt W' does.
            base = channel_norms(layer.weight).flatten()
            safe = base.clamp_min(torch.finfo(base.dtype).tiny)
            norms = base * (1 + (2 * cross + update_sq) / safe.square()).clamp_min(0).sqrt()
        gain = torch.where(norms > 0, adapter.magnitude / norms.clamp_min(torch.finfo(norms.dtype).tiny), 0.0)
        # Output channels are the last axis of a Linear's output, the one before the spatial axes of a conv's.
        gain = gain.reshape(-1, *[1] * (layer.weight.ndim - 2))
        update = adapter.backend.bypass(layer, x) * adapter.scale
        return multiplier * ((gain - 1) * plain.float() + gain * update)

    def bypass_flops(self, adapter, out_positions):
        rows, width = adapter.backend.shape[0], adapter.backend.delta_flops() // adapter.backend.shape[0]
        return rows * width + out_positions * rows * 3  # the norms, then the element-wise blend
