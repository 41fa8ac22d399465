"""The default size of the Tucker convolution updates (flora's and liera's), the sizes their defaults were
measured at: liera's at LoRA's parameter count, flora's at channel ranks twice `--rank`.

`--rank 8` read literally gives a 3x3 convolution the Tucker ranks [8, 8, 3, 3], about a third of LoRA's
parameters at rank 8; on the quality benchmark those learn less, and a shape the base never drew is lost
(README, "Tucker convolutions at LoRA's parameter count"). At LoRA's count flora's channel ranks (26 at
rank 8 on the toy base) spread the subject over more directions than LoRA's and fit unseen views worse;
at twice the rank ([16, 16, 2, 2], 0.61x LoRA's parameters) it reaches LoRA's held-out fit at less drift
(README, "flora's convolutions at twice its rank"). Counting parameters is arithmetic on shapes, so it is
written here rather than by building the adapters.
"""

from __future__ import annotations

import dataclasses
import math

from torch import nn

from .config import AdapterConfig, matrix_rank, mode_ranks
from .inject import find_targets

SPATIAL_RANK = 2  # the kernel modes' Tucker rank (3, with lower channel ranks, screened no better)
# Presets whose convolutions' channel ranks are a multiple of --rank instead of LoRA's count.
CHANNEL_RANK_MULTIPLES = {"flora": 2}


def lora_parameters(shape: tuple[int, ...], rank: int) -> int:
    """LoRA's trainable numbers on a weight of `shape` at `rank`: `r · fan_in + out · r`."""
    r = matrix_rank(rank, shape, "lowrank")
    return r * (math.prod(shape[1:]) + shape[0])


def tucker_parameters(shape: tuple[int, ...], ranks: list[int]) -> int:
    """A Tucker update's trainable numbers on a weight of `shape`: the core and one factor per mode."""
    clipped = mode_ranks(ranks, shape)
    return math.prod(clipped) + sum(size * r for size, r in zip(shape, clipped))


def channel_ranks(channels: int, modes: int) -> list[int]:
    """Tucker ranks `[c, c, 2, 2]` for a weight of `modes` modes: `channels` on out and in, the kernel's at
    `SPATIAL_RANK`."""
    return [channels, channels] + [SPATIAL_RANK] * (modes - 2)


def lora_matched_tucker_rank(shapes: list[tuple[int, ...]], rank: int) -> list[int]:
    """Tucker ranks `[c, c, 2, 2]` (channels, kernel) whose parameter count over convolution weights of
    `shapes` is the closest to LoRA's at `rank` on the same weights (the smaller `c` on a tie)."""
    if not shapes:
        raise ValueError("lora_matched_tucker_rank needs at least one convolution weight shape")
    modes = max(len(shape) for shape in shapes)
    target = sum(lora_parameters(shape, rank) for shape in shapes)

    def distance(c: int) -> int:
        return abs(sum(tucker_parameters(shape, channel_ranks(c, modes)) for shape in shapes) - target)

    widest = max(max(shape[:2]) for shape in shapes)
    return channel_ranks(min(range(1, widest + 1), key=distance), modes)


def with_default_conv_rank(config: AdapterConfig, model: nn.Module) -> AdapterConfig:
    """`config` with its default Tucker convolution ranks as its `conv_rank` where it sets none, its
    convolutions' backend is Tucker and `model` has convolutions among its targets: `[m·r, m·r, 2, 2]` for a
    preset in `CHANNEL_RANK_MULTIPLES` (m) and otherwise `lora_matched_tucker_rank`. Else `config` unchanged."""
    if config.conv_rank is not None or not isinstance(config.rank, int) or config.backend_for(4) != "tucker":
        return config
    shapes = [tuple(m.weight.shape) for m in find_targets(model, config).values() if m.weight.ndim > 2]
    if not shapes:
        return config
    if config.method in CHANNEL_RANK_MULTIPLES:
        channels = CHANNEL_RANK_MULTIPLES[config.method] * config.rank
        modes = max(len(shape) for shape in shapes)
        return dataclasses.replace(config, conv_rank=channel_ranks(channels, modes))
    return dataclasses.replace(config, conv_rank=lora_matched_tucker_rank(shapes, config.rank))
