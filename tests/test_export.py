"""LoRA export: kohya keys that diffusers' own `load_lora_weights` reads, exact for `lora`, close at full rank."""

import json

import pytest
import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors import safe_open
from safetensors.torch import load_file

import plugin
from pipelines import LieraStableDiffusionPipeline, LieraStableDiffusionXLPipeline
from plugin.export import choose_rank, effective_delta, kohya_name, lora_state_dict, save_lora
from tests import tiny_pipes as tiny

SD_PARTS = ("unet", "text_encoder")
XL_PARTS = ("unet", "text_encoder", "text_encoder_2")


def loaded(tmp_path, method, sdxl=False, **config):
    """A Liera pipeline with one trained-like adapter `a`, and its latents."""
    make, parts = (tiny.sdxl, XL_PARTS) if sdxl else (tiny.sd, SD_PARTS)
    path = tiny.adapter_file(
        tmp_path / f"{method}.safetensors", make(tmp_path / "m"), method, parts, **config
    )
    pipe = make(tmp_path, LieraStableDiffusionXLPipeline if sdxl else LieraStableDiffusionPipeline)
    base = tiny.generate(pipe)
    pipe.load_adapter(path, adapter_name="a")
    return pipe, base, tiny.generate(pipe)


def export_then_load_with_diffusers(tmp_path, pipe, sdxl=False, **kwargs):
    """Export adapter `a`, load the file into a plain diffusers pipeline with `load_lora_weights`."""
    state, report = lora_state_dict(pipe.liera_models(), "a", progress=False, **kwargs)
    path = save_lora(tmp_path / "export.safetensors", state, report)
    reference = (tiny.sdxl if sdxl else tiny.sd)(tmp_path)
    reference.load_lora_weights(str(path), adapter_name="x")
    return reference, report, path


def peft_deltas(pipe, parts):
    """`scaling * B @ A` of every PEFT LoRA layer diffusers made, by `<component>.<path>`."""
    found = {}
    for component in parts:
        for path, module in getattr(pipe, component).named_modules():
            if isinstance(module, BaseTunerLayer):
                found[f"{component}.{path}"] = module.get_delta_weight("x")
    return found


def our_deltas(pipe, parts):
    with torch.no_grad():
        return {
            f"{component}.{path}": effective_delta(layer, layer.adapters["a"])
            for component in parts
            for path, layer in plugin.adapted_layers(getattr(pipe, component)).items()
        }


def test_a_lora_adapter_exports_exactly(tmp_path):
    pipe, _, ours = loaded(tmp_path, "lora")
    reference, report, _ = export_then_load_with_diffusers(tmp_path, pipe, rank=8, dtype=torch.float32)
    assert all(m.exact_factors and m.rank == 4 and m.error < 1e-6 for m in report)
    # kohya's names, whichever module tree this transformers version gives CLIPTextModel.
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj" in {m.key for m in report}
    theirs, mine = peft_deltas(reference, SD_PARTS), our_deltas(pipe, SD_PARTS)
    assert theirs.keys() == mine.keys()  # diffusers found every module under its kohya name
    for key in mine:
        torch.testing.assert_close(theirs[key], mine[key], atol=1e-7, rtol=1e-5)
    # Latents of |x| ~ 8 after two steps: ~2e-5 apart (bypass vs. PEFT's own matmul order).
    torch.testing.assert_close(tiny.generate(reference), ours, atol=1e-4, rtol=0)


@pytest.mark.parametrize("method", ["liera", "flora"])
def test_tensor_adapters_export_closely_at_full_rank(tmp_path, method):
    pipe, base, ours = loaded(tmp_path, method)
    reference, report, _ = export_then_load_with_diffusers(tmp_path, pipe, rank=64, dtype=torch.float32)
    assert max(m.error for m in report) < 1e-5  # measured ~2e-6: SVD rounding only
    assert (ours - base).abs().max() > 1e-2
    torch.testing.assert_close(tiny.generate(reference), ours, atol=1e-4, rtol=0)


def test_truncation_error_is_reported_as_stored(tmp_path):
    pipe, _, _ = loaded(tmp_path, "liera")
    state, report = lora_state_dict(pipe.liera_models(), "a", rank=2, dtype=torch.float16, progress=False)
    path = save_lora(tmp_path / "r2.safetensors", state, report)
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    summary = json.loads(metadata["liera_export"])
    assert summary["ranks"] == [2] and 0.05 < summary["max_relative_error"] < 1
    tensors, errors = load_file(path), {m.key: m.error for m in report}
    for component, prefix in {"unet": "lora_unet_", "text_encoder": "lora_te_"}.items():
        for module_path, layer in plugin.adapted_layers(getattr(pipe, component)).items():
            key = kohya_name(prefix, module_path)
            with torch.no_grad():
                delta = effective_delta(layer, layer.adapters["a"]).flatten(1)
            down = tensors[f"{key}.lora_down.weight"].float().flatten(1)
            up = tensors[f"{key}.lora_up.weight"].float().flatten(1)
            stored = (tensors[f"{key}.alpha"].item() / down.shape[0]) * up @ down
            error = torch.linalg.norm(delta - stored) / torch.linalg.norm(delta)
            assert error.item() == pytest.approx(errors[key], rel=1e-3, abs=1e-6)


def test_energy_threshold_picks_ranks_per_module(tmp_path):
    pipe, _, _ = loaded(tmp_path, "liera")
    _, report = lora_state_dict(pipe.liera_models(), "a", energy=0.9, dtype=torch.float32, progress=False)
    assert len({m.rank for m in report}) > 1
    # Keeping 90% of sum(sigma^2) leaves at most sqrt(10%) of the Frobenius norm.
    assert all(m.error <= 0.1**0.5 + 1e-4 for m in report)
    _, capped = lora_state_dict(pipe.liera_models(), "a", rank=3, energy=0.9, progress=False)
    assert max(m.rank for m in capped) <= 3


def test_choose_rank():
    s = torch.tensor([3.0, 2.0, 1.0, 0.0])
    assert choose_rank(s, 2, None) == 2 and choose_rank(s, 10, None) == 4
    assert choose_rank(s, None, 9 / 14) == 1 and choose_rank(s, None, 0.7) == 2
    assert choose_rank(s, None, 1.0) == 3 and choose_rank(s, 1, 1.0) == 1


def test_sdxl_all_layers_export_with_te1_te2_and_sgm_names(tmp_path):
    pipe, _, ours = loaded(tmp_path, "lora", sdxl=True, targets="all")
    reference, report, path = export_then_load_with_diffusers(
        tmp_path, pipe, sdxl=True, rank=8, dtype=torch.float32
    )
    keys = {m.key for m in report}
    assert any(k.startswith("lora_te1_") for k in keys) and any(k.startswith("lora_te2_") for k in keys)
    assert "lora_unet_label_emb_0_0" in keys  # add_embedding.linear_1, as kohya names it for SDXL
    # Every UNet module in the original UNet's (sgm) names, as kohya's SDXL files: what A1111 and ComfyUI
    # read. The upsampler follows the attention of its block (A1111's SD 1.x rule would miss it).
    unet_keys = {k for k in keys if k.startswith("lora_unet_")}
    assert not any(part in k for k in unet_keys for part in ("down_blocks", "mid_block", "up_blocks"))
    assert {"lora_unet_output_blocks_1_2_conv", "lora_unet_input_blocks_2_0_op", "lora_unet_input_blocks_0_0",
            "lora_unet_out_2", "lora_unet_time_embed_0", "lora_unet_input_blocks_3_1_proj_in",
            "lora_unet_middle_block_2_out_layers_3"} <= unet_keys  # fmt: skip
    assert {"lora_te1_text_model_encoder_layers_1_mlp_fc2", "lora_te2_text_projection"} <= keys
    assert peft_deltas(reference, XL_PARTS).keys() == our_deltas(pipe, XL_PARTS).keys()
    torch.testing.assert_close(tiny.generate(reference), ours, atol=1e-4, rtol=0)
    assert (
        kohya_name("lora_unet_", "down_blocks.0.attentions.0.proj_in")
        == "lora_unet_down_blocks_0_attentions_0_proj_in"
    )


def test_sgm_names_of_the_real_sdxl_unet_are_what_diffusers_maps_back(tmp_path):
    """On SDXL's published config (built on the meta device): every Linear/Conv module has one sgm name,
    the known anchors are right, and diffusers' own converter (sgm blocks, then kohya key) maps each
    name back to the module it came from."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.lora_conversion_utils import (
        _convert_unet_lora_key,
        _maybe_map_sgm_blocks_to_diffusers,
    )

    from plugin.export import sgm_path
    from tests.conftest import ROOT

    config = json.loads((ROOT / "assets" / "configs" / "sdxl_unet.json").read_text())
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    paths = [p for p, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    names = {path: sgm_path(path, unet.config) for path in paths}
    assert len(set(names.values())) == len(paths)
    anchors = {
        "up_blocks.0.upsamplers.0.conv": "output_blocks.2.2.conv",
        "up_blocks.1.upsamplers.0.conv": "output_blocks.5.2.conv",
        "down_blocks.0.downsamplers.0.conv": "input_blocks.3.0.op",
        "down_blocks.1.attentions.0.proj_in": "input_blocks.4.1.proj_in",
        "mid_block.resnets.1.conv2": "middle_block.2.out_layers.3",
        "up_blocks.2.resnets.2.conv_shortcut": "output_blocks.8.0.skip_connection",
        "down_blocks.2.resnets.0.time_emb_proj": "input_blocks.7.0.emb_layers.1",
    }
    assert {path: names[path] for path in anchors} == anchors
    state = {f"lora_unet_{name.replace('.', '_')}.lora_down.weight": path for path, name in names.items()}
    mapped = _maybe_map_sgm_blocks_to_diffusers(dict(state), unet.config)
    back = set()
    for key in mapped:  # as `_convert_non_diffusers_lora_to_diffusers` calls it, then PEFT's module names
        name = _convert_unet_lora_key(key).replace(".processor", "")
        for short, full in [("to_q_lora", "to_q.lora"), ("to_k_lora", "to_k.lora"), ("to_v_lora", "to_v.lora"),
                            ("to_out_lora", "to_out.0.lora")]:  # fmt: skip
            name = name.replace(short, full)
        back.add(name.split(".lora.")[0])
    assert back == set(paths)


def test_export_refuses_fused_adapters_and_unknown_names(tmp_path):
    pipe, _, _ = loaded(tmp_path, "lora")
    with pytest.raises(ValueError, match="no adapter named 'b'"):
        lora_state_dict(pipe.liera_models(), "b", rank=4, progress=False)
    with pytest.raises(ValueError, match="give a rank"):
        lora_state_dict(pipe.liera_models(), "a", progress=False)
    pipe.fuse_adapters()
    with pytest.raises(ValueError, match="unfuse first"):
        lora_state_dict(pipe.liera_models(), "a", rank=4, progress=False)
