"""Each backend's D against an einsum written here, and its bypass against a layer running D."""

import string
import threading

import pytest
import tensorly as tl
import torch
from torch import nn

from plugin import CP, AdapterConfig, LowRank, Tucker
from plugin.config import mode_ranks

LAYERS = {
    "linear": lambda: nn.Linear(12, 10),
    "conv3x3": lambda: nn.Conv2d(6, 8, 3, padding=1),
    "conv1x1": lambda: nn.Conv2d(6, 8, 1),
    "depthwise": lambda: nn.Conv2d(6, 6, 3, padding=1, groups=6),
    "conv3d": lambda: nn.Conv3d(4, 5, (3, 3, 2)),
    "strided_reflect": lambda: nn.Conv2d(6, 8, 3, stride=2, padding=1, padding_mode="reflect"),
    "conv1d": lambda: nn.Conv1d(6, 8, 5, padding=2),
}
INPUTS = {
    "linear": (3, 7, 12),
    "conv3x3": (2, 6, 9, 9),
    "conv1x1": (2, 6, 5, 5),
    "depthwise": (2, 6, 7, 7),
    "conv3d": (2, 4, 5, 5, 4),
    "strided_reflect": (2, 6, 9, 9),
    "conv1d": (2, 6, 11),
}


def filled(backend):
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in backend.parameters():
            param.copy_(torch.randn(param.shape, generator=generator))
    return backend


def einsum_tucker(core, factors):
    letters = string.ascii_lowercase
    core_idx = letters[: core.ndim]
    out_idx = letters[13 : 13 + core.ndim]
    spec = ",".join([core_idx] + [o + c for o, c in zip(out_idx, core_idx)]) + "->" + out_idx
    return torch.einsum(spec, core, *factors)


def einsum_cp(weights, factors):
    letters = string.ascii_lowercase[: len(factors)]
    spec = "z," + ",".join(f"{i}z" for i in letters) + "->" + letters
    return torch.einsum(spec, weights, *factors)


@pytest.mark.parametrize("kind", LAYERS)
def test_lowrank_delta_is_up_times_down(kind):
    shape = tuple(LAYERS[kind]().weight.shape)
    backend = filled(LowRank(shape, rank=3))
    expected = torch.einsum("or,ri->oi", backend.lora_up, backend.lora_down).reshape(shape)
    torch.testing.assert_close(backend.delta(), expected)
    assert backend.lora_down.shape == (3, shape[1] * int(torch.tensor(shape[2:]).prod()))


@pytest.mark.parametrize("kind", LAYERS)
def test_tucker_delta_is_mode_products(kind):
    shape = tuple(LAYERS[kind]().weight.shape)
    backend = filled(Tucker(shape, rank=[4, 3, 2, 2]))
    assert backend.tucker_core.shape == tuple(mode_ranks([4, 3, 2, 2], shape))
    expected = einsum_tucker(backend.tucker_core, list(backend.tucker_factor))
    torch.testing.assert_close(backend.delta(), expected)


@pytest.mark.parametrize("kind", LAYERS)
def test_cp_delta_is_sum_of_outer_products(kind):
    shape = tuple(LAYERS[kind]().weight.shape)
    backend = filled(CP(shape, rank=5))
    expected = einsum_cp(backend.cp_weights, list(backend.cp_factor))
    torch.testing.assert_close(backend.delta(), expected)


@pytest.mark.parametrize("backend_cls", [LowRank, Tucker])
@pytest.mark.parametrize("kind", LAYERS)
def test_bypass_equals_layer_with_delta_weight(backend_cls, kind):
    layer = LAYERS[kind]()
    backend = filled(backend_cls(tuple(layer.weight.shape), rank=3))
    if not backend.can_bypass(layer):
        assert layer.groups > 1  # only grouped convs fall back to rebuilding the weight
        return
    x = torch.randn(INPUTS[kind], generator=torch.Generator().manual_seed(1))
    if isinstance(layer, nn.Linear):
        expected = nn.functional.linear(x, backend.delta())
    else:
        expected = layer._conv_forward(x, backend.delta(), None)
    torch.testing.assert_close(backend.bypass(layer, x), expected, rtol=1e-4, atol=1e-4)


def test_zero_initialisation_gives_zero_delta():
    shape = (8, 6, 3, 3)
    for backend in (LowRank(shape, 4), Tucker(shape, [4, 4, 2, 2]), CP(shape, 4)):
        assert torch.count_nonzero(backend.delta()) == 0
        assert any(torch.count_nonzero(p) > 0 for p in backend.parameters())  # factors are random


def test_ranks_clip_to_mode_sizes_and_lists_need_tucker():
    assert mode_ranks([16, 16, 2, 2], (8, 320, 3, 3)) == [8, 16, 2, 2]
    assert mode_ranks([16, 16, 2], (8, 8, 3, 3, 3)) == [8, 8, 2, 2, 2]
    assert mode_ranks(8, (320, 768)) == [8, 8]
    assert LowRank((4, 2, 1, 1), rank=8).lora_down.shape == (2, 2)
    with pytest.raises(ValueError, match="only apply to the tucker backend"):
        LowRank((8, 6, 3, 3), rank=[4, 4, 2, 2])
    config = AdapterConfig(rank=8, conv_rank=[16, 16, 2, 2], rank_pattern={"to_k": 2})
    assert config.rank_for("mid_block.attentions.0.transformer_blocks.0.attn1.to_k", 2) == 2
    assert config.rank_for("mid_block.attentions.0.transformer_blocks.0.attn1.to_q", 2) == 8
    assert config.rank_for("down_blocks.0.resnets.0.conv1", 4) == [16, 16, 2, 2]
    with pytest.raises(ValueError, match="positive integers"):
        AdapterConfig(rank=0)


def test_tensorly_backend_of_the_user_is_untouched():
    tl.set_backend("numpy")
    with tl.backend_context("pytorch"):  # the user's own setting survives our calls inside it
        Tucker((8, 6, 3, 3), 2).delta()
        assert tl.get_backend() == "pytorch"
    Tucker((8, 6, 3, 3), 2).delta()
    CP((8, 6, 3, 3), 2).delta()
    assert tl.get_backend() == "numpy"

    # A thread that never chose a backend follows the global default, also after our calls
    # (tl.backend_context would leave it pinned to the backend it had before).
    computed, changed, seen = threading.Event(), threading.Event(), []

    def worker():
        Tucker((8, 6, 3, 3), 2).delta()
        computed.set()
        changed.wait(10)
        seen.append(tl.get_backend())

    thread = threading.Thread(target=worker)
    thread.start()
    computed.wait(10)
    tl.set_backend("pytorch")  # the user's program changes the global default
    changed.set()
    thread.join()
    tl.set_backend("numpy")
    assert seen == ["pytorch"]
