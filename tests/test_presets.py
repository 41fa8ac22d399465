"""Every preset: built by name, starting exactly at the base model, with its paper's structure."""

import pytest
import torch
from torch import nn

import plugin
from plugin import METHODS, AdapterConfig


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(16, 32, 3, padding=1)
        self.depthwise = nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.proj = nn.Linear(32, 24)

    def forward(self, x):
        return self.proj(self.depthwise(self.conv(x)).mean(dim=(2, 3)))


EXPECTED = {  # preset -> (composition, Linear backend, conv backend, lie map where it matters)
    "lora": ("additive", "lowrank", "lowrank", None),
    "flora": ("additive", "tucker", "tucker", None),
    "liera": ("lie", "lowrank", "tucker", "exp"),
    "hira": ("lie", "lowrank", "lowrank", "linear"),
    "abba": ("additive", "hadamard", "hadamard", None),
    "loha": ("additive", "hadamard", "hadamard", None),
    "bhra": ("lie", "blocklowrank", "blocklowrank", "linear"),
    "gralora": ("additive", "blocklowrank", "blocklowrank", None),
    "diablo": ("additive", "blockdiag", "blockdiag", None),
    "ssb": ("lie", "rowcol", "rowcol", "exp"),
    "ssl": ("lie", "rowcol", "rowcol", "linear"),
    "ia3": ("lie", "rowcol", "rowcol", "linear"),
    "dora": ("dora", "lowrank", "lowrank", None),
    "dora-flora": ("dora", "tucker", "tucker", None),
}


def test_every_preset_is_listed():
    assert set(METHODS) == set(EXPECTED)


@pytest.mark.parametrize("method", sorted(EXPECTED))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_fresh_adapter_is_the_base_model_bit_for_bit(method, dtype):
    torch.manual_seed(0)
    block = Block().to(dtype)
    x = torch.randn(2, 16, 6, 6, dtype=dtype)
    with torch.no_grad():
        base = block(x)
    plugin.add_adapter(
        block, AdapterConfig(method=method, rank=4, targets=["conv", "depthwise", "proj"]), "a"
    )
    composition, linear, conv, lie_map = EXPECTED[method]
    for name, backend in (("proj", linear), ("conv", conv), ("depthwise", conv)):
        layer = getattr(block, name)
        adapter = layer.adapters["a"]
        assert (adapter.composition.name, adapter.backend.name) == (composition, backend)
        if lie_map:
            assert adapter.composition.lie_map == lie_map
        assert torch.equal(layer.adapted_weight(layer.unfused_terms_active()), layer.base_layer.weight)
    with torch.no_grad():
        assert torch.equal(block(x), base)
    assert torch.equal(block(x), base)  # the training path too
    assert plugin.trainable_parameters(block) > 0


def test_preset_structure_follows_the_papers():
    torch.manual_seed(0)
    layer = nn.Conv2d(16, 32, 3)

    def adapter(method, **kwargs):
        block = nn.Sequential(nn.Conv2d(16, 32, 3))
        block[0].weight.data.copy_(layer.weight)
        plugin.add_adapter(block, AdapterConfig(method=method, targets=["0"], **kwargs), "a")
        return block[0].adapters["a"]

    assert adapter("hira").scale == 1.0
    assert adapter("ia3").backend.row.shape == (32,) and not hasattr(adapter("ia3").backend, "col")
    assert adapter("ssl").backend.col.shape == (16,) and not hasattr(adapter("ssl").backend, "row")
    ssb = adapter("ssb").backend
    assert ssb.row.shape == (32,) and ssb.col.shape == (16,)
    dora = adapter("dora")
    torch.testing.assert_close(dora.magnitude, layer.weight.detach().flatten(1).norm(dim=1))
    gralora = adapter("gralora", rank=8).backend
    assert gralora.block_up.shape == (2, 2, 16, 4)  # k = 2 blocks a side, rank r / k each
    loha, abba = adapter("loha").backend, adapter("abba").backend
    assert torch.count_nonzero(loha.hada_w2_a) == 0 and 0.05 < loha.hada_w1_a.std() < 0.2
    assert torch.count_nonzero(abba.hada_w2_a) == 0 and torch.linalg.matrix_rank(abba.hada_w1_a) == 8
    assert adapter("diablo", blocks=4).backend.blockdiag_blocks.shape == (4, 8, 4, 3, 3)


def test_options_that_a_backend_does_not_take_are_refused():
    with pytest.raises(ValueError, match="blocks does not apply to the lowrank"):
        AdapterConfig(method="lora", blocks=4)
    with pytest.raises(ValueError, match="vectors does not apply"):
        AdapterConfig(method="liera", vectors="row")
    AdapterConfig(method="gralora", blocks=4)
    AdapterConfig(method="lora", backend="rowcol", vectors="row")
    with pytest.raises(ValueError, match="unknown adapter method"):
        AdapterConfig(method="lycoris")
