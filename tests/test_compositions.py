"""The adapted weight against FORMAT.md's formula, fused and unfused, on single layers."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import plugin
from plugin import AdapterConfig
from tests.conftest import randomize

# (composition, backend, lie_map): every backend under every composition it is used with.
VARIANTS = [
    ("additive", "lowrank", "exp"),
    ("additive", "tucker", "exp"),
    ("additive", "cp", "exp"),
    ("lie", "lowrank", "exp"),
    ("lie", "tucker", "exp"),
    ("lie", "cp", "linear"),
    ("lie", "lowrank", "linear"),
    ("additive", "hadamard", "exp"),
    ("lie", "hadamard", "exp"),
    ("additive", "blockdiag", "exp"),
    ("lie", "blockdiag", "linear"),
    ("additive", "blocklowrank", "exp"),
    ("lie", "blocklowrank", "linear"),
    ("lie", "rowcol", "exp"),
    ("lie", "rowcol", "linear"),
    ("lie", "rowcol:row", "linear"),  # (IA)³
    ("lie", "rowcol:col", "exp"),
    ("additive", "rowcol", "exp"),
    ("dora", "lowrank", "exp"),
    ("dora", "tucker", "exp"),
    ("dora", "hadamard", "exp"),
    ("dora", "blocklowrank", "exp"),
]


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(6, 8, 3, padding=1)
        self.proj = nn.Linear(8, 4)

    def forward(self, x):
        return self.proj(self.conv(x).mean(dim=(2, 3)))


def reference_weight(layer, adapters: list[tuple[str, float]]) -> torch.Tensor:
    """FORMAT.md written out by hand for one module, differentiable in the adapter tensors:
    W' = W ⊙ Π φ(m s D) + Σ_additive m s D + Σ_dora m (g ⊙ (W + s D) - W), g = magnitude / ||W + s D||."""
    weight = layer._original if layer._original is not None else layer.base_layer.weight.detach()
    weight = weight.clone().float()
    product, total = torch.ones_like(weight), torch.zeros_like(weight)
    for adapter_name, m in adapters:
        adapter = layer.adapters[adapter_name]
        composition, s = adapter.composition, adapter.scale
        delta = adapter.backend.delta()
        if composition.name == "additive":
            total = total + m * s * delta
        elif composition.name == "lie":
            product = product * (
                torch.exp(m * s * delta) if composition.lie_map == "exp" else 1 + m * s * delta
            )
        else:
            direction = weight + s * delta
            norms = direction.flatten(1).norm(dim=1).detach().reshape(-1, *[1] * (weight.ndim - 1))
            gain = adapter.magnitude.reshape(norms.shape) / norms
            total = total + m * (gain * direction - weight)
    return weight * product + total


def reference(block: Block, adapters: list[tuple[str, float]], x: torch.Tensor) -> torch.Tensor:
    h = F.conv2d(x, reference_weight(block.conv, adapters), block.conv.bias, padding=1)
    return F.linear(h.mean(dim=(2, 3)), reference_weight(block.proj, adapters), block.proj.bias)


def adapted_block(variants, scale=0.7, targets=("conv", "proj")):
    torch.manual_seed(0)
    block = Block()
    for i, (composition, backend, lie_map) in enumerate(variants):
        backend, _, vectors = backend.partition(":")
        config = AdapterConfig(
            method="lora",
            composition=composition,
            backend=backend,
            lie_map=lie_map,
            rank=[3, 3, 2, 2] if backend == "tucker" else 4,
            blocks=2 if backend.startswith("block") else None,
            vectors=vectors or None,
            targets=list(targets),
            scale=scale,
        )
        plugin.add_adapter(block, config, f"a{i}")
    randomize(block, std=0.2)
    return block


@pytest.mark.parametrize("variant", VARIANTS)
def test_unfused_and_fused_match_the_formula(variant):
    block = adapted_block([variant])
    x = torch.randn(4, 6, 7, 7)
    with torch.no_grad():
        expected = reference(block, [("a0", 1.0)], x)
        unfused = block(x)
        plugin.fuse_adapters(block)
        fused = block(x)
    torch.testing.assert_close(unfused, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused, expected, rtol=1e-5, atol=1e-5)
    plugin.unfuse_adapters(block)
    plugin.disable_adapters(block)
    with torch.no_grad():
        assert (block(x) - expected).abs().max() > 1e-3  # the adapter did change the output


def test_adapters_change_outputs_and_training_mode_matches():
    block = adapted_block([("lie", "tucker", "exp"), ("additive", "lowrank", "exp")])
    plugin.set_adapters(block, ["a0", "a1"], [0.5, 2.0])
    x = torch.randn(4, 6, 7, 7)
    with torch.no_grad():
        inference = block(x)
        plugin.disable_adapters(block)
        base = block(x)
        plugin.enable_adapters(block)
    training = block(x)  # grad enabled: rebuilds through a checkpoint, additive may take the bypass
    torch.testing.assert_close(
        inference, reference(block, [("a0", 0.5), ("a1", 2.0)], x), rtol=1e-5, atol=1e-5
    )
    torch.testing.assert_close(training, inference, rtol=1e-5, atol=1e-5)
    assert (inference - base).abs().max() > 1e-3


def test_mixed_adapters_follow_the_order_rule_with_part_fused():
    """Fusing the additive adapter first must not make the lie one multiply it, and a dora adapter's
    Δ is always taken from the original W, whatever is fused (FORMAT.md)."""
    block = adapted_block(
        [
            ("additive", "lowrank", "exp"),
            ("lie", "lowrank", "exp"),
            ("lie", "tucker", "linear"),
            ("dora", "hadamard", "exp"),
        ]
    )
    names = [("a0", 1.0), ("a1", 0.5), ("a2", 1.0), ("a3", 0.7)]
    plugin.set_adapters(block, [n for n, _ in names], [m for _, m in names])
    x = torch.randn(4, 6, 7, 7)
    expected = reference(block, names, x)
    with torch.no_grad():
        for fused in (["a0"], ["a3"], ["a2"], None):
            plugin.fuse_adapters(block, adapter_names=fused)
            torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-5)


def test_two_exp_lie_adapters_fuse_in_either_order():
    def fused_weights(order):
        block = adapted_block([("lie", "lowrank", "exp"), ("lie", "tucker", "exp")])
        plugin.set_adapters(block, ["a0", "a1"], [1.0, 1.0])
        for name in order:
            plugin.fuse_adapters(block, adapter_names=[name])
        return block.conv.base_layer.weight.detach().clone(), block.proj.base_layer.weight.detach().clone()

    for first, second in zip(fused_weights(["a0", "a1"]), fused_weights(["a1", "a0"])):
        torch.testing.assert_close(first, second, rtol=2e-7, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("variant", VARIANTS)
def test_unfuse_restores_the_weights_bit_for_bit(variant, dtype):
    block = adapted_block([variant])
    for layer in (block.conv, block.proj):
        layer.base_layer.to(dtype)
    original = {n: p.detach().clone() for n, p in block.named_parameters() if "base_layer" in n}
    for _ in range(3):
        plugin.fuse_adapters(block, scale=1.3)
        changed = {n: p for n, p in block.named_parameters() if "base_layer.weight" in n}
        assert all(not torch.equal(original[n], p) for n, p in changed.items())
        plugin.unfuse_adapters(block)
    for name, param in block.named_parameters():
        if name in original:
            assert torch.equal(param, original[name]), name


def test_runtime_scale_and_weights_are_linear_for_additive():
    block = adapted_block([("additive", "lowrank", "exp")], targets=["conv"])  # output linear in W
    x = torch.randn(4, 6, 7, 7)
    with torch.no_grad():
        plugin.set_adapters(block, ["a0"], [0.0])
        base = block(x)
        plugin.set_adapters(block, ["a0"], [1.0])
        one = block(x)
        plugin.set_adapters(block, ["a0"], [0.5])
        half = block(x)
        plugin.set_adapters(block, ["a0"], [1.0])
        plugin.set_runtime_scale(block, 0.5)
        runtime_half = block(x)
    torch.testing.assert_close(half, (base + one) / 2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(runtime_half, half, rtol=1e-6, atol=1e-6)


def test_inference_weight_cache_follows_every_change():
    block = adapted_block([("lie", "tucker", "exp")])
    x = torch.randn(4, 6, 7, 7)
    with torch.no_grad():
        first = block(x)
        assert torch.equal(block(x), first)  # second call reuses the cached W'
        block.conv.adapters["a0"].backend.tucker_core.mul_(2)  # an optimiser-style in-place edit
        torch.testing.assert_close(block(x), reference(block, [("a0", 1.0)], x), rtol=1e-5, atol=1e-5)
        plugin.set_adapters(block, ["a0"], [0.25])
        quarter = reference(block, [("a0", 0.25)], x)
        torch.testing.assert_close(block(x), quarter, rtol=1e-5, atol=1e-5)
        plugin.fuse_adapters(block)
        torch.testing.assert_close(block(x), quarter, rtol=1e-5, atol=1e-5)
    assert block.conv._weight_cache is None  # fusing dropped the cached copy


def gradients(block: Block, x: torch.Tensor) -> tuple[list[int], torch.Tensor, dict[str, torch.Tensor]]:
    """Sizes of the tensors autograd saved, and the gradients of a loss on `block(x)`."""
    block.zero_grad(set_to_none=True)
    x.grad = None
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        out = block(x)
    out.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in block.named_parameters() if p.grad is not None}
    return saved, x.grad.clone(), grads


def assert_same_gradients_as_plain_autograd(block: Block, x: torch.Tensor, monkeypatch) -> None:
    saved, grad_x, grads = gradients(block, x)
    monkeypatch.setattr(plugin.AdaptedLayer, "_can_recompute_weight", lambda self: False)
    saved_plain, grad_x_plain, grads_plain = gradients(block, x)
    weight_size = block.conv.base_layer.weight.numel()
    assert weight_size in saved_plain and weight_size not in saved  # W' is rebuilt, not kept
    assert grads.keys() == grads_plain.keys() and len(grads) == len(
        [p for p in block.parameters() if p.requires_grad]
    )
    torch.testing.assert_close(grad_x, grad_x_plain, rtol=1e-4, atol=1e-5)
    for name in grads:
        torch.testing.assert_close(grads[name], grads_plain[name], rtol=1e-4, atol=1e-5)


def test_training_keeps_no_copy_of_the_weight_and_gets_the_same_gradients(monkeypatch):
    block = adapted_block([("lie", "tucker", "exp"), ("lie", "lowrank", "linear"), ("additive", "cp", "exp")])
    plugin.set_adapters(block, ["a0", "a1", "a2"], [1.0, 0.5, 2.0])
    assert_same_gradients_as_plain_autograd(block, torch.randn(4, 6, 7, 7, requires_grad=True), monkeypatch)


IN_PLACE = [
    v for v in VARIANTS if v[0] == "lie" and v[1].split(":")[0] in ("lowrank", "tucker", "cp", "rowcol")
]


@pytest.mark.parametrize("variant", IN_PLACE + [("additive", "cp", "exp")])
def test_one_adapter_rebuilds_in_place_with_the_same_gradients(variant, monkeypatch):
    """The usual training set-up (one adapter, float32) builds W' and dL/dU in place when the
    update is one matrix product."""
    block = adapted_block([variant])
    plugin.set_adapters(block, ["a0"], [0.5])
    assert block.conv._rebuilds_in_place(block.conv.unfused_terms_active())
    assert_same_gradients_as_plain_autograd(block, torch.randn(4, 6, 7, 7, requires_grad=True), monkeypatch)


@pytest.mark.parametrize(
    "variant", [("lie", "tucker", "exp"), ("lie", "lowrank", "linear"), ("additive", "cp", "exp")]
)
def test_a_half_precision_base_rebuilds_in_place_with_the_same_gradients(variant, monkeypatch):
    """A bf16 base under autocast (GPU training) takes the in-place path too: `W'` built in float32,
    the layer's operation in bf16, and the gradients of plain autograd through the same formula."""
    block = adapted_block([variant])
    block.conv.base_layer.to(torch.bfloat16)
    plugin.set_adapters(block, ["a0"], [0.5])
    assert block.conv._rebuilds_in_place(block.conv.unfused_terms_active())
    x = torch.randn(4, 6, 7, 7, dtype=torch.bfloat16)

    def bf16_gradients():
        block.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = block.conv(x)
        assert out.dtype == torch.bfloat16
        out.float().square().sum().backward()
        return {n: p.grad.clone() for n, p in block.conv.named_parameters() if p.grad is not None}

    grads = bf16_gradients()
    monkeypatch.setattr(plugin.AdaptedLayer, "_can_recompute_weight", lambda self: False)
    plain = bf16_gradients()
    assert grads and grads.keys() == plain.keys()
    for name, grad in grads.items():
        assert grad.dtype == torch.float32 and torch.count_nonzero(grad)
        torch.testing.assert_close(grad, plain[name], rtol=0.02, atol=0.02 * plain[name].abs().max().item())


@pytest.mark.parametrize("variant", VARIANTS)
def test_training_gradients_match_the_formula(variant):
    """Every path the layer may take (bypass, in-place rebuild, recomputed rebuild) against autograd
    through FORMAT.md written by hand, with DoRA's norm a constant in backward."""
    block = adapted_block([variant])
    plugin.set_adapters(block, ["a0"], [0.5])
    x = torch.randn(4, 6, 7, 7, requires_grad=True)
    _, grad_x, grads = gradients(block, x)
    block.zero_grad(set_to_none=True)
    x_ref = x.detach().clone().requires_grad_(True)
    reference(block, [("a0", 0.5)], x_ref).square().sum().backward()
    assert grads and all(torch.count_nonzero(g) for g in grads.values())
    torch.testing.assert_close(grad_x, x_ref.grad, rtol=1e-4, atol=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, block.get_parameter(name).grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "variants",
    [[("lie", "tucker", "exp")], [("additive", "cp", "exp")], [("lie", "lowrank", "exp"), VARIANTS[0]]],
)
def test_autocast_runs_the_layer_in_bf16_and_the_adapters_in_float32(variants):
    """Mixed-precision training: the layer's operation at the autocast dtype, as without adapters;
    W' and the adapter gradients in float32, close to a float32 run's."""
    block = adapted_block(variants)
    plugin.set_adapters(block, [f"a{i}" for i in range(len(variants))], [1.0] * len(variants))
    x = torch.randn(4, 6, 7, 7, requires_grad=True)
    _, grad_x, grads = gradients(block, x)
    block.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = block.conv(x)
        assert out.dtype == torch.bfloat16
        loss = block.proj(out.mean(dim=(2, 3))).float().square().sum()
    loss.backward()
    for name, grad in grads.items():
        param = block.get_parameter(name)
        assert param.grad.dtype == torch.float32
        torch.testing.assert_close(param.grad, grad, rtol=0.05, atol=0.05 * grad.abs().max().item())


def literal_layer(weight, method, **tensors):
    """A 2x2 Linear with one adapter whose tensors are written out by hand."""
    layer = nn.Linear(2, 2, bias=False)
    layer.weight.data = torch.tensor(weight)
    block = nn.Sequential(layer)
    plugin.add_adapter(
        block, AdapterConfig(method=method, rank=2 if method == "bhra" else 1, targets=["0"]), "a"
    )
    adapter = block[0].adapters["a"]
    with torch.no_grad():
        for name, value in tensors.items():
            owner = adapter if name == "magnitude" else adapter.backend
            target = getattr(owner, name)
            assert target.shape == torch.tensor(value).shape, name  # no broadcasting
            target.copy_(torch.tensor(value))
    return block[0]


LITERALS = [
    # SSB: diag(e^row) W diag(e^col) with row = (ln 2, 0), col = (0, ln 3).
    (
        "ssb",
        {"row": [math.log(2), 0.0], "col": [0.0, math.log(3)]},
        [[1.0, 2.0], [3.0, 4.0]],
        [[2.0, 12.0], [3.0, 12.0]],
    ),
    # (IA)³: W ⊙ (1 + row[j_0]): the first output row scaled by 1.5.
    ("ia3", {"row": [0.5, 0.0]}, [[1.0, 2.0], [3.0, 4.0]], [[1.5, 3.0], [3.0, 4.0]]),
    # DoRA with D = 0: W's rows rescaled to the magnitudes, (3, 4) to norm 10 and (0, 1) to norm 2.
    ("dora", {"magnitude": [10.0, 2.0]}, [[3.0, 4.0], [0.0, 1.0]], [[6.0, 8.0], [0.0, 2.0]]),
    # LoHa: (w1_a w1_b) ⊙ (w2_a w2_b) added, rank 1: [[1, 2], [2, 4]] ⊙ [[1, 1], [-1, -1]].
    (
        "loha",
        {
            "hada_w1_a": [[1.0], [2.0]],
            "hada_w1_b": [[1.0, 2.0]],
            "hada_w2_a": [[1.0], [-1.0]],
            "hada_w2_b": [[1.0, 1.0]],
        },
        [[0.0, 0.0], [0.0, 0.0]],
        [[1.0, 2.0], [-2.0, -4.0]],
    ),
    # DiaBlo with 2 blocks of 1x1: only the diagonal changes.
    ("diablo", {"blockdiag_blocks": [[[5.0]], [[7.0]]]}, [[1.0, 1.0], [1.0, 1.0]], [[6.0, 1.0], [1.0, 8.0]]),
    # BHRA (lie, linear) with 2x2 blocks of rank 1: W ⊙ (1 + D), D's block (a, b) = up[a, b] · down[a, b].
    (
        "bhra",
        {
            "block_up": [[[[1.0]], [[2.0]]], [[[3.0]], [[0.0]]]],
            "block_down": [[[[1.0]], [[1.0]]], [[[1.0]], [[1.0]]]],
        },
        [[1.0, 2.0], [3.0, 4.0]],
        [[2.0, 6.0], [12.0, 4.0]],
    ),
]


@pytest.mark.parametrize("method, tensors, weight, expected", LITERALS, ids=[m for m, *_ in LITERALS])
def test_hand_written_tensors_give_format_md_numbers(method, tensors, weight, expected):
    layer = literal_layer(weight, method, **tensors)
    with torch.no_grad():
        adapted = layer.adapted_weight(layer.unfused_terms_active())
    torch.testing.assert_close(adapted, torch.tensor(expected), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "variant", [("dora", "lowrank", "exp"), ("dora", "tucker", "exp"), ("additive", "tucker", "exp")]
)
def test_the_bypass_forms_match_the_formula(variant, monkeypatch):
    """DoRA as a bypass, `(g - 1) ⊙ W x + g ⊙ s·D x` with the norms taken from the factors (what large
    layers with many tokens run), against FORMAT.md: outputs and gradients."""

    def bypass_when_possible(self, adapters, x):
        return all(a.composition.can_bypass(a, self.base_layer, bool(self.fused)) for a, _ in adapters)

    monkeypatch.setattr(plugin.AdaptedLayer, "_bypass_is_cheaper", bypass_when_possible)
    block = adapted_block([variant])
    plugin.set_adapters(block, ["a0"], [0.5])
    x = torch.randn(4, 6, 7, 7, requires_grad=True)
    assert block.conv._bypass_is_cheaper(block.conv.unfused_terms_active(), x)
    with torch.no_grad():
        torch.testing.assert_close(block(x), reference(block, [("a0", 0.5)], x), rtol=1e-5, atol=1e-5)
    _, grad_x, grads = gradients(block, x)
    block.zero_grad(set_to_none=True)
    x_ref = x.detach().clone().requires_grad_(True)
    reference(block, [("a0", 0.5)], x_ref).square().sum().backward()
    torch.testing.assert_close(grad_x, x_ref.grad, rtol=1e-4, atol=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, block.get_parameter(name).grad, rtol=1e-4, atol=1e-5)
