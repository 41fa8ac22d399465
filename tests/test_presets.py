"""Every preset: built by name, starting exactly at the base model, with its paper's structure."""

import copy
import dataclasses
from pathlib import Path

import pytest
import torch
from torch import nn

import plugin
from pipelines import LieraStableDiffusionPipeline
from plugin import METHODS, AdapterConfig
from plugin.training import list_images, load_rgb, to_model_input, tokenize_prompt


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


# --- a few training steps per preset on the shipped toy base -------------------------------------------

TOY = Path(__file__).resolve().parents[1] / "assets" / "toy-sd"
SUBJECT = Path(__file__).resolve().parents[1] / "assets" / "subject"


@pytest.fixture(scope="module")
def toy():
    pipe = LieraStableDiffusionPipeline.from_pretrained(TOY)
    pipe.set_progress_bar_config(disable=True)
    images = [to_model_input(load_rgb(path), 64, center_crop=True) for path in list_images(SUBJECT)[:2]]
    pixels = torch.stack(images)
    with torch.no_grad():
        latents = pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor
        base = generate(pipe)
    return pipe, latents, base


def generate(pipe) -> torch.Tensor:
    out = pipe(
        "a sks circle",
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
    )
    return out.images


def train_a_few_steps(pipe, latents: torch.Tensor, steps: int = 3) -> None:
    params = [p for m in (pipe.unet, pipe.text_encoder) for p in m.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    tokens = tokenize_prompt(pipe.tokenizer, "a sks circle")
    for _ in range(steps):
        noise = torch.randn(latents.shape, generator=generator)
        t = torch.randint(0, 1000, (len(latents),), generator=generator)
        hidden = pipe.text_encoder(tokens)[0].expand(len(latents), -1, -1)
        pred = pipe.unet(pipe.scheduler.add_noise(latents, noise, t), t, hidden).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


@pytest.mark.parametrize("method", sorted(EXPECTED))
def test_a_few_training_steps_save_and_load_into_a_fresh_pipeline_identically(toy, method, tmp_path):
    pipe, latents, base = toy
    trained = copy.deepcopy(pipe)
    config = AdapterConfig(method=method, rank=4)
    torch.manual_seed(0)
    plugin.add_adapter(trained.unet, config, "subject")
    plugin.add_adapter(trained.text_encoder, dataclasses.replace(config, targets="attn"), "subject")
    train_a_few_steps(trained, latents)
    path = trained.save_adapter(tmp_path / f"{method}.safetensors", "subject")
    fresh = copy.deepcopy(pipe)
    fresh.load_adapter(path)
    with torch.no_grad():
        expected = generate(trained)
        assert torch.equal(generate(fresh), expected)
    assert (expected - base).abs().max() > 1e-4  # training moved the model
    # liera/1 when the file needs nothing newer: hira is lie (linear) + lowrank, both liera/1.
    version = "liera/1" if method in ("lora", "flora", "liera", "hira") else "liera/2"
    assert plugin.read_adapter_file(path)[1]["format"] == version


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_preset_trains_under_bf16_autocast_with_float32_gradients(method):
    """A half-precision base under autocast (the training script's --mixed_precision): every path of
    every preset (bypass, rebuild, in-place) runs and gives its float32 tensors finite gradients."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.Flatten(2), nn.Linear(64, 24)).to(torch.bfloat16)
    plugin.add_adapter(model, AdapterConfig(method=method, rank=4, targets="all"))
    x = torch.randn(2, 8, 8, 8, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(x).float().square().mean().backward()
    trained = [p for p in model.parameters() if p.requires_grad]
    assert trained and all(p.dtype == torch.float32 and p.grad is not None for p in trained)
    assert all(torch.isfinite(p.grad).all() for p in trained)
