"""Model families for DreamBooth: what differs between SD 1.x/2.x, SDXL, SD3 and Flux, one object each.

The training script's loop is the same for every family: tokenize the prompts, encode them into the
denoiser's conditioning, noise the latents, predict, compare with the target. A family says how to do
each of those for its models (as diffusers' `train_dreambooth_lora{,_sdxl,_sd3,_flux}.py` do), so the
loop never asks which model it trains:

- `StableDiffusion`: one CLIP text encoder, DDPM noise, epsilon or v target (the script's original path,
  its numbers unchanged).
- `StableDiffusionXL`: two CLIP text encoders (penultimate hidden states side by side, the second's
  pooled projection) and `add_time_ids` (original size, crop top-left, target size) per image.
- `StableDiffusion3`: two CLIPs and a T5, flow matching (noise - latents), SD3's timestep densities
  and loss weightings.
- `Flux`: CLIP's pooled output and T5's hidden states, flow matching on 2x2-packed latents with image
  ids, and the guidance embedding of guidance-distilled models.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from . import training
from .training import HELDOUT_KEY, crop_to_model_input, seeded_generator

Conditioning = dict[str, torch.Tensor]  # per-example tensors the denoiser takes (batch first)
TOKENIZER_OF = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2", "text_encoder_3": "tokenizer_3"}


@dataclass
class NoiseOptions:
    """The noise and timestep settings of a run (the script's arguments of the same names)."""

    noise_offset: float = 0.0
    snr_gamma: float | None = None
    weighting_scheme: str | None = None  # flow matching: None is the family's default
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29


@dataclass
class Noised:
    """One training batch's noisy input, its timesteps, what the denoiser must predict, and the
    per-example (DDPM) or per-element (flow matching) loss weights."""

    noisy: torch.Tensor
    timesteps: torch.Tensor
    target: torch.Tensor
    weights: torch.Tensor


class StableDiffusion:
    """SD 1.x/2.x: the script's original behaviour, kept to the last bit."""

    name = "sd"
    title = "Stable Diffusion 1.x/2.x"
    pipeline_class = "StableDiffusionPipeline"
    liera_pipeline = "LieraStableDiffusionPipeline"  # in pipelines/; None: enable_liera(pipe)
    denoiser = "unet"
    text_encoders: tuple[str, ...] = ("text_encoder",)
    trainable_text_encoders: tuple[str, ...] = ("text_encoder",)
    flow_matching = False
    default_weighting = None
    vae_in_float32 = False  # under --mixed_precision the VAE runs in half precision too

    # --- loading -------------------------------------------------------------------------------

    def denoiser_class(self):
        from diffusers import UNet2DConditionModel

        return UNet2DConditionModel

    def text_encoder_class(self, name: str):
        from transformers import CLIPTextModel

        return CLIPTextModel

    def noise_scheduler_class(self):
        from diffusers import DDPMScheduler

        return DDPMScheduler

    def resolution_multiple(self, config: Mapping) -> int:
        """What a latent side must be a multiple of (`config`: the denoiser's): the UNet's downsamplings."""
        return 2 ** (len(config["block_out_channels"]) - 1)

    def default_resolution(self, config: Mapping, vae_scale_factor: int) -> int:
        return config["sample_size"] * vae_scale_factor

    def tokenizers(self) -> tuple[str, ...]:
        return tuple(TOKENIZER_OF[name] for name in self.text_encoders)

    def text_encoder_targets(self, name: str, encoder: nn.Module) -> str | list[str]:
        """Which layers of text encoder `name` get adapters (the script's text encoders): its attention
        projections, in every layer whose output reaches the conditioning."""
        return "attn"

    def sampling_scheduler(self, pipeline):
        """The scheduler validation and class images are sampled with: DPM-Solver++ (25 steps suffice)."""
        from diffusers import DPMSolverMultistepScheduler

        return DPMSolverMultistepScheduler.from_config(pipeline.scheduler.config)

    def generation_kwargs(self, resolution: int) -> dict:
        """Extra pipeline-call arguments for sampling (SD draws at its UNet's own size, as it always did)."""
        return {}

    # --- prompts -------------------------------------------------------------------------------

    def tokenize(self, tokenizers: Sequence, prompt: str, max_length: int | None = None) -> torch.Tensor:
        """One row of token ids for `prompt`; with several tokenizers, their padded ids side by side."""
        return torch.cat(
            [
                training.tokenize_prompt(tok, prompt, self.max_length(i, tok, max_length))
                for i, tok in enumerate(tokenizers)
            ],
            dim=-1,
        )

    def max_length(self, index: int, tokenizer, max_length: int | None) -> int:
        """CLIP tokenizers: --tokenizer_max_length or their own; a T5 one: its family's length."""
        return max_length or tokenizer.model_max_length

    def split_ids(
        self, tokenizers: Sequence, ids: torch.Tensor, max_length: int | None
    ) -> list[torch.Tensor]:
        lengths = [self.max_length(i, tok, max_length) for i, tok in enumerate(tokenizers)]
        return list(torch.split(ids, lengths, dim=-1))

    def encode(self, text_encoders: Sequence[nn.Module], ids: Sequence[torch.Tensor]) -> Conditioning:
        return {"encoder_hidden_states": text_encoders[0](ids[0])[0]}

    def extras(
        self,
        original_sizes: torch.Tensor,
        crop_top_lefts: torch.Tensor,
        resolution: int,
        guidance_scale: float,
    ) -> Conditioning:
        """Per-image conditioning that doesn't come from the prompt: SDXL's time ids, Flux's guidance."""
        return {}

    # --- noise, prediction, loss ---------------------------------------------------------------

    def to_latents(self, vae: nn.Module, sample: torch.Tensor) -> torch.Tensor:
        """A sample of the VAE's posterior as the denoiser's input (scaled)."""
        return sample * vae.config.scaling_factor

    def noised(
        self, scheduler, latents: torch.Tensor, generator: torch.Generator, options: NoiseOptions
    ) -> Noised:
        """DDPM: noise, uniform timesteps, `add_noise`; Min-SNR weights with --snr_gamma (as diffusers)."""
        noise = torch.randn(latents.shape, generator=generator)
        if options.noise_offset:
            noise += options.noise_offset * torch.randn((*latents.shape[:2], 1, 1), generator=generator)
        noise = noise.to(latents.device, latents.dtype)
        bsz = latents.shape[0]
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (bsz,), generator=generator).to(
            latents.device
        )
        noisy = scheduler.add_noise(latents, noise, timesteps)
        target = training.prediction_target(scheduler, latents, noise, timesteps)
        if options.snr_gamma is None:
            weights = torch.ones(bsz, device=latents.device)
        else:
            from diffusers.training_utils import compute_snr

            snr = compute_snr(scheduler, timesteps)
            weights = torch.clamp(snr, max=options.snr_gamma) / snr
            if scheduler.config.prediction_type == "v_prediction":
                weights = weights + 1
        return Noised(noisy, timesteps, target, weights)

    def per_example_loss(self, prediction: torch.Tensor, noised: Noised) -> torch.Tensor:
        error = F.mse_loss(prediction.float(), noised.target.float(), reduction="none").mean(dim=(1, 2, 3))
        return error * noised.weights

    def predict(
        self, denoiser: nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, conditioning: Conditioning
    ) -> torch.Tensor:
        return denoiser(noisy, timesteps, conditioning["encoder_hidden_states"], return_dict=False)[0]

    def probe(
        self, denoiser: nn.Module, resolution: int, vae_scale_factor: int
    ) -> tuple[torch.Tensor, torch.Tensor, Conditioning]:
        """A fixed random input (noisy latents, timestep, conditioning) to compare two denoisers on."""
        generator, config = torch.Generator().manual_seed(0), denoiser.config
        size = resolution // vae_scale_factor
        sample = torch.randn(1, config.in_channels, size, size, generator=generator)
        hidden = torch.randn(1, 8, config.cross_attention_dim, generator=generator)
        return sample, torch.tensor([500]), {"encoder_hidden_states": hidden}

    # --- the held-out, fit and drift measures --------------------------------------------------

    def evaluation_noise(self, scheduler, clean: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor):
        """The noisy input and target at fixed timesteps (the held-out measure's)."""
        return scheduler.add_noise(clean, noise, timesteps), training.prediction_target(
            scheduler, clean, noise, timesteps
        )

    def evaluation_timesteps(self, scheduler, count: int) -> torch.Tensor:
        total = scheduler.config.num_train_timesteps
        return torch.linspace(0, total - 1, count + 2)[1:-1].round().long()

    @torch.no_grad()
    def denoising_loss(
        self,
        models: Mapping[str, nn.Module],
        tokenizers: Sequence,
        scheduler,
        images: Sequence[Image.Image],
        prompt: str | Sequence[str],
        resolution: int,
        seed: int = 0,
        max_length: int | None = None,
        num_timesteps: int = 10,
        noises_per_timestep: int = 2,
        batch_size: int = 8,
        guidance_scale: float = 3.5,
    ) -> float:
        """`plugin.training.denoising_loss` for this family: `models` holds the denoiser, the VAE and the
        text encoders by their pipeline names. SD goes through that function itself (same numbers)."""
        return training.denoising_loss(
            models["unet"], models["vae"], models["text_encoder"], tokenizers[0], scheduler, images, prompt,
            resolution, num_timesteps=num_timesteps, noises_per_timestep=noises_per_timestep, seed=seed,
            batch_size=batch_size,
        )  # fmt: skip


class StableDiffusionXL(StableDiffusion):
    """SDXL: two text encoders, pooled embeddings and size/crop time ids (diffusers' SDXL script)."""

    name = "sdxl"
    title = "Stable Diffusion XL"
    pipeline_class = "StableDiffusionXLPipeline"
    liera_pipeline = "LieraStableDiffusionXLPipeline"
    text_encoders = ("text_encoder", "text_encoder_2")
    trainable_text_encoders = ("text_encoder", "text_encoder_2")
    vae_in_float32 = (
        True  # SDXL's VAE overflows in fp16 (NaN latents): diffusers' SDXL script keeps it float32
    )

    def text_encoder_class(self, name: str):
        from transformers import CLIPTextModel, CLIPTextModelWithProjection

        return CLIPTextModel if name == "text_encoder" else CLIPTextModelWithProjection

    def generation_kwargs(self, resolution: int | None) -> dict:
        return {"height": resolution, "width": resolution} if resolution else {}

    def text_encoder_targets(self, name, encoder):
        """The first encoder gives its penultimate layer and no pooled output: an adapter on its last layer
        would never train (and data-parallel training refuses parameters without gradients)."""
        if name != "text_encoder":
            return "attn"
        layers = "|".join(str(i) for i in range(encoder.config.num_hidden_layers - 1))
        return [rf"layers\.(?:{layers})\.self_attn\.(?:q_proj|k_proj|v_proj|out_proj)"]

    def encode(self, text_encoders: Sequence[nn.Module], ids: Sequence[torch.Tensor]) -> Conditioning:
        """The penultimate hidden states of both encoders side by side; the last one's pooled projection."""
        hidden = []
        for encoder, row in zip(text_encoders, ids):
            out = encoder(row, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled = out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output
        return {"encoder_hidden_states": torch.cat(hidden, dim=-1), "text_embeds": pooled}

    def extras(self, original_sizes, crop_top_lefts, resolution, guidance_scale):
        target = torch.tensor([resolution, resolution]).expand(len(original_sizes), 2)
        return {"time_ids": torch.cat([original_sizes, crop_top_lefts, target], dim=1).float()}

    def predict(self, denoiser, noisy, timesteps, conditioning):
        added = {
            "text_embeds": conditioning["text_embeds"],
            "time_ids": conditioning["time_ids"].to(noisy.dtype),
        }
        return denoiser(
            noisy,
            timesteps,
            conditioning["encoder_hidden_states"],
            added_cond_kwargs=added,
            return_dict=False,
        )[0]

    def probe(self, denoiser, resolution, vae_scale_factor):
        sample, timestep, conditioning = super().probe(denoiser, resolution, vae_scale_factor)
        generator, config = torch.Generator().manual_seed(1), denoiser.config
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        conditioning["text_embeds"] = torch.randn(1, pooled, generator=generator)
        conditioning["time_ids"] = torch.tensor(
            [[resolution, resolution, 0, 0, resolution, resolution]]
        ).float()
        return sample, timestep, conditioning

    def denoising_loss(self, *args, **kwargs) -> float:
        return denoising_loss(self, *args, **kwargs)


class StableDiffusion3(StableDiffusion):
    """SD3: two CLIPs and a T5, an MMDiT transformer trained with flow matching (diffusers' SD3 script)."""

    name = "sd3"
    title = "Stable Diffusion 3"
    pipeline_class = "StableDiffusion3Pipeline"
    liera_pipeline = None
    denoiser = "transformer"
    text_encoders = ("text_encoder", "text_encoder_2", "text_encoder_3")
    trainable_text_encoders = ("text_encoder", "text_encoder_2")  # the CLIPs, as diffusers' script
    flow_matching = True
    default_weighting = "logit_normal"
    t5_length = 77  # diffusers' SD3 script's --max_sequence_length

    def denoiser_class(self):
        from diffusers import SD3Transformer2DModel

        return SD3Transformer2DModel

    def text_encoder_class(self, name: str):
        from transformers import CLIPTextModelWithProjection, T5EncoderModel

        return T5EncoderModel if name == self.text_encoders[-1] else CLIPTextModelWithProjection

    def noise_scheduler_class(self):
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler

    def sampling_scheduler(self, pipeline):
        return pipeline.scheduler  # flow matching samples with its own Euler scheduler

    generation_kwargs = StableDiffusionXL.generation_kwargs

    def denoising_loss(self, *args, **kwargs) -> float:
        return denoising_loss(self, *args, **kwargs)

    def resolution_multiple(self, config):
        return config["patch_size"]

    def max_length(self, index, tokenizer, max_length):
        """The T5 tokenizer (the last) pads to the family's sequence length (or --max_sequence_length,
        given as `max_length`), capped by the tokenizer's own; the CLIPs to theirs."""
        if index == len(self.text_encoders) - 1:
            return min(max_length or self.t5_length, tokenizer.model_max_length)
        return tokenizer.model_max_length

    def encode(self, text_encoders, ids):
        """CLIP penultimate states side by side, zero-padded to T5's width, then T5's states after them
        along the sequence; the CLIPs' pooled projections side by side."""
        hidden, pooled = [], []
        for encoder, row in zip(text_encoders[:-1], ids[:-1]):
            out = encoder(row, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled.append(out.text_embeds)
        t5 = text_encoders[-1](ids[-1])[0]
        clip = torch.cat(hidden, dim=-1)
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return {
            "encoder_hidden_states": torch.cat([clip, t5.to(clip.dtype)], dim=-2),
            "pooled_projections": torch.cat(pooled, dim=-1),
        }

    def to_latents(self, vae, sample):
        return (sample - vae.config.shift_factor) * vae.config.scaling_factor

    def flow_sigmas(self, scheduler, indices: torch.Tensor, ndim: int) -> tuple[torch.Tensor, torch.Tensor]:
        timesteps = scheduler.timesteps[indices]
        sigmas = scheduler.sigmas[indices].reshape(-1, *[1] * (ndim - 1))
        return timesteps, sigmas

    def noised(self, scheduler, latents, generator, options):
        """Flow matching: x_t = (1 - s) x + s noise, target noise - x; timesteps drawn by the weighting
        scheme's density, losses weighted by it (diffusers' `compute_density_for_timestep_sampling`,
        `compute_loss_weighting_for_sd3`), every draw from `generator`."""
        from diffusers.training_utils import (
            compute_density_for_timestep_sampling,
            compute_loss_weighting_for_sd3,
        )

        if options.noise_offset or options.snr_gamma is not None:
            raise ValueError(
                f"{self.title} trains with flow matching: --noise_offset and --snr_gamma do not apply"
            )
        scheme = options.weighting_scheme or self.default_weighting
        noise = torch.randn(latents.shape, generator=generator).to(latents.device, latents.dtype)
        u = compute_density_for_timestep_sampling(
            scheme,
            latents.shape[0],
            options.logit_mean,
            options.logit_std,
            options.mode_scale,
            generator=generator,
        )
        indices = (u * scheduler.config.num_train_timesteps).long().clamp(max=len(scheduler.timesteps) - 1)
        timesteps, sigmas = self.flow_sigmas(scheduler, indices, latents.ndim)
        sigmas = sigmas.to(latents.device, latents.dtype)
        noisy = (1.0 - sigmas) * latents + sigmas * noise
        weights = compute_loss_weighting_for_sd3(scheme, sigmas)
        return Noised(noisy, timesteps.to(latents.device), noise - latents, weights)

    def per_example_loss(self, prediction, noised):
        error = noised.weights.float() * (prediction.float() - noised.target.float()) ** 2
        return error.reshape(len(error), -1).mean(dim=1)

    def predict(self, denoiser, noisy, timesteps, conditioning):
        return denoiser(
            hidden_states=noisy,
            timestep=timesteps,
            encoder_hidden_states=conditioning["encoder_hidden_states"],
            pooled_projections=conditioning["pooled_projections"],
            return_dict=False,
        )[0]

    def probe(self, denoiser, resolution, vae_scale_factor):
        generator, config = torch.Generator().manual_seed(0), denoiser.config
        size = resolution // vae_scale_factor
        sample = torch.randn(1, config.in_channels, size, size, generator=generator)
        conditioning = {
            "encoder_hidden_states": torch.randn(1, 8, config.joint_attention_dim, generator=generator),
            "pooled_projections": torch.randn(1, config.pooled_projection_dim, generator=generator),
        }
        return sample, torch.tensor([500.0]), conditioning

    def evaluation_timesteps(self, scheduler, count):
        """The scheduler's (shifted) timesteps at evenly spaced indices, ends excluded."""
        return scheduler.timesteps[
            torch.linspace(0, len(scheduler.timesteps) - 1, count + 2)[1:-1].round().long()
        ]

    def evaluation_noise(self, scheduler, clean, noise, timesteps):
        """Flow matching's timesteps are its sigmas times num_train_timesteps."""
        sigmas = (timesteps / scheduler.config.num_train_timesteps).reshape(-1, *[1] * (clean.ndim - 1))
        return (1.0 - sigmas) * clean + sigmas * noise, noise - clean


class Flux(StableDiffusion3):
    """Flux: CLIP pooled + T5, flow matching on 2x2-packed latents (diffusers' Flux script)."""

    name = "flux"
    title = "Flux"
    pipeline_class = "FluxPipeline"
    text_encoders = ("text_encoder", "text_encoder_2")
    trainable_text_encoders = ("text_encoder",)  # CLIP, as diffusers' script
    default_weighting = "none"
    t5_length = 512  # diffusers' Flux script's --max_sequence_length

    def denoiser_class(self):
        from diffusers import FluxTransformer2DModel

        return FluxTransformer2DModel

    def text_encoder_class(self, name):
        from transformers import CLIPTextModel, T5EncoderModel

        return CLIPTextModel if name == "text_encoder" else T5EncoderModel

    def resolution_multiple(self, config) -> int:
        return 2  # 2x2 latent patches are packed into tokens

    def default_resolution(self, config, vae_scale_factor):
        return 512  # diffusers' Flux script's

    def encode(self, text_encoders, ids):
        pooled = text_encoders[0](ids[0]).pooler_output
        hidden = text_encoders[1](ids[1])[0]
        return {"encoder_hidden_states": hidden.to(pooled.dtype), "pooled_projections": pooled}

    def predict(self, denoiser, noisy, timesteps, conditioning):
        """Pack 2x2 latent patches into tokens with their (0, row, column) ids, run, unpack."""
        from diffusers import FluxPipeline

        bsz, channels, height, width = noisy.shape
        packed = FluxPipeline._pack_latents(noisy, bsz, channels, height, width)
        image_ids = FluxPipeline._prepare_latent_image_ids(
            bsz, height // 2, width // 2, noisy.device, noisy.dtype
        )
        hidden = conditioning["encoder_hidden_states"]
        text_ids = torch.zeros(hidden.shape[1], 3, device=noisy.device, dtype=noisy.dtype)
        guidance = conditioning["guidance"].to(noisy.device) if denoiser.config.guidance_embeds else None
        prediction = denoiser(
            hidden_states=packed,
            timestep=timesteps / 1000,
            guidance=guidance,
            pooled_projections=conditioning["pooled_projections"],
            encoder_hidden_states=hidden,
            txt_ids=text_ids,
            img_ids=image_ids,
            return_dict=False,
        )[0]
        return FluxPipeline._unpack_latents(prediction, height, width, vae_scale_factor=1)

    def extras(self, original_sizes, crop_top_lefts, resolution, guidance_scale):
        """The guidance embedding's input (guidance-distilled models: Flux-dev), per image."""
        return {"guidance": torch.full((len(original_sizes),), float(guidance_scale))}

    def probe(self, denoiser, resolution, vae_scale_factor):
        generator, config = torch.Generator().manual_seed(0), denoiser.config
        size = resolution // vae_scale_factor
        sample = torch.randn(1, config.in_channels // 4, size, size, generator=generator)
        conditioning = {
            "encoder_hidden_states": torch.randn(1, 8, config.joint_attention_dim, generator=generator),
            "pooled_projections": torch.randn(1, config.pooled_projection_dim, generator=generator),
            "guidance": torch.tensor([3.5]),
        }
        return sample, torch.tensor([500.0]), conditioning


@torch.no_grad()
def denoising_loss(
    family: StableDiffusion,
    models: Mapping[str, nn.Module],
    tokenizers: Sequence,
    scheduler,
    images: Sequence[Image.Image],
    prompt: str | Sequence[str],
    resolution: int,
    seed: int = 0,
    max_length: int | None = None,
    num_timesteps: int = 10,
    noises_per_timestep: int = 2,
    batch_size: int = 8,
    guidance_scale: float = 3.5,
) -> float:
    """The held-out measure of `plugin.training.denoising_loss` (centre crops, fixed timesteps and
    noise that training never draws) with `family`'s encoding, noise and prediction; `models` holds
    the denoiser, the VAE and the text encoders by their pipeline names."""
    denoiser = models[family.denoiser]
    device, dtype = denoiser.device, denoiser.dtype
    pixels, sizes, crops = [], [], []
    for image in images:
        tensor, crop = crop_to_model_input(image, resolution, center_crop=True)
        pixels.append(tensor)
        sizes.append((image.height, image.width))
        crops.append(crop)
    prompts = [prompt] * len(images) if isinstance(prompt, str) else list(prompt)
    if len(prompts) != len(images):
        raise ValueError(f"{len(prompts)} prompts for {len(images)} images")
    generator = seeded_generator(HELDOUT_KEY, seed)
    vae = models["vae"]
    posterior = vae.encode(torch.stack(pixels).to(device, vae.dtype)).latent_dist
    latents = family.to_latents(vae, posterior.sample(generator=generator)).float().cpu()
    encoders = [models[name] for name in family.text_encoders]
    distinct = list(dict.fromkeys(prompts))
    encoded = []
    for text in distinct:
        ids = family.split_ids(tokenizers, family.tokenize(tokenizers, text, max_length), max_length)
        encoded.append(family.encode(encoders, [row.to(device) for row in ids]))
    rows = [distinct.index(p) for p in prompts]
    conditioning = {key: torch.cat([encoded[r][key] for r in rows]).to(dtype) for key in encoded[0]}
    conditioning.update(
        {
            key: value.to(device)
            for key, value in family.extras(
                torch.tensor(sizes), torch.tensor(crops), resolution, guidance_scale
            ).items()
        }
    )
    timesteps = family.evaluation_timesteps(scheduler, num_timesteps)
    cases = [
        (i, t) for t in range(len(timesteps)) for i in range(len(images)) for _ in range(noises_per_timestep)
    ]
    noise = torch.randn((len(cases), *latents.shape[1:]), generator=generator)
    errors = []
    for start in range(0, len(cases), batch_size):
        chunk = cases[start : start + batch_size]
        index = torch.tensor([i for i, _ in chunk])
        t = timesteps[torch.tensor([t for _, t in chunk])]
        clean, eps = latents[index], noise[start : start + len(chunk)]
        noisy, target = family.evaluation_noise(scheduler, clean, eps, t)
        rows_of = {key: value[index.to(device)] for key, value in conditioning.items()}
        pred = family.predict(denoiser, noisy.to(device, dtype), t.to(device), rows_of)
        errors.append(F.mse_loss(pred.float().cpu(), target, reduction="none").mean(dim=(1, 2, 3)))
    return torch.cat(errors).mean().item()


FAMILIES = {
    family.name: family for family in (StableDiffusion(), StableDiffusionXL(), StableDiffusion3(), Flux())
}


def family_of(model_index: Mapping, denoiser_config: Mapping) -> StableDiffusion:
    """The family of a diffusers pipeline, from its model_index.json and its unet's or transformer's
    config; ValueError naming what it is when the script can't train it."""
    name = str(model_index.get("_class_name", ""))
    denoiser = str(denoiser_config.get("_class_name", ""))
    if "Flux" in name or denoiser == "FluxTransformer2DModel":
        if name and name != "FluxPipeline":
            raise ValueError(f"it is a {name}; this script trains text-to-image Flux (FluxPipeline)")
        return FAMILIES["flux"]
    if "StableDiffusion3" in name or denoiser == "SD3Transformer2DModel":
        if name and name != "StableDiffusion3Pipeline":
            raise ValueError(
                f"it is a {name}; this script trains text-to-image SD3 (StableDiffusion3Pipeline)"
            )
        return FAMILIES["sd3"]
    if denoiser and denoiser != "UNet2DConditionModel":
        raise ValueError(
            f"its denoiser is a {denoiser}, not a UNet of SD 1.x/2.x/XL or a transformer of SD3/Flux"
        )
    xl = (
        "XL" in name
        or "text_encoder_2" in model_index
        or denoiser_config.get("addition_embed_type") == "text_time"
    )
    if xl:
        if "text_encoder" in model_index and not (model_index["text_encoder"] or [None])[0]:
            raise ValueError("it is an SDXL refiner (no first text encoder); train the SDXL base model")
        return FAMILIES["sdxl"]
    return FAMILIES["sd"]


def family_of_folder(path: str | Path) -> StableDiffusion:
    """`family_of` for a local pipeline folder; ValueError if it is not one."""
    path = Path(path)
    index = (
        json.loads((path / "model_index.json").read_text()) if (path / "model_index.json").is_file() else {}
    )
    for denoiser in ("unet", "transformer"):
        if (path / denoiser / "config.json").is_file():
            return family_of(index, json.loads((path / denoiser / "config.json").read_text()))
    raise ValueError("it is not a diffusers pipeline folder (no unet/config.json or transformer/config.json)")
