#!/usr/bin/env python
"""Pretrain the toy Stable Diffusion-style base pipeline shipped in ``assets/toy-sd``.

The data is the procedural world of :mod:`plugin.toy.data`: one or two objects (four shapes, plain
or one of seven two-colour patterns, eight colours, sizes, positions) on a plain background, 64x64,
captioned "a red and white checked square and a blue circle on a green background". Combinations
in ``plugin.toy.data.HELDOUT`` never appear: they are the DreamBooth yardstick's subjects. The
recipe has five stages, each skipped when its output already exists in ``--work_dir``, and the
training stages checkpoint themselves (safetensors only), so killing and re-running the same
command resumes where it stopped:

1. tokenizer  a CLIP BPE tokenizer over a small word vocabulary (every caption word is one token;
              any other lowercase word still tokenizes, letter by letter), plus CLIP's byte alphabet.
2. vae        an ``AutoencoderKL`` 64x64x3 -> 16x16x4 (channels 32/64/64, 0.95M parameters),
              trained on L1 + MSE + a small KL, mostly on 32x32 crops (it is fully convolutional),
              then on whole images; its ``scaling_factor`` is set to 1 / std of the latents.
3. decoder    the decoder alone fine-tuned on whole images, half of them with two objects (the
              encoder, so the latent space, is unchanged).
4. latents    a fixed set of examples encoded once (posterior mean and std, and the scenes as JSON
              so that every step captions them afresh: size words, colours and background are
              randomly left out, so partial prompts are in distribution).
5. unet       a ``UNet2DConditionModel`` with Stable Diffusion's block types (channels 64/128/128,
              5.9M parameters) and a ``CLIPTextModel`` (4 layers, width 128, 0.9M) trained jointly
              under accelerate: epsilon prediction, min-SNR-5 loss weights (diffusers'
              ``compute_snr``), 10% of captions dropped to "" (so classifier-free guidance works),
              EMA weights (diffusers' ``EMAModel``). ``--mixed_precision bf16`` on a GPU.

The pipeline (EMA weights, a DPM-Solver++ scheduler with the training betas, no safety checker)
is then written with ``save_pretrained(..., safe_serialization=True)``, and the fine-tuning
subject (``plugin.toy.data.write_subject``) to ``--subject_dir``. To train longer, re-run
with a larger ``--unet_steps``; to ship a checkpoint early, re-run with ``--unet_steps`` at (or
below) its step: both resume from the last checkpoint.

    HF_HUB_OFFLINE=1 GLIBC_TUNABLES=glibc.malloc.mmap_threshold=1073741824:glibc.malloc.trim_threshold=4294967296 \\
        python train_scripts/pretrain_toy_base.py --output_dir assets/toy-sd --work_dir runs/toy-base

On one GPU: ``accelerate launch train_scripts/pretrain_toy_base.py --mixed_precision bf16 ...``
(the VAE stages move to the GPU as well).

(The ``GLIBC_TUNABLES`` setting is optional; it keeps glibc from returning and re-faulting the
activation memory on every step, which made CPU steps several times slower on our VM. On a machine
whose cores are busy with other work, ``--threads 1`` is far faster than oversubscribing them.)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from plugin.toy.data import (  # noqa: E402
    CAPTION_WORDS,
    Object,
    make_example,
    random_caption,
    write_subject,
)

#: Words that get their own token although no caption contains them: rare tokens for fine-tuning
#: ("a sks circle") and a few common prompt words.
EXTRA_WORDS = (
    "sks",
    "photo",
    "of",
    "the",
    "with",
    "stripes",
    "dots",
    "checks",
    "rings",
    "ball",
    "object",
    "shape",
)
MAX_LENGTH = 24


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output_dir", default="assets/toy-sd", help="where the final pipeline is saved")
    p.add_argument("--subject_dir", default="assets/subject", help="where the fine-tuning subject is written")
    p.add_argument("--work_dir", default="runs/toy-base", help="checkpoints and caches (not shipped)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    # VAE
    p.add_argument("--vae_steps", type=int, default=2400)
    p.add_argument("--vae_batch_size", type=int, default=32)
    p.add_argument("--vae_lr", type=float, default=1e-3)
    p.add_argument("--vae_kl_weight", type=float, default=1e-6)
    p.add_argument("--vae_pool", type=int, default=8192, help="images the VAE is trained on")
    p.add_argument("--decoder_steps", type=int, default=600, help="decoder-only fine-tuning steps")
    p.add_argument("--decoder_lr", type=float, default=3e-4)
    # latents / UNet
    p.add_argument("--num_examples", type=int, default=32768, help="examples encoded for the UNet")
    p.add_argument("--unet_steps", type=int, default=6000)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup_steps", type=int, default=100)
    p.add_argument("--caption_dropout", type=float, default=0.1)
    p.add_argument("--snr_gamma", type=float, default=5.0)
    p.add_argument("--ema_max_decay", type=float, default=0.999)
    p.add_argument("--checkpoint_every", type=int, default=100)
    p.add_argument(
        "--mixed_precision", default="no", choices=["no", "fp16", "bf16"], help="UNet stage, on a GPU"
    )
    p.add_argument("--cpu", action="store_true", help="stay on the CPU even when a GPU is there")
    return p.parse_args(argv)


def step_rng(seed: int, stage: int, step: int) -> tuple[np.random.Generator, torch.Generator]:
    """Randomness for one training step as a pure function of (seed, stage, step): resuming
    from a checkpoint replays exactly the batches and noise an uninterrupted run would have seen."""
    ss = np.random.SeedSequence([seed, stage, step])
    g = torch.Generator().manual_seed(int(ss.generate_state(1, dtype=np.uint64)[0] % (2**63)))
    return np.random.default_rng(ss), g


# ------------------------------------------------------------------------------------------------
# checkpoints: model + optimizer state in one safetensors file, the step in its metadata


def save_checkpoint(path: Path, models: dict, optimizer: torch.optim.Optimizer, step: int, extra=None):
    tensors = {}
    for name, module in models.items():
        for k, v in module.state_dict().items():
            tensors[f"{name}.{k}"] = v.detach().contiguous()
    opt = optimizer.state_dict()
    for pid, state in opt["state"].items():
        for k, v in state.items():
            tensors[f"optim.{pid}.{k}"] = torch.as_tensor(v).contiguous()
    for name, t in (extra or {}).items():
        tensors[name] = t.detach().contiguous()
    meta = {"step": str(step), "param_groups": json.dumps(opt["param_groups"])}
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)  # atomic: a kill mid-save never leaves a broken checkpoint


def load_checkpoint(path: Path, models: dict, optimizer: torch.optim.Optimizer) -> tuple[int, dict]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    for name, module in models.items():
        prefix = f"{name}."
        module.load_state_dict({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})
    state: dict = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, pid, key = k.split(".", 2)
            state.setdefault(int(pid), {})[key] = v
    optimizer.load_state_dict({"state": state, "param_groups": json.loads(meta["param_groups"])})
    extra = {k: v for k, v in tensors.items() if not k.startswith("optim.") and k.split(".")[0] not in models}
    return int(meta["step"]), extra


# ------------------------------------------------------------------------------------------------
# 1. tokenizer


def _bytes_to_unicode() -> list[str]:
    """CLIP's (GPT-2's) reversible byte -> printable unicode alphabet."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def build_tokenizer(out_dir: Path, words=CAPTION_WORDS + EXTRA_WORDS):
    """A CLIPTokenizer whose BPE merges spell every word of ``words`` as one token.

    Writes ``vocab.json`` and ``merges.txt`` (CLIP's original files, for slow tokenizers) and
    ``tokenizer.json`` (for fast ones) to ``out_dir`` and returns the tokenizer.
    """
    from transformers import CLIPTokenizer

    alphabet = _bytes_to_unicode()
    vocab = {c: i for i, c in enumerate(alphabet)}
    vocab.update({c + "</w>": len(alphabet) + i for i, c in enumerate(alphabet)})
    ranks: dict[tuple[str, str], int] = {}

    def bpe(symbols: list[str]) -> list[str]:
        while len(symbols) > 1:
            rank, i = min((ranks.get(p, math.inf), i) for i, p in enumerate(zip(symbols, symbols[1:])))
            if rank == math.inf:
                break
            symbols[i : i + 2] = [symbols[i] + symbols[i + 1]]
        return symbols

    # Add merges word by word, on top of whatever the earlier merges already do to the word, so
    # that a later merge never changes how an earlier word is split.
    for word in dict.fromkeys(words):
        segments = bpe(list(word[:-1]) + [word[-1] + "</w>"])
        prefix = segments[0]
        for nxt in segments[1:]:
            ranks[(prefix, nxt)] = len(ranks)
            prefix += nxt
            vocab.setdefault(prefix, len(vocab))
    merges = sorted(ranks, key=ranks.get)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)

    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_LENGTH)
    for word in dict.fromkeys(words):
        ids = tokenizer(word, add_special_tokens=False).input_ids
        assert len(ids) == 1, f"{word!r} -> {tokenizer.convert_ids_to_tokens(ids)}"
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n")
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return tokenizer


# ------------------------------------------------------------------------------------------------
# model configs


def vae_config() -> dict:
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * 3,
        "up_block_types": ["UpDecoderBlock2D"] * 3,
        "block_out_channels": [32, 64, 64],
        "layers_per_block": 1,
        "latent_channels": 4,
        "norm_num_groups": 8,
        "sample_size": 64,
    }


def unet_config() -> dict:
    return {
        "sample_size": 16,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "block_out_channels": [64, 128, 128],
        "layers_per_block": 1,
        "cross_attention_dim": 128,
        "attention_head_dim": 4,  # diffusers' name for the number of heads in this class
        "norm_num_groups": 8,
    }


def text_config(tokenizer) -> dict:
    return {
        "vocab_size": len(tokenizer),
        "hidden_size": 128,
        "intermediate_size": 512,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "max_position_embeddings": MAX_LENGTH,
        "projection_dim": 128,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def noise_scheduler_config() -> dict:
    """The DDPM training schedule (Stable Diffusion's betas); the shipped inference scheduler uses
    the same betas."""
    return {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "prediction_type": "epsilon",
    }


def device_for(args) -> str:
    """The GPU when there is one (and ``--cpu`` is not given), else the CPU."""
    return "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"


def lr_at(step: int, base: float, warmup: int, total: int | None = None, final_frac: float = 0.1) -> float:
    """Linear warm-up, then constant (``total=None``) or cosine decay to ``final_frac * base``."""
    if step < warmup:
        return base * (step + 1) / warmup
    if total is None:
        return base
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (final_frac + (1 - final_frac) * 0.5 * (1 + math.cos(math.pi * t)))


# ------------------------------------------------------------------------------------------------
# 2. VAE


def make_images(n: int, seed: int, desc: str) -> tuple[np.ndarray, list]:
    """``n`` examples with full captions: uint8 images (n, 64, 64, 3) and their Example records."""
    images = np.empty((n, 64, 64, 3), dtype=np.uint8)
    records = []
    for i in tqdm(range(n), desc=desc, mininterval=2):
        ex = make_example(seed * 1_000_003 + i, p_size_word=0, p_drop_colour=0, p_drop_background=0)
        images[i] = ex.image
        records.append(ex)
    return images, records


def to_model_range(images_u8: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images_u8).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def train_vae(args, work: Path):
    from diffusers import AutoencoderKL

    final = work / "vae"
    if (final / "config.json").exists():
        print(f"[vae] found {final}, skipping")
        return AutoencoderKL.from_pretrained(final)
    torch.manual_seed(args.seed)
    device = device_for(args)
    vae = AutoencoderKL(**vae_config()).to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    ckpt = work / "vae_checkpoint.safetensors"
    start = 0
    if ckpt.exists():
        start, _ = load_checkpoint(ckpt, {"vae": vae}, opt)
        print(f"[vae] resumed at step {start}")
    pool = to_model_range(make_images(args.vae_pool, args.seed + 1, "[vae] images")[0]).to(device)
    crop_until = int(0.75 * args.vae_steps)  # crops first (4x cheaper), whole images at the end
    vae.train()
    bar = tqdm(range(start, args.vae_steps), desc="[vae] train", initial=start, total=args.vae_steps)
    for step in bar:
        rng, g = step_rng(args.seed, 1, step)
        if step < crop_until:
            idx = torch.from_numpy(rng.integers(len(pool), size=args.vae_batch_size)).to(device)
            oy, ox = rng.integers(0, 33, size=2)
            x = pool[idx, :, oy : oy + 32, ox : ox + 32]
        else:
            idx = torch.from_numpy(rng.integers(len(pool), size=args.vae_batch_size // 2)).to(device)
            x = pool[idx]
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.vae_lr, 100, args.vae_steps)
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=g).to(device)
        rec = vae.decode(z).sample
        rec_loss = F.l1_loss(rec, x) + F.mse_loss(rec, x)
        kl = posterior.kl().mean()
        loss = rec_loss + args.vae_kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        bar.set_postfix(rec=f"{rec_loss.item():.4f}", kl=f"{kl.item():.0f}")
        if (step + 1) % args.checkpoint_every == 0 or step + 1 == args.vae_steps:
            save_checkpoint(ckpt, {"vae": vae}, opt, step + 1)
    vae.eval()
    # scaling_factor: make the latents of the data unit-variance, as SD's 0.18215 does for its VAE
    with torch.no_grad():
        n = min(2048, len(pool))
        z = torch.cat([vae.encode(pool[i : min(i + 256, n)]).latent_dist.mean for i in range(0, n, 256)])
        err = (vae.decode(z[:256]).sample - pool[:256]).abs().mean().item() * 127.5
    std = z.std().item()
    vae.register_to_config(scaling_factor=round(1.0 / std, 5))
    print(f"[vae] latent mean {z.mean().item():.3f} std {std:.3f} -> scaling_factor {1 / std:.5f}")
    print(f"[vae] mean abs reconstruction error {err:.2f} / 255")
    vae.save_pretrained(final, safe_serialization=True)
    return vae


# ------------------------------------------------------------------------------------------------
# 3. decoder


def finetune_decoder(args, work: Path, vae):
    """Fine-tune the decoder only (the encoder, hence the latent space, stays fixed) on whole
    images, half of them with two objects, for sharper patterns and truer colours."""
    from diffusers import AutoencoderKL

    final = work / "vae_ft"
    if (final / "config.json").exists():
        print(f"[decoder] found {final}, skipping")
        return AutoencoderKL.from_pretrained(final)
    if args.decoder_steps == 0:
        return vae
    vae.requires_grad_(False)
    vae.decoder.requires_grad_(True)
    vae.post_quant_conv.requires_grad_(True)
    params = [p for p in vae.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.decoder_lr, weight_decay=0.0)
    ckpt = work / "decoder_checkpoint.safetensors"
    start = 0
    if ckpt.exists():
        start, _ = load_checkpoint(ckpt, {"vae": vae}, opt)
        print(f"[decoder] resumed at step {start}")
    vae.train()
    bar = tqdm(
        range(start, args.decoder_steps), desc="[decoder] train", initial=start, total=args.decoder_steps
    )
    for step in bar:
        rng, g = step_rng(args.seed, 3, step)
        n = args.vae_batch_size // 2
        images = [make_example(rng, p_two_objects=0.5).image for _ in range(n)]
        x = to_model_range(np.stack(images)).to(vae.device)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.decoder_lr, 50, args.decoder_steps)
        with torch.no_grad():
            posterior = vae.encode(x).latent_dist
            z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=g).to(vae.device)
        rec = vae.decode(z).sample
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        bar.set_postfix(rec=f"{loss.item():.4f}")
        if (step + 1) % args.checkpoint_every == 0 or step + 1 == args.decoder_steps:
            save_checkpoint(ckpt, {"vae": vae}, opt, step + 1)
    vae.eval()
    vae.requires_grad_(False)
    vae.save_pretrained(final, safe_serialization=True)
    return vae


# ------------------------------------------------------------------------------------------------
# 4. latents


def cache_latents(args, work: Path, vae) -> tuple[dict, list]:
    """Encode ``--num_examples`` examples once; their scenes (objects, background) go to a JSON
    file beside the latents, so that every step can caption them afresh."""
    path = work / f"latents_{args.num_examples}.safetensors"
    scenes_path = path.with_suffix(".json")
    if path.exists() and scenes_path.exists():
        print(f"[latents] found {path}")
        return load_file(str(path)), _load_scenes(scenes_path)
    images, records = make_images(args.num_examples, args.seed + 2, "[latents] images")
    means, stds = [], []
    with torch.no_grad():
        for i in tqdm(range(0, len(images), 256), desc="[latents] encode"):
            post = vae.encode(to_model_range(images[i : i + 256]).to(vae.device)).latent_dist
            means.append(post.mean.cpu())
            stds.append(post.std.cpu())
    cache = {"mean": torch.cat(means).contiguous(), "std": torch.cat(stds).contiguous()}
    scenes = [{"objects": [asdict(o) for o in r.objects], "background": r.background} for r in records]
    scenes_path.write_text(json.dumps(scenes) + "\n")
    save_file(cache, str(path))
    return cache, _load_scenes(scenes_path)


def _load_scenes(path: Path) -> list[tuple[list[Object], str]]:
    def obj(d: dict) -> Object:
        return Object(d["shape"], d["pattern"], tuple(d["colours"]), tuple(d["centre"]), d["extent"])

    return [([obj(o) for o in s["objects"]], s["background"]) for s in json.loads(path.read_text())]


# ------------------------------------------------------------------------------------------------
# 5. UNet + text encoder


def train_unet(args, work: Path, vae, tokenizer, cache: dict, scenes: list):
    """The UNet and the text encoder, jointly from scratch, under accelerate (CPU, or one GPU with
    ``--mixed_precision bf16``), with diffusers' ``EMAModel`` and ``compute_snr``."""
    from accelerate import Accelerator
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from diffusers.training_utils import EMAModel, compute_snr
    from transformers import CLIPTextConfig, CLIPTextModel

    accelerator = Accelerator(mixed_precision=args.mixed_precision, cpu=args.cpu)
    device = accelerator.device
    torch.manual_seed(args.seed)
    unet = UNet2DConditionModel(**unet_config())
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_config(tokenizer)))
    modules = {"unet": unet, "text_encoder": text_encoder}
    named = [(f"{n}.{k}", v) for n, m in modules.items() for k, v in m.named_parameters()]
    params = [v for _, v in named]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-2)
    ema = EMAModel(params, decay=args.ema_max_decay, use_ema_warmup=True, inv_gamma=1.0, power=2 / 3)
    ckpt = work / "unet_checkpoint.safetensors"
    start = 0
    if ckpt.exists():
        start, extra = load_checkpoint(ckpt, modules, opt)
        ema.shadow_params = [extra[f"ema.{name}"].clone() for name, _ in named]
        ema.optimization_step = start
        print(f"[unet] resumed at step {start}")
    unet, text_encoder, opt = accelerator.prepare(unet, text_encoder, opt)
    ema.to(device)
    sched = DDPMScheduler(**noise_scheduler_config())
    scale = vae.config.scaling_factor
    mean_all, std_all = cache["mean"].to(device), cache["std"].to(device)
    n_unet = sum(p.numel() for p in unet.parameters())
    n_text = sum(p.numel() for p in text_encoder.parameters())
    print(f"[unet] UNet {n_unet / 1e6:.2f}M params, text encoder {n_text / 1e6:.2f}M params, on {device}")

    unet.train()
    text_encoder.train()
    bar = tqdm(range(start, args.unet_steps), desc="[unet] train", initial=start, total=args.unet_steps)
    running = None
    for step in bar:
        rng, g = step_rng(args.seed, 2, step)
        idx = torch.from_numpy(rng.integers(len(mean_all), size=args.batch_size))
        captions = [
            "" if rng.random() < args.caption_dropout else random_caption(*scenes[i], rng)
            for i in idx.tolist()
        ]
        ids = tokenizer(
            captions, padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt"
        ).input_ids.to(device)
        # every random draw on the CPU from the step's generator: resuming replays it exactly
        eps_latent = torch.randn((args.batch_size, *mean_all.shape[1:]), generator=g)
        noise = torch.randn(eps_latent.shape, generator=g).to(device)
        t = torch.randint(0, sched.config.num_train_timesteps, (args.batch_size,), generator=g).to(device)
        idx = idx.to(device)
        latents = (mean_all[idx] + std_all[idx] * eps_latent.to(device)) * scale
        noisy = sched.add_noise(latents, noise, t)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.lr, args.warmup_steps)
        cond = text_encoder(ids)[0]
        pred = unet(noisy, t, cond).sample
        snr = compute_snr(sched, t)
        weights = torch.clamp(snr, max=args.snr_gamma) / snr  # min-SNR-gamma, epsilon target
        loss = (F.mse_loss(pred.float(), noise, reduction="none").mean(dim=(1, 2, 3)) * weights).mean()
        opt.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(params, 1.0)
        opt.step()
        ema.step(params)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        bar.set_postfix(loss=f"{running:.4f}")
        if (step + 1) % args.checkpoint_every == 0 or step + 1 == args.unet_steps:
            shadow = {f"ema.{name}": v.cpu() for (name, _), v in zip(named, ema.shadow_params)}
            plain = {
                n: accelerator.unwrap_model(m) for n, m in (("unet", unet), ("text_encoder", text_encoder))
            }
            save_checkpoint(ckpt, plain, opt, step + 1, shadow)
    # ship the EMA weights
    unet, text_encoder = accelerator.unwrap_model(unet), accelerator.unwrap_model(text_encoder)
    ema.copy_to(params)
    unet.to("cpu").eval()
    text_encoder.to("cpu").eval()
    return unet, text_encoder


def inference_scheduler():
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(
        **noise_scheduler_config(),
        algorithm_type="dpmsolver++",
        solver_order=2,
        timestep_spacing="trailing",
        steps_offset=1,
    )


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    work, out = Path(args.work_dir), Path(args.output_dir)
    work.mkdir(parents=True, exist_ok=True)
    (work / "args.json").write_text(json.dumps(vars(args), indent=2) + "\n")
    t0 = time.time()

    tokenizer = build_tokenizer(work / "tokenizer")
    vae = train_vae(args, work).to(device_for(args)).eval()
    vae.requires_grad_(False)
    vae = finetune_decoder(args, work, vae)
    cache, scenes = cache_latents(args, work, vae)
    unet, text_encoder = train_unet(args, work, vae, tokenizer, cache, scenes)

    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=vae.to("cpu"),
        text_encoder=text_encoder,
        tokenizer=build_tokenizer(work / "tokenizer"),  # a fresh one: no padding state gets saved
        unet=unet,
        scheduler=inference_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    # CLIP's original tokenizer files too, for transformers versions whose CLIPTokenizer needs them
    for name in ("vocab.json", "merges.txt"):
        (out / "tokenizer" / name).write_bytes((work / "tokenizer" / name).read_bytes())
    write_subject(args.subject_dir)
    print(f"[done] pipeline saved to {out} ({(time.time() - t0) / 60:.1f} min in this invocation)")


if __name__ == "__main__":
    main()
