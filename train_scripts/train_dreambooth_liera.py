#!/usr/bin/env python
"""DreamBooth with LieRA, FLoRA or LoRA adapters: diffusers' `train_dreambooth_lora.py`, adapted.

It trains SD 1.x/2.x, SDXL, SD3 and Flux (as diffusers' `_sdxl`, `_sd3` and `_flux` scripts do), the
family read from the pipeline; `plugin/families.py` holds what differs between them.

    accelerate launch train_scripts/train_dreambooth_liera.py     # toy base + shipped subject, CPU

    accelerate launch train_scripts/train_dreambooth_liera.py \\
      --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \\
      --instance_data_dir dog --instance_prompt "a photo of sks dog" \\
      --with_prior_preservation --class_data_dir dog-class --class_prompt "a photo of dog" \\
      --resolution 512 --train_batch_size 1 --learning_rate 1e-3 --max_train_steps 500 \\
      --adapter liera --rank 8 --validation_prompt "a photo of sks dog in a bucket"

Arguments keep diffusers' names and meanings; the adapter is chosen with `--adapter` (a preset:
lora, flora, liera, hira, abba, loha, bhra, gralora, diablo, ssb, ssl, ia3, dora, dora-flora) and
`--backend`, `--conv_backend`, `--rank`, `--conv_rank`, `--scale`, `--lie_map`, `--blocks`, `--init`,
`--vectors`, `--targets`; training procedures with `--init pissa` (PiSSA/HOSVD start), `--relora_steps` (ReLoRA
restarts) and `--mpc` (matrix pattern constraints). In `--output_dir` the run leaves
`adapter.safetensors` (format `liera/1`, or `liera/2` for the newer presets; see FORMAT.md),
`checkpoint-<step>/` folders (resumable with `--resume_from_checkpoint latest`), `validation/*.png`
grids, `class_images.png` (prior preservation's class images, to look at), `metrics.json` and a
`README.md` card.

After training it measures the denoising loss, base vs adapted, on the training images (fit), on
held-out images of the subject that training never saw (generalisation: `--heldout_data_dir`, default
`<instance_data_dir>/heldout`, and `--num_heldout_images`) and on class images with the class prompt
(prior drift, `--num_drift_images`). `--keep_best_heldout` saves the adapter of the step with the
lowest held-out loss.

From Python (benchmarks): `main(parse_args([...]))` runs exactly what the command line runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import importlib.util
import json
import logging
import math
import os
import random
import re
import shutil
import time
from pathlib import Path

from PIL import Image, ImageOps

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_BASE = REPO_ROOT / "assets" / "toy-sd"
DEFAULT_SUBJECT = REPO_ROOT / "assets" / "subject"
# Optional, in an instance folder: {"instance_prompt": ..., "class_prompt": ..., "validation_prompts": [...],
# "captions": {"<image file name>": "<its caption>", ...}, "heldout": {"<file in heldout/>": "<caption>", ...}}
PROMPTS_FILE = "prompts.json"
HELDOUT_FOLDER = "heldout"  # in an instance folder: views of the subject that training never sees
DRIFT_FOLDER = "drift_class_images"  # in --output_dir: base-model samples of --class_prompt
CLASS_GRID = "class_images.png"  # in --output_dir: the class images prior preservation trains on, to look at
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")  # as plugin.training.list_images
TARGET_PRESETS = ("attn", "conv", "attn+conv", "cross-kv+conv", "all")  # as plugin.config.TARGET_PRESETS
# Chosen with benchmarks/quality.py on subjects the toy base never saw (README, "Benchmarks"): with
# prior preservation and the text encoder adapted, 800 steps at 1e-3 (lora) put the subject in 3 of 4
# samples on backgrounds training never showed, against 1 in 3 at 400 steps, for class drift +14%.
DEFAULT_MAX_TRAIN_STEPS = 800
# lora, flora and liera were tuned (above); the other presets take the rate of their family until the
# quality benchmark tunes them: lie ones (W ⊙ sD is small next to W) and vector scales like liera,
# additive ones like lora, Tucker-based like flora. One entry per preset of plugin.config.METHODS.
DEFAULT_LEARNING_RATES = {
    "liera": 5e-3,
    "flora": 3e-3,
    "lora": 1e-3,
    "hira": 5e-3,
    "bhra": 5e-3,
    "abba": 5e-3,
    "loha": 1e-3,
    "gralora": 1e-3,
    "diablo": 1e-3,
    "ssb": 5e-3,
    "ssl": 5e-3,
    "ia3": 5e-3,
    "dora": 1e-3,
    "dora-flora": 3e-3,
}
# The prior preservation loss's weight per --adapter (benchmarks/results/quality_prior_weight.md, 4
# subjects x 3 seeds): at 3, lora's and flora's held-out fit improved (x1.01 -> x0.92 and x1.00 -> x0.92 the
# base's) and the subject showed on more unseen backgrounds (0.56 -> 0.67, 0.58 -> 0.69); liera lost its
# subject there (0.44 -> 0.22) and keeps diffusers' 1, as the presets not measured.
DEFAULT_PRIOR_LOSS_WEIGHTS = {"lora": 3.0, "flora": 3.0}
# Adapters on convolutions train at --learning_rate divided by this, unless --conv_learning_rate says
# otherwise (benchmarks/results/quality_conv_rate.md). A Tucker update multiplies five trained tensors
# and grows faster than a two-factor one; under W ⊙ exp(sD) its largest entries then grow exponentially:
# at one rate liera's mid-block convs changed by up to 2e14 times their norm.
DEFAULT_CONV_LEARNING_RATE_DIVISORS = {"liera": 10, "flora": 3}
# Pivotal tuning by default for these --adapter values on SD and SDXL: the identifier learnt as new
# token embeddings (at DEFAULT_TOKEN_LEARNING_RATE) and the UNet adapted on its convolutions and
# cross-attention keys and values only (benchmarks/results/quality_pivotal.md and
# quality_pivotal_methods.md, 4 subjects x 3 seeds: prompt following x0.68/0.70/0.48 -> x0.81/0.83/0.73
# the base's for lora/flora/liera, the subject on 0.67/0.69/0.44 -> 0.79/0.84/0.79 of unseen backgrounds,
# held-out fit x0.915/0.917/0.882 -> x0.911/0.919/0.844, drift +13.3/12.4/10.8 -> +13.9/14.0/9.1%).
# The presets not measured keep the text encoder adapted, on attn+conv.
PIVOTAL_ADAPTERS = ("lora", "flora", "liera")
DEFAULT_TOKEN_LEARNING_RATE = 5e-3
PIVOTAL_TARGETS = "cross-kv+conv"
# (--learning_rate, --conv_learning_rate) of an --adapter with pivotal tuning's defaults, where they are
# not its DEFAULT_LEARNING_RATES (and divisor): cross-attention's keys and values at half the method's
# rate (liera's since at a fifth, below), the convolutions at 5e-4 for all three, 4 subjects x 3 seeds
# each (liera: K/V halved, benchmarks/results/quality_pivotal_rate.md, held-out fit x0.844 -> x0.832,
# drift +9.1 -> +7.7%, prompt following 0.73 -> 0.87; flora: K/V and convs halved,
# quality_pivotal_flora_rate.md, x0.919 -> x0.871, +14.0 -> +12.0%, 0.83 either way; lora: K/V halved,
# quality_pivotal_lora_rate.md, x0.911 -> x0.902, +13.9 -> +13.4%, 0.81 -> 0.89, then convs halved,
# quality_pivotal_lora_conv_rate.md, x0.902 -> x0.850, +13.4 -> +10.8%, 0.89 -> 0.85). liera's K/V since
# at a fifth of its rate, 1e-3, 8 subjects x 3 seeds (quality_liera_kv_rate.md: x0.877 -> x0.871, +6.5 ->
# +4.4%, prompt following 0.93 -> 1.04 and at least 0.94 on every subject; the bare instance prompt 0.71
# -> 0.62, the crosses' shape kept less).
PIVOTAL_LEARNING_RATES = {"lora": (5e-4, 5e-4), "flora": (1.5e-3, 5e-4), "liera": (1e-3, 5e-4)}
# The length and the zoom (--max_train_steps, --random_zoom) of an --adapter with pivotal tuning's defaults,
# where they are not DEFAULT_MAX_TRAIN_STEPS and none: liera at 1200 steps on views enlarged up to 1.1x,
# 8 subjects x 3 seeds (benchmarks/results/quality_random_zoom11_1200steps.md: held-out fit x0.871 -> x0.831,
# drift +4.4 -> +3.4%, the subject on unseen backgrounds 0.84 -> 0.86, its shape kept 0.85 -> 0.88, the
# orange cross's 0.46 -> 0.62 and 0.53 -> 0.71; prompt following 1.04 -> 1.01). The zoom alone fits better
# but draws shapes the base never drew less often; the length alone draws them, at more drift. Its class
# images at half weight since, 8 x 3 (quality_liera_prior05.md: held-out fit x0.831 either way, drift +3.4
# -> +3.1%, unseen backgrounds 0.86 -> 0.89, the crosses' 0.62 / 0.46 -> 0.67 / 0.60; the largest relative
# weight change 1.00 -> 2.46, on mid-block convolutions).
PIVOTAL_TRAINING = {"liera": {"max_train_steps": 1200, "random_zoom": 1.1, "prior_loss_weight": 0.5}}
BACKENDS = ("lowrank", "tucker", "cp", "hadamard", "blockdiag", "blocklowrank", "rowcol")  # as plugin.config
TRACKERS = ("tensorboard", "wandb", "comet_ml")  # --report_to values (each the package it needs)
ADAPTER_NAME = "default"
ADAPTER_FILENAME = "adapter.safetensors"
EMBEDDINGS_FILENAME = "embeddings.safetensors"  # as plugin.pivotal, with --train_text_encoder_ti
# In a checkpoint, beside the adapter file, when the adapter continues a frozen part (PiSSA, ReLoRA):
# the trained and frozen parts apart, which resuming needs (plugin.procedures.training_state).
TRAINING_STATE_FILENAME = "adapter_training_state.safetensors"
RUN_FILE = "run.json"  # in --output_dir and in every checkpoint: the run's identity (RUN_IDENTITY)
# What makes two runs the same training: a checkpoint resumes only a run equal in all of these, and an
# --output_dir holding another run is refused. The others (steps, checkpointing, validation, logging)
# may change between a run and its resumption.
RUN_IDENTITY = (
    "pretrained_model_name_or_path", "revision", "variant", "instance_data_dir", "instance_prompt",
    "instance_captions", "train_images", "class_prompt", "class_captions", "with_prior_preservation",
    "prior_loss_weight", "num_class_images", "train_text_encoder", "train_text_encoder_ti", "token_abstraction",
    "num_new_tokens_per_abstraction", "resolution", "center_crop", "random_flip", "random_zoom",
    "train_batch_size", "gradient_accumulation_steps", "learning_rate", "conv_learning_rate", "text_encoder_lr", "scale_lr", "lr_scheduler",
    "lr_warmup_steps", "lr_num_cycles", "lr_power", "adam_beta1", "adam_beta2", "adam_weight_decay",
    "adam_epsilon", "max_grad_norm", "text_encoder_preservation", "noise_offset", "snr_gamma", "seed", "adapter", "backend", "conv_backend", "rank",
    "conv_rank", "scale", "alpha", "lie_map", "blocks", "init", "vectors", "targets", "mixed_precision",
    "relora_steps", "relora_warmup_steps", "mpc", "mpc_weight",
)  # fmt: skip
PIVOTAL_KEY = "pivotal."  # the identifier's rows among --keep_best_heldout's kept tensors
LOSS_READ_STEPS = 10  # steps whose losses stay on the device before one read (StepLosses)
WARM_UP_STEPS = 10  # steps (at most half the run) before metrics.json's steady_steps_per_s counts
RELORA_KEY = 5  # the first key of a restart's seed (plugin.training's keys are 1-4)
DRIFT_FIRST_SAMPLE = 2 * 10**9  # drift images' seeds start here, far from the class images' (10**9)
# Flow matching's settings (SD3, Flux) are part of a run's identity too.
FLOW_IDENTITY = (
    "weighting_scheme",
    "logit_mean",
    "logit_std",
    "mode_scale",
    "guidance_scale",
    "max_sequence_length",
)
# diffusers' `compute_density_for_timestep_sampling` and `compute_loss_weighting_for_sd3` (SD3, Flux).
WEIGHTING_SCHEMES = ("none", "logit_normal", "mode", "sigma_sqrt", "cosmap")


# ---------------------------------------------------------------------------------------------
# Arguments. They are parsed and checked before torch and diffusers are imported (which takes
# seconds on a small machine), so a mistake stops at once with a message naming the argument.


def _pivotal_defaults(setting: str) -> str:
    """PIVOTAL_TRAINING's values of one setting, for a help text: "liera 1200"."""
    return ", ".join(f"{method} {training[setting]:g}" for method, training in PIVOTAL_TRAINING.items())


def parse_args(input_args: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="DreamBooth fine-tuning of Stable Diffusion 1.x/2.x, SDXL, SD3 or Flux with LieRA, FLoRA or "
        "LoRA adapters.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    model = parser.add_argument_group("base model and data (diffusers' names)")
    model.add_argument(
        "--pretrained_model_name_or_path",
        type=str,
        default=str(DEFAULT_BASE),
        help="Path to a diffusers Stable Diffusion 1.x/2.x, SDXL, SD3 or Flux folder, or a model id from "
        "huggingface.co/models (the model family is read from its model_index.json and denoiser config).",
    )
    model.add_argument("--revision", type=str, default=None, help="Revision of the pretrained model.")
    model.add_argument("--variant", type=str, default=None, help="Variant of the model files, e.g. fp16.")
    model.add_argument(
        "--cache_dir", type=str, default=None, help="Where downloaded models are cached (huggingface_hub's)."
    )
    model.add_argument(
        "--instance_data_dir",
        type=str,
        default=None,
        help=f"A folder of instance (subject) images. Default: {DEFAULT_SUBJECT.relative_to(REPO_ROOT)}.",
    )
    model.add_argument(
        "--instance_prompt",
        type=str,
        default=None,
        help=f"The prompt with the identifier of the instance. Default: read from {PROMPTS_FILE} in the instance folder.",
    )
    model.add_argument(
        "--instance_captions",
        action="store_true",
        help="Train each instance image with its own caption instead of --instance_prompt: the text of "
        f'<image stem>.txt beside it, else its entry in {PROMPTS_FILE}\'s "captions" (file name -> caption).',
    )
    model.add_argument(
        "--heldout_data_dir",
        type=str,
        default=None,
        help="Images of the subject that training never sees, to measure generalisation (the held-out "
        f"denoising loss). Default: <instance_data_dir>/{HELDOUT_FOLDER} if it holds images.",
    )
    model.add_argument(
        "--num_heldout_images",
        type=int,
        default=0,
        help="Also hold this many of the instance images out of training (a --seed-determined choice), "
        "for the held-out measure.",
    )
    model.add_argument(
        "--class_data_dir",
        type=str,
        default=None,
        help="A folder of class images; missing ones are generated there. Default: <output_dir>/class_images.",
    )
    model.add_argument(
        "--class_prompt",
        type=str,
        default=None,
        help=f"The prompt for images of the subject's class. Default: read from {PROMPTS_FILE} in the instance folder.",
    )
    model.add_argument(
        "--class_captions",
        action="store_true",
        help="Train each class image with its own caption instead of --class_prompt (kohya's captioned "
        "regularisation images): the text of <image stem>.txt beside it. Missing class images are "
        f'generated from the instance folder\'s {PROMPTS_FILE} "class_prompts" (varied prompts of the '
        "class, one image each, in turn), each saved with its caption. On generated class images it hurt "
        "prompt following in benchmarks/quality.py (README, Prompt following).",
    )
    model.add_argument(
        "--with_prior_preservation",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Add the prior preservation loss on class images of --class_prompt (on by default: on unseen "
        "subjects it cut the class drift from +39%% to +10%% in benchmarks/quality.py's sweep).",
    )
    model.add_argument(
        "--prior_loss_weight",
        type=float,
        default=None,
        help="Weight of the prior preservation loss. Default: per --adapter, "
        + ", ".join(f"{method} {weight:g}" for method, weight in DEFAULT_PRIOR_LOSS_WEIGHTS.items())
        + ", 1 for the others; "
        + _pivotal_defaults("prior_loss_weight")
        + " with pivotal tuning's defaults (measured on unseen subjects: lora and flora generalise better at "
        "3, liera at 3 loses the subject).",
    )
    model.add_argument(
        "--num_class_images",
        type=int,
        default=100,
        help="Minimal number of class images for prior preservation; missing ones are generated with the base "
        "pipeline and --class_prompt before training.",
    )
    model.add_argument(
        "--sample_batch_size", type=int, default=4, help="Batch size for generating class images."
    )
    model.add_argument(
        "--prior_generation_precision",
        type=str,
        default=None,
        choices=["no", "fp32", "fp16", "bf16"],
        help="Precision for generating class images (default fp16 on a GPU, else fp32).",
    )
    model.add_argument(
        "--prior_generation_steps",
        type=int,
        default=25,
        help="Sampling steps (DPM-Solver++) per generated class image: half the pipeline's usual 50, as "
        "fast and as good for class images.",
    )
    model.add_argument(
        "--resolution",
        type=int,
        default=None,
        help="Training resolution; images are resized (and cropped) to it. Default: the base model's own.",
    )
    model.add_argument(
        "--center_crop", action="store_true", help="Crop the centre instead of a random square."
    )
    model.add_argument(
        "--random_flip",
        action="store_true",
        help="Mirror each training image left to right half of the time (diffusers' and kohya's flip "
        "augmentation): for subjects that look the same mirrored, not for text or one-sided markings.",
    )
    model.add_argument(
        "--random_zoom",
        type=float,
        default=None,
        metavar="MAX",
        help="Enlarge each training image by a random factor in [1, MAX] before the random crop: the "
        "subject at other sizes and places, kept the right way round (1.25 shows 64%% to 100%% of it). "
        "Default: 1 (no zoom); " + _pivotal_defaults("random_zoom") + " with pivotal tuning's defaults.",
    )
    model.add_argument(
        "--tokenizer_max_length", type=int, default=None, help="Tokenizer length (default: the tokenizer's)."
    )

    train = parser.add_argument_group("training (diffusers' names)")
    train.add_argument(
        "--output_dir",
        type=str,
        default=None,
        help="Where the run writes everything. Default: outputs/dreambooth-<adapter>.",
    )
    train.add_argument("--seed", type=int, default=0, help="Seed of every random draw of the run.")
    train.add_argument(
        "--train_text_encoder",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Also adapt the text encoder's attention projections (default: on, unless --train_text_encoder_ti: "
        "a new identifier such as 'sks' has an embedding the base never trained, and with prior preservation "
        "the UNet alone cannot tell the subject from its class; see benchmarks/quality.py's sweep).",
    )
    train.add_argument(
        "--train_text_encoder_ti",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Pivotal tuning (diffusers' advanced scripts): learn the identifier (--token_abstraction) as "
        f"--num_new_tokens_per_abstraction new token embeddings, <s0><s1>..., saved to {EMBEDDINGS_FILENAME} "
        "(textual-inversion format), and leave the text encoders as they are, so prompts without the "
        "identifier keep their meaning. Prompts then use the tokens in place of the identifier. Default: on "
        f"for {', '.join(PIVOTAL_ADAPTERS)} on SD 1.x/2.x and SDXL (benchmarks/results/quality_pivotal.md) "
        "unless --train_text_encoder is given, off otherwise.",
    )
    train.add_argument(
        "--token_abstraction",
        type=str,
        default="sks",
        help="With --train_text_encoder_ti: the identifier word in the prompts that the new tokens replace.",
    )
    train.add_argument(
        "--num_new_tokens_per_abstraction",
        type=int,
        default=2,
        help="With --train_text_encoder_ti: how many new tokens stand for the identifier.",
    )
    train.add_argument("--train_batch_size", type=int, default=4, help="Batch size per device.")
    train.add_argument(
        "--num_train_epochs", type=int, default=None, help="Epochs, if --max_train_steps is unset."
    )
    train.add_argument(
        "--max_train_steps",
        type=int,
        default=None,
        help=f"Optimizer steps; overrides --num_train_epochs. Default: {DEFAULT_MAX_TRAIN_STEPS} unless "
        "--num_train_epochs is given; "
        + _pivotal_defaults("max_train_steps")
        + " with pivotal tuning's defaults.",
    )
    train.add_argument("--gradient_accumulation_steps", type=int, default=1)
    train.add_argument(
        "--gradient_checkpointing", action="store_true", help="Recompute activations in backward."
    )
    train.add_argument(
        "--learning_rate",
        type=float,
        default=None,
        help="Learning rate (after warm-up). Default: per --adapter, "
        + ", ".join(f"{method} {lr:g}" for method, lr in DEFAULT_LEARNING_RATES.items())
        + " (a lie adapter changes W by W*sD, so it needs a larger step than W + sD; liera diverged at 2e-2; "
        "only lora, flora and liera were tuned); with pivotal tuning's defaults "
        + ", ".join(f"{method} {lr:g}" for method, (lr, _) in PIVOTAL_LEARNING_RATES.items())
        + ".",
    )
    train.add_argument(
        "--conv_learning_rate",
        type=float,
        default=None,
        help="Learning rate of the adapters on convolutions. Default: --learning_rate divided by "
        + ", ".join(f"{n} ({method})" for method, n in DEFAULT_CONV_LEARNING_RATE_DIVISORS.items())
        + ", 1 for the other presets (a Tucker update multiplies five trained tensors, so it grows faster "
        "than a two-factor one at the same rate); with pivotal tuning's defaults and no --learning_rate "
        + ", ".join(f"{method} {conv:g}" for method, (_, conv) in PIVOTAL_LEARNING_RATES.items())
        + ".",
    )
    train.add_argument(
        "--text_encoder_lr",
        type=float,
        default=None,
        help="Learning rate of the text encoders (with --train_text_encoder), as diffusers' SDXL script "
        "has it, or of the identifier's token embeddings (with --train_text_encoder_ti). Default: "
        f"{DEFAULT_TOKEN_LEARNING_RATE:g} for the tokens, --learning_rate for the text encoders.",
    )
    train.add_argument(
        "--text_encoder_preservation",
        type=float,
        default=0.0,
        help="Weight of a loss that keeps the adapted text encoders' output for prompts without the "
        f'identifier (the empty prompt, the class prompt and the instance {PROMPTS_FILE}\'s "class_prompts") '
        "as the base's, so that the text encoder's adapter changes what the identifier's prompts mean, "
        "not every prompt (with --train_text_encoder; 0: off).",
    )
    train.add_argument(
        "--scale_lr",
        action="store_true",
        help="Multiply the learning rate by the number of processes, accumulation steps and batch size.",
    )
    train.add_argument(
        "--lr_scheduler",
        type=str,
        default="constant",
        choices=[
            "linear",
            "cosine",
            "cosine_with_restarts",
            "polynomial",
            "constant",
            "constant_with_warmup",
        ],
    )
    train.add_argument("--lr_warmup_steps", type=int, default=0, help="Warm-up steps of the lr scheduler.")
    train.add_argument("--lr_num_cycles", type=int, default=1, help="Hard restarts of cosine_with_restarts.")
    train.add_argument("--lr_power", type=float, default=1.0, help="Power of the polynomial scheduler.")
    train.add_argument("--adam_beta1", type=float, default=0.9)
    train.add_argument("--adam_beta2", type=float, default=0.999)
    train.add_argument("--adam_weight_decay", type=float, default=1e-2)
    train.add_argument("--adam_epsilon", type=float, default=1e-8)
    train.add_argument("--max_grad_norm", type=float, default=1.0, help="Gradient clipping norm.")
    train.add_argument(
        "--snr_gamma", type=float, default=None, help="Min-SNR weighting gamma (5.0 is usual)."
    )
    train.add_argument("--noise_offset", type=float, default=0.0, help="Scale of the noise offset.")
    flow = parser.add_argument_group("flow matching (SD3, Flux; diffusers' names)")
    flow.add_argument(
        "--weighting_scheme",
        type=str,
        default=None,
        choices=WEIGHTING_SCHEMES,
        help="Timestep density and loss weighting. Default: logit_normal for SD3, none for Flux (as diffusers).",
    )
    flow.add_argument("--logit_mean", type=float, default=0.0, help="Mean of the logit_normal scheme.")
    flow.add_argument(
        "--logit_std", type=float, default=1.0, help="Standard deviation of the logit_normal scheme."
    )
    flow.add_argument("--mode_scale", type=float, default=1.29, help="Scale of the mode scheme.")
    flow.add_argument(
        "--guidance_scale",
        type=float,
        default=None,
        help="Flux: the guidance embedding's value during training (guidance-distilled models). Default 3.5.",
    )
    flow.add_argument(
        "--max_sequence_length",
        type=int,
        default=None,
        help="T5 prompt length (SD3, Flux). Default: 77 for SD3, 512 for Flux (capped by the tokenizer's).",
    )
    train.add_argument(
        "--cache_latents",
        action="store_true",
        help="Encode each image crop with the VAE once and sample its posterior every step after (the same "
        "draws as without). Random crops of images larger than --resolution are new crops: add --center_crop.",
    )
    train.add_argument("--dataloader_num_workers", type=int, default=0)
    train.add_argument(
        "--mixed_precision",
        type=str,
        default=None,
        choices=["no", "fp16", "bf16"],
        help="Overrides accelerate's setting. Adapters always train in float32.",
    )
    train.add_argument("--allow_tf32", action="store_true", help="Allow TF32 matmuls on Ampere GPUs.")
    train.add_argument(
        "--use_8bit_adam", action="store_true", help="bitsandbytes' 8-bit AdamW (needs bitsandbytes)."
    )
    train.add_argument(
        "--pre_compute_text_embeddings",
        action="store_true",
        help="Encode the prompts once before training instead of every step (the text encoder is not "
        "trained: needs --no-train_text_encoder).",
    )
    train.add_argument(
        "--push_to_hub",
        action="store_true",
        help="After training, upload --output_dir (adapter, model card, validation images; no checkpoints) "
        "to the Hugging Face Hub as --hub_model_id. Offline it only says how to upload it later.",
    )
    train.add_argument("--hub_model_id", type=str, default=None, help="Default: --output_dir's name.")
    train.add_argument("--hub_token", type=str, default=None, help="Default: huggingface_hub's login.")
    train.add_argument(
        "--enable_xformers_memory_efficient_attention", action="store_true", help="Use xformers attention."
    )
    train.add_argument(
        "--checkpointing_steps", type=int, default=250, help="Save a resumable checkpoint every X steps."
    )
    train.add_argument(
        "--checkpoints_total_limit", type=int, default=None, help="Max number of checkpoints kept."
    )
    train.add_argument(
        "--resume_from_checkpoint",
        type=str,
        default=None,
        help='A checkpoint folder (or its name in --output_dir), or "latest". It must come from a run '
        f"with the same configuration ({RUN_FILE} in the checkpoint).",
    )
    train.add_argument(
        "--overwrite_output_dir",
        action="store_true",
        help="Start a new run in an --output_dir that holds an earlier one (its checkpoints are deleted). "
        "Without it such a folder is refused, unless resuming.",
    )
    train.add_argument(
        "--report_to",
        type=str,
        default=None,
        help='Trackers: "tensorboard", "wandb", "comet_ml" or "all". Default: none (metrics.json is always written).',
    )
    train.add_argument("--logging_dir", type=str, default="logs", help="Tracker folder inside --output_dir.")
    train.add_argument("--local_rank", type=int, default=-1, help="Set by launchers; ignored.")

    validation = parser.add_argument_group("validation")
    validation.add_argument(
        "--validation_prompt",
        type=str,
        default=None,
        help=f"Prompt of the validation images. Default: {PROMPTS_FILE}'s validation_prompts (one grid row "
        "each), else --instance_prompt.",
    )
    validation.add_argument(
        "--num_validation_images",
        type=int,
        default=4,
        help="Images per validation grid (0: none). Grids are made before training, every --validation_steps "
        "and at the end, always with the same seeds.",
    )
    validation.add_argument(
        "--validation_steps",
        type=int,
        default=250,
        help="Validate (grids, and the held-out loss if there are held-out images) every X steps.",
    )
    validation.add_argument(
        "--validation_epochs",
        type=int,
        default=None,
        help="Also make a validation grid every X epochs (validation/epoch-<n>.png), as diffusers' script does.",
    )
    validation.add_argument(
        "--keep_best_heldout",
        action="store_true",
        help="Save the adapter of the evaluated step (0, every --validation_steps, the last) with the lowest "
        "held-out loss instead of the last one. Needs held-out images.",
    )
    validation.add_argument(
        "--num_drift_images",
        type=int,
        default=8,
        help="Class images of the prior-drift measure (denoising loss with --class_prompt, base vs adapted): "
        "never trained on: from --class_data_dir (with prior preservation, after the --num_class_images it "
        f"trains on), else base-model samples made before training in <output_dir>/{DRIFT_FOLDER}. 0: no drift "
        "measure.",
    )
    validation.add_argument("--validation_inference_steps", type=int, default=25, help="Sampling steps.")

    adapter = parser.add_argument_group("adapter")
    adapter.add_argument(
        "--adapter",
        type=str,
        default="liera",
        choices=list(DEFAULT_LEARNING_RATES),
        help="A preset (docs/METHODS.md): liera: W * exp(sD) (lowrank for Linear, Tucker for convs); flora: "
        "W + sD, Tucker; lora: W + sD, lowrank; hira, abba, loha, bhra, gralora, diablo, ssb, ssl, ia3, dora, "
        "dora-flora: the methods of those papers.",
    )
    adapter.add_argument(
        "--backend",
        type=str,
        default=None,
        choices=BACKENDS,
        help="Override how D is built for every layer (default: the preset's).",
    )
    adapter.add_argument(
        "--conv_backend",
        type=str,
        default=None,
        choices=BACKENDS,
        help="Override how D is built for convolutions only (LyCORIS' LoCon-Tucker: --adapter lora "
        "--conv_backend tucker).",
    )
    adapter.add_argument(
        "--blocks",
        type=int,
        default=None,
        help="Channel blocks of blockdiag/blocklowrank (default: the preset's).",
    )
    adapter.add_argument(
        "--init",
        type=str,
        default=None,
        help="pissa: start at W's principal part and train on the residual (PiSSA; HOSVD for tucker, "
        "ABBA's start for hadamard); loha or abba: the hadamard backend's own initialisations; zero-core "
        "(FLoRA's) or zero-out (LoRA's start in Tucker form): the tucker backend's.",
    )
    adapter.add_argument(
        "--vectors", type=str, default=None, help="The rowcol backend's vectors: both, row or col."
    )
    adapter.add_argument(
        "--rank", type=int, default=8, help="Rank of the adapters (of Linear layers, and convs)."
    )
    adapter.add_argument(
        "--conv_rank",
        type=int,
        nargs="+",
        default=None,
        help="Rank of conv adapters; several values are per-mode Tucker ranks: out in kh kw. Default: --rank, "
        "and for Tucker convolutions [c, c, 2, 2]: liera's at LoRA's parameter count at --rank, flora's at "
        "c = 2x --rank.",
    )
    adapter.add_argument(
        "--scale", type=float, default=None, help="The adapters' scale s (default: the preset's)."
    )
    adapter.add_argument(
        "--alpha", type=float, default=None, help="LoRA-style alpha: sets scale = alpha / rank."
    )
    adapter.add_argument(
        "--lie_map",
        type=str,
        default=None,
        choices=["exp", "linear"],
        help="A lie adapter's map (default: the preset's).",
    )
    adapter.add_argument(
        "--targets",
        type=str,
        default=None,
        help=f"Layers to adapt: a preset ({', '.join(TARGET_PRESETS)}) or comma-separated module-name regexes. "
        f"Default: {PIVOTAL_TARGETS} with --train_text_encoder_ti (the new tokens reach the UNet through "
        "cross-attention's keys and values), else attn+conv.",
    )
    adapter.add_argument(
        "--save_every_rank",
        action="store_true",
        help="Every process also writes adapter_rank<i>.safetensors (to check that data-parallel ranks agree).",
    )

    procedures = parser.add_argument_group("training procedures (docs/METHODS.md)")
    procedures.add_argument(
        "--relora_steps",
        type=int,
        default=None,
        help="ReLoRA: every this many steps fold the adapter into a frozen part, re-initialise it, reset "
        "its optimizer state and warm the learning rate up again. The file stays one plain adapter.",
    )
    procedures.add_argument(
        "--relora_warmup_steps",
        type=int,
        default=None,
        help="Learning-rate warm-up after each restart (default: a tenth of --relora_steps).",
    )
    procedures.add_argument(
        "--mpc",
        type=str,
        default=None,
        choices=["orthogonal", "diagonal", "nonnegative"],
        help="A matrix pattern constraint (Subspace-Tuning, Si et al. 2024) on the adapter's factors, "
        "added to the loss as a penalty.",
    )
    procedures.add_argument(
        "--mpc_weight", type=float, default=0.1, help="The weight of the --mpc penalty in the loss."
    )

    args = parser.parse_args(input_args)
    check_args(parser, args)
    return args


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Fill the data-dependent defaults and refuse what cannot work, naming the argument."""
    for name in ["train_batch_size", "num_train_epochs", "max_train_steps", "gradient_accumulation_steps"]:
        _positive(parser, args, name)
    for name in ["rank", "checkpointing_steps", "validation_steps", "validation_inference_steps"]:
        _positive(parser, args, name)
    for name in [
        "sample_batch_size",
        "num_class_images",
        "prior_generation_steps",
        "checkpoints_total_limit",
        "resolution",
    ]:
        _positive(parser, args, name)
    if args.prior_loss_weight is not None and not (
        math.isfinite(args.prior_loss_weight) and args.prior_loss_weight >= 0
    ):  # its default follows the adapter and pivotal tuning (default_training_settings)
        parser.error(f"--prior_loss_weight must be a finite number >= 0, got {args.prior_loss_weight}")
    for name in ("learning_rate", "conv_learning_rate"):  # their defaults follow the family (family_settings)
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            parser.error(f"--{name} must be positive, got {getattr(args, name)}")
    _positive(parser, args, "num_new_tokens_per_abstraction")
    if not args.token_abstraction.strip():
        parser.error("--token_abstraction must be a word of the instance prompt, got an empty string")
    if args.text_encoder_preservation < 0:
        parser.error(f"--text_encoder_preservation must be 0 or more, got {args.text_encoder_preservation}")
    if args.text_encoder_lr is not None and args.text_encoder_lr <= 0:
        parser.error(f"--text_encoder_lr must be positive, got {args.text_encoder_lr}")
    for name in ["num_validation_images", "num_heldout_images", "num_drift_images"]:
        if getattr(args, name) < 0:
            parser.error(f"--{name} must be 0 or more, got {getattr(args, name)}")
    if args.conv_rank is not None:
        if any(rank < 1 for rank in args.conv_rank):
            parser.error(f"--conv_rank must be positive integers, got {' '.join(map(str, args.conv_rank))}")
        if len(args.conv_rank) == 1:
            args.conv_rank = args.conv_rank[0]
    if args.targets is not None and args.targets not in TARGET_PRESETS:
        patterns = [pattern.strip() for pattern in args.targets.split(",") if pattern.strip()]
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as error:
                parser.error(f"--targets: {pattern!r} is not a regular expression ({error})")
        if not patterns:
            parser.error("--targets is empty")
        args.targets = patterns
    try:
        config = adapter_config_from(args, base_model=None)
    except ValueError as error:
        parser.error(f"adapter: {error}")
    if args.relora_steps is not None:
        _positive(parser, args, "relora_steps")
        if args.relora_warmup_steps is None:
            args.relora_warmup_steps = args.relora_steps // 10
        if not 0 <= args.relora_warmup_steps < args.relora_steps:
            parser.error(
                f"--relora_warmup_steps must be 0 or more and below --relora_steps ({args.relora_steps}), "
                f"got {args.relora_warmup_steps}"
            )
    elif args.relora_warmup_steps is not None:
        parser.error("--relora_warmup_steps needs --relora_steps")
    if not (math.isfinite(args.mpc_weight) and args.mpc_weight >= 0):
        parser.error(f"--mpc_weight must be a finite number, 0 or more, got {args.mpc_weight}")
    from plugin.procedures import check_constrainable, check_restartable

    for flag, given, check in [
        ("relora_steps", args.relora_steps, check_restartable),
        ("mpc", args.mpc, check_constrainable),
    ]:
        try:
            if given is not None:
                check(config)
        except ValueError as error:
            parser.error(f"--{flag}: {error}")
    if isinstance(args.conv_rank, list) and config.backend_for(4) != "tucker":
        parser.error(
            "--conv_rank with several values (per-mode ranks) needs the tucker backend for convolutions"
        )
    args.scale = config.scale

    if args.instance_data_dir is None:
        args.instance_data_dir = str(DEFAULT_SUBJECT)
    instance_images = _image_folder(parser, "--instance_data_dir", args.instance_data_dir)
    prompts = _read_prompts(parser, Path(args.instance_data_dir))
    args.instance_prompt = args.instance_prompt or prompts.get("instance_prompt")
    if not args.instance_prompt:
        parser.error(
            f"--instance_prompt is required ({args.instance_data_dir} has no {PROMPTS_FILE} with one)"
        )
    check_heldout(parser, args, instance_images, prompts)
    args.instance_prompts = None  # per training image, with --instance_captions
    if args.instance_captions:
        captions = _captions(parser, prompts, "captions", Path(args.instance_data_dir))
        args.instance_prompts = []
        for image in map(Path, args.train_images):
            caption = image_caption(image, captions)
            if caption is None:
                parser.error(
                    f"--instance_captions: {image} has no caption (write {image.with_suffix('.txt').name} "
                    f'beside it, or add "{image.name}" to "captions" in {Path(args.instance_data_dir, PROMPTS_FILE)})'
                )
            args.instance_prompts.append(caption)
    # Read even without prior preservation: the prior-drift measure uses it.
    args.class_prompt = args.class_prompt or prompts.get("class_prompt")
    if args.validation_prompt:
        args.validation_prompts = [args.validation_prompt]
    else:
        listed = prompts.get("validation_prompts") or [
            prompts.get("validation_prompt") or args.instance_prompt
        ]
        args.validation_prompts = [str(prompt) for prompt in listed]
        args.validation_prompt = args.validation_prompts[0]
    if args.output_dir is None:
        args.output_dir = os.path.join("outputs", f"dreambooth-{args.adapter}")
    if args.with_prior_preservation:
        if not args.class_prompt:
            parser.error(
                'prior preservation (on by default) needs a class prompt: give --class_prompt (e.g. "a photo of '
                f'dog"), a "class_prompt" in {Path(args.instance_data_dir, PROMPTS_FILE)}, or turn it off with '
                "--no-with_prior_preservation"
            )
        if args.class_data_dir is None:
            args.class_data_dir = os.path.join(args.output_dir, "class_images")
    check_class_captions(parser, args, prompts)
    # Class images serve prior preservation and the prior-drift measure.
    uses_class_images = args.with_prior_preservation or args.num_drift_images and args.class_prompt
    if uses_class_images and args.class_data_dir and Path(args.class_data_dir).exists():
        if not Path(args.class_data_dir).is_dir():
            parser.error(f"--class_data_dir: {args.class_data_dir} is not a directory")
        _check_images(parser, "--class_data_dir", _list_images(Path(args.class_data_dir)))
    args.num_instance_images = len(args.train_images)
    if args.random_zoom is not None and not args.random_zoom >= 1:
        parser.error(f"--random_zoom must be at least 1 (1: no zoom), got {args.random_zoom}")
    if args.keep_best_heldout and not args.heldout_images:
        parser.error(
            "--keep_best_heldout needs held-out images: --heldout_data_dir, --num_heldout_images, or a "
            f"{HELDOUT_FOLDER}/ folder of images in --instance_data_dir"
        )

    if args.resume_from_checkpoint not in (None, "latest"):
        candidates = [Path(args.resume_from_checkpoint), Path(args.output_dir, args.resume_from_checkpoint)]
        if not any((path / ADAPTER_FILENAME).is_file() for path in candidates):
            parser.error(f"--resume_from_checkpoint: no checkpoint at {args.resume_from_checkpoint}")
    _check_base_model(parser, args)
    if args.family:  # a hub model's family is read in `main`, and its run checked there
        check_output_dir(parser, args)

    if args.validation_epochs is not None:
        _positive(parser, args, "validation_epochs")
    if args.use_8bit_adam and not _installed("bitsandbytes"):
        parser.error("--use_8bit_adam: bitsandbytes is not installed (pip install bitsandbytes)")
    if args.enable_xformers_memory_efficient_attention and not _installed("xformers"):
        parser.error(
            "--enable_xformers_memory_efficient_attention: xformers is not installed (pip install xformers)"
        )
    if args.report_to == "none":
        args.report_to = None
    if args.report_to not in (None, "all", *TRACKERS):
        parser.error(f"--report_to must be one of {', '.join(TRACKERS)}, all, none; got {args.report_to!r}")
    if args.report_to in TRACKERS and not _installed(args.report_to):
        parser.error(f"--report_to {args.report_to}: the {args.report_to} package is not installed")


def run_identity(args: argparse.Namespace) -> dict:
    """The run's RUN_IDENTITY settings, as JSON values."""
    identity = {key: getattr(args, key, None) for key in RUN_IDENTITY}
    if getattr(args, "family", None) in ("sd3", "flux"):
        identity.update({key: getattr(args, key, None) for key in FLOW_IDENTITY})
    return json.loads(json.dumps(identity, default=str))


def checkpoint_folders(output_dir: str | os.PathLike) -> list[Path]:
    """checkpoint-<step> folders of --output_dir, oldest first."""
    folders = [p for p in Path(output_dir).glob("checkpoint-*") if re.fullmatch(r"checkpoint-\d+", p.name)]
    return sorted(folders, key=lambda p: int(p.name.split("-")[1]))


def identity_differences(recorded_in: Path, identity: dict) -> list[str] | None:
    """The settings in which the run recorded in `recorded_in` differs from `identity` (None: unreadable).
    A setting the record lacks (an option newer than the run) differs only when it is set now."""
    try:
        recorded = json.loads(recorded_in.read_text())
    except (OSError, ValueError):
        return None
    return [
        key for key in identity if (key in recorded or identity[key]) and recorded.get(key) != identity[key]
    ]


def resume_checkpoint(args: argparse.Namespace) -> Path | None:
    """The checkpoint `--resume_from_checkpoint` names: a folder, its name in --output_dir, or the
    latest one there ("latest"; None when there is none yet)."""
    if args.resume_from_checkpoint == "latest":
        folders = checkpoint_folders(args.output_dir)
        return folders[-1] if folders else None
    path = Path(args.resume_from_checkpoint)
    return path if path.is_dir() else Path(args.output_dir, args.resume_from_checkpoint)


def check_output_dir(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Never overwrite another run, and resume only the same run: a checkpoint of a different
    configuration would train nothing (or the wrong thing) and ship its old adapter."""
    output_dir = Path(args.output_dir)
    identity = run_identity(args)
    checkpoints = checkpoint_folders(output_dir)
    if args.resume_from_checkpoint:
        path = resume_checkpoint(args)
        if path is None:
            return
        differences = identity_differences(path / RUN_FILE, identity)
        if differences is None:
            parser.error(
                f"--resume_from_checkpoint: {path} has no readable {RUN_FILE} (damaged, or made by an older "
                "version): it can't be checked to belong to this run"
            )
        if differences:
            parser.error(
                f"--resume_from_checkpoint: {path} is from a run with other settings ({', '.join(differences)}); "
                "resume with the same settings, or start a new run in another --output_dir"
            )
        return
    finished = (output_dir / ADAPTER_FILENAME).is_file()
    if (checkpoints or finished) and not args.overwrite_output_dir:
        what = (
            f"checkpoints at steps {', '.join(p.name.split('-')[1] for p in checkpoints)}"
            if checkpoints
            else ""
        )
        what = what or f"a finished run ({ADAPTER_FILENAME})"
        differences = identity_differences(output_dir / RUN_FILE, identity)
        other = f" with other settings ({', '.join(differences)})" if differences else ""
        parser.error(
            f"--output_dir {output_dir} holds {what}{other}: pass --resume_from_checkpoint latest to continue "
            "it, --overwrite_output_dir to start over, or pick another --output_dir"
        )


def _positive(parser: argparse.ArgumentParser, args: argparse.Namespace, name: str) -> None:
    value = getattr(args, name)
    if value is not None and value < 1:
        parser.error(f"--{name} must be a positive integer, got {value}")


def _installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def _list_images(folder: Path) -> list[Path]:
    return sorted(
        path
        for path in folder.iterdir()
        if path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS
    )


def _check_images(parser: argparse.ArgumentParser, flag: str, paths: list[Path]) -> None:
    for path in paths:
        try:
            with Image.open(path) as image:
                image.load()
        except Exception as error:  # PIL raises many kinds for broken files
            parser.error(f"{flag}: {path} is not a readable image ({type(error).__name__}: {error})")


def _image_folder(parser: argparse.ArgumentParser, flag: str, folder: str) -> list[Path]:
    path = Path(folder)
    if not path.is_dir():
        parser.error(f"{flag}: no such directory: {folder}")
    images = _list_images(path)
    if not images:
        parser.error(f"{flag}: {folder} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    _check_images(parser, flag, images)
    return images


def _read_prompts(parser: argparse.ArgumentParser, folder: Path) -> dict:
    path = folder / PROMPTS_FILE
    if not path.is_file():
        return {}
    try:
        prompts = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        parser.error(f"{path} is not valid JSON ({error})")
    return prompts if isinstance(prompts, dict) else {}


def check_heldout(
    parser: argparse.ArgumentParser, args: argparse.Namespace, instance_images: list[Path], prompts: dict
) -> None:
    """Split the images into args.train_images and args.heldout_images (with args.heldout_prompts).

    Held-out images are never trained on: --num_heldout_images of the instance images (a choice fixed
    by --seed) plus those of --heldout_data_dir (default: the instance folder's heldout/, which is
    never trained on since only the files of the instance folder itself are).
    """
    count = args.num_heldout_images
    if count >= len(instance_images):
        parser.error(
            f"--num_heldout_images {count}: {args.instance_data_dir} has {len(instance_images)} images and at "
            "least one must train"
        )
    held = set(random.Random(args.seed).sample(range(len(instance_images)), count))
    args.train_images = [str(path) for i, path in enumerate(instance_images) if i not in held]
    heldout = [path for i, path in enumerate(instance_images) if i in held]

    default = Path(args.instance_data_dir, HELDOUT_FOLDER)
    if args.heldout_data_dir is None and default.is_dir() and _list_images(default):
        args.heldout_data_dir = str(default)
    folder_images = []
    if args.heldout_data_dir is not None:
        folder_images = _image_folder(parser, "--heldout_data_dir", args.heldout_data_dir)
        if Path(args.heldout_data_dir).resolve() == Path(args.instance_data_dir).resolve():
            parser.error(
                f"--heldout_data_dir: {args.heldout_data_dir} is the instance folder; held-out images must be "
                "ones that training never sees"
            )
    args.heldout_images = [str(path) for path in heldout + folder_images]

    # Each held-out image is captioned as training would caption it: its own caption with
    # --instance_captions (<stem>.txt, its folder's "captions", the instance folder's "heldout"), else
    # the instance prompt.
    args.heldout_prompts = [args.instance_prompt] * len(args.heldout_images)
    if args.instance_captions:
        instance_folder = Path(args.instance_data_dir)
        own = _captions(parser, prompts, "captions", instance_folder)
        listed = _captions(parser, prompts, "heldout", instance_folder)
        if args.heldout_data_dir is not None:
            folder = Path(args.heldout_data_dir)
            listed = {**listed, **_captions(parser, _read_prompts(parser, folder), "captions", folder)}
        for i, path in enumerate(heldout + folder_images):
            captions = own if i < len(heldout) else listed
            args.heldout_prompts[i] = image_caption(path, captions) or args.instance_prompt


def pivotal_prompts(args: argparse.Namespace) -> str | None:
    """--train_text_encoder_ti: the identifier in the instance, held-out and validation prompts becomes
    the new tokens (args.identifier_tokens), as the embeddings file's users will write it. Returns why
    it can't (None when done)."""
    from plugin.pivotal import identifier_tokens, mentions, replace_identifier

    word = args.token_abstraction
    if not mentions(args.instance_prompt, word) or any(
        not mentions(p, word) for p in args.instance_prompts or []
    ):
        return (
            f"--train_text_encoder_ti: the identifier --token_abstraction {word!r} is not in the instance prompt "
            f"{args.instance_prompt!r}{' or in every caption' if args.instance_prompts else ''}: name the word "
            "that stands for the subject (or add --no-train_text_encoder_ti where pivotal tuning is a default)"
        )
    args.identifier_tokens = identifier_tokens(args.num_new_tokens_per_abstraction)
    replace = functools.partial(replace_identifier, word=word, tokens=args.identifier_tokens)
    args.instance_prompt = replace(args.instance_prompt)
    args.instance_prompts = args.instance_prompts and [replace(p) for p in args.instance_prompts]
    args.heldout_prompts = [replace(p) for p in args.heldout_prompts]
    args.validation_prompts = [replace(p) for p in args.validation_prompts]
    args.validation_prompt = args.validation_prompts[0]
    return None


def check_class_captions(parser: argparse.ArgumentParser, args: argparse.Namespace, prompts: dict) -> None:
    """With --class_captions: the class images already there have captions, and the missing ones have
    prompts to be generated from (args.class_prompts)."""
    listed, source = prompts.get("class_prompts"), Path(args.instance_data_dir, PROMPTS_FILE)
    if listed is not None and (
        not isinstance(listed, list) or not all(isinstance(p, str) and p.strip() for p in listed)
    ):
        parser.error(f'{source}: "class_prompts" must be a list of non-empty prompts')
    # Varied prompts of the class: missing class images are generated from them in turn (with
    # --class_captions), and --text_encoder_preservation keeps their meaning.
    args.class_prompts = [p.strip() for p in listed] if listed else None
    if not args.class_captions:
        return
    if not args.with_prior_preservation:
        parser.error(
            "--class_captions captions the prior-preservation images: drop --no-with_prior_preservation"
        )
    folder = Path(args.class_data_dir)
    class_images = _list_images(folder)[: args.num_class_images] if folder.is_dir() else []
    for image in class_images:
        if image_caption(image, {}) is None:
            parser.error(
                f"--class_captions: class image {image} has no caption (write {image.with_suffix('.txt').name} "
                "beside it)"
            )
    if len(class_images) < args.num_class_images and not args.class_prompts:
        parser.error(
            f"--class_captions: {args.num_class_images - len(class_images)} class images are missing in "
            f'{folder} and there are no prompts to generate them from: add "class_prompts": [...] to {source}'
        )


def class_captions(args: argparse.Namespace) -> list[str] | None:
    """The captions of the class images trained on, with --class_captions (check_args checked them)."""
    if not args.class_captions:
        return None
    return [image_caption(image, {}) for image in list_images(args.class_data_dir)[: args.num_class_images]]


def _captions(parser: argparse.ArgumentParser, prompts: dict, key: str, folder: Path) -> dict:
    captions = prompts.get(key, {})
    if not isinstance(captions, dict):
        parser.error(f'{folder / PROMPTS_FILE}: "{key}" must map image file names to captions')
    return captions


def image_caption(image: Path, captions: dict) -> str | None:
    """An image's own caption: `<stem>.txt` beside it (the kohya/diffusers convention), else its
    entry in `captions` (file name -> caption, from a prompts.json); None if it has neither."""
    text_file = image.with_suffix(".txt")
    if text_file.is_file() and text_file.read_text().strip():
        return text_file.read_text().strip()
    caption = captions.get(image.name)
    return str(caption).strip() if caption else None


def _check_base_model(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """A local base must be a diffusers folder of a family this script trains (plugin.families), and the
    arguments must suit that family; a hub id is checked once its config is read (`main`)."""
    from plugin.families import FAMILIES, family_of_folder

    name, args.family = args.pretrained_model_name_or_path, None
    path = Path(name)
    if path.is_file():
        parser.error(
            f"--pretrained_model_name_or_path: {name} is a single file; convert it to a diffusers folder first "
            "(StableDiffusionPipeline.from_single_file(...).save_pretrained(folder))"
        )
    if not path.exists():
        if name.startswith((".", "/", "~")) or name.count("/") != 1 or path == DEFAULT_BASE:
            parser.error(f"--pretrained_model_name_or_path: no such directory: {name}")
        return  # a hub id like "stable-diffusion-v1-5/stable-diffusion-v1-5"
    try:
        args.family = family_of_folder(path).name
    except ValueError as error:
        parser.error(f"--pretrained_model_name_or_path: {name}: {error}")
    refusal = family_settings(FAMILIES[args.family], args)
    if refusal:
        parser.error(refusal)


def family_settings(family, args: argparse.Namespace) -> str | None:
    """Fills the defaults that depend on the base model's family (a plugin.families object) and returns
    what the arguments ask that it can't do, naming both (None when it can do it all)."""
    clip = family.name in ("sd", "sdxl")
    if args.train_text_encoder_ti is None:  # --train_text_encoder asks for the earlier recipe
        args.train_text_encoder_ti = (
            clip and args.adapter in PIVOTAL_ADAPTERS and args.train_text_encoder is None
        )
    if args.train_text_encoder_ti and not clip:
        return f"--train_text_encoder_ti learns CLIP token embeddings (SD 1.x/2.x, SDXL); {family.title} is not supported"
    if args.train_text_encoder is None:
        args.train_text_encoder = not args.train_text_encoder_ti
    if args.targets is None:
        args.targets = PIVOTAL_TARGETS if args.train_text_encoder_ti else "attn+conv"
    default_training_settings(args)
    refusal = text_encoder_refusal(args)
    if refusal:
        return refusal
    if family.flow_matching:
        for flag in ("snr_gamma", "noise_offset"):
            if getattr(args, flag):
                return (
                    f"--{flag} is for DDPM models (SD 1.x/2.x, SDXL); {family.title} trains with flow matching "
                    "(see --weighting_scheme)"
                )
        if args.guidance_scale is not None and family.name != "flux":
            return f"--guidance_scale is Flux's guidance embedding; {family.title} has none"
        args.weighting_scheme = args.weighting_scheme or family.default_weighting
        if family.name == "flux" and args.guidance_scale is None:
            args.guidance_scale = 3.5
        return None
    for flag in ("weighting_scheme", "guidance_scale", "max_sequence_length"):
        if getattr(args, flag) is not None:
            return (
                f"--{flag} is for flow-matching models (SD3, Flux); {family.title} is trained with DDPM noise"
            )
    return None


def default_training_settings(args: argparse.Namespace) -> None:
    """Fills the rates (--learning_rate, --conv_learning_rate), the length, the zoom and the prior's weight
    where not given: per --adapter, and with pivotal tuning on its targets (the setting they were measured
    in) per PIVOTAL_LEARNING_RATES and PIVOTAL_TRAINING; a given --learning_rate sets the convolutions' too."""
    measured = args.train_text_encoder_ti and args.targets == PIVOTAL_TARGETS
    training = PIVOTAL_TRAINING.get(args.adapter, {}) if measured else {}
    if args.max_train_steps is None and args.num_train_epochs is None:
        args.max_train_steps = training.get("max_train_steps", DEFAULT_MAX_TRAIN_STEPS)
    if args.random_zoom is None:
        args.random_zoom = training.get("random_zoom")
    if args.random_zoom == 1:  # no zoom has one spelling, None: what the card, the data and resuming read
        args.random_zoom = None
    if args.prior_loss_weight is None:
        args.prior_loss_weight = training.get(
            "prior_loss_weight", DEFAULT_PRIOR_LOSS_WEIGHTS.get(args.adapter, 1.0)
        )
    pivotal = PIVOTAL_LEARNING_RATES.get(args.adapter) if measured else None
    if args.learning_rate is None and pivotal:
        args.learning_rate = pivotal[0]
        args.conv_learning_rate = args.conv_learning_rate or pivotal[1]
    elif args.learning_rate is None:
        args.learning_rate = DEFAULT_LEARNING_RATES[args.adapter]
    if args.conv_learning_rate is None and args.adapter in DEFAULT_CONV_LEARNING_RATE_DIVISORS:
        args.conv_learning_rate = args.learning_rate / DEFAULT_CONV_LEARNING_RATE_DIVISORS[args.adapter]


def text_encoder_refusal(args: argparse.Namespace) -> str | None:
    """What the text-encoder arguments ask that can't be done together; fills the tokens' learning
    rate and, with --train_text_encoder_ti, writes the new tokens into the prompts."""
    if args.text_encoder_preservation and not args.train_text_encoder:
        return "--text_encoder_preservation keeps the adapted text encoder near the base: it needs --train_text_encoder"
    if args.pre_compute_text_embeddings and args.train_text_encoder:
        return (
            "--pre_compute_text_embeddings encodes the prompts once, so the text encoder can't train: add "
            "--no-train_text_encoder"
        )
    if not args.train_text_encoder_ti:
        return None
    if args.pre_compute_text_embeddings:
        return (
            "--pre_compute_text_embeddings encodes the prompts once, so --train_text_encoder_ti's tokens "
            "can't train: drop one of them, or add --no-train_text_encoder_ti where it is a default"
        )
    if args.text_encoder_lr is None and not args.train_text_encoder:
        args.text_encoder_lr = DEFAULT_TOKEN_LEARNING_RATE
    return pivotal_prompts(args)


def adapter_config_from(args: argparse.Namespace, base_model: str | None):
    """The `AdapterConfig` the command line asks for (the preset fills in what it leaves unset)."""
    from plugin.config import AdapterConfig  # the one heavy import argument checking needs (torch)

    options = (
        "backend",
        "conv_backend",
        "lie_map",
        "rank",
        "conv_rank",
        "alpha",
        "scale",
        "blocks",
        "init",
        "vectors",
        "targets",
    )
    return AdapterConfig(
        method=args.adapter, base_model=base_model, **{name: getattr(args, name) for name in options}
    )


if __name__ == "__main__":
    ARGS = parse_args()


# ---------------------------------------------------------------------------------------------
# Training.

import diffusers  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from accelerate.logging import get_logger  # noqa: E402
from accelerate.utils import ProjectConfiguration, set_seed  # noqa: E402
from diffusers import AutoencoderKL, DiffusionPipeline  # noqa: E402
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution  # noqa: E402
from diffusers.optimization import get_scheduler  # noqa: E402
from diffusers.utils import make_image_grid  # noqa: E402
from huggingface_hub import ModelCard, ModelCardData, create_repo, upload_folder  # noqa: E402
from huggingface_hub import constants as hub_constants  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

import plugin  # noqa: E402
from plugin.budget import with_default_conv_rank  # noqa: E402
from plugin.families import FAMILIES, TOKENIZER_OF, NoiseOptions, family_of  # noqa: E402
from plugin.pivotal import (  # noqa: E402
    IdentifierEmbeddings,
    load_embeddings,
    read_embeddings,
    replace_identifier,
    save_embeddings,
)
from plugin.procedures import (  # noqa: E402
    mpc_penalty,
    restart,
    restart_warmup,
    restore_training_state,
    training_state,
)
from plugin.training import (  # noqa: E402
    NOISE_KEY,
    DreamBoothDataset,
    EpochSampler,
    collate_fn,
    copy_adapter_tensors,
    largest_weight_change,
    list_images,
    load_rgb,
    seeded_generator,
)

logger = get_logger(__name__)


def display_name(name: str) -> str:
    """The base model as a user would type it: repo-relative for the shipped assets."""
    path = Path(name).resolve()
    return str(path.relative_to(REPO_ROOT)) if path.exists() and path.is_relative_to(REPO_ROOT) else name


def accelerator_is_cpu_cluster() -> bool:
    """Several processes but no GPU: ask accelerate for its multi-CPU (gloo) mode.

    accelerate 1.x starts several local processes only through its torchrun launcher (`--multi_gpu`
    or a MULTI_GPU config); without a GPU those processes would each train alone unless told `cpu`.
    """
    accelerator_api = getattr(torch, "accelerator", None)
    has_device = accelerator_api.is_available() if accelerator_api else torch.cuda.is_available()
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not has_device


class SystemExitParser:
    """Stands for the argument parser in checks made once a hub model's family is known."""

    def error(self, message: str) -> None:
        raise SystemExit(message)


def hub_family(base: str, hub: dict):
    """The family of a hub model, from its model_index.json and its denoiser's config."""
    try:
        model_index = DiffusionPipeline.load_config(base, **hub)
    except OSError:
        model_index = {}
    for denoiser in ("unet", "transformer"):
        try:  # (a model class reads config.json; a pipeline class would read model_index.json again)
            config = diffusers.UNet2DConditionModel.load_config(base, subfolder=denoiser, **hub)
        except OSError:
            continue
        try:
            return family_of(model_index, config)
        except ValueError as error:
            raise SystemExit(f"--pretrained_model_name_or_path: {base}: {error}") from error
    raise SystemExit(f"--pretrained_model_name_or_path: {base} has no unet/ or transformer/ config")


def load_pipeline(args: argparse.Namespace, device: torch.device, dtype: torch.dtype, **components):
    """The base pipeline (of the run's family) with some `components` replaced (the models being
    trained); the others are moved to `device` and `dtype`, which leaves the given ones (and their
    float32 adapters) alone."""
    family = FAMILIES[args.family]
    pipeline_class = getattr(diffusers, family.pipeline_class)
    pipeline = pipeline_class.from_pretrained(
        args.pretrained_model_name_or_path,
        revision=args.revision,
        variant=args.variant,
        cache_dir=args.cache_dir,
        **components,
    )
    for name, module in pipeline.components.items():
        if name not in components and isinstance(module, torch.nn.Module):
            float32 = dtype == torch.float32 or (name == "vae" and family.vae_in_float32)
            module.to(device, dtype=None if float32 else dtype)
    return pipeline


def generate_class_images(args: argparse.Namespace, accelerator: Accelerator) -> None:
    """diffusers' prior-preservation step: top up --class_data_dir to --num_class_images images (with
    --class_captions, from the class prompts in turn, each saved with its caption)."""
    prompts = args.class_prompts if args.class_captions else None
    generate_images(args, accelerator, Path(args.class_data_dir), args.num_class_images, prompts=prompts)


def save_class_image_grid(args: argparse.Namespace) -> Path:
    """A grid of the class images prior preservation trains on, for the user to look at: where the base
    does not draw the class (a shape it never drew: the benchmark's orange cross), they teach the class
    word away from the subject, and the subject trains better without them (README, "The class images")."""
    trained_on = list_images(args.class_data_dir)[: args.num_class_images]
    thumbnails = []
    for image_path in trained_on[:32]:
        with Image.open(image_path) as image:
            thumbnails.append(ImageOps.fit(image.convert("RGB"), (128, 128)))  # centre crop, no stretch
    columns = min(8, len(thumbnails))
    rows = math.ceil(len(thumbnails) / columns)
    thumbnails += [Image.new("RGB", (128, 128), "white")] * (rows * columns - len(thumbnails))
    path = Path(args.output_dir, CLASS_GRID)
    write_atomically(path, make_image_grid(thumbnails, rows=rows, cols=columns))
    logger.info(
        f"Prior preservation trains on {len(trained_on)} class images for {args.class_prompt!r} ({path}): if "
        "they do not show your subject's class (the base can't draw it), they pull the class word away from "
        "your subject; then train with --no-with_prior_preservation too, and compare (README: The class "
        "images)."
    )
    return path


def drift_class_images(args: argparse.Namespace, accelerator: Accelerator) -> list[Path]:
    """The class images of the prior-drift measure, never trained on: --num_drift_images of
    --class_data_dir (with prior preservation, those after the --num_class_images it trains on), else
    samples of the base model for --class_prompt with seeds the class images don't use. Those are
    made here, before training (so the base is the base), and kept in <output_dir>/drift_class_images
    for later and resumed runs."""
    if not args.num_drift_images or not args.class_prompt:
        return []
    if args.class_data_dir and Path(args.class_data_dir).is_dir():
        unused = list_images(args.class_data_dir)[
            args.num_class_images if args.with_prior_preservation else 0 :
        ]
        if unused:
            return unused[: args.num_drift_images]
    folder = Path(args.output_dir, DRIFT_FOLDER)
    made_by = {
        "class_prompt": args.class_prompt,
        "base_model": display_name(args.pretrained_model_name_or_path),
        "seed": args.seed,
        "first_sample": DRIFT_FIRST_SAMPLE,
    }
    made_by_file = folder / "made_by.json"  # written once all images are there
    stale = folder.is_dir() and (
        not made_by_file.is_file() or json.loads(made_by_file.read_text()) != made_by
    )  # made for another prompt, model or seed, or unfinished
    if accelerator.is_main_process and stale:
        shutil.rmtree(folder)
    accelerator.wait_for_everyone()
    generate_images(args, accelerator, folder, args.num_drift_images, DRIFT_FIRST_SAMPLE)
    if accelerator.is_main_process:
        made_by_file.write_text(json.dumps(made_by))
    return list_images(folder)[: args.num_drift_images]


def generate_images(
    args: argparse.Namespace,
    accelerator: Accelerator,
    folder: Path,
    count: int,
    first_sample: int = 10**9,
    prompts: list[str] | None = None,
) -> None:
    """Top up `folder` to `count` samples of the base pipeline for --class_prompt, fixed seeds,
    shared between the processes. Image k of a list of `prompts` is made from prompts[k % len] and
    saved with it as its caption (<stem>.txt, written first: an image is never without its caption)."""
    folder.mkdir(parents=True, exist_ok=True)
    existing = len(list_images(folder))
    missing = count - existing
    if missing <= 0:
        return
    on_gpu = accelerator.device.type == "cuda"
    precision = args.prior_generation_precision or ("fp16" if on_gpu else "fp32")
    dtype = {"fp32": torch.float32, "no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[
        precision
    ]
    pipeline = load_pipeline(args, accelerator.device, dtype)
    family = FAMILIES[args.family]
    pipeline.scheduler = family.sampling_scheduler(pipeline)
    pipeline.set_progress_bar_config(disable=True)
    described = f"{len(prompts)} class prompts" if prompts else repr(args.class_prompt)
    logger.info(f"Generating {missing} class images for {described} in {folder}")
    starts = list(range(0, missing, args.sample_batch_size))
    with accelerator.split_between_processes(starts) as my_starts:
        for start in tqdm(my_starts, desc="Class images", disable=not accelerator.is_local_main_process):
            batch = min(args.sample_batch_size, missing - start)
            generators = [
                seeded_generator(NOISE_KEY, args.seed, first_sample + start + i) for i in range(batch)
            ]
            numbers = [existing + start + i for i in range(batch)]
            texts = [prompts[k % len(prompts)] for k in numbers] if prompts else [args.class_prompt] * batch
            images = pipeline(
                texts,
                num_inference_steps=args.prior_generation_steps,
                generator=generators,
                **family.generation_kwargs(args.resolution),
            ).images
            for k, text, image in zip(numbers, texts, images):
                path = folder / f"{k:05d}-generated.png"
                if prompts:
                    path.with_suffix(".txt").write_text(text + "\n")
                image.save(path)
    del pipeline
    accelerator.wait_for_everyone()


def log_validation(
    pipeline: diffusers.DiffusionPipeline,
    args: argparse.Namespace,
    accelerator: Accelerator,
    name: str,
    step: int,
    prompts: list[str] | None = None,
) -> list[Image.Image]:
    """Generate --num_validation_images per validation prompt (or per one of `prompts`) with fixed seeds
    (the same at every call, so grids compare) and save them as validation/<name>.png, one row per prompt."""
    family = FAMILIES[args.family]
    pipeline.scheduler = family.sampling_scheduler(pipeline)
    pipeline.set_progress_bar_config(disable=True)
    count = args.num_validation_images
    images = []
    for prompt in prompts or args.validation_prompts:
        generators = [torch.Generator().manual_seed(args.seed + i) for i in range(count)]
        with torch.no_grad(), accelerator.autocast():  # mixed precision: the adapters stay float32
            images += pipeline(
                [prompt] * count,
                num_inference_steps=args.validation_inference_steps,
                generator=generators,
                **family.generation_kwargs(args.resolution),
            ).images
    folder = Path(args.output_dir, "validation")
    folder.mkdir(parents=True, exist_ok=True)
    make_image_grid(images, rows=len(args.validation_prompts), cols=count).save(folder / f"{name}.png")
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images(
                name, np.stack([np.asarray(im) for im in images]), step, dataformats="NHWC"
            )
        elif tracker.name == "wandb":
            import wandb

            captions = [prompt for prompt in args.validation_prompts for _ in range(count)]
            tracker.log({name: [wandb.Image(im, caption=c) for im, c in zip(images, captions)]}, step=step)
    return images


class StepLosses:
    """Each step's training loss, kept on the device until read: every LOSS_READ_STEPS steps and before
    whatever needs the curve (a checkpoint, a held-out evaluation, the end). Reading a loss waits for the
    accelerator; a wait every step leaves a GPU idle while the host queues the next step's kernels."""

    def __init__(self, accelerator: Accelerator, losses: list[float], learning_rate: float, progress_bar):
        self.accelerator, self.losses, self.learning_rate = accelerator, losses, learning_rate
        self.progress_bar = progress_bar
        self.steps: list[int] = []
        self.values: list[torch.Tensor] = []
        self.shown: dict[str, float | torch.Tensor] = {}

    def add(self, step: int, loss: torch.Tensor, shown: dict[str, float | torch.Tensor]) -> None:
        """`loss`: the step's mean over processes and accumulated batches; `shown`: the progress bar's."""
        self.steps.append(step)
        self.values.append(loss)
        self.shown = shown
        if len(self.steps) >= LOSS_READ_STEPS:
            self.read()

    def read(self) -> None:
        """One wait for every pending loss; a non-finite one stops the run, naming its step."""
        if not self.steps:
            return
        values = torch.stack(self.values).tolist()
        for step, value in zip(self.steps, values):
            if not math.isfinite(value):
                raise SystemExit(
                    f"The loss is {value} at step {step}: training diverged. "
                    f"Lower --learning_rate (it is {self.learning_rate:g}) or --scale."
                )
            self.losses.append(value)
            self.accelerator.log({"train_loss": value}, step=step)
        self.steps, self.values = [], []
        shown = {k: v.item() if isinstance(v, torch.Tensor) else v for k, v in self.shown.items()}
        self.progress_bar.set_postfix(loss=values[-1], **shown)


class HeldoutTrack:
    """The held-out loss during training: its curve ([step, loss], step 0 = the base, None for a
    non-finite loss) and, with --keep_best_heldout, a copy of the adapter at its lowest point.

    (A plain class, not a dataclass: benchmarks load this script with importlib, outside sys.modules.)
    """

    def __init__(self) -> None:
        self.curve: list[list] = []
        self.kept_step: int | None = None
        self.kept_tensors: dict[str, torch.Tensor] | None = None

    def add(self, step: int, loss: float, tensors: dict[str, torch.Tensor] | None = None) -> None:
        self.curve.append([step, loss if math.isfinite(loss) else None])
        if tensors is not None and self.best_step() == step:
            self.kept_step = step
            self.kept_tensors = {key: tensor.detach().to("cpu", copy=True) for key, tensor in tensors.items()}

    def best_step(self) -> int | None:
        """The evaluated step with the lowest loss (the earliest of equals)."""
        finite = [point for point in self.curve if point[1] is not None]
        return min(finite, key=lambda point: point[1])[0] if finite else None

    def loss_at(self, step: int) -> float | None:
        return next(loss for s, loss in self.curve if s == step)

    def save(self, folder: Path) -> None:
        (folder / "heldout.json").write_text(json.dumps({"curve": self.curve, "kept_step": self.kept_step}))
        if self.kept_tensors is not None:
            save_file(self.kept_tensors, folder / "kept_adapter.safetensors")

    def load(self, folder: Path, step: int) -> None:
        """Resume from the checkpoint of `step`: its curve, and the adapter it kept if any."""
        if not (folder / "heldout.json").is_file():
            return
        saved = json.loads((folder / "heldout.json").read_text())
        self.curve = [[s, loss] for s, loss in saved["curve"] if s <= step]
        if saved["kept_step"] is not None and (folder / "kept_adapter.safetensors").is_file():
            self.kept_step = saved["kept_step"]
            self.kept_tensors = load_file(folder / "kept_adapter.safetensors")


def write_atomically(path: Path, content: str | Image.Image) -> None:
    """Write a text file (or an image, as PNG) under a temporary name, then rename it: never half a file
    under its name."""
    partial = path.with_name(f".{path.name}.partial")
    if isinstance(content, Image.Image):
        content.save(partial, format="PNG")
    else:
        partial.write_text(content)
    os.replace(partial, path)


def save_checkpoint(
    accelerator: Accelerator,
    args: argparse.Namespace,
    step: int,
    losses: list[float],
    heldout: HeldoutTrack,
) -> None:
    """accelerate's state (adapter via the save hook, optimizer, scheduler) in checkpoint-<step>, with
    the loss curves and the best adapter so far, written under a temporary name first so a run
    killed while saving never leaves half a checkpoint."""
    checkpoints = checkpoint_folders(args.output_dir)
    if args.checkpoints_total_limit is not None and len(checkpoints) >= args.checkpoints_total_limit:
        for old in checkpoints[: len(checkpoints) - args.checkpoints_total_limit + 1]:
            logger.info(f"Removing {old} (--checkpoints_total_limit {args.checkpoints_total_limit})")
            shutil.rmtree(old)
    final = Path(args.output_dir, f"checkpoint-{step}")
    partial = Path(args.output_dir, f".checkpoint-{step}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    accelerator.save_state(str(partial))
    (partial / "losses.json").write_text(json.dumps(losses))
    (partial / RUN_FILE).write_text(json.dumps(run_identity(args), indent=2))
    heldout.save(partial)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(partial, final)
    logger.info(f"Saved state to {final}")


@torch.no_grad()
def parameter_groups(
    trained: dict[str, torch.nn.Module],
    learning_rate: float,
    conv_learning_rate: float | None = None,
    text_encoder_lr: float | None = None,
) -> list[dict]:
    """The trainable tensors as optimizer groups: those of adapters on convolutions, and those of the
    text encoders, apart when they have a rate of their own."""
    rates = {}  # id(parameter) -> its rate, where it is not --learning_rate
    for name, model in trained.items():
        if text_encoder_lr is not None and name.startswith("text_encoder"):
            rates.update((id(p), text_encoder_lr) for p in model.parameters())
        elif conv_learning_rate is not None:
            for layer in plugin.inject.adapted_layers(model).values():
                if isinstance(layer.base_layer, torch.nn.modules.conv._ConvNd):
                    rates.update((id(p), conv_learning_rate) for p in layer.adapters.parameters())
    params = [p for model in trained.values() for p in model.parameters() if p.requires_grad]
    groups = {learning_rate: []}
    for p in params:
        groups.setdefault(rates.get(id(p), learning_rate), []).append(p)
    return [{"params": group, "lr": lr} for lr, group in groups.items() if group]


def unpivoted(prompts: str | list[str], args: argparse.Namespace) -> str | list[str]:
    """--train_text_encoder_ti's prompts as written for the base model: the identifier's word again."""
    undo = functools.partial(
        replace_identifier, word="".join(args.identifier_tokens), tokens=[args.token_abstraction]
    )
    return undo(prompts) if isinstance(prompts, str) else [undo(p) for p in prompts]


def embeddings_difference(pivotal, pipeline, family) -> float:
    """The largest difference between the trained identifier rows and those the saved file loaded."""
    largest = 0.0
    for key, tokenizer_name, encoder_name in zip(pivotal.keys, family.tokenizers(), family.text_encoders):
        tokenizer, encoder = getattr(pipeline, tokenizer_name), getattr(pipeline, encoder_name)
        ids = tokenizer.convert_tokens_to_ids(pivotal.tokens)
        rows = encoder.get_input_embeddings().weight[ids].detach().float().cpu()
        largest = max(largest, (rows - pivotal.state()[key]).abs().max().item())
    return largest


def saved_file_difference(trained: dict[str, torch.nn.Module], pipeline, args: argparse.Namespace) -> float:
    """The largest output difference between the models as trained and the base with the saved file
    loaded, on a fixed random input: a file must reproduce its training, whatever the procedure."""
    family = FAMILIES[args.family]
    denoiser = getattr(pipeline, family.denoiser)
    device, dtype = denoiser.device, denoiser.dtype
    sample, timestep, conditioning = family.probe(denoiser, args.resolution, pipeline.vae_scale_factor)
    conditioning = {key: value.to(device, dtype) for key, value in conditioning.items()}
    largest = 0.0
    for name, model in trained.items():
        loaded, mode = getattr(pipeline, name), model.training
        model.eval()
        if name == family.denoiser:
            noisy, t = sample.to(device, dtype), timestep.to(device)
            ours = family.predict(model, noisy, t, conditioning)
            theirs = family.predict(loaded, noisy, t, conditioning)
        else:
            tokenizer = getattr(pipeline, TOKENIZER_OF[name])
            ids = tokenizer(args.class_prompt or "a photo", return_tensors="pt").input_ids.to(device)
            ours, theirs = model(ids)[0], loaded(ids)[0]
        model.train(mode)
        largest = max(largest, (ours.float() - theirs.float()).abs().max().item())
    return largest


def refuse_other_conv_ranks(checkpoint: Path, config) -> None:
    """Stop, naming the option, when `checkpoint`'s adapter has other conv ranks than `config`: a run begun
    before the Tucker convolutions' defaults (plugin.budget) recorded none or other ones."""
    from safetensors import safe_open

    try:
        with safe_open(str(checkpoint / ADAPTER_FILENAME), framework="pt") as handle:
            trained = json.loads(handle.metadata()["config"])
    except Exception:  # unreadable or no config: load_state below names the damage
        return
    # The method needs no check: it is part of the run's identity, compared before.
    rank, ours = trained.get("conv_rank") or trained.get("rank"), config.conv_rank or config.rank
    if rank != ours:
        raise SystemExit(
            f"--resume_from_checkpoint: {checkpoint} was trained with conv rank {rank}, this run builds "
            f"{ours} (the defaults for Tucker convolutions changed on 2026-12-07: LoRA's parameter count, "
            f"and for flora channel ranks 2x --rank): add --conv_rank {' '.join(map(str, rank if isinstance(rank, list) else [rank]))} "
            "to resume it"
        )


def write_model_card(args: argparse.Namespace, metrics: dict) -> None:
    """A short README.md in --output_dir: what was trained on what, how to load it, how it did."""
    base = display_name(args.pretrained_model_name_or_path)
    prior = (
        f', prior preservation with "{args.class_prompt}" at weight {args.prior_loss_weight:g}'
        if args.with_prior_preservation
        else ""
    )
    prior += " (class images with their own captions)" if args.class_captions else ""
    if args.text_encoder_preservation:
        prior += f", the text encoder's output for prompts without the identifier kept (weight {args.text_encoder_preservation:g})"
    notes = ["each with its own caption"] if args.instance_captions else []
    notes += ["mirrored half the time, --random_flip"] if args.random_flip else []
    notes += [f"enlarged up to {args.random_zoom:g}x, --random_zoom"] if args.random_zoom else []
    captions = f" ({'; '.join(notes)})" if notes else ""
    other_rates = (
        [f"{args.conv_learning_rate} on convolutions"] if args.conv_learning_rate is not None else []
    )
    if args.text_encoder_lr is not None and (args.train_text_encoder or args.train_text_encoder_ti):
        where = " and ".join(
            what
            for what, on in [
                ("the text encoders", args.train_text_encoder),
                ("the new tokens", args.train_text_encoder_ti),
            ]
            if on
        )
        other_rates.append(f"{args.text_encoder_lr} in {where}")
    rates_apart = f" ({', '.join(other_rates)})" if other_rates else ""
    fit = f"x{metrics['train_images_loss_after'] / metrics['train_images_loss_before']:.3f}"
    ratio = metrics["heldout_loss_ratio"]
    general = "n/a: no held-out images" if ratio is None else f"x{ratio:.3f}"
    if metrics["prior_drift_percent"] is not None:
        drift = f"{metrics['prior_drift_percent']:+.1f} %"
    else:
        drift = "n/a: no class prompt" if not args.class_prompt else "n/a: --num_drift_images 0"
    kept = ""
    if args.keep_best_heldout:
        kept = (
            f"\nThe adapter is that of step {metrics['adapter_step']}, the lowest held-out loss of the "
            "evaluations (`heldout_curve` in `metrics.json`).\n"
        )
    metrics = {
        k: "n/a" if v is None else f"{v:.4f}" if isinstance(v, float) else v for k, v in metrics.items()
    }
    family = FAMILIES[args.family]
    if family.liera_pipeline:
        loading = f'from pipelines import {family.liera_pipeline}\n\npipe = {family.liera_pipeline}.from_pretrained("{base}")'
    else:
        loading = (
            f"from diffusers import {family.pipeline_class}\nfrom pipelines import enable_liera\n\n"
            f'pipe = enable_liera({family.pipeline_class}.from_pretrained("{base}"))'
        )
    pivot = ""
    if args.train_text_encoder_ti:
        tokens, path = args.identifier_tokens, Path(args.output_dir, EMBEDDINGS_FILENAME)
        elsewhere = (
            f"load its `clip_l` and `clip_g` with `pipe.load_textual_inversion(tensor, token={tokens}, "
            "text_encoder=..., tokenizer=...)` into the first and the second text encoder"
            if family.name == "sdxl"
            else f'`pipe.load_textual_inversion("{path}", token={tokens})`'
        )
        pivot = (
            f"\nThe identifier {args.token_abstraction!r} was learnt as new tokens, {''.join(tokens)}, in "
            f"`{EMBEDDINGS_FILENAME}` (textual-inversion format; pivotal tuning): write them where you wrote "
            f"the identifier. `load_adapter` on this folder (or its Hub repo) loads them too; without it, {elsewhere}.\n"
        )
    # The Hub's card metadata, written by huggingface_hub (the YAML header the Hub's pages read).
    data = ModelCardData(
        base_model=base,
        library_name="diffusers",
        tags=["text-to-image", "diffusers", "dreambooth", "liera", args.adapter],
        instance_prompt=args.instance_prompt,
    )
    card = f"""---
{data.to_yaml()}
---

# {args.adapter} DreamBooth adapter for {base}

Trained with `train_scripts/train_dreambooth_liera.py` on {args.num_instance_images} images of
"{args.instance_prompt}"{captions}{prior}: {metrics["steps"]} steps at {args.resolution}x{args.resolution},
learning rate {args.learning_rate}{rates_apart}, adapter `{args.adapter}` (rank {args.rank}, conv rank {metrics["conv_rank"]},
scale {args.scale}, targets `{args.targets}`), text encoders adapted: {args.train_text_encoder}.
The file is `adapter.safetensors` in the `liera/1` or `liera/2` format (FORMAT.md).
{pivot}
```python
{loading}
pipe.load_adapter("{args.output_dir}")
image = pipe("{args.validation_prompt}").images[0]
```

Denoising loss (fixed timesteps and noise; lower: the model predicts those images better):

| images | base model | with the adapter | change |
| --- | --- | --- | --- |
| training images (fit), {metrics["num_train_images"]} | {metrics["train_images_loss_before"]} | {metrics["train_images_loss_after"]} | {fit} |
| held-out images (generalisation), {metrics["num_heldout_images"]} training never saw | {metrics["heldout_loss_before"]} | {metrics["heldout_loss_after"]} | {general} |
| class images (prior drift), {metrics["num_drift_images"]} of "{args.class_prompt or "n/a"}" | {metrics["class_loss_before"]} | {metrics["class_loss_after"]} | {drift} |
{kept}
Training loss (mean of {metrics["loss_window"]} steps): {metrics["loss_start"]} at the start,
{metrics["loss_end"]} at the end. Details in `metrics.json`.
"""
    if (Path(args.output_dir) / "validation" / "before_after.png").exists():
        card += (
            f"\n{', '.join(repr(p) for p in args.validation_prompts)} (a row each), base model (left) and "
            "with the adapter (right), same seeds:\n\n"
            "![before and after](validation/before_after.png)\n"
        )
    write_atomically(Path(args.output_dir, "README.md"), str(ModelCard(card)))


def push_to_hub(args: argparse.Namespace) -> str | None:
    """Upload --output_dir as a Hub model repo: the adapter, its card, the validation grids and metrics
    (no checkpoints, no class images). Offline, upload nothing and say how to do it later."""
    repo_id = args.hub_model_id or Path(args.output_dir).resolve().name
    excluded = ["checkpoint-*", "class_images", DRIFT_FOLDER, args.logging_dir, ".*"]
    if hub_constants.HF_HUB_OFFLINE:
        patterns = " ".join(f'--exclude "{p}/*"' for p in excluded[:-1])
        logger.warning(
            f"--push_to_hub: offline (HF_HUB_OFFLINE), nothing uploaded. {args.output_dir} is laid out for the "
            f"Hub; upload it later with: hf upload {repo_id} {args.output_dir} {patterns}"
        )
        return None
    repo_id = create_repo(repo_id, exist_ok=True, token=args.hub_token).repo_id
    upload_folder(
        repo_id=repo_id,
        folder_path=args.output_dir,
        ignore_patterns=[f"{p}/*" for p in excluded] + excluded,
        token=args.hub_token,
        commit_message=f"{args.adapter} DreamBooth adapter",
    )
    logger.info(f"Uploaded {args.output_dir} to https://huggingface.co/{repo_id}")
    return repo_id


def main(args: argparse.Namespace) -> dict:
    """Train; returns the metrics it also writes to <output_dir>/metrics.json."""
    start_time = time.time()
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=args.report_to,
        project_config=ProjectConfiguration(
            project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, args.logging_dir)
        ),
        cpu=accelerator_is_cpu_cluster(),
    )
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    logger.info(accelerator.state, main_process_only=False)
    if accelerator.is_local_main_process:
        transformers.utils.logging.set_verbosity_warning()
        diffusers.utils.logging.set_verbosity_warning()
    else:
        transformers.utils.logging.set_verbosity_error()
        diffusers.utils.logging.set_verbosity_error()
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True

    # The model family (a hub model's is read here, from its configs, before any weights are loaded).
    base = args.pretrained_model_name_or_path
    hub = {"revision": args.revision, "cache_dir": args.cache_dir}
    if args.family:  # a local base: checked with the other arguments
        family = FAMILIES[args.family]
    else:
        family = hub_family(base, hub)
        args.family = family.name
        refusal = family_settings(family, args)
        if refusal:
            raise SystemExit(refusal)
        check_output_dir(SystemExitParser(), args)
    logger.info(f"Base model: {family.title} ({family.pipeline_class})")
    # The training resolution, from the configs: class images are drawn at it, before any weights load.
    vae_config = AutoencoderKL.load_config(base, subfolder="vae", **hub)
    denoiser_config = family.denoiser_class().load_config(base, subfolder=family.denoiser, **hub)
    vae_scale_factor = 2 ** (len(vae_config["block_out_channels"]) - 1)
    multiple = vae_scale_factor * family.resolution_multiple(denoiser_config)
    args.resolution = args.resolution or family.default_resolution(denoiser_config, vae_scale_factor)
    if args.resolution % multiple:
        raise SystemExit(
            f"--resolution must be a multiple of {multiple} for this model, got {args.resolution}"
        )

    set_seed(args.seed)
    if args.with_prior_preservation:
        generate_class_images(args, accelerator)
    drift_images = drift_class_images(args, accelerator)
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
        for stale in Path(args.output_dir).glob(".checkpoint-*.partial"):  # a save that was killed
            shutil.rmtree(stale, ignore_errors=True)
        if args.overwrite_output_dir and not args.resume_from_checkpoint:
            for old in checkpoint_folders(args.output_dir):
                logger.info(f"Removing {old} (--overwrite_output_dir)")
                shutil.rmtree(old)
        write_atomically(Path(args.output_dir, RUN_FILE), json.dumps(run_identity(args), indent=2))
        if args.with_prior_preservation:
            save_class_image_grid(args)
    accelerator.wait_for_everyone()

    # Load the base model; only the adapters will train.
    tokenizers = [AutoTokenizer.from_pretrained(base, subfolder=name, **hub) for name in family.tokenizers()]
    noise_scheduler = family.noise_scheduler_class().from_pretrained(base, subfolder="scheduler", **hub)
    text_encoders = {
        name: family.text_encoder_class(name).from_pretrained(
            base, subfolder=name, variant=args.variant, **hub
        )
        for name in family.text_encoders
    }
    vae = AutoencoderKL.from_pretrained(base, subfolder="vae", variant=args.variant, **hub)
    denoiser = family.denoiser_class().from_pretrained(
        base, subfolder=family.denoiser, variant=args.variant, **hub
    )

    vae.requires_grad_(False)
    denoiser.requires_grad_(False)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(
        accelerator.mixed_precision, torch.float32
    )
    denoiser.to(accelerator.device, dtype=weight_dtype)
    vae.to(accelerator.device, dtype=torch.float32 if family.vae_in_float32 else weight_dtype)
    for text_encoder in text_encoders.values():
        text_encoder.requires_grad_(False)
        text_encoder.to(accelerator.device, dtype=weight_dtype)
    if args.enable_xformers_memory_efficient_attention:
        denoiser.enable_xformers_memory_efficient_attention()

    # The adapters: zero-initialised (the model starts exactly at the base), float32, trainable.
    # Same seed on every process, so data-parallel ranks start identical.
    torch.manual_seed(args.seed)
    # Tucker convolutions without --conv_rank: the sizes the defaults were chosen at (plugin.budget): liera's
    # at LoRA's parameter count at --rank, flora's at channel ranks 2x --rank; --rank read literally
    # ([8, 8, 3, 3]) learns less and loses a new shape.
    adapter_config = with_default_conv_rank(adapter_config_from(args, display_name(base)), denoiser)
    conv_rank = adapter_config.conv_rank or adapter_config.rank  # --conv_rank, or the one chosen for it
    adapted = plugin.add_adapter(denoiser, adapter_config, ADAPTER_NAME)
    trained = {family.denoiser: denoiser}
    if args.train_text_encoder:
        for name in family.trainable_text_encoders:
            targets = family.text_encoder_targets(name, text_encoders[name])
            text_config = dataclasses.replace(adapter_config, targets=targets, conv_rank=None)
            adapted += plugin.add_adapter(text_encoders[name], text_config, ADAPTER_NAME)
            trained[name] = text_encoders[name]
    logger.info(
        f"{args.adapter} adapters on {len(adapted)} layers of {', '.join(trained)}: "
        f"{sum(plugin.trainable_parameters(m) for m in trained.values()):,} trainable parameters "
        f"(rank {args.rank}, conv rank {conv_rank})"
    )
    # --train_text_encoder_ti: the identifier's new token embeddings, the one part of the text encoders
    # that trains (beside their adapters, if --train_text_encoder asks for them too).
    pivotal, prepared_models = None, dict(trained)
    if args.train_text_encoder_ti:
        pairs = [(tokenizers[i], text_encoders[name]) for i, name in enumerate(family.text_encoders)]
        pivotal = IdentifierEmbeddings(pairs, args.identifier_tokens, seed=args.seed)
        prepared_models.update({name: text_encoders[name] for name in family.text_encoders})
        logger.info(
            f"Pivotal tuning: {args.token_abstraction!r} learnt as {''.join(args.identifier_tokens)} in "
            f"{', '.join(family.text_encoders)}"
        )
    if args.gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
        for name in trained:
            if name != family.denoiser:
                text_encoders[name].gradient_checkpointing_enable()

    def unwrapped() -> dict[str, torch.nn.Module]:
        """The denoiser and text encoders, adapters included, by their pipeline names."""
        models = {name: accelerator.unwrap_model(model) for name, model in text_encoders.items()}
        return {family.denoiser: accelerator.unwrap_model(denoiser), **models}

    def training_pipeline():
        """The base pipeline around the models being trained, adapters included, for validation."""
        tokenizer_components = dict(zip(family.tokenizers(), tokenizers))
        return load_pipeline(
            args, accelerator.device, weight_dtype, **unwrapped(), vae=vae, **tokenizer_components
        )

    names_of = {id(model): name for name, model in prepared_models.items()}

    def components_of(models: list[torch.nn.Module]) -> dict[str, torch.nn.Module]:
        return {
            names_of[id(accelerator.unwrap_model(model))]: accelerator.unwrap_model(model) for model in models
        }

    # Checkpoints hold the adapter as a liera/1 or liera/2 file (not pickled model weights): these hooks
    # replace accelerate's model saving and loading.
    def save_model_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            components = {k: v for k, v in components_of(models).items() if k in trained}
            if pivotal is not None:
                save_embeddings(
                    Path(output_dir, EMBEDDINGS_FILENAME),
                    pivotal.state(),
                    args.identifier_tokens,
                    args.token_abstraction,
                )
            plugin.save_adapter(
                Path(output_dir, ADAPTER_FILENAME), components, ADAPTER_NAME, base_model=display_name(base)
            )
            state = training_state(components, ADAPTER_NAME)
            if any(key.startswith("frozen.") for key in state):
                save_file(
                    {k: v.contiguous() for k, v in state.items()}, Path(output_dir, TRAINING_STATE_FILENAME)
                )
        weights.clear()  # nothing else to save for the models

    def load_model_hook(models, input_dir):
        components = {k: v for k, v in components_of(models).items() if k in trained}
        models.clear()  # accelerate must not load model weights itself
        if pivotal is not None:
            pivotal.load_state(read_embeddings(Path(input_dir, EMBEDDINGS_FILENAME))[0])
        state_file = Path(input_dir, TRAINING_STATE_FILENAME)
        if state_file.is_file():
            tensors = load_file(state_file)
        else:
            tensors, _ = plugin.read_adapter_file(Path(input_dir, ADAPTER_FILENAME))
        copy_adapter_tensors(
            restore_training_state(components, ADAPTER_NAME, tensors), components, ADAPTER_NAME
        )

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)

    if args.scale_lr:
        batch = args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
        args.learning_rate *= batch
        if args.conv_learning_rate is not None:
            args.conv_learning_rate *= batch
        if args.text_encoder_lr is not None:
            args.text_encoder_lr *= batch
    optimizer_groups = parameter_groups(
        trained, args.learning_rate, args.conv_learning_rate, args.text_encoder_lr
    )
    if pivotal is not None:
        # Its own group (a text encoder adapted too would otherwise list the embeddings among its tensors).
        rows = {id(p) for p in pivotal.parameters()}
        for group in optimizer_groups:
            group["params"] = [p for p in group["params"] if id(p) not in rows]
        rate = args.text_encoder_lr if args.text_encoder_lr is not None else args.learning_rate
        optimizer_groups = [group for group in optimizer_groups if group["params"]]
        optimizer_groups.append({"params": pivotal.parameters(), "lr": rate})
    params_to_optimize = [p for group in optimizer_groups for p in group["params"]]
    optimizer_options = {}
    if args.use_8bit_adam:
        import bitsandbytes

        optimizer_class = bitsandbytes.optim.AdamW8bit
    else:
        optimizer_class = torch.optim.AdamW
        # On a GPU, one fused kernel updates every tensor: the eager step launches a few per tensor,
        # and a training step of adapters is bound by kernel launches (benchmarks/profile_step.py).
        optimizer_options["fused"] = accelerator.device.type == "cuda"
    optimizer = optimizer_class(
        optimizer_groups,
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
        **optimizer_options,
    )

    # Prompts to ids (several tokenizers: their ids side by side) and ids to the denoiser's conditioning.
    text_length = args.max_sequence_length if family.flow_matching else args.tokenizer_max_length

    def tokenize(prompt: str) -> torch.Tensor:
        return family.tokenize(tokenizers, prompt, text_length)

    def encode(ids: torch.Tensor, models: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
        rows = family.split_ids(tokenizers, ids, text_length)
        return family.encode([models[name] for name in family.text_encoders], rows)

    train_dataset = DreamBoothDataset(
        instance_images=args.train_images,
        instance_prompt=args.instance_prompt,
        tokenizer=tokenizers[0],
        tokenize=tokenize,
        resolution=args.resolution,
        center_crop=args.center_crop,
        random_flip=args.random_flip,
        random_zoom=args.random_zoom or 1.0,
        class_images=list_images(args.class_data_dir)[: args.num_class_images]
        if args.with_prior_preservation
        else None,
        class_prompt=args.class_prompt,
        class_prompts=class_captions(args),
        seed=args.seed,
        tokenizer_max_length=args.tokenizer_max_length,
        instance_prompts=args.instance_prompts,
    )
    prompt_embeddings = None
    if args.pre_compute_text_embeddings:
        # Every prompt a batch can hold (the instance prompts or captions, the class prompt), encoded
        # once by the frozen text encoder, by its token ids.
        ids = [train_dataset.instance_prompt_ids]
        if train_dataset.class_prompt_ids is not None:
            ids.append(train_dataset.class_prompt_ids)
        ids = torch.cat(ids)
        with torch.no_grad():
            encoded = encode(ids.to(accelerator.device), text_encoders)
        prompt_embeddings = {
            tuple(row): {key: value[i] for key, value in encoded.items()}
            for i, row in enumerate(ids.tolist())
        }
    # --text_encoder_preservation: the base text encoders' output for prompts without the identifier,
    # which the adapted ones must keep (each step draws train_batch_size of them).
    preserved_ids, preserved = None, {}
    if args.text_encoder_preservation:
        kept_prompts = dict.fromkeys(["", args.class_prompt or "", *(args.class_prompts or [])])
        preserved_ids = torch.cat([tokenize(prompt) for prompt in kept_prompts]).to(accelerator.device)
        adapted_encoders = [text_encoders[name] for name in trained if name != family.denoiser]
        for text_encoder in adapted_encoders:
            plugin.disable_adapters(text_encoder)
        with torch.no_grad():
            preserved = encode(preserved_ids, text_encoders)
        for text_encoder in adapted_encoders:
            plugin.enable_adapters(text_encoder)
        logger.info(
            f"  Text encoder preservation on {len(kept_prompts)} prompts, weight {args.text_encoder_preservation}"
        )

    train_dataloader = torch.utils.data.DataLoader(
        train_dataset,
        batch_size=args.train_batch_size,
        sampler=EpochSampler(len(train_dataset), seed=args.seed),
        collate_fn=functools.partial(collate_fn, with_prior_preservation=args.with_prior_preservation),
        num_workers=args.dataloader_num_workers,
    )

    # The scheduler counts every process's steps (accelerate steps it once per process).
    num_update_steps_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
    if args.max_train_steps is None:
        args.max_train_steps = args.num_train_epochs * num_update_steps_per_epoch
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=args.max_train_steps * accelerator.num_processes,
        num_cycles=args.lr_num_cycles,
        power=args.lr_power,
    )
    if args.relora_steps:
        # ReLoRA's jagged schedule: the chosen one, warmed up again after every restart.
        jagged = [
            restart_warmup(
                schedule,
                args.relora_steps * accelerator.num_processes,
                args.relora_warmup_steps * accelerator.num_processes,
            )
            for schedule in lr_scheduler.lr_lambdas
        ]
        lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, jagged)

    prepared = accelerator.prepare(*prepared_models.values(), optimizer, train_dataloader, lr_scheduler)
    trained_names = list(prepared_models)  # the models as the loop calls them (DDP-wrapped when distributed)
    for name, model in zip(trained_names, prepared):
        if name == family.denoiser:
            denoiser = model
        else:
            text_encoders[name] = model
    optimizer, train_dataloader, lr_scheduler = prepared[-3:]
    num_update_steps_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
    args.num_train_epochs = math.ceil(args.max_train_steps / num_update_steps_per_epoch)

    if accelerator.is_main_process:
        per_image = ("train_images", "instance_prompts", "heldout_images", "heldout_prompts")  # too long
        config = {
            k: v if isinstance(v, (int, float, str, bool)) else str(v)
            for k, v in vars(args).items()
            if k not in per_image
        }
        accelerator.init_trackers("dreambooth-liera", config=config)

    total_batch_size = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info("***** Running training *****")
    logger.info(f"  Num examples = {len(train_dataset)}")
    if args.instance_prompts:
        logger.info(f"  Prompts = per-image captions ({len(set(args.instance_prompts))} distinct)")
    else:
        logger.info(f"  Prompt = {args.instance_prompt!r}")
    logger.info(f"  Num batches each epoch = {len(train_dataloader)}")
    logger.info(f"  Num Epochs = {args.num_train_epochs}")
    logger.info(f"  Instantaneous batch size per device = {args.train_batch_size}")
    logger.info(f"  Total train batch size (w. parallel, distributed & accumulation) = {total_batch_size}")
    logger.info(f"  Gradient Accumulation steps = {args.gradient_accumulation_steps}")
    logger.info(f"  Total optimization steps = {args.max_train_steps}")
    logger.info(f"  Num held-out images = {len(args.heldout_images)} (never trained on)")

    # The held-out loss, evaluated before training, every --validation_steps and at the end, on the
    # main process only (the unwrapped models: no collective operation, so no process waits on it).
    heldout_images = [load_rgb(path) for path in args.heldout_images]
    heldout = HeldoutTrack()

    def family_loss(
        models: dict, tokenizers: list, images: list[Image.Image], prompts: str | list[str]
    ) -> float:
        """The held-out measure's denoising loss (plugin.training.denoising_loss) for this family."""
        return family.denoising_loss(
            models, tokenizers, noise_scheduler, images, prompts, args.resolution, seed=args.seed,
            max_length=text_length, guidance_scale=args.guidance_scale or 0.0,
        )  # fmt: skip

    def evaluate_heldout(step: int) -> None:
        models = unwrapped()
        modes = {name: model.training for name, model in models.items()}
        for model in models.values():
            model.eval()
        prompts = args.heldout_prompts
        if step == 0 and pivotal is not None:  # the base, with the prompts as written for it
            prompts = unpivoted(prompts, args)
        with accelerator.autocast():
            loss = family_loss({**models, "vae": vae}, tokenizers, heldout_images, prompts)
        for name, model in models.items():
            model.train(modes[name])
        tensors = None
        if args.keep_best_heldout:
            tensors = training_state(trained, ADAPTER_NAME)
            if pivotal is not None:  # the identifier's rows of that step too, apart by their prefix
                tensors.update({PIVOTAL_KEY + key: rows for key, rows in pivotal.state().items()})
        heldout.add(step, loss, tensors)
        accelerator.log({"heldout_loss": loss}, step=step)
        logger.info(f"Held-out denoising loss at step {step}: {loss:.4f}")

    global_step, first_epoch, losses = 0, 0, []
    if args.resume_from_checkpoint:
        path = resume_checkpoint(args)
        if path is None:
            accelerator.print("No checkpoint in --output_dir yet. Starting a new training run.")
        else:
            accelerator.print(f"Resuming from checkpoint {path}")
            refuse_other_conv_ranks(path, adapter_config)
            global_step = int(path.name.split("-")[1])
            try:
                accelerator.load_state(str(path))
                if (path / "losses.json").is_file():
                    losses = json.loads((path / "losses.json").read_text())[:global_step]
                heldout.load(path, global_step)
            except Exception as error:  # any damaged file of the checkpoint: say which, not a bare EOFError
                raise SystemExit(
                    f"--resume_from_checkpoint: {path} is damaged ({type(error).__name__}: {error}); resume from "
                    "an earlier checkpoint (--resume_from_checkpoint <its folder>) or delete this one"
                ) from error
            first_epoch = global_step // num_update_steps_per_epoch
            if args.keep_best_heldout and heldout.kept_tensors is None:
                logger.warning(
                    f"{path} holds no kept adapter (made without --keep_best_heldout?): the adapter saved "
                    f"will be the best of the evaluations from step {global_step} on, if one beats the earlier ones"
                )
    # Batches (per process) of the first epoch that the checkpoint has already trained on.
    resume_batches = min(
        (global_step % num_update_steps_per_epoch) * args.gradient_accumulation_steps, len(train_dataloader)
    )

    validation = args.num_validation_images > 0
    if heldout_images and global_step == 0 and accelerator.is_main_process:
        evaluate_heldout(0)
    if validation and global_step == 0 and accelerator.is_main_process:
        # The base draws the prompts as written for it (pivotal tuning's tokens are untrained yet).
        written = unpivoted(args.validation_prompts, args) if pivotal is not None else None
        log_validation(training_pipeline(), args, accelerator, "before", step=0, prompts=written)

    noise_options = NoiseOptions(
        noise_offset=args.noise_offset,
        snr_gamma=args.snr_gamma,
        weighting_scheme=args.weighting_scheme,
        logit_mean=args.logit_mean,
        logit_std=args.logit_std,
        mode_scale=args.mode_scale,
    )
    latent_cache: dict[bytes, torch.Tensor] = {}  # --cache_latents: image bytes -> VAE moments
    cache_uses = 0

    def latent_distribution(pixels: torch.Tensor) -> DiagonalGaussianDistribution:
        """The VAE's posterior of a batch; with --cache_latents each image is encoded once (the same
        crop always gives the same posterior, so sampling it draws exactly what encoding would)."""
        if not args.cache_latents:
            return vae.encode(pixels).latent_dist
        nonlocal cache_uses
        cache_uses += len(pixels)
        moments = []
        for image in pixels:
            key = hashlib.sha1(image.float().cpu().numpy().tobytes()).digest()
            if key not in latent_cache:
                with torch.no_grad():
                    latent_cache[key] = vae.encode(image[None]).latent_dist.parameters
            moments.append(latent_cache[key])
        return DiagonalGaussianDistribution(torch.cat(moments))

    progress_bar = tqdm(
        range(args.max_train_steps),
        initial=global_step,
        desc="Steps",
        disable=not accelerator.is_local_main_process,
    )
    step_losses = []  # of the batches accumulated into the current step, on the device
    read_losses = StepLosses(accelerator, losses, args.learning_rate, progress_bar)
    loop_start, first_step = time.time(), global_step
    # The step and time after the first WARM_UP_STEPS: the steady speed leaves compilation
    # (--dynamo_backend) and first-call caches out.
    warm = None
    for epoch in range(first_epoch, args.num_train_epochs):
        for name in trained_names:
            (denoiser if name == family.denoiser else text_encoders[name]).train()
        skipped = resume_batches if epoch == first_epoch else 0
        loader = accelerator.skip_first_batches(train_dataloader, skipped) if skipped else train_dataloader
        loader.set_epoch(epoch)
        for step, batch in enumerate(loader, start=skipped):
            # Every random draw of this batch depends only on where it is in the run.
            generator = seeded_generator(
                NOISE_KEY, args.seed, epoch * len(train_dataloader) + step, accelerator.process_index
            )
            with accelerator.accumulate(*prepared[: len(prepared_models)]):
                pixel_values = batch["pixel_values"].to(dtype=vae.dtype)
                posterior = latent_distribution(pixel_values)
                latents = family.to_latents(vae, posterior.sample(generator=generator)).to(weight_dtype)
                noised = family.noised(noise_scheduler, latents, generator, noise_options)
                if preserved_ids is not None:
                    # One call for the batch's prompts and the preserved ones (a DDP model runs once a step).
                    count = len(batch["input_ids"])
                    drawn = torch.randint(len(preserved_ids), (args.train_batch_size,), generator=generator)
                    drawn = drawn.to(preserved_ids.device)
                    ids = torch.cat([batch["input_ids"], preserved_ids[drawn]])
                    encoded = encode(ids, text_encoders)
                    conditioning = {key: value[:count] for key, value in encoded.items()}
                    preservation_loss = sum(
                        F.mse_loss(value[count:].float(), preserved[key][drawn].float())
                        for key, value in encoded.items()
                    )
                elif prompt_embeddings is None:
                    conditioning = encode(batch["input_ids"], text_encoders)
                else:
                    rows = [prompt_embeddings[tuple(row)] for row in batch["input_ids"].tolist()]
                    conditioning = {key: torch.stack([row[key] for row in rows]) for key in rows[0]}
                extras = family.extras(
                    batch["original_sizes"], batch["crop_top_lefts"], args.resolution, args.guidance_scale
                )
                conditioning.update({key: value.to(latents.device) for key, value in extras.items()})
                model_pred = family.predict(denoiser, noised.noisy, noised.timesteps, conditioning)
                per_example = family.per_example_loss(model_pred, noised)
                if args.with_prior_preservation:
                    instance_loss, prior_loss = torch.chunk(per_example, 2)
                    loss = instance_loss.mean() + args.prior_loss_weight * prior_loss.mean()
                else:
                    loss = per_example.mean()
                if preserved_ids is not None:
                    loss = loss + args.text_encoder_preservation * preservation_loss
                if args.mpc:
                    loss = loss + args.mpc_weight * mpc_penalty(trained.values(), ADAPTER_NAME, args.mpc)

                # The mean over all processes, for the loss curve (read later, StepLosses).
                step_losses.append(accelerator.gather(loss.detach()[None]).mean())
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(params_to_optimize, args.max_grad_norm)
                optimizer.step()
                if pivotal is not None:
                    pivotal.restore()
                lr_scheduler.step()
                optimizer.zero_grad()

            if accelerator.sync_gradients:
                progress_bar.update(1)
                global_step += 1
                if global_step - first_step == min(WARM_UP_STEPS, (args.max_train_steps - first_step) // 2):
                    warm = (global_step, time.time())
                if (
                    args.relora_steps
                    and global_step % args.relora_steps == 0
                    and global_step < args.max_train_steps
                ):
                    # Every process restarts alike (same seed); a checkpoint of this step holds the result.
                    seed = int(
                        np.random.SeedSequence([RELORA_KEY, args.seed, global_step]).generate_state(1)[0]
                    )
                    for model in trained.values():
                        for param in restart(model, ADAPTER_NAME, seed):
                            optimizer.state.pop(param, None)
                shown = {"lr": lr_scheduler.get_last_lr()[0]}
                if preserved_ids is not None:  # how far the text encoder moved on the preserved prompts
                    shown["te_drift"] = preservation_loss.detach()
                read_losses.add(global_step, torch.stack(step_losses).mean(), shown)
                step_losses = []
                if global_step % args.checkpointing_steps == 0 or global_step % args.validation_steps == 0:
                    read_losses.read()  # the checkpoint keeps the curve; a diverged run keeps none
                if accelerator.is_main_process:
                    # Before the checkpoint, which keeps the held-out curve.
                    if heldout_images and (
                        global_step % args.validation_steps == 0 or global_step == args.max_train_steps
                    ):
                        evaluate_heldout(global_step)
                    if global_step % args.checkpointing_steps == 0:
                        save_checkpoint(accelerator, args, global_step, losses, heldout)
                    if (
                        validation
                        and global_step % args.validation_steps == 0
                        and global_step < args.max_train_steps
                    ):
                        name = f"step-{global_step:06d}"
                        log_validation(training_pipeline(), args, accelerator, name, global_step)

            if global_step >= args.max_train_steps:
                break
        epoch_validation = args.validation_epochs and (epoch + 1) % args.validation_epochs == 0
        if (
            validation
            and epoch_validation
            and global_step < args.max_train_steps
            and accelerator.is_main_process
        ):
            log_validation(training_pipeline(), args, accelerator, f"epoch-{epoch + 1:04d}", global_step)
    read_losses.read()
    progress_bar.close()
    train_seconds = time.time() - loop_start
    steady_rate = None
    if warm is not None and global_step > warm[0]:
        steady_rate = (global_step - warm[0]) / (time.time() - warm[1])
    if args.cache_latents:
        logger.info(f"--cache_latents: {len(latent_cache)} image crops encoded once, for {cache_uses} uses")

    # Save the adapter, then check the file: load it into a fresh pipeline, make the final images
    # and measure the denoising losses with the adapter off (the base model) and on.
    accelerator.wait_for_everyone()
    if not all(torch.isfinite(p).all() for p in params_to_optimize):
        raise SystemExit(
            f"The adapter diverged (NaN/inf). Lower --learning_rate (it is {args.learning_rate:g})."
        )
    rank_difference = None
    if accelerator.num_processes > 1:
        flat = torch.cat([p.detach().float().flatten() for p in params_to_optimize])
        everyone = accelerator.gather(flat[None])
        rank_difference = (everyone - everyone[0]).abs().max().item()
        logger.info(f"Largest adapter difference between ranks: {rank_difference}")
    if args.save_every_rank:
        plugin.save_adapter(
            Path(args.output_dir, f"adapter_rank{accelerator.process_index}.safetensors"),
            trained,
            ADAPTER_NAME,
            base_model=display_name(base),
        )
    metrics = {}
    if accelerator.is_main_process:
        adapter_step = global_step
        if args.keep_best_heldout and heldout.kept_tensors is not None:
            # The live adapter of this (main) process becomes the best one: training is over.
            kept = dict(heldout.kept_tensors)
            rows = {
                key[len(PIVOTAL_KEY) :]: kept.pop(key) for key in list(kept) if key.startswith(PIVOTAL_KEY)
            }
            if pivotal is not None:
                pivotal.load_state(rows)
            kept = restore_training_state(trained, ADAPTER_NAME, kept)
            copy_adapter_tensors(kept, trained, ADAPTER_NAME)
            adapter_step = heldout.kept_step
            logger.info(
                f"Keeping the adapter of step {adapter_step}, the lowest held-out loss "
                f"({heldout.loss_at(adapter_step):.4f}; --keep_best_heldout)"
            )
        adapter_path = plugin.save_adapter(
            Path(args.output_dir, ADAPTER_FILENAME), trained, ADAPTER_NAME, base_model=display_name(base)
        )
        logger.info(f"Saved the adapter to {adapter_path}")
        pipeline = load_pipeline(args, accelerator.device, weight_dtype)
        loaded = {name: getattr(pipeline, name) for name in trained}
        plugin.load_adapter(adapter_path, loaded)
        file_difference = saved_file_difference(
            {name: accelerator.unwrap_model(model) for name, model in trained.items()}, pipeline, args
        )
        if pivotal is not None:
            embeddings_path = save_embeddings(
                Path(args.output_dir, EMBEDDINGS_FILENAME),
                pivotal.state(),
                args.identifier_tokens,
                args.token_abstraction,
            )
            logger.info(f"Saved the identifier's embeddings to {embeddings_path}")
            load_embeddings(pipeline, embeddings_path)  # diffusers' load_textual_inversion
            file_difference = max(file_difference, embeddings_difference(pivotal, pipeline, family))
        logger.info(
            f"The saved file reproduces the trained model to {file_difference:.2e} (largest output difference)"
        )
        changed_most, weight_change = largest_weight_change(loaded)
        message = f"Largest weight change: {weight_change:.3g} x ||W|| at {changed_most}"
        if weight_change > 1:
            logger.warning(
                f"{message}: the adapter changes that layer by more than its own size (often hidden by a "
                "normalisation after it). Exports and half-precision merges may overflow there; a lower "
                "--learning_rate or --scale keeps it smaller."
            )
        else:
            logger.info(message)

        def before_after(images: list[Image.Image], prompts: str | list[str]) -> tuple[float, float]:
            """The denoising loss of the base model and of the saved adapter: same images, timesteps, noise."""
            losses_of = []
            models = {
                name: getattr(pipeline, name) for name in (family.denoiser, "vae", *family.text_encoders)
            }
            tokenizers_of = [getattr(pipeline, name) for name in family.tokenizers()]
            for enabled in [False, True]:
                for model in loaded.values():
                    plugin.enable_adapters(model, enabled)
                # The base model is measured with the prompts as written for it: the identifier's word.
                said = prompts if enabled or pivotal is None else unpivoted(prompts, args)
                with accelerator.autocast():
                    losses_of.append(family_loss(models, tokenizers_of, images, said))
            return losses_of[0], losses_of[1]

        train_images = [load_rgb(path) for path in args.train_images]
        fit = before_after(train_images, args.instance_prompts or args.instance_prompt)
        logger.info(f"Denoising loss on the training images (fit): {fit[0]:.4f} -> {fit[1]:.4f}")
        general = before_after(heldout_images, args.heldout_prompts) if heldout_images else (None, None)
        if heldout_images:
            logger.info(
                f"Held-out denoising loss on {len(heldout_images)} images training never saw (generalisation): "
                f"{general[0]:.4f} -> {general[1]:.4f} (x{general[1] / general[0]:.3f})"
            )
        else:
            logger.info(
                "Held-out denoising loss: not measured, no held-out images (give some with --heldout_data_dir, "
                f"a {HELDOUT_FOLDER}/ folder in --instance_data_dir, or --num_heldout_images N)"
            )
        drift = (None, None)
        if drift_images:
            drift = before_after([load_rgb(path) for path in drift_images], args.class_prompt)
            logger.info(
                f"Prior drift, denoising loss on {len(drift_images)} class images with {args.class_prompt!r}: "
                f"{drift[0]:.4f} -> {drift[1]:.4f} ({100 * (drift[1] / drift[0] - 1):+.1f} %)"
            )
        elif not args.class_prompt:
            logger.info(
                f"Prior drift: not measured, no class prompt (give --class_prompt, or class_prompt in "
                f"{Path(args.instance_data_dir, PROMPTS_FILE)})"
            )
        else:
            logger.info("Prior drift: not measured (--num_drift_images 0)")
        if validation:
            log_validation(pipeline, args, accelerator, "final", args.max_train_steps)
            folder = Path(args.output_dir, "validation")
            if (folder / "before.png").is_file():
                before, after = Image.open(folder / "before.png"), Image.open(folder / "final.png")
                if before.size == after.size:  # side by side, a white gap between
                    gap = max(2, before.width // 64)
                    both = Image.new("RGB", (2 * before.width + gap, before.height), "white")
                    both.paste(before, (0, 0))
                    both.paste(after, (before.width + gap, 0))
                    both.save(folder / "before_after.png")

        window = max(1, len(losses) // 10)  # the loss is noisy (random timesteps): average 10% of the steps
        metrics = {
            "adapter": args.adapter,
            "conv_rank": conv_rank,
            "steps": global_step,
            "wall_time_s": round(time.time() - start_time, 1),
            "train_loop_time_s": round(train_seconds, 1),
            "steady_steps_per_s": None if steady_rate is None else round(steady_rate, 2),
            "num_processes": accelerator.num_processes,
            "loss_start": round(float(np.mean(losses[:window])), 6) if losses else None,
            "loss_end": round(float(np.mean(losses[-window:])), 6) if losses else None,
            "loss_window": window,
            "num_train_images": len(train_images),
            "train_images_loss_before": fit[0],
            "train_images_loss_after": fit[1],
            "num_heldout_images": len(heldout_images),
            "heldout_loss_before": general[0],
            "heldout_loss_after": general[1],
            "heldout_loss_ratio": general[1] / general[0] if heldout_images else None,
            "num_drift_images": len(drift_images),
            "class_loss_before": drift[0],
            "class_loss_after": drift[1],
            "prior_drift_percent": 100 * (drift[1] / drift[0] - 1) if drift_images else None,
            # The held-out loss during training (step 0: the base); the adapter saved is that of the
            # last step, or of best_step with --keep_best_heldout. A resumed run's curve comes from its checkpoint.
            "heldout_curve": heldout.curve if heldout_images else None,
            "best_step": heldout.best_step(),
            "adapter_step": adapter_step,
            "max_abs_diff_between_ranks": rank_difference,
            "saved_vs_trained_max_abs_diff": file_difference,
            # max over adapted layers of ||W' - W|| / ||W||, and that layer
            "largest_relative_weight_change": weight_change,
            "largest_weight_change_module": changed_most,
            "losses": [round(x, 6) for x in losses],
        }
        write_atomically(Path(args.output_dir, "metrics.json"), json.dumps(metrics, indent=1))
        write_model_card(args, metrics)
        if args.push_to_hub:
            push_to_hub(args)
        logger.info(
            f"Done in {metrics['wall_time_s']} s: loss {metrics['loss_start']} -> {metrics['loss_end']} "
            f"(means of {window} steps); outputs in {args.output_dir}"
        )
    accelerator.end_training()
    return metrics


if __name__ == "__main__":
    main(ARGS)
