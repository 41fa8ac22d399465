#!/usr/bin/env python
"""Evidence that the toy base pipeline draws what it is asked for.

Generates one image per evaluation prompt (``plugin.toy.data.make_prompts``: single objects balanced
over shapes and patterns, with colours and a background; ``make_pair_prompts``: two objects), a
fixed seed per prompt, judges every image with the deterministic analyser of ``plugin.toy.analyser``
and reports the accuracy of every attribute (object count, shape, colours, pattern, background),
per pattern and per shape. Also writes a sample grid (prompts vs seeds) and times four 64x64 images
at 25 steps.

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

from plugin.toy.analyser import analyse, score_image  # noqa: E402
from plugin.toy.data import PATTERNS, SHAPES, make_pair_prompts, make_prompts  # noqa: E402

#: Rows of the sample grid: every pattern, shape and colour at least once, and two-object scenes.
GRID_PROMPTS = (
    "a red circle on a white background",
    "a blue and white striped square on a yellow background",
    "a green and black vertical striped triangle on a white background",
    "a yellow and purple diagonal striped diamond on a green background",
    "an orange and blue checked square on a white background",
    "a white and red dotted circle on a black background",
    "a black and yellow ringed square on a blue background",
    "a purple and orange two-tone diamond on a white background",
    "a red square and a yellow circle on a blue background",
    "a green triangle and a white and blue checked square on a red background",
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="assets/toy-sd")
    p.add_argument("--out_dir", default=None, help="default: the model directory")
    p.add_argument("--num_prompts", type=int, default=64, help="single-object prompts")
    p.add_argument("--num_pair_prompts", type=int, default=16, help="two-object prompts")
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
    label_w = 420
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

    items = make_prompts(args.num_prompts, args.prompt_seed) + make_pair_prompts(
        args.num_pair_prompts, args.prompt_seed
    )
    images = []
    t0 = time.perf_counter()
    for i in range(0, len(items), args.batch_size):
        chunk = items[i : i + args.batch_size]
        prompts, seeds = [it["prompt"] for it in chunk], [it["seed"] for it in chunk]
        images.extend(generate(pipe, prompts, seeds, args.steps, args.guidance_scale))
    gen_seconds = time.perf_counter() - t0

    keys = ("count", "shape", "colour", "pattern", "background")
    rows = []
    for it, im in zip(items, images):
        got = analyse(im)
        scores = score_image(im, it["prompt"])
        rows.append(
            {
                "prompt": it["prompt"],
                "seed": it["seed"],
                "objects": len(it.get("objects", [None])),
                "pattern": it.get("pattern"),
                "shape": it.get("shape"),
                "got": [{"shape": o.shape, "pattern": o.pattern, "colours": o.colours} for o in got.objects],
                "got_background": got.background,
                **{f"{k}_ok": scores[k] for k in keys},
                "all_ok": all(v for v in scores.values() if v is not None),
            }
        )

    def acc(key, subset=lambda r: True):
        vals = [r[key] for r in rows if subset(r) and r[key] is not None]
        return round(float(np.mean(vals)), 4) if vals else None

    single = lambda r: r["objects"] == 1  # noqa: E731
    pair = lambda r: r["objects"] == 2  # noqa: E731
    result = {
        "model": args.model,
        "num_prompts": len(rows),
        "steps": args.steps,
        "guidance_scale": args.guidance_scale,
        "scheduler": type(pipe.scheduler).__name__,
        "accuracy_one_object": {k: acc(f"{k}_ok", single) for k in (*keys, "all")},
        "accuracy_two_objects": {k: acc(f"{k}_ok", pair) for k in (*keys, "all")},
        "pattern_accuracy_by_pattern": {
            p: acc("pattern_ok", lambda r, p=p: single(r) and r["pattern"] == p) for p in PATTERNS
        },
        "shape_accuracy_by_shape": {
            s: acc("shape_ok", lambda r, s=s: single(r) and r["shape"] == s) for s in SHAPES
        },
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
    for name in ("accuracy_one_object", "accuracy_two_objects"):
        print(f"{name}: " + "  ".join(f"{k} {v:.1%}" for k, v in result[name].items() if v is not None))
    print("pattern accuracy by pattern:", result["pattern_accuracy_by_pattern"])
    print("shape accuracy by shape:", result["shape_accuracy_by_shape"])
    print(f"4 images x 25 steps: {seconds_4x25:.2f} s ({torch.get_num_threads()} threads)")
    print(f"wrote {out_dir / 'eval.json'}" + ("" if args.no_grid else f" and {out_dir / 'samples.png'}"))
    return result


if __name__ == "__main__":
    main()
