"""Training procedures (PiSSA, ReLoRA, MPC): they change how an adapter trains, never what its file
means. Every check compares against the original weights: a file saved after any procedure, loaded
on the base, reproduces the trained model."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import plugin
from plugin.backends import Continued, trained_part
from plugin.config import AdapterConfig
from plugin.procedures import (
    CONSTRAINTS,
    check_constrainable,
    check_restartable,
    mpc_penalty,
    restart,
    restart_warmup,
    restore_training_state,
    training_state,
)
from plugin.training import copy_adapter_tensors

RESTARTABLE = [
    "lora",
    "flora",
    "liera",
    "hira",
    "bhra",
    "gralora",
    "diablo",
    "ssb",
    "ssl",
    "ia3",
    "dora",
    "dora-flora",
]


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.Flatten(2), nn.Linear(81, 40))


def inputs() -> torch.Tensor:
    return torch.randn(2, 16, 9, 9, generator=torch.Generator().manual_seed(1))


def train_a_little(model: nn.Module, steps: int = 3) -> None:
    """A few optimizer steps on a random target: enough to move every trained tensor."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=1e-2)
    target = torch.randn(2, 32, 40, generator=torch.Generator().manual_seed(2))
    for _ in range(steps):
        loss = (model(inputs()) - target).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def loaded_on_base(model: nn.Module, tmp_path, base: nn.Module) -> nn.Module:
    """A fresh copy of the base with `model`'s adapter file loaded, as any user would load it."""
    path = plugin.save_adapter(tmp_path / "adapter.safetensors", {"unet": model}, "default")
    fresh = copy.deepcopy(base)
    plugin.load_adapter(path, {"unet": fresh})
    return fresh


# --- PiSSA ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(64, 48), (300, 200)])  # an exact SVD, and a randomised one
def test_pissa_starts_lowrank_at_the_best_rank_r_part_and_trains_on_the_residual(shape):
    torch.manual_seed(0)
    layer = nn.Linear(shape[1], shape[0])
    # A decaying spectrum, as trained weights have (a random matrix's flat one has no principal part).
    left, right = torch.linalg.qr(torch.randn(shape[0], 40))[0], torch.linalg.qr(torch.randn(shape[1], 40))[0]
    with torch.no_grad():
        layer.weight.copy_(left / torch.arange(1.0, 41.0) @ right.T)
    weight = layer.weight.detach().clone()
    model = nn.Sequential(layer)
    plugin.add_adapter(model, AdapterConfig(method="lora", init="pissa", rank=4, alpha=8.0, targets="all"))
    adapter = model[0].adapters["default"]
    assert isinstance(adapter.backend, Continued)
    start = adapter.scale * adapter.backend.trained.delta()
    u, s, vh = torch.linalg.svd(weight)
    best = u[:, :4] * s[:4] @ vh[:4]
    torch.testing.assert_close(start, best, atol=1e-3 * s[0].item(), rtol=0)
    # The residual the adapter trains on, plus its start, is W; so the model starts exactly at the base.
    residual = weight + adapter.scale * adapter.backend.frozen.delta()
    torch.testing.assert_close(residual + start, weight, atol=1e-6, rtol=0)
    x = torch.randn(5, shape[1])
    torch.testing.assert_close(model(x), nn.functional.linear(x, weight, layer.bias), atol=1e-5, rtol=0)


def test_hosvd_start_of_a_tucker_update_leaves_a_residual_outside_its_subspaces():
    torch.manual_seed(0)
    conv = nn.Conv2d(24, 40, 3)
    weight = conv.weight.detach().clone()
    model = nn.Sequential(conv)
    plugin.add_adapter(model, AdapterConfig(method="flora", init="pissa", rank=6, targets="all"))
    backend = model[0].adapters["default"].backend.trained
    factors = list(backend.tucker_factor)
    for factor in factors:  # orthonormal columns: each mode's principal subspace
        torch.testing.assert_close(factor.T @ factor, torch.eye(factor.shape[1]), atol=1e-5, rtol=0)
    residual = weight - backend.delta()
    projected = residual
    for mode, factor in enumerate(factors):
        projected = torch.tensordot(projected.movedim(mode, -1), factor, dims=1).movedim(-1, mode)
    assert projected.abs().max() < 1e-4 * weight.abs().max()
    x = torch.randn(2, 24, 7, 7)
    torch.testing.assert_close(model(x), conv._conv_forward(x, weight, conv.bias), atol=1e-5, rtol=0)


def test_pissa_is_refused_where_the_update_does_not_add_to_w():
    for method in ["liera", "hira", "ssb"]:
        with pytest.raises(ValueError, match="multiplies W"):
            AdapterConfig(method=method, init="pissa")
    with pytest.raises(ValueError, match="blockdiag backend has no principal start"):
        AdapterConfig(method="diablo", init="pissa")


@pytest.mark.parametrize("method", ["lora", "flora", "dora", "dora-flora", "abba"])
def test_a_pissa_trained_file_loads_on_the_original_base_to_the_trained_model(method, tmp_path):
    base = small_model()
    model = copy.deepcopy(base)
    plugin.add_adapter(model, AdapterConfig(method=method, init="pissa", rank=4, targets="all"))
    train_a_little(model)
    with torch.no_grad():
        torch.testing.assert_close(
            loaded_on_base(model, tmp_path, base)(inputs()), model(inputs()), atol=2e-5, rtol=0
        )


# --- ReLoRA ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", RESTARTABLE)
def test_restarts_keep_the_model_and_the_file_stays_one_plain_adapter(method, tmp_path):
    base = small_model()
    model = copy.deepcopy(base)
    config = AdapterConfig(method=method, rank=4, targets="all")
    plugin.add_adapter(model, config)
    check_restartable(config)
    for cycle in range(3):
        train_a_little(model)
        with torch.no_grad():
            before = model(inputs())
            restarted = restart(model, "default", seed=cycle)
            torch.testing.assert_close(model(inputs()), before, atol=2e-5, rtol=0)
        # The trained tensors are the same objects (the optimizer keeps them), re-initialised: D = 0.
        live = [p for name, p in model.named_parameters() if p.requires_grad and "magnitude" not in name]
        assert {id(p) for p in restarted} == {id(p) for p in live}
        for layer in plugin.inject.adapted_layers(model).values():
            assert not trained_part(layer.adapters["default"].backend).delta().any()
    train_a_little(model)
    with torch.no_grad():
        torch.testing.assert_close(
            loaded_on_base(model, tmp_path, base)(inputs()), model(inputs()), atol=2e-5, rtol=0
        )


def test_restart_files_hold_the_summed_rank():
    model = small_model()
    plugin.add_adapter(model, AdapterConfig(method="lora", rank=4, targets="all"))
    for cycle in range(2):
        restart(model, "default", seed=cycle)
    state = plugin.adapter_state_dict(model, "default")
    assert state["2.lora_down"].shape == (12, 81) and state["2.lora_up"].shape == (40, 12)


def test_tucker_restarts_stop_growing_along_modes_they_fill():
    model = small_model()
    plugin.add_adapter(model, AdapterConfig(method="flora", rank=4, targets="all"))
    for cycle in range(3):
        restart(model, "default", seed=cycle)
    core = plugin.adapter_state_dict(model, "default")["0.tucker_core"]
    assert tuple(core.shape) == (16, 16, 3, 3)  # 4 restarts of (4, 4, 3, 3): the kernel modes stay 3


def test_restarts_are_refused_for_updates_that_do_not_add_up():
    for method in ["loha", "abba"]:
        with pytest.raises(ValueError, match="a sum of hadamard updates is not one"):
            check_restartable(AdapterConfig(method=method))


def test_a_restart_is_a_function_of_its_seed():
    models = [small_model(), small_model()]
    for other_draws, model in enumerate(models):
        torch.manual_seed(0)
        plugin.add_adapter(model, AdapterConfig(method="liera", rank=4, targets="all"))
        torch.rand(other_draws)  # where the global generator stands must not matter
        restart(model, "default", seed=7)
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        assert torch.equal(a, b)


def test_the_jagged_schedule_warms_up_after_every_restart():
    factor = restart_warmup(lambda step: 1.0 - step / 100, every=10, warmup=4)
    assert [factor(s) for s in range(10)] == [1.0 - s / 100 for s in range(10)]  # first cycle: as it was
    assert [round(factor(s), 6) for s in range(10, 15)] == [
        round((1 - s / 100) * (s - 9) / 5, 6) for s in range(10, 14)
    ] + [0.86]


@pytest.mark.parametrize("method", ["lora", "gralora", "ssb"])
def test_training_state_round_trips_the_trained_and_frozen_parts(method):
    model = small_model()
    config = AdapterConfig(method=method, rank=4, targets="all")
    plugin.add_adapter(model, config)
    train_a_little(model)
    restart(model, "default", seed=0)
    train_a_little(model)
    state = training_state({"unet": model}, "default")
    assert any(key.startswith("frozen.") for key in state)
    other = small_model()
    plugin.add_adapter(other, config)
    copy_adapter_tensors(
        restore_training_state({"unet": other}, "default", state), {"unet": other}, "default"
    )
    with torch.no_grad():
        assert torch.equal(other(inputs()), model(inputs()))


# --- MPC ------------------------------------------------------------------------------------------


def test_mpc_penalties_vanish_on_their_patterns_and_not_elsewhere():
    orthonormal = torch.linalg.qr(torch.randn(20, 5))[0]
    orthogonal = orthonormal * torch.arange(1.0, 6.0)
    assert CONSTRAINTS["orthogonal"](orthonormal) < 1e-12 and CONSTRAINTS["orthogonal"](orthogonal) > 0.1
    assert CONSTRAINTS["diagonal"](orthogonal) < 1e-10 and CONSTRAINTS["diagonal"](torch.randn(20, 5)) > 0.1
    assert (
        CONSTRAINTS["nonnegative"](orthogonal.abs()) == 0
        and CONSTRAINTS["nonnegative"](-orthogonal.abs()) > 0
    )
    # A zero-initialised factor (LoRA's up) is a stationary point: no constraint moves W' off W alone.
    zero = torch.zeros(20, 5, requires_grad=True)
    for penalty in CONSTRAINTS.values():
        (grad,) = torch.autograd.grad(penalty(zero), zero)
        assert not grad.any()


def test_minimising_the_orthogonal_constraint_makes_the_factors_orthonormal():
    model = small_model()
    plugin.add_adapter(model, AdapterConfig(method="lora", rank=4, targets="all"))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(std=0.2)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    first = mpc_penalty([model], "default", "orthogonal").item()
    for _ in range(300):
        loss = mpc_penalty([model], "default", "orthogonal")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 1e-3 * first
    up = trained_part(model[0].adapters["default"].backend).lora_up
    torch.testing.assert_close(up.T @ up, torch.eye(4), atol=0.05, rtol=0)


def test_mpc_is_refused_without_factors_to_constrain():
    for method in ["diablo", "ssb", "ia3"]:
        with pytest.raises(ValueError, match="has none"):
            check_constrainable(AdapterConfig(method=method))
    check_constrainable(AdapterConfig(method="gralora"))


def test_mpc_trained_files_load_exactly(tmp_path):
    base = small_model()
    model = copy.deepcopy(base)
    plugin.add_adapter(model, AdapterConfig(method="flora", rank=4, targets="all"))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=1e-2)
    for _ in range(3):
        loss = model(inputs()).square().mean() + 0.1 * mpc_penalty([model], "default", "orthogonal")
        assert math.isfinite(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        torch.testing.assert_close(
            loaded_on_base(model, tmp_path, base)(inputs()), model(inputs()), atol=2e-5, rtol=0
        )
