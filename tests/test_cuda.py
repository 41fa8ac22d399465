"""On a CUDA device, as users train: a bf16 base, float32 adapters, autocast (benchmarks/gpu_check.sh).

Skipped without CUDA; `check_on_device` runs the same checks on any device."""

import pytest
import torch
from diffusers import UNet2DConditionModel

import plugin
from plugin import AdapterConfig
from tests.conftest import TINY_UNET, randomize

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def check_on_device(method: str, device: str, tmp_path) -> None:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**TINY_UNET).to(device, torch.bfloat16)
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 4, 8, 8, generator=generator).to(device, torch.bfloat16)
    timesteps = torch.tensor([10, 500], device=device)
    context = torch.randn(2, 5, 32, generator=generator).to(device, torch.bfloat16)
    originals = {n: p.detach().clone() for n, p in unet.named_parameters()}

    plugin.add_adapter(unet, AdapterConfig(method=method, rank=4), "a")
    randomize(unet)
    trained = [p for p in unet.parameters() if p.requires_grad]
    assert trained and all(p.dtype == torch.float32 and p.device.type == device for p in trained)
    with torch.autocast(device, dtype=torch.bfloat16):
        prediction = unet(latents, timesteps, context).sample
    prediction.float().square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in trained)

    unet.eval()
    with torch.no_grad():
        unfused = unet(latents, timesteps, context).sample
        plugin.fuse_adapters(unet)
        fused = unet(latents, timesteps, context).sample
        plugin.unfuse_adapters(unet)
    torch.testing.assert_close(fused, unfused, rtol=0.05, atol=0.05)
    plugin.save_adapter(tmp_path / "a.safetensors", {"unet": unet}, "a")
    plugin.unload_adapters(unet)
    for name, param in unet.named_parameters():
        assert torch.equal(param, originals[name]), f"{name} changed after unfuse and unload"

    fresh = UNet2DConditionModel(**TINY_UNET).to(device, torch.bfloat16)
    fresh.load_state_dict(originals)
    plugin.load_adapter(tmp_path / "a.safetensors", {"unet": fresh}, "a")
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(latents, timesteps, context).sample, unfused, rtol=0, atol=0)


@pytest.mark.parametrize("method", ["lora", "flora", "liera"])
def test_bf16_base_float32_adapters_train_fuse_and_load_on_cuda(method, tmp_path):
    check_on_device(method, "cuda", tmp_path)
