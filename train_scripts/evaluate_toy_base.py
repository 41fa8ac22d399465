#!/usr/bin/env python
"""Evidence that the toy base pipeline draws what it is asked for.

Generates one image per evaluation prompt (``plugin.toy.data.make_prompts``: balanced over the four
shapes and eight colours, each with a background, a fixed seed per prompt), judges every image with
the deterministic analyser of ``plugin.toy.analyser`` and reports colour / shape / background
accuracy. Also writes a sample grid (prompts vs seeds) and times four 64x64 images at 25 steps.

    HF_HUB_OFFLINE=1 python train_scripts/evaluate_toy_base.py --model assets/toy-sd

writes ``samples.png`` and ``eval.json`` next to the model (or to ``--out_dir``).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from plugin.toy.analyser import analyse  # noqa: E402
from plugin.toy.data import make_prompts  # noqa: E402

#: Rows of the sample grid: every shape and every colour at least once.
GRID_PROMPTS = (
    "a red circle on a white background",
    "a blue square on a yellow background",
    "a green triangle on a black background",
    "a yellow diamond on a purple background",
    "an orange square on a blue background",
    "a purple circle on a green background",
    "a white triangle on a red background",
    "a black diamond on an orange background",
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="assets/toy-sd")
    p.add_argument("--out_dir", default=None, help="default: the model directory")
    p.add_argument("--num_prompts", type=int, default=64)
    p.add_argument("--prompt_seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance_scale", type=float, default=7.5)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--grid_columns", type=int, default=6)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (0: torch's default); the toy model gains little from more than one, and "
        "more than the free cores makes every step many times slower",
    )
    p.add_argument("--no_grid", action="store_true")
    return p.parse_args(argv)


def load_pipeline(path: str):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(path, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, prompts: list[str], seeds: list[int], steps: int, guidance: float) -> np.ndarray:
    """uint8 images ``(N, 64, 64, 3)``, image ``i`` from ``torch.Generator().manual_seed(seeds[i])``."""
    out = pipe(
        prompts,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=[torch.Generator().manual_seed(s) for s in seeds],
        output_type="np",
    ).images
    return (np.clip(out, 0, 1) * 255).round().astype(np.uint8)


def sample_grid(pipe, prompts, columns: int, steps: int, guidance: float, cell: int = 96) -> Image.Image:
    """One row per prompt (its text on the left), ``columns`` seeds per row."""
    label_w = 300
    grid = Image.new("RGB", (label_w + columns * cell, len(prompts) * cell), "white")
    draw = ImageDraw.Draw(grid)
    for r, prompt in enumerate(prompts):
        images = generate(pipe, [prompt] * columns, list(range(columns)), steps, guidance)
        for c, im in enumerate(images):
            grid.paste(
                Image.fromarray(im).resize((cell, cell), Image.NEAREST), (label_w + c * cell, r * cell)
            )
        draw.text((8, r * cell + cell // 2 - 6), prompt, fill="black")
    return grid


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out_dir = Path(args.out_dir or args.model)
    out_dir.mkdir(parents=True, exist_ok=True)
    pipe = load_pipeline(args.model)

    # timing: four 64x64 images, 25 steps (after one warm-up call)
    generate(pipe, ["a red circle"] * 4, [0, 1, 2, 3], 25, args.guidance_scale)
    t0 = time.perf_counter()
    generate(pipe, ["a red circle on a blue background"] * 4, [0, 1, 2, 3], 25, args.guidance_scale)
    seconds_4x25 = time.perf_counter() - t0

    items = make_prompts(args.num_prompts, args.prompt_seed)
    images = []
    t0 = time.perf_counter()
    for i in range(0, len(items), args.batch_size):
        chunk = items[i : i + args.batch_size]
        images.extend(
            generate(
                pipe,
                [it["prompt"] for it in chunk],
                [it["seed"] for it in chunk],
                args.steps,
                args.guidance_scale,
            )
        )
    gen_seconds = time.perf_counter() - t0

    rows = []
    for it, im in zip(items, images):
        a = analyse(im)
        rows.append(
            {
                "prompt": it["prompt"],
                "seed": it["seed"],
                "colour": it["colour"],
                "shape": it["shape"],
                "background": it["background"],
                "got_colour": a.colour,
                "got_shape": a.shape,
                "got_background": a.background,
                "colour_ok": a.colour == it["colour"],
                "shape_ok": a.shape == it["shape"],
                "background_ok": a.background == it["background"],
            }
        )

    def acc(key, subset=None):
        sel = [r for r in rows if subset is None or subset(r)]
        return round(float(np.mean([r[key] for r in sel])), 4)

    shapes = sorted({it["shape"] for it in items})
    colours = sorted({it["colour"] for it in items})
    result = {
        "model": args.model,
        "num_prompts": len(rows),
        "steps": args.steps,
        "guidance_scale": args.guidance_scale,
        "scheduler": type(pipe.scheduler).__name__,
        "accuracy": {
            "colour": acc("colour_ok"),
            "shape": acc("shape_ok"),
            "background": acc("background_ok"),
            "all_three": round(
                float(np.mean([r["colour_ok"] and r["shape_ok"] and r["background_ok"] for r in rows])), 4
            ),
        },
        "shape_accuracy_by_shape": {s: acc("shape_ok", lambda r, s=s: r["shape"] == s) for s in shapes},
        "colour_accuracy_by_colour": {c: acc("colour_ok", lambda r, c=c: r["colour"] == c) for c in colours},
        "seconds_4_images_25_steps": round(seconds_4x25, 3),
        "seconds_per_image_eval": round(gen_seconds / len(rows), 3),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "torch_threads": torch.get_num_threads(),
        "versions": {"torch": torch.__version__, "diffusers": __import__("diffusers").__version__},
        "per_prompt": rows,
    }
    (out_dir / "eval.json").write_text(json.dumps(result, indent=1) + "\n")
    if not args.no_grid:
        sample_grid(pipe, GRID_PROMPTS, args.grid_columns, args.steps, args.guidance_scale).save(
            out_dir / "samples.png", optimize=True
        )
    a = result["accuracy"]
    print(
        f"{len(rows)} prompts, {args.steps} steps, guidance {args.guidance_scale}: "
        f"colour {a['colour']:.1%}  shape {a['shape']:.1%}  background {a['background']:.1%}  "
        f"all three {a['all_three']:.1%}"
    )
    print("shape accuracy by shape:", result["shape_accuracy_by_shape"])
    print("colour accuracy by colour:", result["colour_accuracy_by_colour"])
    print(f"4 images x 25 steps: {seconds_4x25:.2f} s ({torch.get_num_threads()} threads)")
    print(f"wrote {out_dir / 'eval.json'}" + ("" if args.no_grid else f" and {out_dir / 'samples.png'}"))
    return result


if __name__ == "__main__":
    main()
