"""Diffusion transformers (SD3, Flux) on tiny random configurations: the `attn` preset covers their
attention layers, and their adapters export to the LoRA layout diffusers' own loaders read."""

import copy

import pytest
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel, SD3Transformer2DModel, StableDiffusion3Pipeline

import plugin
from plugin.config import AdapterConfig
from plugin.export import lora_state_dict, own_rank, save_lora
from tests.conftest import ROOT


def flux():
    torch.manual_seed(0)
    model = FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 4, 8),
    ).eval()  # fmt: skip
    generator = torch.Generator().manual_seed(1)
    inputs = {
        "hidden_states": torch.randn(1, 16, 4, generator=generator),
        "encoder_hidden_states": torch.randn(1, 6, 32, generator=generator),
        "pooled_projections": torch.randn(1, 32, generator=generator),
        "timestep": torch.tensor([0.5]),
        "img_ids": torch.randn(16, 3, generator=generator),
        "txt_ids": torch.zeros(6, 3),
    }
    return model, inputs, FluxPipeline


def sd3():
    torch.manual_seed(0)
    model = SD3Transformer2DModel(
        sample_size=8, patch_size=1, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=4,
        caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=64, out_channels=4,
    ).eval()  # fmt: skip
    generator = torch.Generator().manual_seed(1)
    inputs = {
        "hidden_states": torch.randn(1, 4, 8, 8, generator=generator),
        "encoder_hidden_states": torch.randn(1, 6, 32, generator=generator),
        "pooled_projections": torch.randn(1, 64, generator=generator),
        "timestep": torch.tensor([500]),
    }
    return model, inputs, StableDiffusion3Pipeline


def test_the_attn_preset_covers_flux_single_blocks():
    model, _, _ = flux()
    adapted = plugin.add_adapter(model, AdapterConfig(method="lora", targets="attn"))
    for block in range(2):
        for name in ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out"]:
            assert f"single_transformer_blocks.{block}.{name}" in adapted
    assert (
        "transformer_blocks.0.attn.to_add_out" in adapted and "proj_out" not in adapted
    )  # not the final layer


@pytest.mark.parametrize("make", [flux, sd3], ids=["flux", "sd3"])
@pytest.mark.parametrize("method", ["lora", "flora"])
def test_transformer_adapters_export_to_what_diffusers_loads(make, method, tmp_path):
    model, inputs, pipeline_class = make()
    base = copy.deepcopy(model)
    plugin.add_adapter(model, AdapterConfig(method=method, rank=4, targets="attn"), "a")
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.1 * torch.randn(param.shape, generator=generator))
        expected = model(**inputs, return_dict=False)[0]
        models = {"transformer": model}
        state, report = lora_state_dict(
            models, "a", own_rank(models, "a"), dtype=torch.float32, progress=False
        )
    assert all(key.startswith("transformer.") and ".lora_" in key for key in state)
    assert all(module.exact_factors for module in report)
    path = save_lora(tmp_path / "lora.safetensors", state, report)

    # diffusers' own loading path: `load_lora_weights` is `lora_state_dict` + `load_lora_into_transformer`.
    loaded = pipeline_class.lora_state_dict(str(path))
    state_dict = loaded[0] if isinstance(loaded, tuple) else loaded
    if pipeline_class is FluxPipeline:
        pipeline_class.load_lora_into_transformer(state_dict, None, base, adapter_name="x")
    else:
        pipeline_class.load_lora_into_transformer(state_dict, base, adapter_name="x")
    with torch.no_grad():
        torch.testing.assert_close(base(**inputs, return_dict=False)[0], expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "config, modules, lora_parameters",
    [
        ("sd15_unet", 192, 6_222_848),
        ("sdxl_unet", 609, 14_643_200),
        ("sd3_medium_transformer", 191, 4_694_016),
        ("flux_dev_transformer", 342, 23_347_200),  # 19 double blocks x 8 + 38 single blocks x 5
    ],
)
def test_presets_count_the_real_configurations_from_shapes_alone(config, modules, lora_parameters, capsys):
    """The published configs, built on the meta device (Flux-dev has 12B weights): docs/METHODS.md's table."""
    import json

    from plugin.cli import main

    assert main(["presets", "--config", str(ROOT / "assets" / "configs" / f"{config}.json"), "--json"]) == 0
    rows = {row["preset"]: row for row in json.loads(capsys.readouterr().out)}
    assert rows["lora"]["modules"] == modules and rows["lora"]["parameters"] == lora_parameters
    assert set(rows) == set(plugin.METHODS)
