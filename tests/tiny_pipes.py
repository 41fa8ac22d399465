"""Tiny real diffusers pipelines (SD, SDXL, SD3, Flux) built from configs with random weights, nothing downloaded."""

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

import plugin
from plugin import AdapterConfig
from tests.conftest import TINY_UNET, randomize

PROMPT = "a photo of a cat"
UNET = {**TINY_UNET, "sample_size": 16}  # the pipelines draw 32x32 images by default (VAE factor 2)


def tokenizer(folder: Path) -> CLIPTokenizer:
    """A CLIP BPE tokenizer over single letters: enough to turn prompts into ids offline."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for letter in "abcdefghijklmnopqrstuvwxyz":
        vocab[letter] = len(vocab)
        vocab[f"{letter}</w>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=16)


def text_config(**kwargs) -> CLIPTextConfig:
    return CLIPTextConfig(
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=64,
        max_position_embeddings=16,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        **kwargs,
    )


def vae(**overrides) -> AutoencoderKL:
    return AutoencoderKL(
        **{
            "block_out_channels": (8, 16),
            "down_block_types": ("DownEncoderBlock2D",) * 2,
            "up_block_types": ("UpDecoderBlock2D",) * 2,
            "latent_channels": 4,
            "norm_num_groups": 8,
            "sample_size": 32,
            **overrides,
        }
    )


def scheduler() -> DDIMScheduler:
    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def sd(folder: Path, cls=None, seed: int = 0):
    """A tiny Stable Diffusion pipeline; the same seed always gives the same weights."""
    from diffusers import StableDiffusionPipeline

    torch.manual_seed(seed)
    components = dict(
        unet=UNet2DConditionModel(**UNET),
        vae=vae(),
        text_encoder=CLIPTextModel(text_config()),
        tokenizer=tokenizer(folder / "tokenizer"),
        scheduler=scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe = (cls or StableDiffusionPipeline)(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sdxl(folder: Path, cls=None, seed: int = 0):
    """A tiny SDXL pipeline: two text encoders, a UNet with `text_time` added conditioning."""
    from diffusers import StableDiffusionXLPipeline

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        # SDXL's order: attention in the low-resolution blocks, so its first up block (with an
        # upsampler) has attention, which the file's sgm names depend on.
        **{
            **UNET,
            "cross_attention_dim": 64,
            "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
            "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
        },
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=8 * 6 + 32,
    )
    components = dict(
        unet=unet,
        vae=vae(),
        text_encoder=CLIPTextModel(text_config()),
        text_encoder_2=CLIPTextModelWithProjection(text_config(projection_dim=32)),
        tokenizer=tokenizer(folder / "tokenizer"),
        tokenizer_2=tokenizer(folder / "tokenizer_2"),
        scheduler=scheduler(),
        add_watermarker=False,
    )
    pipe = (cls or StableDiffusionXLPipeline)(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def t5_tokenizer(folder: Path):
    """A T5 (Unigram) tokenizer over single letters, built with `tokenizers`: T5's own can't be downloaded."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
    pieces += [(letter, -2.0) for letter in "abcdefghijklmnopqrstuvwxyz"]
    model = Tokenizer(models.Unigram(pieces, unk_id=2))
    model.pre_tokenizer = pre_tokenizers.Metaspace()
    model.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer = T5TokenizerFast(
        tokenizer_object=model, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", extra_ids=0,
        model_max_length=32,
    )  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(folder)
    return T5TokenizerFast.from_pretrained(folder)


def t5(d_model: int):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=32, d_model=d_model, d_kv=8, d_ff=37, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, dropout_rate=0.0,
    )  # fmt: skip
    return T5EncoderModel(config)


def flow_vae() -> AutoencoderKL:
    """SD3's and Flux's VAE layout: 16 latent channels, a shift, no quant convs."""
    return vae(
        latent_channels=16,
        shift_factor=0.0609,
        scaling_factor=1.5035,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def sd3(folder: Path, cls=None, seed: int = 0):
    """A tiny SD3 pipeline: two CLIPs with projections, a T5, a 2-block MMDiT on 16-channel latents."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=1, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
        num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=64, pooled_projection_dim=64,
    )  # fmt: skip
    components = dict(
        transformer=transformer,
        vae=flow_vae(),
        text_encoder=CLIPTextModelWithProjection(text_config(projection_dim=32)),
        text_encoder_2=CLIPTextModelWithProjection(text_config(projection_dim=32)),
        text_encoder_3=t5(64),
        tokenizer=tokenizer(folder / "tokenizer"),
        tokenizer_2=tokenizer(folder / "tokenizer_2"),
        tokenizer_3=t5_tokenizer(folder / "tokenizer_3"),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
    )
    pipe = (cls or StableDiffusion3Pipeline)(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def flux(folder: Path, cls=None, seed: int = 0):
    """A tiny Flux pipeline: CLIP (pooled) and T5, one double and one single block on packed 16-channel
    latents, with the guidance embedding of guidance-distilled models (Flux-dev)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 4, 8),
        guidance_embeds=True,
    )  # fmt: skip
    components = dict(
        transformer=transformer,
        vae=flow_vae(),
        text_encoder=CLIPTextModel(text_config()),
        text_encoder_2=t5(32),
        tokenizer=tokenizer(folder / "tokenizer"),
        tokenizer_2=t5_tokenizer(folder / "tokenizer_2"),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0),
    )
    pipe = (cls or FluxPipeline)(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(
    pipe, prompt: str = PROMPT, seed: int = 0, output_type: str = "latent", **kwargs
) -> torch.Tensor:
    """Two DDIM steps with a fixed seed: the latents (or images) to compare."""
    out = pipe(
        prompt,
        num_inference_steps=2,
        guidance_scale=5.0,
        height=32,
        width=32,
        generator=torch.Generator().manual_seed(seed),
        output_type=output_type,
        **kwargs,
    )
    return out.images if output_type == "latent" else torch.as_tensor(out.images)


def adapter_file(
    path: Path,
    pipe,
    method: str = "liera",
    components=("unet", "text_encoder"),
    seed: int = 2,
    **config,
) -> Path:
    """Train-like file: an adapter on `pipe`'s components with random (non-zero) tensors, saved and removed."""
    models = {c: getattr(pipe, c) for c in components}
    for model in models.values():
        plugin.add_adapter(model, AdapterConfig(method=method, rank=4, **config), "tmp")
        randomize(model, std=0.1, seed=seed)
    plugin.save_adapter(path, models, "tmp", base_model="tiny")
    for model in models.values():
        plugin.unload_adapters(model)
    return path
