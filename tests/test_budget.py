"""Tucker convolutions at LoRA's parameter count (plugin.budget): counted as the backends build them, and
on the toy base the sizes the quality benchmark's budgets (and the defaults) were measured at."""

from pathlib import Path

import pytest
from diffusers import UNet2DConditionModel

import plugin
from plugin.backends import LowRank, Tucker
from plugin.budget import (
    lora_matched_tucker_rank,
    lora_parameters,
    tucker_parameters,
    with_lora_matched_conv_rank,
)
from plugin.config import AdapterConfig

TOY_UNET = Path(__file__).resolve().parents[1] / "assets" / "toy-sd" / "unet"


@pytest.mark.parametrize("shape", [(64, 64, 3, 3), (128, 64, 1, 1), (8, 300, 3, 3), (96, 48)])
@pytest.mark.parametrize("rank", [2, 8, 26])
def test_counts_are_the_backends_own(shape, rank):
    assert lora_parameters(shape, rank) == plugin.trainable_parameters(LowRank(shape, rank))
    ranks = [rank, rank, 2, 2][: len(shape)]
    assert tucker_parameters(shape, ranks) == plugin.trainable_parameters(Tucker(shape, ranks))


def test_the_matched_rank_is_the_closest_count():
    shapes = [(64, 64, 3, 3), (128, 64, 3, 3), (128, 64, 1, 1)]
    target = sum(lora_parameters(shape, 8) for shape in shapes)
    c, *spatial = lora_matched_tucker_rank(shapes, 8)
    assert c == spatial[0] and spatial[1:] == [2, 2]  # [c, c, 2, 2]

    def off(c: int) -> int:
        return abs(sum(tucker_parameters(shape, [c, c, 2, 2]) for shape in shapes) - target)

    assert off(c) <= off(c - 1) and off(c) <= off(c + 1)
    with pytest.raises(ValueError, match="at least one convolution"):
        lora_matched_tucker_rank([], 8)


@pytest.fixture(scope="module")
def toy_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel.from_pretrained(TOY_UNET)


@pytest.mark.parametrize("rank, conv_rank", [(2, [8, 8, 2, 2]), (4, [14, 14, 2, 2]), (8, [26, 26, 2, 2])])
def test_on_the_toy_base_the_quality_benchmarks_budgets(toy_unet, rank, conv_rank):
    for method in ("flora", "liera"):
        config = AdapterConfig(method=method, rank=rank, targets="cross-kv+conv")
        assert with_lora_matched_conv_rank(config, toy_unet).conv_rank == conv_rank


def test_the_script_default_costs_what_lora_costs(toy_unet):
    """flora with the matched conv rank trains about LoRA's count, [8, 8, 3, 3] about a third of it."""

    def trainable(config: AdapterConfig) -> int:
        plugin.add_adapter(toy_unet, config, "counted")
        count = plugin.trainable_parameters(toy_unet)
        plugin.delete_adapters(toy_unet, "counted")
        return count

    lora = trainable(AdapterConfig(method="lora", rank=8, targets="cross-kv+conv"))
    flora = AdapterConfig(method="flora", rank=8, targets="cross-kv+conv")
    matched = trainable(with_lora_matched_conv_rank(flora, toy_unet))
    literal = trainable(flora)
    assert (lora, matched) == (314_368, 321_506)  # quality.py's large budget
    assert abs(matched - lora) < 0.03 * lora and literal < 0.4 * lora


def test_what_it_leaves_alone(toy_unet):
    unchanged = [
        AdapterConfig(method="flora", rank=8, conv_rank=[4, 4, 3, 3]),  # asked for
        AdapterConfig(method="flora", rank=8, conv_rank=4),
        AdapterConfig(method="lora", rank=8),  # lowrank convolutions
        AdapterConfig(method="liera", rank=8, conv_backend="lowrank"),
        AdapterConfig(method="flora", rank=8, targets="attn"),  # no convolution targeted
    ]
    for config in unchanged:
        assert with_lora_matched_conv_rank(config, toy_unet) is config
    tucker_convs = AdapterConfig(method="lora", rank=8, conv_backend="tucker")  # LoCon-Tucker
    assert with_lora_matched_conv_rank(tucker_convs, toy_unet).conv_rank[2:] == [2, 2]
