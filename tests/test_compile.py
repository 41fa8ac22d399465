"""`torch.compile`: adapted layers trace whole (no graph breaks), and adapters are added, saved, loaded
and hot-swapped on compiled models under the model's own module paths. Dynamo's tracing is what can
break, so the tests compile with the `eager` backend: the same graphs, without code generation."""

import copy
import functools

import pytest
import torch
import torch._dynamo as dynamo
from diffusers import UNet2DConditionModel
from torch import nn

import plugin
from plugin.config import AdapterConfig
from tests.conftest import TINY_UNET

METHODS = ["lora", "flora", "liera", "hira", "loha", "gralora", "diablo", "ssb", "dora", "dora-flora"]


def trained_like(model: nn.Module, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn(param.shape, generator=generator))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_an_adapted_layer_compiles_whole_for_inference_and_training(method, kind):
    torch.manual_seed(0)
    layer = nn.Linear(32, 48) if kind == "linear" else nn.Conv2d(16, 32, 3, padding=1)
    x = torch.randn(4, 10, 32) if kind == "linear" else torch.randn(2, 16, 8, 8)
    model = nn.Sequential(layer)
    plugin.add_adapter(model, AdapterConfig(method=method, rank=4, targets="all"))
    trained_like(model)
    adapted = model[0]
    dynamo.reset()
    compiled = torch.compile(adapted, backend="eager", fullgraph=True)  # any graph break raises
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), adapted(x))
    params = [p for p in adapted.parameters() if p.requires_grad]
    eager_grads = torch.autograd.grad(adapted(x).square().sum(), params)
    compiled_grads = torch.autograd.grad(compiled(x).square().sum(), params)
    for eager, traced in zip(eager_grads, compiled_grads):
        torch.testing.assert_close(traced, eager)


def test_a_compiled_unet_has_no_more_graph_breaks_with_adapters():
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**TINY_UNET).eval()
    inputs = (torch.randn(1, 4, 8, 8), torch.tensor([10]), torch.randn(1, 6, 32))
    dynamo.reset()
    base_breaks = dynamo.explain(unet)(*inputs).graph_break_count
    plugin.add_adapter(unet, AdapterConfig(method="liera", rank=4))
    trained_like(unet)
    dynamo.reset()  # (training traces per layer above: the UNet's forward is the same code)
    assert dynamo.explain(unet)(*inputs).graph_break_count == base_breaks


def test_adapters_on_a_compiled_unet_keep_the_models_own_paths(tmp_path):
    torch.manual_seed(0)
    base = UNet2DConditionModel(**TINY_UNET).eval()
    inputs = (torch.randn(1, 4, 8, 8), torch.tensor([10]), torch.randn(1, 6, 32))
    dynamo.reset()
    compiled = torch.compile(copy.deepcopy(base), backend="eager")
    plugin.add_adapter(compiled, AdapterConfig(method="flora", rank=4), "subject")
    trained_like(compiled)
    keys = plugin.adapter_state_dict(compiled, "subject")
    assert keys and not any("_orig_mod" in key for key in keys)
    path = plugin.save_adapter(tmp_path / "subject.safetensors", {"unet": compiled}, "subject")
    with torch.no_grad():
        expected = compiled(*inputs).sample
        eager = copy.deepcopy(base)
        plugin.load_adapter(path, {"unet": eager})
        torch.testing.assert_close(eager(*inputs).sample, expected)
        # Loading into a model compiled before the adapter existed, then hot-swapping in place.
        later = torch.compile(copy.deepcopy(base), backend="eager")
        later(*inputs)
        plugin.load_adapter(path, {"unet": later}, adapter_name="subject")
        torch.testing.assert_close(later(*inputs).sample, expected)
        trained_like(compiled, seed=2)
        other = plugin.save_adapter(tmp_path / "other.safetensors", {"unet": compiled}, "subject")
        plugin.hotswap_adapter(other, {"unet": later}, "subject")
        torch.testing.assert_close(later(*inputs).sample, compiled(*inputs).sample)


def graphs_of_training_then_evaluation(method: str | None) -> int:
    """Frames dynamo compiles for three training steps and two no-grad evaluations of the tiny UNet,
    with `method`'s adapters (None: bare)."""
    from torch._dynamo.testing import CompileCounter

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**TINY_UNET)
    if method is not None:
        plugin.add_adapter(unet, AdapterConfig(method=method, rank=4))
    dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(unet, backend=counter)
    for batch in [2, 2, 2]:
        out = compiled(torch.randn(batch, 4, 8, 8), torch.tensor([10] * batch), torch.randn(batch, 6, 32))
        out.sample.square().mean().backward()
    with torch.no_grad():
        for _ in range(2):
            compiled(torch.randn(1, 4, 8, 8), torch.tensor([10]), torch.randn(1, 6, 32))
    return counter.frame_count


@functools.cache
def bare_unet_graphs() -> int:
    return graphs_of_training_then_evaluation(None)


@pytest.mark.parametrize("method", ["lora", "liera"])
def test_a_compiled_unet_trains_and_evaluates_with_as_many_graphs_as_without_adapters(method):
    """Training steps and then no-grad evaluation (the training script's held-out measure) compile
    as many graphs as the bare UNet: the layer's Python caches (bypass plan, inference `W'`) are
    skipped while tracing, so they neither break the graph nor recompile it per layer."""
    assert graphs_of_training_then_evaluation(method) == bare_unet_graphs()
