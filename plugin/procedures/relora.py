"""ReLoRA (Lialin et al. 2023): every T steps, fold what the adapter learned into a frozen part and
start it afresh, so a run of k cycles reaches k times the adapter's rank with its parameter count.

A restart keeps `W'` as it is: the frozen part becomes (frozen + trained + any frozen part of the
fresh start) and the trained tensors are re-initialised in place, so the optimizer keeps pointing at
them (their optimizer state must be reset by the caller). The saved file is the frozen and trained
parts combined: a lowrank/tucker update of the summed rank, or added vectors and blocks (FORMAT.md).
For the `linear` lie map this means restarts add in the algebra, `W ⊙ (1 + c·ΣD_k)`, rather than
multiplying `W ⊙ Π(1 + c·D_k)`, which no single backend could hold; for DoRA the magnitude is kept.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..backends import BACKEND_CLASSES, Backend, Continued, frozen_part, trained_part
from ..config import AdapterConfig
from ..inject import adapted_layers, adapter_configs, adapters_named, new_backend


def check_restartable(config: AdapterConfig) -> None:
    """Refuse, before training, an adapter whose updates don't add up to one update of their kind."""
    for name in sorted({config.backend_for(2), config.backend_for(4)}):
        if BACKEND_CLASSES[name].combine.__func__ is Backend.combine.__func__:
            raise ValueError(
                f"ReLoRA restarts need updates that add up to one update of their kind; a sum of {name} "
                "updates is not one (choose a preset with another backend, e.g. lora, flora, liera, gralora)"
            )


@torch.no_grad()
def restart(model: nn.Module, adapter_name: str, seed: int) -> list[nn.Parameter]:
    """Fold the adapter's trained part into its frozen part and re-initialise it (drawn from `seed`, so
    every process and every resumed run draws the same). Returns the re-initialised parameters."""
    config = adapter_configs(model)[adapter_name]
    restarted = []
    devices = sorted({p.device for p in model.parameters() if p.device.type == "cuda"}, key=str)
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        layers = adapted_layers(model)
        for path, adapter in adapters_named(model, adapter_name).items():
            trained, frozen = trained_part(adapter.backend), frozen_part(adapter.backend)
            fresh = new_backend(config, path, layers[path].original_weight())
            parts = [(part, 1.0) for part in (frozen, trained, frozen_part(fresh)) if part is not None]
            combined = type(trained).combine(parts)
            new = dict(trained_part(fresh).named_parameters())
            for name, param in trained.named_parameters():
                param.copy_(new[name])
            adapter.backend = Continued(combined, trained)
            restarted += list(trained.parameters())
    return restarted


def restart_warmup(schedule: Callable[[int], float], every: int, warmup: int) -> Callable[[int], float]:
    """ReLoRA's jagged schedule: `schedule`, with a linear warm-up over `warmup` steps after each
    restart (the first cycle keeps the schedule's own warm-up). Steps count from 0, restarts at
    multiples of `every`."""

    def factor(step: int) -> float:
        since = step % every
        if step < every or since >= warmup:
            return schedule(step)
        return schedule(step) * (since + 1) / (warmup + 1)

    return factor
