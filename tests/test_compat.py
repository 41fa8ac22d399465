"""The few things taken from torch and TensorLy beyond their public APIs (`plugin/compat.py`): if an
upgrade changes them, these tests say which, before anything else breaks."""

import threading

import pytest
import tensorly as tl
import torch
from tensorly.backend import BackendManager
from torch import nn

from plugin.compat import conv, conv_backward, tensor_version, tensorly


def test_a_tensors_version_counts_in_place_edits_only():
    tensor = torch.zeros(3)
    start = tensor_version(tensor)
    tensor + 1  # noqa: B018 (out of place: no edit)
    assert tensor_version(tensor) == start
    tensor.add_(1)
    tensor[0] = 5
    assert tensor_version(tensor) == start + 2


def test_tensorly_runs_on_torch_and_leaves_every_threads_backend_as_it_was():
    assert hasattr(BackendManager, "_THREAD_LOCAL_DATA"), "TensorLy moved its per-thread backend slot"
    seen = {}

    def other_thread():
        tl.set_backend("numpy", local_threadsafe=True)
        seen["result"] = tensorly(tl.tenalg.mode_dot, torch.ones(2, 3), torch.ones(4, 3), 1)
        seen["after"] = tl.get_backend()

    worker = threading.Thread(target=other_thread)
    before = tl.get_backend()
    worker.start()
    worker.join()
    assert isinstance(seen["result"], torch.Tensor) and seen["result"].shape == (2, 4)
    assert seen["after"] == "numpy" and tl.get_backend() == before


LAYERS = [
    nn.Conv2d(6, 8, 3, padding=1),
    nn.Conv2d(6, 8, 3, stride=2, padding=2, dilation=2, groups=2),
    nn.Conv2d(6, 8, 3, padding="same"),
    nn.Conv2d(6, 8, (3, 5), padding=(1, 2), padding_mode="reflect"),
    nn.Conv2d(6, 8, 3, padding=1, padding_mode="circular"),
    nn.Conv2d(6, 8, 3, padding=1, padding_mode="replicate"),
    nn.Conv1d(6, 8, 3, padding=1, padding_mode="reflect"),
    nn.Conv3d(6, 8, 3, padding=1),
]


@pytest.mark.parametrize("layer", LAYERS, ids=repr)
def test_conv_is_the_layers_own_convolution_with_another_weight(layer):
    torch.manual_seed(0)
    x = torch.randn(2, 6, *[9] * (layer.weight.ndim - 2))
    weight, bias = torch.randn_like(layer.weight), torch.randn(8)
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(bias)
        torch.testing.assert_close(conv(layer, x, weight, bias), layer(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "layer",
    [layer for layer in LAYERS if layer.padding_mode == "zeros" and not isinstance(layer.padding, str)],
    ids=repr,
)
def test_conv_backward_matches_autograd(layer):
    torch.manual_seed(0)
    x = torch.randn(2, 6, *[9] * (layer.weight.ndim - 2), requires_grad=True)
    weight = torch.randn_like(layer.weight, requires_grad=True)
    out = conv(layer, x, weight, None)
    grad = torch.randn_like(out)
    expected = torch.autograd.grad(out, (x, weight), grad)
    grad_x, grad_weight = conv_backward(layer, x.detach(), weight.detach(), grad, input_grad=True)
    torch.testing.assert_close(grad_x, expected[0], rtol=0, atol=1e-4)
    torch.testing.assert_close(grad_weight, expected[1], rtol=0, atol=1e-4)
    assert conv_backward(layer, x.detach(), weight.detach(), grad, input_grad=False)[0] is None
