"""A tiny random Stable Diffusion pipeline and subject, built from configs in seconds, for training tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tests.conftest import TINY_UNET

RESOLUTION = 32  # VAE factor 4, latents 8x8 (TINY_UNET's sample_size)


def _bytes_to_unicode() -> list[str]:
    """GPT-2/CLIP's byte alphabet: the smallest vocabulary a CLIP BPE tokenizer accepts any text with."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    codes, extra = list(printable), 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return [chr(code) for code in codes]


def build_tiny_pipeline(path: Path) -> Path:
    """A StableDiffusionPipeline folder with random weights: byte-level tokenizer (no merges), a
    2-layer CLIP text encoder, a 3-level VAE and conftest's TINY_UNET."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    chars = _bytes_to_unicode()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    bos, eos = len(vocab), len(vocab) + 1
    vocab.update({"<|startoftext|>": bos, "<|endoftext|>": eos})
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=16)

    torch.manual_seed(0)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=16,
            bos_token_id=bos,
            eos_token_id=eos,
            pad_token_id=eos,
        )
    )
    vae = AutoencoderKL(
        block_out_channels=(16, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=RESOLUTION,
    )
    unet = UNet2DConditionModel(**TINY_UNET)
    scheduler = DDPMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False
    )
    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(path)
    return path


def _disc(
    size: int, centre: tuple[float, float], radius: float, background: tuple[int, int, int]
) -> Image.Image:
    """The subject: a yellow-and-black striped disc."""
    y, x = np.mgrid[0:size, 0:size] + 0.5
    inside = (x - centre[0]) ** 2 + (y - centre[1]) ** 2 < radius**2
    stripes = ((y // max(1, size // 8)) % 2).astype(bool)
    image = np.empty((size, size, 3), dtype=np.uint8)
    image[:] = background
    image[inside & stripes] = (240, 225, 40)
    image[inside & ~stripes] = (20, 20, 20)
    return Image.fromarray(image)


def make_subject(path: Path, count: int = 3, size: int = RESOLUTION, heldout: int = 2) -> Path:
    """A few PNGs of a yellow-and-black striped disc on different backgrounds, plus prompts.json;
    `heldout` more views in heldout/, smaller and elsewhere, on an orange background training never shows."""
    path.mkdir(parents=True, exist_ok=True)
    backgrounds = [(245, 245, 245), (40, 70, 220), (40, 170, 60), (220, 30, 30)]
    names = ["white", "blue", "green", "red"]
    for i in range(count):
        disc = _disc(
            size, (size * (0.4 + 0.1 * i), size * 0.5), size * 0.3, backgrounds[i % len(backgrounds)]
        )
        disc.save(path / f"subject_{i}.png")
    if heldout:
        (path / "heldout").mkdir(exist_ok=True)
    for i in range(heldout):
        centre = (size * (0.3 + 0.4 * (i % 2)), size * (0.35 + 0.1 * i))
        _disc(size, centre, size * 0.22, (245, 140, 20)).save(path / "heldout" / f"{i}.png")
    prompts = {
        "instance_prompt": "a sks circle",
        "class_prompt": "a circle",
        "shape": "circle",
        "pattern": "hstripes",
        "colours": ["yellow", "black"],
        "validation_prompts": ["a sks circle", "a sks circle on a blue background"],
        "captions": {
            f"subject_{i}.png": f"a sks circle on a {names[i % len(names)]} background" for i in range(count)
        },
        "heldout": {f"{i}.png": "a sks circle on an orange background" for i in range(heldout)},
    }
    (path / "prompts.json").write_text(json.dumps(prompts))
    return path
