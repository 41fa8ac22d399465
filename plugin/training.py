"""Reusable pieces of the DreamBooth training script (`train_scripts/train_dreambooth_liera.py`).

Two ideas make a run resumable exactly: every random draw of a training step (its noise, its
timesteps, its VAE sample, the crop of each image) comes from a generator seeded by *where* it is
in the run (seed, epoch, batch, process), never from a global RNG whose state depends on what
happened before; and a checkpoint stores the adapter as a `liera/1`/`liera/2` file, copied back *into* the
existing adapter parameters so the optimizer keeps pointing at them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from PIL.ImageOps import exif_transpose
from torch import nn
from torch.utils.data import Dataset, Sampler

from .inject import adapted_layers, adapter_state_dict, list_adapters

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# What each random stream is for: the first key of every seed, so no two streams ever coincide and
# the held-out evaluation never sees noise that training drew.
NOISE_KEY, SHUFFLE_KEY, CROP_KEY, HELDOUT_KEY = 1, 2, 3, 4


def list_images(directory: str | os.PathLike) -> list[Path]:
    """The image files of a folder (by extension, sorted), ignoring prompts.json, READMEs, ..."""
    return sorted(
        path
        for path in Path(directory).iterdir()
        if path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS
    )


def load_rgb(path: str | os.PathLike) -> Image.Image:
    with Image.open(path) as image:
        return exif_transpose(image).convert("RGB")


def seeded_generator(*keys: int) -> torch.Generator:
    """A CPU generator that depends only on `keys` (non-negative ints: purpose, seed, step, ...)."""
    seed = np.random.SeedSequence([int(k) for k in keys]).generate_state(2)
    return torch.Generator().manual_seed(int(seed[0]) << 32 | int(seed[1]))


def to_model_input(
    image: Image.Image, resolution: int, center_crop: bool, rng: np.random.Generator | None = None
) -> torch.Tensor:
    """Resize the short side to `resolution`, crop a square (centre or random), scale to [-1, 1].

    diffusers' DreamBooth transforms (Resize, CenterCrop/RandomCrop, ToTensor, Normalize), without
    torchvision, and with the random crop drawn from `rng` so it is reproducible.
    """
    return crop_to_model_input(image, resolution, center_crop, rng)[0]


def crop_to_model_input(
    image: Image.Image,
    resolution: int,
    center_crop: bool,
    rng: np.random.Generator | None = None,
    flip: bool = False,
    zoom: float = 1.0,
) -> tuple[torch.Tensor, tuple[int, int]]:
    """`to_model_input`, and the crop's top-left corner (top, left) in the resized image: SDXL
    conditions on it (its `crops_coords_top_left`). `flip` mirrors the image left to right before
    the crop, as diffusers' SDXL scripts do (so the corner is the flipped image's). `zoom` >= 1
    resizes the short side to `zoom * resolution` first, so the crop shows a part of the image."""
    if zoom < 1:
        raise ValueError(f"zoom must be at least 1, got {zoom}")
    width, height = image.size
    scale = zoom * resolution / min(width, height)
    size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    image = image.resize(size, Image.Resampling.BILINEAR)
    if flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    spare_x, spare_y = size[0] - resolution, size[1] - resolution
    if center_crop or rng is None:
        left, top = spare_x // 2, spare_y // 2
    else:
        left, top = int(rng.integers(spare_x + 1)), int(rng.integers(spare_y + 1))
    image = image.crop((left, top, left + resolution, top + resolution))
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous(), (top, left)


def tokenize_prompt(tokenizer, prompt: str, max_length: int | None = None) -> torch.Tensor:
    max_length = max_length or tokenizer.model_max_length
    return tokenizer(
        prompt, truncation=True, padding="max_length", max_length=max_length, return_tensors="pt"
    ).input_ids


class DreamBoothDataset(Dataset):
    """Instance images with their prompt and, for prior preservation, class images with theirs.

    Like diffusers' dataset, its length is the larger of the two image counts and item `i` pairs
    instance image `i % n_instance` with class image `i % n_class`. Images are decoded once; random
    crops depend on (seed, epoch, index) only, so call `set_epoch` (accelerate's dataloader does).
    `instance_prompts` (one per instance image) replaces `instance_prompt` with per-image captions,
    and `class_prompts` (one per class image) replaces `class_prompt` likewise.
    `tokenize` (a prompt to one row of ids) replaces `tokenizer` for models with several tokenizers.
    Each example also says its image's original (height, width) and crop (top, left): SDXL's time ids.
    `random_flip` mirrors each image left to right with probability 1/2 (drawn like the crops): more
    views of a subject that looks the same mirrored; one that does not (text, a two-tone object) would
    be taught both ways round. `random_zoom` (>= 1) enlarges each image by a factor drawn uniformly
    from [1, random_zoom] before the crop: other sizes and places of the subject, never mirrored.
    """

    def __init__(
        self,
        instance_images: Sequence[str | os.PathLike],
        instance_prompt: str,
        tokenizer,
        resolution: int,
        center_crop: bool = False,
        class_images: Sequence[str | os.PathLike] | None = None,
        class_prompt: str | None = None,
        seed: int = 0,
        tokenizer_max_length: int | None = None,
        instance_prompts: Sequence[str] | None = None,
        tokenize: Callable[[str], torch.Tensor] | None = None,
        class_prompts: Sequence[str] | None = None,
        random_flip: bool = False,
        random_zoom: float = 1.0,
    ):
        if random_zoom < 1:
            raise ValueError(f"random_zoom must be at least 1 (no zoom), got {random_zoom}")
        if tokenize is None:

            def tokenize(prompt: str) -> torch.Tensor:
                return tokenize_prompt(tokenizer, prompt, tokenizer_max_length)

        self.instance_images = [load_rgb(path) for path in instance_images]
        self.class_images = [load_rgb(path) for path in class_images or []]
        self.instance_prompt_ids, self.prompt_rows = _prompt_rows(
            "instance", instance_prompts, instance_prompt, len(self.instance_images), tokenize
        )
        self.class_prompt_ids, self.class_prompt_rows = (
            _prompt_rows("class", class_prompts, class_prompt, len(self.class_images), tokenize)
            if self.class_images
            else (None, None)
        )
        self.resolution, self.center_crop, self.seed, self.epoch = resolution, center_crop, seed, 0
        self.random_flip, self.random_zoom = random_flip, random_zoom

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return max(len(self.instance_images), len(self.class_images))

    def _crop(self, image: Image.Image, rng: np.random.Generator) -> tuple[torch.Tensor, tuple[int, int]]:
        # Each drawn only when asked for: without them the crops are those of a dataset that can't.
        flip = self.random_flip and bool(rng.integers(2))
        zoom = float(rng.uniform(1.0, self.random_zoom)) if self.random_zoom > 1 else 1.0
        return crop_to_model_input(image, self.resolution, self.center_crop, rng, flip, zoom)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([CROP_KEY, self.seed, self.epoch, index])
        i = index % len(self.instance_images)
        image = self.instance_images[i]
        pixels, crop = self._crop(image, rng)
        example = {
            "instance_images": pixels,
            "instance_prompt_ids": self.instance_prompt_ids[self.prompt_rows[i]],
            "instance_original_size": (image.height, image.width),
            "instance_crop_top_left": crop,
        }
        if self.class_images:
            image = self.class_images[index % len(self.class_images)]
            pixels, crop = self._crop(image, rng)
            example["class_images"] = pixels
            example["class_prompt_ids"] = self.class_prompt_ids[
                self.class_prompt_rows[index % len(self.class_images)]
            ]
            example["class_original_size"] = (image.height, image.width)
            example["class_crop_top_left"] = crop
        return example


def _prompt_rows(
    kind: str, prompts: Sequence[str] | None, prompt: str, count: int, tokenize: Callable[[str], torch.Tensor]
) -> tuple[torch.Tensor, list[int]]:
    """Each distinct prompt tokenised once, and the row of each image's: `prompts` (one per image)
    if given, else `prompt` for every image."""
    if prompts is not None and len(prompts) != count:
        raise ValueError(f"{len(prompts)} {kind} prompts for {count} {kind} images")
    prompts = list(prompts if prompts is not None else [prompt] * count)
    distinct = list(dict.fromkeys(prompts))
    return torch.cat([tokenize(p) for p in distinct]), [distinct.index(p) for p in prompts]


def collate_fn(examples: list[dict], with_prior_preservation: bool = False) -> dict[str, torch.Tensor]:
    """Stack a batch; with prior preservation the class examples follow the instance ones, so one
    forward pass serves both and the loss splits the batch in halves (as in diffusers)."""
    kinds = ["instance", "class"] if with_prior_preservation else ["instance"]
    pixels = [example[f"{kind}_images"] for kind in kinds for example in examples]
    input_ids = [example[f"{kind}_prompt_ids"] for kind in kinds for example in examples]
    batch = {"pixel_values": torch.stack(pixels).contiguous().float(), "input_ids": torch.stack(input_ids)}
    if all(
        f"{kind}_original_size" in example for kind in kinds for example in examples
    ):  # (DreamBoothDataset's)
        sizes = [example[f"{kind}_original_size"] for kind in kinds for example in examples]
        crops = [example[f"{kind}_crop_top_left"] for kind in kinds for example in examples]
        batch.update(original_sizes=torch.tensor(sizes), crop_top_lefts=torch.tensor(crops))
    return batch


class EpochSampler(Sampler[int]):
    """A shuffle that is a function of (seed, epoch) only: a resumed run sees the same order."""

    def __init__(self, length: int, seed: int = 0):
        self.length, self.seed, self.epoch = length, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[int]:
        generator = seeded_generator(SHUFFLE_KEY, self.seed, self.epoch)
        return iter(torch.randperm(self.length, generator=generator).tolist())


def copy_adapter_tensors(
    tensors: Mapping[str, torch.Tensor], models: Mapping[str, nn.Module], adapter_name: str
) -> None:
    """Put an adapter file's tensors into adapters that already exist, in place (resuming).

    Unlike `load_adapter`, this keeps the parameter objects, so an optimizer (and DDP) built on
    them stays valid. The file must hold exactly the adapter's tensors.
    """
    live = {}
    for component, model in models.items():
        if adapter_name in list_adapters(model):
            live.update(adapter_state_dict(model, adapter_name, prefix=f"{component}.", trained_only=True))
    missing, unexpected = sorted(set(live) - set(tensors)), sorted(set(tensors) - set(live))
    if missing or unexpected:
        raise ValueError(
            f"checkpoint does not match the adapter being trained: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]} (was it made with other --adapter/--rank/--targets?)"
        )
    with torch.no_grad():
        for key, target in live.items():
            if tensors[key].shape != target.shape:
                raise ValueError(
                    f"checkpoint key {key} has shape {tuple(tensors[key].shape)}, expected {tuple(target.shape)}"
                )
            target.copy_(tensors[key].to(target.dtype))


def prediction_target(noise_scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor):
    """What the UNet learns to predict: the noise (SD 1.x, SD 2 base) or the velocity (SD 2 768-v)."""
    kind = noise_scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unknown prediction type {kind!r}")


@torch.no_grad()
def denoising_loss(
    unet: nn.Module,
    vae: nn.Module,
    text_encoder: nn.Module,
    tokenizer,
    noise_scheduler,
    images: Sequence[Image.Image],
    prompt: str | Sequence[str],
    resolution: int,
    num_timesteps: int = 10,
    noises_per_timestep: int = 2,
    seed: int = 0,
    batch_size: int = 8,
) -> float:
    """Mean squared error of the UNet's prediction on `images` (centre-cropped) captioned `prompt`
    (one prompt for all, or one per image), at `num_timesteps` evenly spaced timesteps with fixed
    noise that training never draws.

    The same numbers (images, timesteps, noise) give the base model's and the adapted model's loss,
    so "before" and "after" differ only by the adapter: a lower "after" means it learned the subject.
    """
    device = next(unet.parameters()).device
    dtype = next(unet.parameters()).dtype
    total_steps = noise_scheduler.config.num_train_timesteps
    timesteps = torch.linspace(0, total_steps - 1, num_timesteps + 2)[1:-1].round().long()
    pixels = torch.stack([to_model_input(image, resolution, center_crop=True) for image in images])
    generator = seeded_generator(HELDOUT_KEY, seed)
    latents = vae.encode(pixels.to(device, vae.dtype)).latent_dist.sample(generator=generator)
    latents = (latents * vae.config.scaling_factor).float().cpu()
    prompts = [prompt] * len(images) if isinstance(prompt, str) else list(prompt)
    if len(prompts) != len(images):
        raise ValueError(f"{len(prompts)} prompts for {len(images)} images")
    # Each distinct prompt is encoded once, alone (so one prompt gives exactly the numbers it always did).
    distinct = list(dict.fromkeys(prompts))
    encoded = [text_encoder(tokenize_prompt(tokenizer, p).to(device))[0].to(dtype) for p in distinct]
    hidden = torch.cat([encoded[distinct.index(p)] for p in prompts])  # one row per image

    # Every (image, timestep, noise draw) combination, evaluated in batches.
    cases = [
        (i, t) for t in timesteps.tolist() for i in range(len(images)) for _ in range(noises_per_timestep)
    ]
    noise = torch.randn((len(cases), *latents.shape[1:]), generator=generator)
    errors = []
    for start in range(0, len(cases), batch_size):
        chunk = cases[start : start + batch_size]
        index = torch.tensor([i for i, _ in chunk])
        t = torch.tensor([t for _, t in chunk])
        clean, eps = latents[index], noise[start : start + len(chunk)]
        noisy = noise_scheduler.add_noise(clean, eps, t)
        target = prediction_target(noise_scheduler, clean, eps, t)
        pred = unet(noisy.to(device, dtype), t.to(device), hidden[index.to(device)], return_dict=False)[0]
        errors.append(F.mse_loss(pred.float().cpu(), target, reduction="none").mean(dim=(1, 2, 3)))
    return torch.cat(errors).mean().item()


@torch.no_grad()
def largest_weight_change(models: Mapping[str, nn.Module]) -> tuple[str | None, float]:
    """The adapted layer whose weight the active adapters change most, `||W' - W|| / ||W||`, and that
    ratio. A lie adapter can grow huge on a layer that a normalisation follows without the loss
    noticing (the norm divides it away); the number shows it before an export or a merge does."""
    worst, largest = None, 0.0
    for component, model in models.items():
        for path, layer in adapted_layers(model).items():
            weight = layer.original_weight().float()
            change = layer.adapted_weight(layer.unfused_terms_active()).float() - weight
            ratio = float(torch.linalg.norm(change) / torch.linalg.norm(weight).clamp_min(1e-30))
            if ratio > largest:
                worst, largest = f"{component}.{path}", ratio
    return worst, largest
