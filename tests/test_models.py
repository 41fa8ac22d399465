"""Adapters on real diffusers/transformers models built from configs (random weights, no download)."""

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

import plugin
from plugin import AdapterConfig
from plugin.layer import AdaptedLayer
from tests.conftest import TINY_UNET, randomize, sd15_unet_config

METHOD_CONFIGS = {
    "lora": AdapterConfig(method="lora", rank=4),
    "flora": AdapterConfig(method="flora", rank=4, conv_rank=[4, 4, 2, 2]),
    "liera": AdapterConfig(method="liera", rank=4),
    "liera-linear-cp": AdapterConfig(method="liera", backend="cp", lie_map="linear", rank=4),
}


@pytest.mark.parametrize("method", METHOD_CONFIGS)
def test_fresh_adapters_change_no_output_and_one_step_trains_only_adapters(method, tiny_unet, unet_inputs):
    with torch.no_grad():
        base = tiny_unet(*unet_inputs).sample
    before = {k: v.clone() for k, v in tiny_unet.state_dict().items()}
    plugin.add_adapter(tiny_unet, METHOD_CONFIGS[method], "a")
    with torch.no_grad():
        assert torch.equal(tiny_unet(*unet_inputs).sample, base)  # bit-identical
    trainable = {n for n, p in tiny_unet.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters.a." in n for n in trainable)

    tiny_unet.train()
    optimizer = torch.optim.AdamW([p for p in tiny_unet.parameters() if p.requires_grad], lr=1e-2)
    tiny_unet(*unet_inputs).sample.square().mean().backward()
    optimizer.step()
    after = tiny_unet.state_dict()
    base_after = {k.replace(".base_layer", ""): v for k, v in after.items() if ".adapters." not in k}
    assert base_after.keys() == before.keys()
    assert all(torch.equal(before[k], base_after[k]) for k in before)
    # Adapters started at D = 0 (zero up/core/weights); after one step those have moved.
    assert any(
        ".adapters.a." in k and torch.count_nonzero(v)
        for k, v in after.items()
        if k.endswith(("lora_up", "tucker_core", "cp_weights"))
    )
    with torch.no_grad():
        assert not torch.equal(tiny_unet(*unet_inputs).sample, base)


def test_sd15_attn_conv_preset_adapts_every_projection_and_conv_like_peft():
    """The counts the issue asks for, next to PEFT's LoRA r=8 on the same layers."""
    from peft import LoraConfig

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**sd15_unet_config())
    expected = {
        name
        for name, module in unet.named_modules()
        if (isinstance(module, torch.nn.Linear) and name.split(".")[-1] in {"to_q", "to_k", "to_v"})
        or name.endswith("to_out.0")
        or (isinstance(module, torch.nn.Conv2d) and ("resnets" in name or "samplers" in name))
    }
    configs = {
        "lora": AdapterConfig(method="lora", rank=8),
        "flora": AdapterConfig(method="flora", rank=8, conv_rank=[8, 8, 2, 2]),
        "liera": AdapterConfig(method="liera", rank=8, conv_rank=[8, 8, 2, 2]),
    }
    counts = {}
    for method, config in configs.items():
        adapted = plugin.add_adapter(unet, config, method)
        assert set(adapted) == expected
        counts[method] = sum(
            p.numel()
            for layer in plugin.adapted_layers(unet).values()
            for p in layer.adapters[method].parameters()
        )
    plugin.unload_adapters(unet)
    targets = [
        "to_q",
        "to_k",
        "to_v",
        "to_out.0",
        "conv1",
        "conv2",
        "conv_shortcut",
        "downsamplers.0.conv",
        "upsamplers.0.conv",
    ]
    unet.add_adapter(LoraConfig(r=8, lora_alpha=8, target_modules=targets, init_lora_weights="gaussian"))
    peft_layers = {n for n, m in unet.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")}
    peft_params = sum(p.numel() for n, p in unet.named_parameters() if "lora_" in n)
    print(
        f"\nSD1.5 attn+conv: {len(expected)} modules ({sum('conv' in n for n in expected)} convs); "
        f"trainable params: {counts} PEFT LoRA r=8: {peft_params}"
    )
    assert peft_layers == expected
    assert counts["lora"] == peft_params  # same targets, same rank: the same LoRA
    assert counts["flora"] < counts["lora"] and counts["liera"] < counts["lora"]
    assert len(expected) == 192


def test_processors_gradient_checkpointing_and_unloading(tiny_unet, unet_inputs):
    plugin.add_adapter(tiny_unet, AdapterConfig(method="liera", rank=4), "a")
    randomize(tiny_unet)
    with torch.no_grad():
        sdpa = tiny_unet(*unet_inputs).sample
        tiny_unet.set_attn_processor(AttnProcessor())
        classic = tiny_unet(*unet_inputs).sample
        plugin.disable_adapters(tiny_unet)
        base = tiny_unet(*unet_inputs).sample
        plugin.enable_adapters(tiny_unet)
    torch.testing.assert_close(classic, sdpa, rtol=1e-5, atol=1e-5)
    assert (classic - base).abs().max() > 1e-3
    tiny_unet.set_attn_processor(AttnProcessor2_0())

    def grads(checkpointing):
        tiny_unet.zero_grad()
        if checkpointing:
            tiny_unet.enable_gradient_checkpointing()
        else:
            tiny_unet.disable_gradient_checkpointing()
        tiny_unet.train()
        tiny_unet(*unet_inputs).sample.square().mean().backward()
        return {n: p.grad.clone() for n, p in tiny_unet.named_parameters() if p.requires_grad}

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-4, atol=1e-6)

    classes = [type(m) for m in UNet2DConditionModel(**TINY_UNET).modules()]
    plugin.unload_adapters(tiny_unet)
    assert [type(m) for m in tiny_unet.modules()] == classes
    assert plugin.list_adapters(tiny_unet) == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="xformers needs CUDA")
def test_xformers_processor_sees_adapters(tiny_unet, unet_inputs):
    pytest.importorskip("xformers")
    tiny_unet.cuda()
    inputs = [t.cuda() for t in unet_inputs]
    plugin.add_adapter(tiny_unet, AdapterConfig(method="liera", rank=4), "a")
    randomize(tiny_unet)
    with torch.no_grad():
        sdpa = tiny_unet(*inputs).sample
        tiny_unet.enable_xformers_memory_efficient_attention()
        xformers = tiny_unet(*inputs).sample
    torch.testing.assert_close(xformers, sdpa, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_base_with_float32_adapters(dtype, tiny_unet, unet_inputs):
    tiny_unet.to(dtype)
    inputs = [t.to(dtype) if t.is_floating_point() else t for t in unet_inputs]
    with torch.no_grad():
        base = tiny_unet(*inputs).sample
    plugin.add_adapter(tiny_unet, AdapterConfig(method="liera", rank=4), "l")
    plugin.add_adapter(tiny_unet, AdapterConfig(method="flora", rank=4), "f")
    plugin.set_adapters(tiny_unet, ["l", "f"])
    adapter_params = [p for n, p in tiny_unet.named_parameters() if ".adapters." in n]
    assert adapter_params and all(p.dtype == torch.float32 for p in adapter_params)
    with torch.no_grad():
        assert torch.equal(tiny_unet(*inputs).sample, base)
    randomize(tiny_unet)
    tiny_unet.train()
    out = tiny_unet(*inputs).sample
    assert out.dtype == dtype
    out.float().square().mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in adapter_params)
    assert (out.detach().float() - base.float()).abs().max() > 1e-2


def test_management_of_several_named_adapters(tiny_unet, unet_inputs):
    plugin.add_adapter(tiny_unet, AdapterConfig(method="lora", rank=4), "a")
    plugin.add_adapter(tiny_unet, AdapterConfig(method="liera", rank=4, targets="attn"), "b")
    randomize(tiny_unet)
    assert plugin.list_adapters(tiny_unet) == ["a", "b"]
    assert plugin.active_adapters(tiny_unet) == ["b"]  # a newly added adapter is the active one
    with torch.no_grad():
        only_b = tiny_unet(*unet_inputs).sample
        plugin.set_adapters(tiny_unet, ["a", "b"], [1.0, 1.0])
        both = tiny_unet(*unet_inputs).sample
        plugin.fuse_adapters(tiny_unet)
        fused = tiny_unet(*unet_inputs).sample
        with pytest.raises(ValueError, match="unfuse_adapters"):
            plugin.delete_adapters(tiny_unet, "a")
        plugin.unfuse_adapters(tiny_unet)
        plugin.delete_adapters(tiny_unet, "a")
        after_delete = tiny_unet(*unet_inputs).sample
    torch.testing.assert_close(fused, both, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(after_delete, only_b, rtol=1e-4, atol=1e-5)
    assert plugin.list_adapters(tiny_unet) == ["b"]
    assert isinstance(tiny_unet.down_blocks[0].resnets[0].conv1, torch.nn.Conv2d)  # "a" was its only adapter
    with pytest.raises(ValueError, match="no adapter named 'zzz'"):
        plugin.set_adapters(tiny_unet, ["zzz"])
    with pytest.raises(ValueError, match="already exists"):
        plugin.add_adapter(tiny_unet, AdapterConfig(), "b")


def test_text_encoder_sdxl_unet_and_transformer_models():
    from diffusers import PixArtTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, vocab_size=99
        )
    ).eval()
    adapted = plugin.add_adapter(text_encoder, AdapterConfig(method="liera", targets="attn"), "t")
    assert len(adapted) == 2 * 4 and all(
        n.split(".")[-1] in {"q_proj", "k_proj", "v_proj", "out_proj"} for n in adapted
    )
    randomize(text_encoder)
    ids = torch.randint(0, 99, (2, 7))
    with torch.no_grad():
        adapted_out = text_encoder(ids).last_hidden_state
        plugin.fuse_adapters(text_encoder)
        torch.testing.assert_close(text_encoder(ids).last_hidden_state, adapted_out, rtol=1e-4, atol=1e-5)

    sdxl_like = UNet2DConditionModel(
        **dict(
            TINY_UNET,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=80,
            transformer_layers_per_block=[1, 2],
            use_linear_projection=True,
        )
    )
    assert len(plugin.add_adapter(sdxl_like, AdapterConfig(method="flora", targets="attn+conv"), "x")) > 10
    added = {"text_embeds": torch.randn(1, 32), "time_ids": torch.randn(1, 6)}
    with torch.no_grad():
        sdxl_like(torch.randn(1, 4, 8, 8), 3, torch.randn(1, 5, 32), added_cond_kwargs=added)

    transformer = PixArtTransformer2DModel(
        sample_size=8,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        in_channels=4,
        out_channels=8,
        patch_size=2,
        cross_attention_dim=16,
        caption_channels=16,
        norm_num_groups=1,
        norm_type="ada_norm_single",
    )
    adapted = plugin.add_adapter(transformer, AdapterConfig(method="liera", targets="attn+conv"), "p")
    assert adapted and all(
        isinstance(transformer.get_submodule(n).base_layer, torch.nn.Linear) for n in adapted
    )
    with pytest.raises(ValueError, match="match no Linear/Conv layer"):
        plugin.add_adapter(transformer, AdapterConfig(targets=["nothing_here"]), "q")
    assert all(isinstance(m, AdaptedLayer) for m in plugin.adapted_layers(transformer).values())
