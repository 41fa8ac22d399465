#!/usr/bin/env python
"""DreamBooth quality on subjects the toy base never saw, judged on views training never saw.

    python benchmarks/quality.py                    # 8 subjects x 3 methods x 3 seeds, the script's defaults
    python benchmarks/quality.py --quick            # 3 subjects, 1 seed, 100 steps: a smoke run
    python benchmarks/quality.py --shard 0/2 & python benchmarks/quality.py --shard 1/2; wait
    python benchmarks/quality.py                    # both cores above, then the tables from the cached runs
    python benchmarks/quality.py --recipes defaults lr3e-4="--learning_rate 3e-4" --name sweep

Every run is `train_scripts/train_dreambooth_liera.py` itself (`main(parse_args([...]))`, the code path
of the command line) on the toy base. The subjects (`SUBJECTS`) range from a combination the base
knows to a shape it never saw; each gets four training views on four backgrounds and four held-out
views at other places and sizes on backgrounds training never shows (`<subject>/heldout/`). A
*recipe* is a set of the script's arguments (learning rate, steps, prior preservation, captions ...);
the default recipe is the script's defaults. Each adapter is judged on fixed numbers:

- held-out fit: denoising loss on the held-out views, captioned with their background ("a sks circle
  on an orange background"), divided by the base model's (lower is better); training fit likewise;
- class drift: change of the denoising loss on rendered objects of the subject's class captioned with
  the class prompt ("a circle"), in %;
- prompt following: the toy analyser's accuracy (count, shape, colours, pattern, background) on
  non-subject prompts, divided by the base model's;
- subject rate: share of samples the analyser recognises as the subject (shape, pattern and colours),
  for the instance prompt, on the training backgrounds and on unseen backgrounds; shape kept: share of
  all those samples with the subject's shape; colour order kept: of the samples recognised as a
  two-colour subject, the share with its colours in order (the first left, on top or outside: a
  mirror swaps them in halves, vertical stripes and checks); background kept: share of the
  unseen-background samples whose background is the one asked for.

Ranks are matched per budget (the tables give the parameter counts). Runs and judgements are kept in
`--work-dir` and reused, so an interrupted benchmark resumes. Results: `benchmarks/results/<name>.{md,json}`,
`<name>_fit_vs_drift.png`, `<name>_samples.png`.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import json
import shlex
import shutil
import sys
import time
from pathlib import Path
from statistics import fmean

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (
    REPO_ROOT,
    RESULTS_DIR,
    command_line,
    environment,
    markdown_table,
    pyplot,
    spread,
    write_json,
    write_markdown,
)

METHODS = (
    "lora", "flora", "liera", "hira", "abba", "loha", "bhra", "gralora", "diablo", "ssb", "ssl", "ia3",
    "dora", "dora-flora",
)  # fmt: skip
# budget -> method -> the script's size options. Matched on the toy base's UNet (attn+conv targets): lora's
# rank sets the budget; flora and liera keep that rank on attention and spend the rest on Tucker ranks
# [r, r, 2, 2] of the convolutions, r chosen for the closest count ("default": the script's own sizes).
# Trainable parameters (lora / flora / liera): small 95,488 / 98,534 / 98,310; medium 190,976 /
# 187,842 / 186,946; large 381,952 / 391,778 / 388,194. hira, gralora, bhra at lora's rank and abba, loha
# at half of it (two pairs) have exactly lora's count; dora adds 9,280 magnitudes (large: 391,232);
# dora-flora large 373,062; diablo's blocks only come in powers of 2 here (channels 64/128/192/256):
# 68,928 / 137,856 / 275,712. ssb, ssl and ia3 have one size (20,096 / 10,816 / 9,280).
_SMALL, _MEDIUM, _LARGE = [8, 8, 2, 2], [14, 14, 2, 2], [26, 26, 2, 2]


def _budget(rank: int, conv: list[int], dora_conv: list[int], blocks: int) -> dict[str, dict]:
    return {
        "lora": {"rank": rank},
        "flora": {"rank": rank, "conv_rank": conv},
        "liera": {"rank": rank, "conv_rank": conv},
        "hira": {"rank": rank},
        "abba": {"rank": rank // 2},
        "loha": {"rank": rank // 2},
        "bhra": {"rank": rank},
        "gralora": {"rank": rank},
        "diablo": {"blocks": blocks},
        "ssb": {},
        "ssl": {},
        "ia3": {},
        "dora": {"rank": rank},
        "dora-flora": {"rank": rank, "conv_rank": dora_conv},
    }


BUDGETS: dict[str, dict[str, dict]] = {
    "default": {method: {} for method in METHODS},
    "small": _budget(2, _SMALL, [7, 7, 2, 2], 64),
    "medium": _budget(4, _MEDIUM, [13, 13, 2, 2], 32),
    "large": _budget(8, _LARGE, [24, 24, 2, 2], 16),
}
# (difficulty, pattern, colours, shape): from a combination the base knows to a shape it never saw.
SUBJECTS: tuple[tuple[str, str, tuple[str, ...], str], ...] = (
    ("known combination", "plain", ("red",), "square"),
    ("known combination", "vstripes", ("blue", "white"), "triangle"),
    ("new combination", "hstripes", ("yellow", "black"), "circle"),
    ("new combination", "checks", ("red", "white"), "square"),
    ("new combination", "dots", ("blue", "yellow"), "triangle"),
    ("new combination", "halves", ("orange", "blue"), "diamond"),
    ("new shape", "plain", ("orange",), "cross"),
    ("new shape and pattern", "rings", ("green", "purple"), "cross"),
)


# The script's defaults before pivotal tuning became lora's, flora's and liera's (text encoder adapted,
# UNet on attn+conv): the recipes measured on them pin them, so that they keep their meaning.
UNPIVOTAL = "--no-train_text_encoder_ti --targets attn+conv"
# Pivotal tuning's settings, spelled out for the recipes that vary its rates.
PIVOTAL = "--train_text_encoder_ti --text_encoder_lr 5e-3 --targets cross-kv+conv"


def sweep_args(
    lr: float, steps: int, prior: bool = False, te: bool = False, captions: bool = False, warmup: int = 0
) -> str:
    """The script's arguments for one point of the sweep, every swept setting explicit, so that a
    recipe keeps its meaning when the script's defaults change."""
    args = f"--learning_rate {lr:g} --max_train_steps {steps}"
    args += " --with_prior_preservation" if prior else " --no-with_prior_preservation"
    args += " --train_text_encoder" if te else " --no-train_text_encoder"
    args += f" {UNPIVOTAL}"
    args += " --instance_captions" if captions else ""
    args += f" --lr_scheduler constant_with_warmup --lr_warmup_steps {warmup}" if warmup else ""
    return args


# Named recipes, so a published sweep can be re-run by name. "defaults": whatever the script's are
# (for lora, flora and liera since this commit: ti-rate5e-3-kvconv's settings).
RECIPES: dict[str, str] = {
    "defaults": "",
    "old-defaults": sweep_args(1e-3, 1000),  # the script's defaults before the sweep
    "lr1e-3-400": sweep_args(1e-3, 400),
    "lr3e-4-400-warmup": sweep_args(3e-4, 400, warmup=40),
    "prior-lr1e-3-400": sweep_args(1e-3, 400, prior=True),
    "captions-lr1e-3-400": sweep_args(1e-3, 400, captions=True),
    "captions-prior-lr1e-3-400": sweep_args(1e-3, 400, prior=True, captions=True),
    "te-lr1e-3-400": sweep_args(1e-3, 400, te=True),
    "te-prior-lr1e-3-400": sweep_args(1e-3, 400, prior=True, te=True),
    "te-prior-lr1e-3-800": sweep_args(1e-3, 800, prior=True, te=True),
    "te-captions-prior-lr1e-3-400": sweep_args(1e-3, 400, prior=True, te=True, captions=True),
    **{
        f"te-prior-lr{lr}-400": sweep_args(float(lr), 400, prior=True, te=True)
        for lr in ("2e-3", "3e-3", "5e-3")
    },
    # The training procedures, each on the recipe above at lora's default rate (issue 17's benchmark).
    "pissa": sweep_args(1e-3, 400, prior=True, te=True) + " --init pissa",
    "relora100": sweep_args(1e-3, 400, prior=True, te=True) + " --relora_steps 100",
    "mpc-orthogonal": sweep_args(1e-3, 400, prior=True, te=True) + " --mpc orthogonal",
    # The rate of the adapters on convolutions (issue 11's screen for liera and flora, on the defaults):
    # liera's and flora's old defaults had one rate for every layer.
    "liera-old-defaults": f"{UNPIVOTAL} --conv_learning_rate 5e-3",
    "liera-linearmap": f"{UNPIVOTAL} --lie_map linear --conv_learning_rate 5e-3",
    **{f"liera-conv{lr}": f"{UNPIVOTAL} --conv_learning_rate {lr}" for lr in ("1e-3", "5e-4", "2e-4")},
    "liera-lr3e-3-conv5e-4": f"{UNPIVOTAL} --learning_rate 3e-3 --conv_learning_rate 5e-4",
    "flora-old-defaults": f"{UNPIVOTAL} --conv_learning_rate 3e-3",
    **{f"flora-conv{lr}": f"{UNPIVOTAL} --conv_learning_rate {lr}" for lr in ("1e-3", "5e-4")},
    # Prompt following (issue 11): the text encoders' own rate, and the prior's weight, on the defaults.
    **{f"te-rate{lr}": f"{UNPIVOTAL} --text_encoder_lr {lr}" for lr in ("1e-4", "3e-3")},
    "prior-weight3": f"{UNPIVOTAL} --prior_loss_weight 3",  # lora's and flora's default since (DEFAULT_PRIOR_LOSS_WEIGHTS)
    "prior-weight1": f"{UNPIVOTAL} --prior_loss_weight 1",  # their default before, diffusers' weight
    "class-captions": f"{UNPIVOTAL} --class_captions",
    "class-captions256": f"{UNPIVOTAL} --class_captions --num_class_images 256",
    "te-keep0.1": f"{UNPIVOTAL} --text_encoder_preservation 0.1",
    "te-keep1": f"{UNPIVOTAL} --text_encoder_preservation 1",
    "te-keep10": f"{UNPIVOTAL} --text_encoder_preservation 10",
    # Pivotal tuning (issue 11's prompt following): the identifier as new token embeddings, the text
    # encoder unadapted; at the method's rate (lora's 1e-3, the one method measured with it), and at
    # textual inversion's larger ones.
    "ti": "--train_text_encoder_ti --text_encoder_lr 1e-3 --targets attn+conv",
    **{
        f"ti-rate{lr}": f"--train_text_encoder_ti --text_encoder_lr {lr} --targets attn+conv"
        for lr in ("5e-3", "1e-2")
    },
    # The same without the adapters on attention that cost prompt following when switched on alone (the
    # self-attention and the image side of cross-attention): cross-attention's keys and values (the text
    # side, Custom Diffusion's choice) and the convolutions stay.
    # (Its lora, flora and liera runs in quality_pivotal*.md trained at their rates, 1e-3, 3e-3 and 5e-3,
    # before the script gave pivotal tuning its own, PIVOTAL_LEARNING_RATES: run again, they would take those.)
    "ti-rate5e-3-kvconv": "--train_text_encoder_ti --text_encoder_lr 5e-3 --targets attn2.to_k,attn2.to_v,"
    "resnets.[0-9]+.conv1,resnets.[0-9]+.conv2,resnets.[0-9]+.conv_shortcut,downsamplers.[0-9]+.conv,"
    "upsamplers.[0-9]+.conv",
    # Cross-attention's K/V at half their rate, the convolutions' unchanged (quality_pivotal_rate.md,
    # quality_pivotal_lora_rate.md): liera's pivotal default since; lora's until lora-kv5e-4-conv5e-4.
    "liera-kv2.5e-3": f"{PIVOTAL} --learning_rate 2.5e-3 --conv_learning_rate 5e-4",
    "lora-kv5e-4": f"{PIVOTAL} --learning_rate 5e-4 --conv_learning_rate 1e-3",
    # flora's (quality_pivotal_flora_conv_screen.md, quality_pivotal_flora_rate.md): its convolutions at
    # half their rate, with K/V at half theirs (the default since) and alone, and the Tucker ranks of the
    # kernel's spatial modes full (3, the channel ranks lower for about the same parameter count).
    "flora-kv1.5e-3-conv5e-4": f"{PIVOTAL} --learning_rate 1.5e-3 --conv_learning_rate 5e-4",
    "flora-kv3e-3-conv5e-4": f"{PIVOTAL} --learning_rate 3e-3 --conv_learning_rate 5e-4",
    "flora-spatial3": f"{PIVOTAL} --conv_rank 21 21 3 3",
    # The convolutions at half their rate for lora and liera too, with their pivotal K/V rates.
    "lora-kv5e-4-conv5e-4": f"{PIVOTAL} --learning_rate 5e-4 --conv_learning_rate 5e-4",
    "liera-kv2.5e-3-conv2.5e-4": f"{PIVOTAL} --learning_rate 2.5e-3 --conv_learning_rate 2.5e-4",
    "flora-kv1.5e-3-conv2.5e-4": f"{PIVOTAL} --learning_rate 1.5e-3 --conv_learning_rate 2.5e-4",
    "lora-kv5e-4-conv2.5e-4": f"{PIVOTAL} --learning_rate 5e-4 --conv_learning_rate 2.5e-4",
}
# The recipes the variants below change one setting of: the pivotal defaults when the variants were measured
# (their recipes above spell them out). liera's default is liera-kv1e-3 since (below); its variants keep
# K/V at 2.5e-3, the arguments their published results ran.
_VARIANT_BASES = {
    "lora": "lora-kv5e-4-conv5e-4",
    "flora": "flora-kv1.5e-3-conv5e-4",
    "liera": "liera-kv2.5e-3",
}


def _on_base(method: str, extra: str) -> str:
    """The method's _VARIANT_BASES recipe with `extra` arguments: a variant that names only its change."""
    return f"{RECIPES[_VARIANT_BASES[method]]} {extra}"


# At other lengths than 800 steps: with pivotal tuning every method's held-out loss (the script's
# heldout_curve) is lowest between steps 250 and 500 and rises after; liera at 1200: whether the cross,
# which loses its shape with fewer steps, keeps gaining.
RECIPES.update(
    {
        f"{method}-{steps}steps": _on_base(method, f"--max_train_steps {steps}")
        for method, steps in [
            ("lora", 500),
            ("flora", 500),
            ("liera", 500),
            ("lora", 650),
            ("liera", 650),
            ("liera", 1200),
        ]  # fmt: skip
    }
)
# The cross (the shape the base never drew) is step-limited: two ways to learn shape sooner without more
# steps. Min-SNR weighting (the toy base's own pretraining loss) moves the loss's weight to the noisy
# timesteps where a sample's shape is decided; a cosine schedule from twice the rates moves the learning
# early, at the same total rate (a cosine's mean is half its peak).
RECIPES["liera-snr5"] = _on_base("liera", "--snr_gamma 5")
RECIPES["liera-cosine-peak2x"] = (
    f"{PIVOTAL} --learning_rate 5e-3 --conv_learning_rate 1e-3 --lr_scheduler cosine"
)
# Whether the class images hold the cross back: the base draws orange diamonds and triangles for "a cross"
# (a shape it never drew), so prior preservation teaches the class word away from the subject's shape.
# lora's and flora's prior weight (3, DEFAULT_PRIOR_LOSS_WEIGHTS) was chosen before pivotal tuning; at
# liera's 1 the class images pull less.
RECIPES.update(
    {f"{method}-noprior": _on_base(method, "--no-with_prior_preservation") for method in _VARIANT_BASES}
)
RECIPES["liera-prior0.3"] = _on_base("liera", "--prior_loss_weight 0.3")
RECIPES.update(
    {f"{method}-prior1": _on_base(method, "--prior_loss_weight 1") for method in ("lora", "flora")}
)
# flora behind lora at matched settings (issue 11's item 4): from FLoRA's zero core only the core trains at
# first, inside random subspaces; from a zero output factor (LoRA's start in Tucker form) that factor trains
# from the first step. At flora's rates, at lora's, and on liera's Tucker convolutions.
RECIPES["flora-zeroout"] = _on_base("flora", "--init zero-out")
RECIPES["flora-zeroout-kv5e-4"] = f"{PIVOTAL} --learning_rate 5e-4 --conv_learning_rate 5e-4 --init zero-out"
RECIPES["liera-zeroout"] = _on_base("liera", "--init zero-out")
# Which part of flora costs it held-out fit: each method with the other's convolutions (lora's cross-attention
# keys and values with flora's Tucker convs, LyCORIS' LoCon-Tucker; flora's with lora's flattened rank-8 ones).
RECIPES["lora-tuckerconv"] = _on_base("lora", "--conv_backend tucker --conv_rank 26 26 2 2")
RECIPES["flora-lowrankconv"] = _on_base("flora", "--conv_backend lowrank --conv_rank 8")
# flora's Tucker convolutions at lower channel ranks (its conv updates at the default ranks are twice lora's
# in norm and of three times the effective rank): fewer parameters, as FLoRA's paper proposes.
RECIPES["flora-conv8-8-3-3"] = _on_base("flora", "--conv_rank 8 8 3 3")
RECIPES["flora-conv16-16-2-2"] = _on_base("flora", "--conv_rank 16 16 2 2")
# The script's sizes before plugin.budget (--rank read literally on Tucker convolutions) for liera too.
RECIPES["liera-conv8-8-3-3"] = _on_base("liera", "--conv_rank 8 8 3 3")
# The cross's prompt following (its adapters draw other prompts' two-colour objects plain, the subject's
# look): the convolutions' updates act on every prompt alike, cross-attention's keys and values only
# through the words. Each method's default with keys and values alone.
RECIPES.update(
    {f"{method}-kvonly": _on_base(method, "--targets attn2.to_k,attn2.to_v") for method in _VARIANT_BASES}
)
# ... and with the convolutions alone: the identifier's new embeddings reach the UNet through the base's
# keys and values, which no other prompt then finds changed.
RECIPES.update({f"{method}-convonly": _on_base(method, "--targets conv") for method in _VARIANT_BASES})
# Between the two for liera: its keys and values at 1e-3 (2.5e-3 draws the crosses' shape and costs their
# prompt following; convs-only, a rate of 0, the reverse). liera's default since (quality_liera_kv_rate.md).
RECIPES["liera-kv1e-3"] = f"{PIVOTAL} --learning_rate 1e-3 --conv_learning_rate 5e-4"
# The same for flora: its keys and values at lora's 5e-4 instead of 1.5e-3 (its Tucker K/V at three times
# lora's rate cost it held-out fit and drift, quality_pivotal_conv_swap_screen.md).
RECIPES["flora-kv5e-4"] = f"{PIVOTAL} --learning_rate 5e-4 --conv_learning_rate 5e-4"
# liera's default at 1200 steps: with K/V at 1e-3 it drifts less than lora, room the crosses' shape, which
# kept growing past 800 steps with K/V at 2.5e-3 (quality_pivotal_steps_screen.md), may spend.
RECIPES["liera-kv1e-3-1200steps"] = f"{RECIPES['liera-kv1e-3']} --max_train_steps 1200"
# Mirrored training views (--random_flip): more positions of the subject for the same four images; the
# two-tone diamond, orange on the left, is the subject that a mirror changes.
RECIPES["liera-flip"] = f"{RECIPES['liera-kv1e-3']} --random_flip"
# ... and at 1200 steps: the mirrored views' better held-out fit with the longer run's subject rates?
RECIPES["liera-flip-1200steps"] = f"{RECIPES['liera-kv1e-3-1200steps']} --random_flip"
# Zoomed training views (--random_zoom 1.25): other sizes and places of the subject, the right way round
# (a mirror swaps a one-sided subject's colours: quality_mirror_order_screen.md).
RECIPES["liera-zoom"] = f"{RECIPES['liera-kv1e-3']} --random_zoom 1.25"
RECIPES["liera-zoom-1200steps"] = f"{RECIPES['liera-kv1e-3-1200steps']} --random_zoom 1.25"
RECIPES["liera-zoom1.1"] = f"{RECIPES['liera-kv1e-3']} --random_zoom 1.1"
# ... at 1200 steps: the small zoom's held-out fit with the longer run's subject rates (the crosses')?
RECIPES["liera-zoom1.1-1200steps"] = f"{RECIPES['liera-kv1e-3-1200steps']} --random_zoom 1.1"
# ... without the class images, on the crosses: the README's advice for a class the base can't draw, on liera's
# default since.
RECIPES["liera-zoom1.1-1200steps-noprior"] = (
    f"{RECIPES['liera-zoom1.1-1200steps']} --no-with_prior_preservation"
)
# flora with liera's zoom, at its own default size (recipe flora-conv16-16-2-2).
RECIPES["flora-zoom1.1"] = f"{RECIPES['flora-conv16-16-2-2']} --random_zoom 1.1"
# ... and at 1200 steps, as liera's default: at 800 steps the zoom cost flora the subject on unseen backgrounds.
RECIPES["flora-zoom1.1-1200steps"] = f"{RECIPES['flora-zoom1.1']} --max_train_steps 1200"
# liera's default with the class images at half their weight: between the default and none, which draw the
# ringed cross more often and the orange cross less (quality_crosses_zoom11_1200steps_noprior.md).
RECIPES["liera-zoom1.1-1200steps-prior0.5"] = f"{RECIPES['liera-zoom1.1-1200steps']} --prior_loss_weight 0.5"
# ... at 1600 steps: at half weight the crosses' shape kept growing from 800 to 1200 steps. An option for a
# shape the base never drew, not the default (quality_liera_1600steps.md: the crosses drawn more often, at
# more drift and lower prompt following elsewhere).
RECIPES["liera-zoom1.1-1600steps-prior0.5"] = (
    f"{RECIPES['liera-zoom1.1-1200steps-prior0.5']} --max_train_steps 1600"
)
# liera's default with its convolutions at half their rate: at half weight a quarter of runs change a
# mid-block convolution by more than its own norm (the script's warning); whether a slower rate avoids it.
RECIPES["liera-zoom1.1-1200steps-prior0.5-conv2.5e-4"] = (
    f"{RECIPES['liera-zoom1.1-1200steps-prior0.5']} --conv_learning_rate 2.5e-4"
)
# Every recipe but "defaults" runs on the script's defaults as the recipes above were measured on: settings
# whose default changed since are pinned to what it was (a recipe that names one overrides it), so that a
# recipe keeps its meaning. liera with pivotal tuning trains 1200 steps on zoomed views since, its class
# images at half weight (PIVOTAL_TRAINING in the script).
PINNED_DEFAULTS = ["--max_train_steps", "800", "--random_zoom", "1"]
PINNED_METHOD_DEFAULTS = {"liera": ["--prior_loss_weight", "1"]}
VIEWS = 4  # training views per subject, and held-out views
JUDGE_PROMPT_SEED = 1  # of the prompt-following prompts
CLASS_IMAGES = 32  # generated by the base per class, for recipes with prior preservation
CLASS_PROMPTS = 256  # varied prompts per class, for --class_captions (one image each, in turn)
# One colour per preset (lora, flora and liera keep those of the earlier plots).
COLORS = {
    "lora": "tab:gray", "flora": "tab:orange", "liera": "tab:blue", "hira": "tab:cyan", "abba": "tab:red",
    "loha": "salmon", "bhra": "tab:purple", "gralora": "tab:olive", "diablo": "tab:brown", "ssb": "tab:green",
    "ssl": "lightgreen", "ia3": "darkgreen", "dora": "tab:pink", "dora-flora": "gold",
}  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", default=str(REPO_ROOT / "assets" / "toy-sd"), help="Base pipeline folder.")
    parser.add_argument(
        "--subjects", nargs="+", type=int, default=None, help="Indices into SUBJECTS (default: all)."
    )
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--budgets", nargs="+", default=["large"], choices=list(BUDGETS))
    parser.add_argument(
        "--recipes",
        nargs="+",
        default=["defaults"],
        help=f'Recipes: a name ({", ".join(RECIPES)}) or NAME="script arguments"; all but "defaults" on '
        f"{' '.join(PINNED_DEFAULTS)} ("
        + "; ".join(f"{method} also {' '.join(pins)}" for method, pins in PINNED_METHOD_DEFAULTS.items())
        + ") unless they say otherwise.",
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--max-train-steps", type=int, default=None, help="Default: the recipe's/script's.")
    parser.add_argument("--train-batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None, help="torch threads. Default: torch's default.")
    parser.add_argument("--eval-timesteps", type=int, default=10, help="Timesteps of the denoising losses.")
    parser.add_argument("--eval-noises", type=int, default=4, help="Noise draws per image and timestep.")
    parser.add_argument("--class-images", type=int, default=8, help="Rendered class images for the drift.")
    # 64 prompts and 16 samples (16 and 8 before 2026-12-06): at 16 prompts, one sample each, a run's prompt
    # following moved by ±0.1 between seeds, the size of the per-subject goal's margin.
    parser.add_argument("--num-prompts", type=int, default=64, help="Non-subject prompts to generate.")
    parser.add_argument("--subject-samples", type=int, default=16, help="Samples per kind of subject prompt.")
    parser.add_argument("--inference-steps", type=int, default=20)
    parser.add_argument("--guidance-scale", type=float, default=7.5)
    parser.add_argument("--work-dir", default=str(REPO_ROOT / "runs" / "quality"), help="Training runs.")
    parser.add_argument("--shard", default=None, help="I/N: only every N-th job from the I-th; no report.")
    parser.add_argument("--output-dir", default=str(RESULTS_DIR))
    parser.add_argument("--name", default="quality", help="Stem of the results files.")
    parser.add_argument("--no-plot", action="store_true", help="No plot and no sample grid.")
    parser.add_argument(
        "--no-train", action="store_true", help="Report only the runs already trained (a partial benchmark)."
    )
    parser.add_argument(
        "--rejudge", action="store_true", help="Judge finished runs again (after the judge has changed)."
    )
    parser.add_argument("--quick", action="store_true", help="3 subjects, 1 seed, 100 steps, fewer samples.")
    parser.add_argument(
        "--reuse",
        nargs="+",
        default=[],
        metavar="NAME",
        help="Earlier results (NAME.json in --output-dir) whose runs are taken instead of training them again "
        "where no run folder holds them; refused if judged with other settings.",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.subjects = args.subjects or [1, 3, 6]
        args.seeds, args.max_train_steps = args.seeds[:1], args.max_train_steps or 100
        args.subject_samples, args.num_prompts = min(args.subject_samples, 4), min(args.num_prompts, 8)
    args.subjects = list(range(len(SUBJECTS))) if args.subjects is None else args.subjects
    for index in args.subjects:
        if not 0 <= index < len(SUBJECTS):
            parser.error(f"--subjects: {index} is not an index of SUBJECTS (0-{len(SUBJECTS) - 1})")
    args.recipe_args = {}
    for recipe in args.recipes:
        name, _, script_args = recipe.partition("=")
        if not _ and name not in RECIPES:
            parser.error(
                f"--recipes: unknown recipe {name!r}; name one of {sorted(RECIPES)} or give NAME=ARGS"
            )
        args.recipe_args[name] = shlex.split(script_args if _ else RECIPES[name])
    args.recipes = list(args.recipe_args)
    if args.shard is not None:
        try:
            index, count = map(int, args.shard.split("/"))
            assert 0 <= index < count
        except (ValueError, AssertionError):
            parser.error(f"--shard must be I/N with 0 <= I < N, got {args.shard!r}")
        args.shard = (index, count)
    return args


# --- subjects ------------------------------------------------------------------------------------


def subject_info(index: int) -> dict:
    from plugin.toy.data import make_subject

    difficulty, pattern, colours, shape = SUBJECTS[index]
    info = make_subject(pattern, colours, shape)
    return {**info, "difficulty": difficulty, "slug": info["name"].replace(" ", "-")}


def subject_backgrounds(index: int) -> tuple[list[str], list[str]]:
    """(training, unseen) backgrounds: four colours the subject doesn't use, and the others."""
    import numpy as np

    from plugin.toy.data import COLOURS

    colours = SUBJECTS[index][2]
    free = [c for c in COLOURS if c not in colours]
    order = np.random.default_rng(100 + index).permutation(len(free))
    free = [free[i] for i in order]
    return free[:VIEWS], free[VIEWS:]


def class_prompts(index: int) -> list[str]:
    """CLASS_PROMPTS varied prompts of the subject's shape (patterns in turn, random colours and
    backgrounds), for --class_captions; none is one of the judge's prompt-following prompts."""
    from plugin.toy.data import make_prompts

    judged = {p["prompt"] for p in make_prompts(64, seed=JUDGE_PROMPT_SEED)}
    shape = subject_info(index)["shape"]
    candidates = make_prompts(2 * CLASS_PROMPTS, seed=3000 + index, shapes=(shape,))
    distinct = dict.fromkeys(p["prompt"] for p in candidates if p["prompt"] not in judged)
    return list(distinct)[:CLASS_PROMPTS]


def write_subject_folder(index: int, folder: Path) -> Path:
    """Training views (0.png ...), held-out views (heldout/0.png ...) and prompts.json of a subject."""
    from PIL import Image

    from plugin.toy.data import make_caption, make_subject_images

    info = subject_info(index)
    if (folder / "prompts.json").is_file():
        return folder
    train_bgs, unseen_bgs = subject_backgrounds(index)
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    (partial / "heldout").mkdir(parents=True)
    captions, heldout = {}, {}
    views = make_subject_images(VIEWS, 1000 + index, info, tuple(train_bgs))
    for i, (image, view) in enumerate(views):
        Image.fromarray(image).save(partial / f"{i}.png")
        captions[f"{i}.png"] = make_caption(info["shape"], info["token"], view["background"])
    for i, (image, view) in enumerate(make_subject_images(VIEWS, 2000 + index, info, tuple(unseen_bgs))):
        Image.fromarray(image).save(partial / "heldout" / f"{i}.png")
        heldout[f"{i}.png"] = make_caption(info["shape"], info["token"], view["background"])
    prompts = {
        "subject": info["name"],
        "difficulty": info["difficulty"],
        "shape": info["shape"],
        "pattern": info["pattern"],
        "colours": list(info["colours"]),
        "instance_prompt": info["instance_prompt"],
        "class_prompt": info["class_prompt"],
        "class_prompts": class_prompts(index),
        "captions": captions,
        "heldout": heldout,
        "training_backgrounds": train_bgs,
        "unseen_backgrounds": unseen_bgs,
    }
    (partial / "prompts.json").write_text(json.dumps(prompts, indent=2) + "\n")
    try:
        partial.rename(folder)
    except OSError:  # another shard wrote it first: the same content
        shutil.rmtree(partial, ignore_errors=True)
    return folder


def class_objects(shape: str, count: int, seed: int = 2024) -> list:
    """Rendered objects of one shape (random patterns, colours, sizes, places, backgrounds)."""
    import numpy as np
    from PIL import Image

    from plugin.toy.data import COLOURS, IMAGE_SIZE, Object, render_scene, sample_object

    rng = np.random.default_rng(seed)
    images = []
    while len(images) < count:
        background = COLOURS[rng.integers(len(COLOURS))]
        _, pattern, colours, extent = sample_object(rng, {background}, allow_heldout=True)
        margin = extent / 2 + 2
        centre = tuple(float(rng.uniform(margin, IMAGE_SIZE - margin)) for _ in range(2))
        objects = [Object(shape, pattern, colours, centre, extent)]
        images.append(Image.fromarray(render_scene(objects, background, rng=rng)))
    return images


# --- training, through the training script ----------------------------------------------------


def training_script():
    path = REPO_ROOT / "train_scripts" / "train_dreambooth_liera.py"
    spec = importlib.util.spec_from_file_location("train_dreambooth_liera", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_folder(args: argparse.Namespace, job: tuple) -> Path:
    recipe, method, budget, index, seed = job
    return Path(args.work_dir, recipe, f"{method}-{budget}", subject_info(index)["slug"], f"seed{seed}")


def finished(folder: Path) -> bool:
    """A run folder holding a finished run (the script writes metrics.json after the adapter)."""
    return (folder / "adapter.safetensors").is_file() and (folder / "metrics.json").is_file()


def train(args: argparse.Namespace, script, judge: Judge, job: tuple) -> dict:
    """One DreamBooth run (or the one already in its folder): the script's metrics.json."""
    recipe, method, budget, index, seed = job
    output = run_folder(args, job)
    if finished(output):
        return json.loads((output / "metrics.json").read_text())
    if (output / "diverged.txt").is_file():
        return {"diverged": (output / "diverged.txt").read_text()}
    if args.no_train:
        return {"missing": True}
    size = BUDGETS[budget][method]
    subject_dir = write_subject_folder(index, Path(args.work_dir, "subjects", subject_info(index)["slug"]))
    argv = [
        "--pretrained_model_name_or_path", args.base,
        "--instance_data_dir", str(subject_dir),
        "--output_dir", str(output),
        "--adapter", method,
        "--seed", str(seed),
        "--train_batch_size", str(args.train_batch_size),
        "--num_validation_images", "0",
        "--checkpointing_steps", "1000000",
        "--num_drift_images", "0",  # the judge measures drift itself
    ]  # fmt: skip
    for option, value in size.items():
        argv += [f"--{option}", *map(str, value if isinstance(value, list) else [value])]
    argv += [*PINNED_DEFAULTS, *PINNED_METHOD_DEFAULTS.get(method, [])] if recipe != "defaults" else []
    argv += ["--max_train_steps", str(args.max_train_steps)] if args.max_train_steps else []
    recipe_args = args.recipe_args[recipe]
    if "--class_captions" in recipe_args:  # the script makes them from the subject's class_prompts
        argv += ["--num_class_images", str(CLASS_IMAGES)]
    elif "--no-with_prior_preservation" not in recipe_args and "--class_data_dir" not in recipe_args:
        shape = subject_info(index)["shape"]
        argv += ["--class_data_dir", str(judge.class_folder(shape, Path(args.work_dir, "class", shape)))]
        argv += ["--num_class_images", str(CLASS_IMAGES)]
    try:
        return script.main(script.parse_args(argv + recipe_args))
    except SystemExit as stop:  # the script stops a diverged run with a message
        output.mkdir(parents=True, exist_ok=True)
        (output / "diverged.txt").write_text(str(stop))
        return {"diverged": str(stop)}


# --- evaluation, the same numbers for every adapter ---------------------------------------------


class Judge:
    """Loads the base pipeline once and scores the base model or any adapter on fixed numbers."""

    def __init__(self, args: argparse.Namespace):
        from diffusers import DDPMScheduler, StableDiffusionPipeline

        from plugin.toy.data import make_prompts

        self.args = args
        self.pipe = StableDiffusionPipeline.from_pretrained(args.base)
        self.pipe.set_progress_bar_config(disable=True)
        self.noise_scheduler = DDPMScheduler.from_config(self.pipe.scheduler.config)
        self.resolution = self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor
        self.prompts = make_prompts(args.num_prompts, seed=JUDGE_PROMPT_SEED)
        self.identifier = None  # (word, new tokens) of a pivotal-tuning run's embeddings, while loaded

    @contextlib.contextmanager
    def loaded(self, adapter: Path | None, name: str = "judged"):
        """`adapter` on the base's UNet and text encoder while the block runs (nothing for None), removed
        afterwards, so that the next adapter is judged on the base again. A pivotal-tuning run's
        embeddings beside it are loaded too, and `said` writes the identifier as their tokens."""
        import plugin
        from plugin.pivotal import EMBEDDINGS_FILENAME, load_embeddings

        models = {"unet": self.pipe.unet, "text_encoder": self.pipe.text_encoder}
        if adapter is not None:
            plugin.load_adapter(adapter, models, name)
            if (adapter.parent / EMBEDDINGS_FILENAME).is_file():
                tokens, word = load_embeddings(self.pipe, adapter.parent / EMBEDDINGS_FILENAME)
                self.identifier = word, tokens
        try:
            yield models
        finally:
            for model in models.values():
                if name in plugin.list_adapters(model):
                    plugin.delete_adapters(model, name)
            if self.identifier is not None:
                self.pipe.unload_textual_inversion()
                self.identifier = None

    def said(self, prompts: list[str]) -> list[str]:
        """The subject's prompts as the loaded adapter takes them (a pivotal run's tokens for its word)."""
        from plugin.pivotal import replace_identifier

        if self.identifier is None:
            return prompts
        word, tokens = self.identifier
        return [replace_identifier(prompt, word, tokens) for prompt in prompts]

    def prompt_images(self) -> tuple[list[str], list]:
        """The non-subject prompts of prompt following and the current model's images of them."""
        texts = [p["prompt"] for p in self.prompts]
        return texts, self.generate(texts, [p["seed"] for p in self.prompts])

    def class_folder(self, shape: str, folder: Path) -> Path:
        """CLASS_IMAGES images the base generates for "a <shape>" (DreamBooth's class images), once."""
        if folder.is_dir():
            return folder
        partial = folder.with_name(folder.name + f".partial-{time.time_ns()}")
        partial.mkdir(parents=True)
        images = self.generate([f"a {shape}"] * CLASS_IMAGES, list(range(10**6, 10**6 + CLASS_IMAGES)))
        from PIL import Image

        for i, image in enumerate(images):
            Image.fromarray(image).save(partial / f"{i:05d}.png")
        try:
            partial.rename(folder)
        except OSError:  # another shard made them first (the same images)
            shutil.rmtree(partial, ignore_errors=True)
        return folder

    def loss(self, images: list, prompts: list[str]) -> float:
        """Mean denoising loss of images captioned one by one, on fixed timesteps and noise."""
        from plugin.training import denoising_loss

        p, total = self.pipe, 0.0
        for image, prompt in zip(images, prompts):
            total += denoising_loss(
                p.unet,
                p.vae,
                p.text_encoder,
                p.tokenizer,
                self.noise_scheduler,
                [image],
                prompt,
                self.resolution,
                num_timesteps=self.args.eval_timesteps,
                noises_per_timestep=self.args.eval_noises,
                seed=0,
            )
        return total / len(images)

    def generate(self, prompts: list[str], seeds: list[int]) -> list:
        import numpy as np
        import torch

        images = []
        for start in range(0, len(prompts), 16):
            out = self.pipe(
                prompts[start : start + 16],
                num_inference_steps=self.args.inference_steps,
                guidance_scale=self.args.guidance_scale,
                generator=[torch.Generator().manual_seed(s) for s in seeds[start : start + 16]],
                output_type="np",
            ).images
            images.extend((np.clip(out, 0, 1) * 255).round().astype(np.uint8))
        return images

    def subject_prompts(self, index: int) -> dict[str, list[str]]:
        """The subject prompts judged: alone, on its training backgrounds, on unseen ones."""
        from plugin.toy.data import make_caption

        info, n = subject_info(index), self.args.subject_samples
        train_bgs, unseen_bgs = subject_backgrounds(index)
        return {
            "instance": [info["instance_prompt"]] * n,
            "training backgrounds": [
                make_caption(info["shape"], info["token"], train_bgs[i % len(train_bgs)]) for i in range(n)
            ],
            "unseen backgrounds": [
                make_caption(info["shape"], info["token"], unseen_bgs[i % len(unseen_bgs)]) for i in range(n)
            ],
        }

    def score(self, index: int, adapter: Path | None = None) -> tuple[dict, dict]:
        """Metrics of the base (`adapter=None`) or of `adapter` on subject `index`, and sample images."""
        from plugin.toy.analyser import analyse, analyse_subject, parse_prompt, score_images
        from plugin.training import list_images, load_rgb

        info = subject_info(index)
        folder = write_subject_folder(index, Path(self.args.work_dir, "subjects", info["slug"]))
        prompts = json.loads((folder / "prompts.json").read_text())
        train_views = [load_rgb(path) for path in list_images(folder)]
        heldout_views = [load_rgb(path) for path in list_images(folder / "heldout")]
        with self.loaded(adapter):
            texts, images = self.prompt_images()
            accuracy = score_images(images, texts)
            samples, verdicts = {}, {}
            subject_prompts = self.subject_prompts(index)
            for kind, kind_prompts in subject_prompts.items():
                samples[kind] = self.generate(self.said(kind_prompts), list(range(len(kind_prompts))))
                verdicts[kind] = [analyse_subject(image, info) for image in samples[kind]]
            unseen = subject_prompts["unseen backgrounds"]
            every = [v for kind in verdicts.values() for v in kind]
            class_images = class_objects(info["shape"], self.args.class_images)
            backgrounds_kept = [
                analyse(image).background == parse_prompt(prompt)["background"]
                for image, prompt in zip(samples["unseen backgrounds"], unseen)
            ]
            metrics = {
                "train_loss": self.loss(train_views, self.said(list(prompts["captions"].values()))),
                "heldout_loss": self.loss(heldout_views, self.said(list(prompts["heldout"].values()))),
                "class_loss": self.loss(class_images, [info["class_prompt"]] * len(class_images)),
                "prompt_accuracy": accuracy["all"],
                **{
                    f"rate_{kind.split()[0]}": fmean(v["is_subject"] for v in vs)
                    for kind, vs in verdicts.items()
                },
                "shape_kept": fmean(v["shape_ok"] for v in every),
                "order_kept": colour_order_kept(every, info),
                "background_kept": fmean(backgrounds_kept),
            }
        return metrics, {kind: images[:2] for kind, images in samples.items()}


def colour_order_kept(verdicts: list[dict], info: dict) -> float | None:
    """Of the samples recognised as a two-colour subject, the share with its colours in order (the
    first left, on top, outside): what mirrored training views cost a one-sided subject. None for a
    one-colour subject or when no sample is the subject."""
    recognised = [v for v in verdicts if v["is_subject"]]
    if len(info["colours"]) < 2 or not recognised:
        return None
    return fmean(v["order_ok"] for v in recognised)


JUDGE_SETTINGS = (
    "base", "eval_timesteps", "eval_noises", "class_images", "num_prompts", "subject_samples",
    "inference_steps", "guidance_scale",
)  # fmt: skip


def judged(judge: Judge, folder: Path, index: int, adapter: Path | None) -> tuple[dict, dict]:
    """`judge.score(index, adapter)`, kept in `folder` (judge.json, judge_samples.npz) and reused while
    the adapter file and the judging settings are unchanged (and `--rejudge` is off): a re-run after an
    interruption resumes."""
    import numpy as np

    stat = adapter.stat() if adapter is not None else None
    key = {
        **{name: getattr(judge.args, name) for name in JUDGE_SETTINGS},
        "subject": SUBJECTS[index],
        "adapter": None if stat is None else [stat.st_size, stat.st_mtime_ns],
    }
    scores_file, samples_file = folder / "judge.json", folder / "judge_samples.npz"
    if scores_file.is_file() and samples_file.is_file() and not judge.args.rejudge:
        saved = json.loads(scores_file.read_text())
        if saved["key"] == json.loads(json.dumps(key)):
            with np.load(samples_file) as arrays:
                return saved["scores"], {kind: list(arrays[kind]) for kind in arrays.files}
    scores, samples = judge.score(index, adapter)
    folder.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(samples_file, **{kind: np.stack(images) for kind, images in samples.items()})
    scores_file.write_text(json.dumps({"key": key, "scores": scores}, indent=1))
    return scores, samples


def reused_runs(args: argparse.Namespace) -> dict[tuple, dict]:
    """The runs of the `--reuse` results files, by job: a report over more seeds than one session can
    train keeps the runs an earlier one published. Refused when those were judged or trained otherwise."""
    index_of = {subject_info(index)["name"]: index for index in range(len(SUBJECTS))}
    compared = (*JUDGE_SETTINGS, "train_batch_size", "max_train_steps")

    def value(settings: dict, name: str):  # the base by folder name: a clone elsewhere holds the same one
        return Path(settings[name]).name if name == "base" else settings[name]

    found = {}
    for name in args.reuse:
        path = Path(args.output_dir, f"{name}.json")
        if not path.is_file():
            raise SystemExit(f"--reuse: {path} does not exist")
        earlier = json.loads(path.read_text())
        settings = earlier["settings"]
        differ = [f"{k} {value(settings, k)!r} (here {value(vars(args), k)!r})" for k in compared
                  if value(settings, k) != value(vars(args), k)]  # fmt: skip
        if differ:
            raise SystemExit(f"--reuse: {path} was judged with other settings: {', '.join(differ)}")
        for run in earlier["runs"]:
            recipe = run["recipe"]
            if recipe in args.recipe_args and settings["recipe_args"][recipe] != args.recipe_args[recipe]:
                raise SystemExit(
                    f"--reuse: {path}'s recipe {recipe!r} ran {settings['recipe_args'][recipe]}, "
                    f"this report's runs {args.recipe_args[recipe]}"
                )
            found[(recipe, run["method"], run["budget"], index_of[run["subject"]], run["seed"])] = run
    return found


def weight_change(judge: Judge, folder: Path, metrics: dict) -> float:
    """The run's largest `||W' - W|| / ||W||` over its adapted layers: the script's own number, or,
    for runs older than that number, measured on the adapter file."""
    if metrics.get("largest_relative_weight_change") is not None:
        return metrics["largest_relative_weight_change"]
    from plugin.training import largest_weight_change

    with judge.loaded(folder / "adapter.safetensors", "measured") as models:
        return largest_weight_change(models)[1]


def adapter_parameters(path: Path) -> int:
    """Trainable parameters of an adapter file: every tensor but the scales."""
    import math

    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return sum(
            math.prod(handle.get_slice(k).get_shape()) for k in handle.keys() if not k.endswith(".scale")
        )


def relative(scores: dict, base: dict) -> dict:
    """A run's scores next to its subject's base model: the ratios and changes the tables report."""
    return {
        "heldout_fit": scores["heldout_loss"] / base["heldout_loss"],
        "train_fit": scores["train_loss"] / base["train_loss"],
        "class_drift": 100 * (scores["class_loss"] / base["class_loss"] - 1),
        "prompt_following": scores["prompt_accuracy"] / max(base["prompt_accuracy"], 1e-9),
    }


# --- tables and plots ---------------------------------------------------------------------------

REPORTED = (
    ("params", "params", "{:,.0f}"),
    ("heldout_fit", "held-out fit ×base ↓", "{:.3f}"),
    ("train_fit", "training fit ×base", "{:.3f}"),
    ("class_drift", "class drift % ↓", "{:+.1f}"),
    ("prompt_following", "prompt following ×base ↑", "{:.2f}"),
    ("rate_instance", "subject: instance prompt ↑", "{:.2f}"),
    ("rate_training", "training bgs ↑", "{:.2f}"),
    ("rate_unseen", "unseen bgs ↑", "{:.2f}"),
    ("shape_kept", "shape kept ↑", "{:.2f}"),
    ("order_kept", "colour order kept ↑", "{:.2f}"),
    ("background_kept", "background kept ↑", "{:.2f}"),
    ("weight_change", "largest ‖W'−W‖/‖W‖ (max) ↓", "{:.3g}"),
)
LARGEST = {"weight_change"}  # reported as the largest over the runs, not their mean


def summarise(runs: list[dict], keys: tuple[str, ...]) -> list[dict]:
    """Means over the runs of each group of `keys`; spreads: standard deviation over seeds of the
    per-seed means (0 with one seed). A measure a run lacks (None: colour order for one colour, or a
    run judged before the measure existed) is averaged over the runs that have it."""
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        groups.setdefault(tuple(run[k] for k in keys), []).append(run)
    rows = []
    for group_key, group in groups.items():
        row = {**dict(zip(keys, group_key)), "runs": len(group), "seeds": len({r["seed"] for r in group})}
        for key, _, _ in REPORTED:
            if key in LARGEST:
                row[key], row[f"{key}_std"] = max(r[key] for r in group), 0.0
                continue
            measured = [r for r in group if r.get(key) is not None]
            if not measured:
                row[key] = row[f"{key}_std"] = None
                continue
            row[key] = sum(r[key] for r in measured) / len(measured)
            by_seed: dict[int, list[float]] = {}
            for r in measured:
                by_seed.setdefault(r["seed"], []).append(r[key])
            row[f"{key}_std"] = spread([sum(v) / len(v) for v in by_seed.values()])
        rows.append(row)
    return rows


def table(rows: list[dict], keys: tuple[str, ...]) -> str:
    headers = [*keys, "runs", *(title for _, title, _ in REPORTED)]
    body = []
    for row in rows:
        cells = [f"`{row[k]}`" if k in ("method", "recipe") else str(row[k]) for k in keys] + [
            str(row["runs"])
        ]
        for key, _, fmt in REPORTED:
            if row[key] is None:
                cells.append("—")
                continue
            mean, std = fmt.format(row[key]), fmt.format(row[f"{key}_std"]).lstrip("+")
            plain = key == "params" or key in LARGEST or row["seeds"] < 2
            cells.append(mean if plain else f"{mean} ± {std}")
        body.append(cells)
    return markdown_table(headers, body, "l" * len(keys) + "r" * (1 + len(REPORTED)))


def base_table(bases: dict[int, dict]) -> str:
    headers = ["subject", "difficulty", "held-out loss", "class loss", "prompt accuracy", "subject: instance",
               "training bgs", "unseen bgs", "shape kept"]  # fmt: skip
    body = []
    for index, b in bases.items():
        info = subject_info(index)
        body.append(
            [
                info["name"],
                info["difficulty"],
                f"{b['heldout_loss']:.4f}",
                f"{b['class_loss']:.4f}",
                f"{b['prompt_accuracy']:.2f}",
                f"{b['rate_instance']:.2f}",
                f"{b['rate_training']:.2f}",
                f"{b['rate_unseen']:.2f}",
                f"{b['shape_kept']:.2f}",
            ]  # fmt: skip
        )
    return markdown_table(headers, body, "ll" + "r" * 7)


def plot_fit_vs_drift(runs: list[dict], rows: list[dict], path: Path) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 5.5))
    markers = "osD^v<>pPX*h"
    recipes = list(dict.fromkeys(r["recipe"] for r in rows))
    for run in runs:
        marker = markers[recipes.index(run["recipe"]) % len(markers)]
        ax.scatter(
            run["class_drift"],
            run["heldout_fit"],
            color=COLORS[run["method"]],
            marker=marker,
            alpha=0.2,
            s=18,
        )
    for row in rows:
        ax.errorbar(
            row["class_drift"],
            row["heldout_fit"],
            xerr=row["class_drift_std"],
            yerr=row["heldout_fit_std"],
            color=COLORS[row["method"]],
            marker=markers[recipes.index(row["recipe"]) % len(markers)],
            markersize=9,
            markeredgecolor="black",
            capsize=3,
            linestyle="none",
            label=f"{row['method']} {row['recipe']} {row['budget']}",
        )
    ax.axhline(1, color="black", linewidth=0.8)
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_xlabel("class drift: change of the class images' denoising loss (%)  → worse")
    ax.set_ylabel("held-out fit: loss on unseen views / base's  ↓ better")
    ax.set_title(
        "DreamBooth on unseen subjects: held-out fit vs drift (means over subjects; faint: runs)", fontsize=9
    )
    ax.legend(fontsize=6, ncol=2, loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def sample_grid(rows: list[tuple[str, dict]], path: Path) -> Path:
    """One row per (subject, model): two samples each of the instance prompt, a training background
    and an unseen background."""
    from PIL import Image, ImageDraw

    cell, label, header = 64, 230, 16
    kinds = ["instance", "training backgrounds", "unseen backgrounds"]
    grid = Image.new("RGB", (label + cell * 2 * len(kinds), header + cell * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for c, kind in enumerate(kinds):
        draw.text((label + c * 2 * cell + 2, 2), kind, fill="black")
    for r, (name, samples) in enumerate(rows):
        draw.text((4, header + r * cell + cell // 2 - 6), name, fill="black")
        for c, image in enumerate(image for kind in kinds for image in samples[kind][:2]):
            grid.paste(
                Image.fromarray(image).resize((cell - 2, cell - 2)),
                (label + c * cell + 1, header + r * cell + 1),
            )
    grid.save(path, optimize=True)
    return path


# --- driver -------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    import torch
    from tqdm import tqdm

    if args.threads:
        torch.set_num_threads(args.threads)
    env = environment("cpu", args.threads)
    start = time.time()
    script = training_script()
    judge = Judge(args)
    jobs = [
        (recipe, method, budget, index, seed)
        for recipe in args.recipes
        for budget in args.budgets
        for method in args.methods
        for index in args.subjects
        for seed in args.seeds
    ]
    if args.shard is not None:
        jobs = jobs[args.shard[0] :: args.shard[1]]
    bases: dict[int, tuple[dict, dict]] = {}  # judged when first needed: a shard judges only its own

    def base(index: int) -> tuple[dict, dict]:
        if index not in bases:
            folder = Path(args.work_dir, "base", subject_info(index)["slug"])
            bases[index] = judged(judge, folder, index, None)
        return bases[index]

    reused = reused_runs(args)
    runs, diverged, samples, taken = [], [], {}, 0
    for job in tqdm(jobs, desc="train and judge"):
        recipe, method, budget, index, seed = job
        if job in reused and not finished(run_folder(args, job)):
            runs.append(reused[job])
            taken += 1
            continue
        metrics = train(args, script, judge, job)
        gc.collect()
        if "missing" in metrics:
            continue
        if "diverged" in metrics:
            diverged.append({"recipe": recipe, "method": method, "budget": budget, "subject": index, "seed": seed,
                             "message": metrics["diverged"]})  # fmt: skip
            continue
        folder = run_folder(args, job)
        scores, run_samples = judged(judge, folder, index, folder / "adapter.safetensors")
        if not any(shown[:4] == job[:4] for shown in samples):  # the first seed judged here (--reuse)
            samples[job] = run_samples
        runs.append(
            {
                "recipe": recipe,
                "method": method,
                "budget": budget,
                "subject": subject_info(index)["name"],
                "difficulty": SUBJECTS[index][0],
                "seed": seed,
                "params": adapter_parameters(folder / "adapter.safetensors"),
                "steps": metrics.get("steps"),
                "train_time_s": metrics.get("train_loop_time_s"),
                "weight_change": weight_change(judge, folder, metrics),
                **scores,
                **relative(scores, base(index)[0]),
            }  # fmt: skip
        )
    if args.shard is not None:
        print(f"shard {args.shard[0]}/{args.shard[1]}: {len(runs)} runs judged, {len(diverged)} diverged")
        return {"runs": runs, "diverged": diverged}
    for index in args.subjects:
        base(index)
    env["wall_time_s"] = round(time.time() - start)

    rows = summarise(runs, ("recipe", "method", "budget"))
    per_subject = summarise(runs, ("recipe", "method", "budget", "subject"))
    output = Path(args.output_dir)
    command = command_line(argv, "benchmarks/quality.py")
    recipes = "; ".join(
        f"`{name}`: `{' '.join(a) or 'the script defaults'}`" for name, a in args.recipe_args.items()
    )
    published = ", ".join(f"{name}.json" for name in args.reuse)
    reuse_note = f" {taken} of the {len(runs)} runs as published in {published} (`--reuse`)."
    reuse_note = reuse_note if taken else ""
    body = "\n\n".join(
        [
            f"DreamBooth (`train_scripts/train_dreambooth_liera.py`) on `{Path(args.base).name}`, {len(args.subjects)} "
            f"subjects x {len(args.seeds)} seeds ({args.seeds}), batch {args.train_batch_size}"
            + (f", {args.max_train_steps} steps" if args.max_train_steps else "")
            + f". Recipes: {recipes}. Budgets: {', '.join(args.budgets)} (ranks in `BUDGETS`)."
            + reuse_note,
            "Means over subjects and seeds; ± is the standard deviation over seeds of the subject means. "
            f"Held-out fit: denoising loss on {VIEWS} views per subject that training never saw (other places, "
            "sizes and backgrounds), captioned with their background, ÷ the base model's; training fit: the same "
            f"on the {VIEWS} training views. Class drift: change of the loss on {args.class_images} rendered "
            "objects of the subject's class captioned with the class prompt. Prompt following: the analyser's "
            f"accuracy on {args.num_prompts} non-subject prompts ÷ the base's. Subject rates: share of "
            f"{args.subject_samples} samples per kind of prompt that the analyser recognises as the subject "
            f"({args.inference_steps} steps, guidance {args.guidance_scale}); colour order kept: of those, the "
            "share with a two-colour subject's colours in order (— for one colour or runs judged before it).",
            table(rows, ("recipe", "method", "budget")),
            "Per subject:\n\n" + table(per_subject, ("recipe", "method", "budget", "subject")),
            "The base model on each subject (the denominators):\n\n"
            + base_table({i: b[0] for i, b in bases.items()}),
            *[
                f"Diverged (left out of the means): {d['recipe']} {d['method']} {d['budget']} subject {d['subject']} "
                f"seed {d['seed']}: {d['message']}"
                for d in diverged
            ],
            f"![fit vs drift]({args.name}_fit_vs_drift.png)\n\n![samples]({args.name}_samples.png)",
        ]
    )
    write_markdown(output / f"{args.name}.md", "DreamBooth quality on unseen subjects", env, body, command)
    payload = {"environment": env, "command": command, "settings": {k: v for k, v in vars(args).items()}}
    payload.update({"bases": {subject_info(i)["name"]: b[0] for i, b in bases.items()}})
    payload.update({"summary": rows, "per_subject": per_subject, "runs": runs, "diverged": diverged})
    write_json(output / f"{args.name}.json", payload)
    if not args.no_plot:
        plot_fit_vs_drift(runs, rows, output / f"{args.name}_fit_vs_drift.png")
        grid_rows = []
        for index in args.subjects:
            grid_rows.append((f"{subject_info(index)['name']}: base", bases[index][1]))
            for job, job_samples in samples.items():
                if job[3] == index:
                    seed = "" if job[4] == args.seeds[0] else f" seed {job[4]}"
                    grid_rows.append((f"  {job[1]} {job[0]}{seed}", job_samples))
        sample_grid(grid_rows, output / f"{args.name}_samples.png")
    print(body)
    return payload


if __name__ == "__main__":
    main()
