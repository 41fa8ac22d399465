#!/usr/bin/env python
"""How well an adapter fits its DreamBooth subject's images: the denoising loss, base vs adapted.

    python train_scripts/evaluate_subject_fit.py outputs/dreambooth-liera
    python train_scripts/evaluate_subject_fit.py my-run/adapter.safetensors \\
        --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --instance_data_dir dog --instance_prompt "a photo of sks dog" --resolution 512

The loss is the UNet's prediction error on the subject images at fixed timesteps with fixed noise
that training never draws (`plugin.training.denoising_loss`). On the images the adapter trained on
this measures fit, not generalisation: it is metrics.json's `train_images_loss_before/after`; point
--instance_data_dir at images training never saw for a held-out measure (the training script's
`heldout_loss_*`). Prints one JSON line: {"before": ..., "after": ..., ...}.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("adapter", help="An adapter file, or a training run's output folder.")
    parser.add_argument(
        "--pretrained_model_name_or_path",
        default=None,
        help="Default: the base model named in the adapter file.",
    )
    parser.add_argument("--instance_data_dir", default=str(REPO_ROOT / "assets" / "subject"))
    parser.add_argument("--instance_prompt", default=None, help="Default: the folder's prompts.json.")
    parser.add_argument("--resolution", type=int, default=None, help="Default: the base model's own.")
    parser.add_argument("--num_timesteps", type=int, default=10)
    parser.add_argument("--noises_per_timestep", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(args: argparse.Namespace) -> dict:
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    import plugin
    from plugin.training import denoising_loss, list_images, load_rgb

    tensors, metadata = plugin.read_adapter_file(args.adapter)
    base = args.pretrained_model_name_or_path or metadata.get("base_model")
    if base is None:
        raise SystemExit("the adapter file names no base model; pass --pretrained_model_name_or_path")
    if not Path(base).exists() and (REPO_ROOT / base).exists():
        base = str(REPO_ROOT / base)  # the shipped toy base, named relative to the repository
    prompt = args.instance_prompt
    if prompt is None:
        prompts_file = Path(args.instance_data_dir, "prompts.json")
        if not prompts_file.is_file():
            raise SystemExit(f"--instance_prompt is required ({args.instance_data_dir} has no prompts.json)")
        prompt = json.loads(prompts_file.read_text())["instance_prompt"]

    pipeline = StableDiffusionPipeline.from_pretrained(base)
    pipeline.set_progress_bar_config(disable=True)
    plugin.load_adapter((tensors, metadata), {"unet": pipeline.unet, "text_encoder": pipeline.text_encoder})
    resolution = args.resolution or pipeline.unet.config.sample_size * pipeline.vae_scale_factor
    images = [load_rgb(path) for path in list_images(args.instance_data_dir)]
    result = {"base_model": base, "adapter": str(args.adapter), "prompt": prompt, "images": len(images)}
    for label, enabled in [("before", False), ("after", True)]:
        plugin.enable_adapters(pipeline.unet, enabled)
        plugin.enable_adapters(pipeline.text_encoder, enabled)
        result[label] = denoising_loss(
            pipeline.unet,
            pipeline.vae,
            pipeline.text_encoder,
            pipeline.tokenizer,
            DDPMScheduler.from_config(pipeline.scheduler.config),  # training's noise schedule
            images,
            prompt,
            resolution,
            num_timesteps=args.num_timesteps,
            noises_per_timestep=args.noises_per_timestep,
            seed=args.seed,
        )
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(parse_args())
