"""The DreamBooth yardstick of the toy base: can anything teach it a subject it never saw whole?

    python benchmarks/yardstick.py                 # 4 held-out subjects x (full, lora), 400 steps
    python benchmarks/yardstick.py --quick         # 2 subjects, 150 steps: a smoke run
    python benchmarks/yardstick.py --recipe script --name yardstick_script   # the script's recipe

Every subject is a combination of pattern x colours x shape held out of the toy base's pretraining
(`plugin.toy.data.HELDOUT`; the base knows each part, never the whole). For each subject, four
rendered views on four backgrounds train, with the instance prompt "a sks <shape>":

- `full`: the whole UNet fine-tuned (AdamW), the ceiling;
- `lora`: this project's `lora` preset (rank 8, attn+conv), as users train it.

Both use the same loop (epsilon loss, DDPM noise, batch 4, constant learning rate after a short
warm-up), the same data and the same seeds. `--recipe unet` trains the UNet alone on the instance
images (diffusers' plain DreamBooth); `--recipe script` is the training script's default recipe: the
text encoder trained too (whole, or `lora` adapters on its attention), prior preservation with 32
class images the base generates for "a <shape>", 800 steps, lora at the script's 1e-3. Then, per run, the toy analyser
(`plugin.toy.analyser.analyse_subject`) judges images sampled from the instance prompt alone and
on backgrounds the training views never showed: the share that is the subject (its shape, pattern
and both colours), and the share that keeps its shape. The base model is judged the same way on the
instance prompt and on the subject's full description ("a yellow and black striped circle"): the
second says whether the base could already compose the subject from its parts.

Results: `benchmarks/results/yardstick.{md,json}` and `yardstick_samples.png`; runs are cached in
`runs/yardstick/`, so an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))

from common import environment, markdown_table, write_json, write_markdown  # noqa: E402

from plugin.toy.analyser import analyse_subject  # noqa: E402
from plugin.toy.data import COLOURS, make_caption, make_subject_images, subject  # noqa: E402

METHODS = {"full": {"lr": 2e-4}, "lora": {"lr": 3e-3, "rank": 8}}
# --recipe -> what it trains, with what: `script` is train_scripts/train_dreambooth_liera.py's defaults.
RECIPES = {
    "unet": {"text_encoder": False, "class_images": 0, "steps": 400, "lr": {"full": 2e-4, "lora": 3e-3}},
    "script": {"text_encoder": True, "class_images": 32, "steps": 800, "lr": {"full": 2e-4, "lora": 1e-3}},
}
CLASS_SEEDS = 10**6  # the base's class images use seeds from here (as benchmarks/quality.py)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default=str(REPO_ROOT / "assets" / "toy-sd"))
    p.add_argument("--subjects", type=int, default=4, help="the first N held-out combinations")
    p.add_argument(
        "--indices",
        type=int,
        nargs="+",
        default=None,
        help="only these subjects (to split runs across processes)",
    )
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--recipe", default="unet", choices=list(RECIPES))
    p.add_argument("--steps", type=int, default=None, help="Default: the recipe's.")
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--views", type=int, default=4, help="training images per subject")
    p.add_argument("--samples", type=int, default=8, help="images per prompt judged")
    p.add_argument("--guidance_scale", type=float, default=7.5)
    p.add_argument("--inference_steps", type=int, default=25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work_dir", default=str(REPO_ROOT / "runs" / "yardstick"))
    p.add_argument("--out_dir", default=str(REPO_ROOT / "benchmarks" / "results"))
    p.add_argument("--name", default="yardstick")
    p.add_argument(
        "--captions",
        default="instance",
        choices=["instance", "background"],
        help="train every view with the instance prompt (diffusers' DreamBooth), or with a caption that "
        "also names its background ('a sks circle on a white background')",
    )
    p.add_argument("--quick", action="store_true", help="2 subjects, 150 steps, 4 samples")
    args = p.parse_args(argv)
    if args.steps is None:
        args.steps = RECIPES[args.recipe]["steps"]
    if args.quick:
        args.subjects, args.steps, args.samples = min(args.subjects, 2), 150, 4
    return args


def load_pipe(base: str):
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(base, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    return pipe, noise_scheduler


@torch.no_grad()
def generate(pipe, prompts: list[str], seeds: list[int], args, size: int | None = None) -> list[np.ndarray]:
    out = pipe(
        prompts,
        height=size,
        width=size,
        num_inference_steps=args.inference_steps,
        guidance_scale=args.guidance_scale,
        generator=[torch.Generator().manual_seed(s) for s in seeds],
        output_type="np",
    ).images
    return list((np.clip(out, 0, 1) * 255).round().astype(np.uint8))


def eval_prompts(subj: dict, train_backgrounds: list[str], n: int) -> dict[str, list[str]]:
    """The instance prompt alone, and on backgrounds the training views never showed."""
    unseen = [c for c in COLOURS if c not in train_backgrounds and c not in subj["colours"]]
    token_prompt = subj["instance_prompt"]
    return {
        "instance prompt": [token_prompt] * n,
        "unseen backgrounds": [
            make_caption(subj["shape"], subj["token"], unseen[i % len(unseen)]) for i in range(n)
        ],
    }


def judge(images: list[np.ndarray], subj: dict) -> dict:
    found = [analyse_subject(im, subj) for im in images]
    return {
        "subject_rate": float(np.mean([f["is_subject"] for f in found])),
        "shape_rate": float(np.mean([f["shape_ok"] for f in found])),
        "pattern_rate": float(np.mean([f["pattern_ok"] for f in found])),
    }


def train(
    pipe, noise_scheduler, method: str, images: list[np.ndarray], captions: list[str], class_prompt: str, args
) -> dict:
    """Fine-tune ``pipe`` in place on the subject's views, as ``--recipe`` says; returns the loss
    curve's ends."""
    import plugin
    from plugin import AdapterConfig
    from plugin.toy.data import to_tensor

    unet, vae, text_encoder, tokenizer = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
    recipe = RECIPES[args.recipe]
    lr = recipe["lr"][method]
    class_images = class_images_for(pipe, class_prompt, images[0].shape[0], args)
    models = [unet, text_encoder] if recipe["text_encoder"] else [unet]
    torch.manual_seed(args.seed)
    for model in models:
        if method == "full":
            model.requires_grad_(True)
        else:
            targets = "attn+conv" if model is unet else "attn"
            plugin.add_adapter(
                model, AdapterConfig(method="lora", rank=METHODS[method]["rank"], targets=targets), "subject"
            )
    params = [p for model in models for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)

    with torch.no_grad():
        pixels = torch.stack([to_tensor(im) for im in images + class_images])
        posterior = vae.encode(pixels).latent_dist
    ids = tokenizer(
        captions + [class_prompt] * len(class_images),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    frozen_cond = None
    if not recipe["text_encoder"]:  # a frozen text encoder: its embeddings once, not every step
        with torch.no_grad():
            frozen_cond = text_encoder(ids)[0]
    instances, classes = torch.arange(len(images)), len(images) + torch.arange(len(class_images))
    g = torch.Generator().manual_seed(args.seed)
    losses = []
    for model in models:
        model.train()
    for step in tqdm(range(args.steps), desc=f"[{method}] train", leave=False):
        idx = instances[torch.randint(0, len(images), (args.batch_size,), generator=g)]
        if len(class_images):  # prior preservation: as many class images, in the same batch
            idx = torch.cat(
                [idx, classes[torch.randint(0, len(class_images), (args.batch_size,), generator=g)]]
            )
        latents = posterior.mean[idx] + posterior.std[idx] * torch.randn(
            posterior.mean[idx].shape, generator=g
        )
        latents = latents * vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=g)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(idx),), generator=g)
        noisy = noise_scheduler.add_noise(latents, noise, t)
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 20)
        cond = text_encoder(ids[idx])[0] if frozen_cond is None else frozen_cond[idx]
        pred = unet(noisy, t, cond).sample
        # The instance and the class halves weigh the same (diffusers' prior_loss_weight 1).
        per_image = F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))
        loss = per_image[: args.batch_size].mean() + per_image[args.batch_size :].sum() / args.batch_size
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    for model in models:
        model.eval()
        model.requires_grad_(False)
    tenth = max(1, len(losses) // 10)
    return {
        "loss_first": float(np.mean(losses[:tenth])),
        "loss_last": float(np.mean(losses[-tenth:])),
        "trained_parameters": sum(p.numel() for p in params),
        "class_images": len(class_images),
    }


def class_images_for(pipe, class_prompt: str, size: int, args) -> list[np.ndarray]:
    """The recipe's class images: the base's own samples of the class prompt (DreamBooth's prior) at
    the views' size, made before training changes the base."""
    count = RECIPES[args.recipe]["class_images"]
    seeds = [CLASS_SEEDS + i for i in range(count)]
    return generate(pipe, [class_prompt] * count, seeds, args, size) if count else []


def run_one(args, index: int, method: str | None) -> dict:
    """Train (``method``) or not (``None``: the base) and judge; cached as JSON + images."""
    subj = subject(index)
    key = run_key(args, index, method or "base")
    cache = Path(args.work_dir) / f"{key}.json"
    if cache.exists():
        return json.loads(cache.read_text())
    pipe, noise_scheduler = load_pipe(args.base)
    views = make_subject_images(args.views, seed=1234 + index, subject_=subj)
    train_backgrounds = [info["background"] for _, info in views]
    t0 = time.time()
    result = {"subject": subj["name"], "index": index, "method": method or "base"}
    if method is not None:
        result.update(
            train(
                pipe,
                noise_scheduler,
                method,
                [im for im, _ in views],
                training_captions(args, subj, views),
                subj["class_prompt"],
                args,
            )
        )
    result["train_seconds"] = round(time.time() - t0, 1)
    prompts = eval_prompts(subj, train_backgrounds, args.samples)
    if method is None:  # can the base compose the subject from its description?
        prompts["description"] = [
            make_caption(subj["shape"], *subj["colours"][:1], None, None, subj["pattern"], subj["colours"][1])
        ] * args.samples
    samples = {}
    for name, plist in prompts.items():
        images = generate(pipe, plist, [args.seed * 1000 + i for i in range(len(plist))], args)
        result[name] = judge(images, subj)
        samples[name] = images
    Path(args.work_dir).mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        cache.with_suffix(".npz"),
        **{k: np.stack(v) for k, v in samples.items()},
        views=np.stack([im for im, _ in views]),
    )
    cache.write_text(json.dumps(result, indent=1) + "\n")
    return result


def training_captions(args, subj: dict, views) -> list[str]:
    if args.captions == "background":
        return [make_caption(subj["shape"], subj["token"], info["background"]) for _, info in views]
    return [subj["instance_prompt"]] * len(views)


def run_key(args, index: int, method: str) -> str:
    captions = "" if args.captions == "instance" or method == "base" else f"-{args.captions}"
    recipe = "" if args.recipe == "unet" or method == "base" else f"-{args.recipe}"
    return f"{index}-{method}-{args.steps}-{args.seed}{captions}{recipe}"


def sample_grid(args, rows: list[tuple[str, Path]], path: Path, per_row: int = 4) -> Path:
    """One row per run: its training views, then instance-prompt samples, then unseen backgrounds."""
    from PIL import Image, ImageDraw

    cell, label = 64, 170
    loaded = [(name, np.load(npz)) for name, npz in rows]
    columns = 2 + 2 * per_row
    grid = Image.new("RGB", (label + columns * cell, len(loaded) * cell), "white")
    draw = ImageDraw.Draw(grid)
    for r, (name, data) in enumerate(loaded):
        images = [
            *data["views"][:2],
            *data["instance prompt"][:per_row],
            *data["unseen backgrounds"][:per_row],
        ]
        for c, im in enumerate(images):
            grid.paste(Image.fromarray(im), (label + c * cell, r * cell))
        draw.text((4, r * cell + 26), name, fill="black")
    grid.save(path, optimize=True)
    return path


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    results = []
    jobs = [(i, m) for i in (args.indices or range(args.subjects)) for m in [None, *args.methods]]
    for index, method in tqdm(jobs, desc="yardstick"):
        results.append(run_one(args, index, method))
        r = results[-1]
        print(
            f"{r['subject']:>36} {r['method']:>5}: subject rate {r['instance prompt']['subject_rate']:.2f} "
            f"(unseen backgrounds {r['unseen backgrounds']['subject_rate']:.2f})"
        )
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    headers = [
        "subject",
        "run",
        "loss first→last",
        "subject rate: instance prompt",
        "unseen backgrounds",
        "shape kept",
        "pattern kept: instance prompt",
        "unseen backgrounds ",
        "base, description prompt",
    ]
    rows = []
    for r in results:
        losses = f"{r['loss_first']:.3f} → {r['loss_last']:.3f}" if "loss_first" in r else ""
        rows.append(
            [
                r["subject"],
                r["method"],
                losses,
                f"{r['instance prompt']['subject_rate']:.2f}",
                f"{r['unseen backgrounds']['subject_rate']:.2f}",
                f"{(r['instance prompt']['shape_rate'] + r['unseen backgrounds']['shape_rate']) / 2:.2f}",
                f"{r['instance prompt']['pattern_rate']:.2f}",
                f"{r['unseen backgrounds']['pattern_rate']:.2f}",
                f"{r['description']['subject_rate']:.2f}" if "description" in r else "",
            ]
        )
    summary = {}
    for method in ["base", *args.methods]:
        sel = [r for r in results if r["method"] == method]
        summary[method] = {
            k: float(np.mean([r[k]["subject_rate"] for r in sel]))
            for k in ("instance prompt", "unseen backgrounds")
        }
    body = (
        markdown_table(headers, rows)
        + "\n\nMeans over subjects (subject rate):\n\n"
        + markdown_table(
            ["run", "instance prompt", "unseen backgrounds"],
            [
                [m, f"{v['instance prompt']:.2f}", f"{v['unseen backgrounds']:.2f}"]
                for m, v in summary.items()
            ],
        )
    )
    env = environment("cpu", args.threads)
    settings = {
        k: getattr(args, k)
        for k in (
            "recipe",
            "steps",
            "batch_size",
            "views",
            "samples",
            "guidance_scale",
            "inference_steps",
            "seed",
        )
    }
    write_json(
        out / f"{args.name}.json",
        {
            "settings": settings,
            "methods": METHODS,
            "recipe": RECIPES[args.recipe],
            "environment": env,
            "runs": results,
            "summary": summary,
        },
    )
    command = "python benchmarks/yardstick.py" + (" --quick" if args.quick else "")
    command += "" if args.captions == "instance" else f" --captions {args.captions}"
    command += "" if args.recipe == "unet" else f" --recipe {args.recipe}"
    command += "" if args.name == "yardstick" else f" --name {args.name}"
    command += f" --indices {' '.join(map(str, args.indices))}" if args.indices else ""
    write_markdown(out / f"{args.name}.md", "DreamBooth yardstick on the toy base", env, body, command)
    grid_rows = [
        (
            f"{r['subject']}\n{r['method']}",
            Path(args.work_dir) / f"{run_key(args, r['index'], r['method'])}.npz",
        )
        for r in results
    ]
    sample_grid(args, grid_rows, out / f"{args.name}_samples.png")
    print(body)
    return {"runs": results, "summary": summary}


if __name__ == "__main__":
    main()
