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
