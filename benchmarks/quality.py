#!/usr/bin/env python
"""What an adapter gives: DreamBooth with lora, flora and liera at matched parameter budgets.

    python benchmarks/quality.py                   # toy base + shipped subject, 3 methods x 3 budgets x 3 seeds
    python benchmarks/quality.py --methods liera --budgets small --seeds 0 --max-train-steps 20

Every run is `train_scripts/train_dreambooth_liera.py` itself (`main(parse_args([...]))`, the same code
path as the command line) on the toy base (`assets/toy-sd`) and the shipped subject (`assets/subject`),
without prior preservation. Then every adapter is judged on the same fixed numbers:

- subject fit: held-out denoising loss on the subject images with the instance prompt, at fixed
  timesteps and noise draws that training never sees (`plugin.training.denoising_loss`), relative to
  the base model's loss on the same numbers (lower is better);
- prior drift: change of the denoising loss on rendered class images (circles of the toy world's
  colours, captioned with the class prompt) from the base model's (closer to 0 is better);
- prompt following: the toy analyser's accuracy (colour, shape and background all right) on images
  generated for `--num-prompts` non-subject prompts, and its change from the base model's;
- subject rate: share of images generated for the instance prompt that the analyser recognises as the
  subject (a striped circle).

Ranks are chosen so that the three methods have about the same number of trainable parameters at each
budget (the tables give the exact counts). Runs are kept in `--work-dir` and reused when re-run.
Results: `benchmarks/results/quality.{md,json}`, `quality_fit_vs_drift.png`, `quality_samples_<method>.png`.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import sys
import time
from pathlib import Path

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

METHODS = ("lora", "flora", "liera")
# budget -> method -> (rank, conv_rank). Matched on the toy base's UNet (attn+conv, 89 modules):
# lora's rank sets the budget; flora and liera keep that rank on attention and spend the rest on
# Tucker ranks [r, r, 2, 2] of the convolutions, r chosen for the closest count. Trainable parameters
# (lora / flora / liera): small 47,744 / 47,205 / 46,981; medium 95,488 / 98,189 / 97,293;
# large 190,976 / 188,157 / 193,570.
BUDGETS: dict[str, dict[str, tuple[int, list[int] | None]]] = {
    "small": {"lora": (2, None), "flora": (2, [7, 7, 2, 2]), "liera": (2, [7, 7, 2, 2])},
    "medium": {"lora": (4, None), "flora": (4, [13, 13, 2, 2]), "liera": (4, [13, 13, 2, 2])},
    "large": {"lora": (8, None), "flora": (8, [21, 21, 2, 2]), "liera": (8, [22, 22, 2, 2])},
}
COLORS = {"lora": "tab:gray", "flora": "tab:orange", "liera": "tab:blue"}
MARKERS = {"small": "o", "medium": "s", "large": "D"}
GRID_SUBJECT = 4  # images of the instance prompt (seeds 0, 1, ...) in the sample grids
GRID_PROMPTS = 4  # non-subject prompts in the sample grids


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", default=str(REPO_ROOT / "assets" / "toy-sd"), help="Base pipeline folder.")
    parser.add_argument("--subject", default=str(REPO_ROOT / "assets" / "subject"), help="Instance images.")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--budgets", nargs="+", default=list(BUDGETS), choices=list(BUDGETS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--max-train-steps", type=int, default=400)
    parser.add_argument("--train-batch-size", type=int, default=4)
    parser.add_argument("--learning-rate", type=float, default=None, help="Default: the training script's.")
    parser.add_argument("--threads", type=int, default=None, help="torch threads. Default: torch's default.")
    parser.add_argument("--eval-timesteps", type=int, default=10, help="Timesteps of the denoising losses.")
    parser.add_argument("--eval-noises", type=int, default=4, help="Noise draws per image and timestep.")
    parser.add_argument("--class-images", type=int, default=16)
    parser.add_argument("--num-prompts", type=int, default=32, help="Non-subject prompts to generate.")
    parser.add_argument("--subject-samples", type=int, default=8, help="Images of the instance prompt.")
    parser.add_argument("--inference-steps", type=int, default=20)
    parser.add_argument("--guidance-scale", type=float, default=7.5)
    parser.add_argument("--work-dir", default=str(REPO_ROOT / "runs" / "quality"), help="Training runs.")
    parser.add_argument("--retrain", action="store_true", help="Train again even where a run exists.")
    parser.add_argument("--output-dir", default=str(RESULTS_DIR))
    parser.add_argument("--name", default="quality", help="Stem of the results files.")
    parser.add_argument("--no-plot", action="store_true", help="No plot and no sample grids.")
    return parser.parse_args(argv)


# --- training, through the training script ----------------------------------------------------


def training_script():
    path = REPO_ROOT / "train_scripts" / "train_dreambooth_liera.py"
    spec = importlib.util.spec_from_file_location("train_dreambooth_liera", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def train(args: argparse.Namespace, script, method: str, budget: str, seed: int) -> tuple[Path, dict]:
    """One DreamBooth run (or the one already in the work dir): its folder and metrics.json."""
    rank, conv_rank = BUDGETS[budget][method]
    output = Path(args.work_dir, f"{method}-{budget}-seed{seed}")
    done = (output / "adapter.safetensors").is_file() and (output / "metrics.json").is_file()
    if done and not args.retrain:
        return output, json.loads((output / "metrics.json").read_text())
    if (output / "diverged.txt").is_file() and not args.retrain:
        return output, {"diverged": (output / "diverged.txt").read_text()}
    argv = [
        "--pretrained_model_name_or_path", args.base,
        "--instance_data_dir", args.subject,
        "--output_dir", str(output),
        "--adapter", method,
        "--rank", str(rank),
        "--seed", str(seed),
        "--max_train_steps", str(args.max_train_steps),
        "--train_batch_size", str(args.train_batch_size),
        "--num_validation_images", "0",
        "--checkpointing_steps", str(10 * args.max_train_steps),
    ]  # fmt: skip
    if conv_rank is not None:
        argv += ["--conv_rank", *map(str, conv_rank)]
    if args.learning_rate is not None:
        argv += ["--learning_rate", str(args.learning_rate)]
    try:
        metrics = script.main(script.parse_args(argv))
    except SystemExit as stop:  # the script stops a diverged run with a message
        metrics = {"diverged": str(stop)}
        output.mkdir(parents=True, exist_ok=True)
        (output / "diverged.txt").write_text(str(stop))
    return output, metrics


# --- evaluation, the same numbers for every adapter ---------------------------------------------


def class_images(count: int, seed: int = 2024) -> list:
    """Circles of the toy world (random patterns, colours, sizes, places, backgrounds): the subject's
    class."""
    import numpy as np
    from PIL import Image

    from plugin.toy.data import COLOURS, IMAGE_SIZE, Object, render_scene, sample_object

    rng = np.random.default_rng(seed)
    images = []
    while len(images) < count:
        background = COLOURS[rng.integers(len(COLOURS))]
        shape, pattern, colours, extent = sample_object(rng, {background})
        if shape != "circle":
            continue
        margin = extent / 2 + 2
        centre = (
            float(rng.uniform(margin, IMAGE_SIZE - margin)),
            float(rng.uniform(margin, IMAGE_SIZE - margin)),
        )
        images.append(
            Image.fromarray(
                render_scene([Object(shape, pattern, colours, centre, extent)], background, rng=rng)
            )
        )
    return images


class Judge:
    """Loads the base pipeline once and scores the base model or any adapter on fixed numbers."""

    def __init__(self, args: argparse.Namespace):
        from diffusers import DDPMScheduler, StableDiffusionPipeline

        from plugin.toy.data import make_prompts
        from plugin.training import list_images, load_rgb

        self.args = args
        self.pipe = StableDiffusionPipeline.from_pretrained(args.base)
        self.pipe.set_progress_bar_config(disable=True)
        self.noise_scheduler = DDPMScheduler.from_config(self.pipe.scheduler.config)
        self.resolution = self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor
        prompts = json.loads(Path(args.subject, "prompts.json").read_text())
        missing = {"shape", "pattern", "colours"} - set(prompts)
        if missing:
            raise SystemExit(
                f"{Path(args.subject, 'prompts.json')}: the toy analyser needs the subject's {sorted(missing)}"
            )
        self.subject = prompts
        self.instance_prompt = prompts["instance_prompt"]
        self.class_prompt = prompts.get("class_prompt", "a circle")
        self.subject_images = [load_rgb(path) for path in list_images(args.subject)]
        self.class_images = class_images(args.class_images)
        self.prompts = make_prompts(args.num_prompts, seed=1)

    def loss(self, images: list, prompt: str) -> float:
        from plugin.training import denoising_loss

        p = self.pipe
        return denoising_loss(
            p.unet,
            p.vae,
            p.text_encoder,
            p.tokenizer,
            self.noise_scheduler,
            images,
            prompt,
            self.resolution,
            num_timesteps=self.args.eval_timesteps,
            noises_per_timestep=self.args.eval_noises,
            seed=0,
        )

    def generate(self, prompts: list[str], seeds: list[int]):
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

    def score(self, adapter: Path | None = None) -> tuple[dict, dict]:
        """Metrics of the base (`adapter=None`) or of `adapter`, and the images for a sample grid."""
        import plugin
        from plugin.toy.analyser import analyse_subject, score_images

        if adapter is not None:
            plugin.load_adapter(adapter, {"unet": self.pipe.unet}, "judged")
        try:
            texts = [p["prompt"] for p in self.prompts]
            generated = self.generate(texts, [p["seed"] for p in self.prompts])
            subject = self.generate(
                [self.instance_prompt] * self.args.subject_samples, list(range(self.args.subject_samples))
            )
            accuracy = score_images(generated, texts)
            metrics = {
                "subject_loss": self.loss(self.subject_images, self.instance_prompt),
                "class_loss": self.loss(self.class_images, self.class_prompt),
                "prompt_accuracy": accuracy["all"],
                "colour_accuracy": accuracy["colour"],
                "shape_accuracy": accuracy["shape"],
                "background_accuracy": accuracy["background"],
                "pattern_accuracy": accuracy["pattern"],
                "subject_rate": sum(analyse_subject(im, self.subject)["is_subject"] for im in subject)
                / len(subject),
            }
            grid = {"subject": subject[:GRID_SUBJECT], "prompts": generated[:GRID_PROMPTS]}
        finally:
            if adapter is not None:
                plugin.delete_adapters(self.pipe.unet, "judged")
        return metrics, grid


JUDGE_SETTINGS = (
    "base", "subject", "eval_timesteps", "eval_noises", "class_images", "num_prompts", "subject_samples",
    "inference_steps", "guidance_scale",
)  # fmt: skip


def judged(judge: Judge, folder: Path, adapter: Path | None) -> tuple[dict, dict]:
    """`judge.score(adapter)`, kept in `folder` (judge.json, judge_grid.npz) and reused while the
    adapter file and the judging settings are unchanged: a re-run after an interruption resumes."""
    import numpy as np

    stat = adapter.stat() if adapter is not None else None
    key = {
        **{name: getattr(judge.args, name) for name in JUDGE_SETTINGS},
        "adapter": None if stat is None else [stat.st_size, stat.st_mtime_ns],
    }
    scores_file, grid_file = folder / "judge.json", folder / "judge_grid.npz"
    if scores_file.is_file() and grid_file.is_file():
        saved = json.loads(scores_file.read_text())
        if saved["key"] == key:
            with np.load(grid_file) as arrays:
                return saved["scores"], {
                    "subject": list(arrays["subject"]),
                    "prompts": list(arrays["prompts"]),
                }
    scores, grid = judge.score(adapter)
    folder.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(grid_file, subject=np.stack(grid["subject"]), prompts=np.stack(grid["prompts"]))
    scores_file.write_text(json.dumps({"key": key, "scores": scores}, indent=1))
    return scores, grid


def adapter_parameters(path: Path) -> int:
    """Trainable parameters of an adapter file: every tensor but the scales."""
    import math

    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return sum(
            math.prod(handle.get_slice(k).get_shape()) for k in handle.keys() if not k.endswith(".scale")
        )


# --- tables and plots ---------------------------------------------------------------------------

REPORTED = (
    ("params", "params", "{:,.0f}"),
    ("subject_fit", "subject loss ×base ↓", "{:.3f}"),
    ("prior_drift", "prior drift (Δ class loss, %)", "{:+.2f}"),
    ("prompt_accuracy", "prompt accuracy", "{:.3f}"),
    ("prompt_accuracy_change", "Δ prompt accuracy", "{:+.3f}"),
    ("subject_rate", "subject rate ↑", "{:.2f}"),
)


def summarise(runs: list[dict]) -> list[dict]:
    groups: dict[tuple[str, str], list[dict]] = {}
    for run in runs:
        groups.setdefault((run["method"], run["budget"]), []).append(run)
    rows = []
    for budget in BUDGETS:
        for method in METHODS:
            group = groups.get((method, budget))
            if not group:
                continue
            row = {"method": method, "budget": budget, "seeds": len(group)}
            for key, _, _ in REPORTED:
                values = [run[key] for run in group]
                row[key] = sum(values) / len(values)
                row[f"{key}_std"] = spread(values)
            rows.append(row)
    return rows


def table(rows: list[dict], base: dict) -> str:
    headers = ["budget", "method", "seeds", *(title for _, title, _ in REPORTED)]
    body = []
    for row in rows:
        cells = [row["budget"], f"`{row['method']}`", str(row["seeds"])]
        for key, _, fmt in REPORTED:
            mean, std = fmt.format(row[key]), fmt.format(row[f"{key}_std"]).lstrip("+")
            cells.append(mean if key == "params" or row["seeds"] < 2 else f"{mean} ± {std}")
        body.append(cells)
    base_line = (
        f"Base model: subject loss {base['subject_loss']:.4f}, class loss {base['class_loss']:.4f}, "
        f"prompt accuracy {base['prompt_accuracy']:.3f} (colour {base['colour_accuracy']:.3f}, shape "
        f"{base['shape_accuracy']:.3f}, background {base['background_accuracy']:.3f}), subject rate "
        f"{base['subject_rate']:.2f}."
    )
    return markdown_table(headers, body, "llr" + "r" * len(REPORTED)) + "\n\n" + base_line


def plot_fit_vs_drift(runs: list[dict], rows: list[dict], path: Path) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 5))
    for run in runs:
        ax.scatter(
            run["prior_drift"],
            run["subject_fit"],
            color=COLORS[run["method"]],
            marker=MARKERS[run["budget"]],
            alpha=0.3,
            s=25,
        )
    for row in rows:
        ax.errorbar(
            row["prior_drift"],
            row["subject_fit"],
            xerr=row["prior_drift_std"],
            yerr=row["subject_fit_std"],
            color=COLORS[row["method"]],
            marker=MARKERS[row["budget"]],
            markersize=9,
            markeredgecolor="black",
            capsize=3,
            label=f"{row['method']} {row['budget']}",
        )
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_xlabel("prior drift: change of the class images' denoising loss (%)  → worse")
    ax.set_ylabel("subject fit: held-out subject loss / base's  ↓ better")
    ax.set_title("DreamBooth on the toy base: fit vs drift (means ± sd over seeds; faint: runs)", fontsize=10)
    ax.legend(fontsize=7, ncol=3, loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def sample_grid(
    method: str, rows: dict[str, dict], prompts: list[str], instance_prompt: str, path: Path
) -> Path:
    """Rows: the base, then each budget; columns: the instance prompt (seeds), then non-subject prompts."""
    from PIL import Image, ImageDraw

    cell, label, header = 80, 120, 56
    first = next(iter(rows.values()))
    columns = [f"{instance_prompt}\n(seed {s})" for s in range(len(first["subject"]))]
    columns += prompts[: len(first["prompts"])]
    grid = Image.new("RGB", (label + cell * len(columns), header + cell * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for c, text in enumerate(columns):
        words, lines = text.replace("\n", " \n ").split(" "), [""]
        for word in words:
            if word == "\n" or len(lines[-1]) + len(word) > 13:
                lines.append("")
            if word != "\n":
                lines[-1] = f"{lines[-1]} {word}".strip()
        draw.multiline_text((label + c * cell + 2, 2), "\n".join(lines[:4]), fill="black", spacing=1)
    draw.text((4, 2), f"{method}\n(seed 0 runs)", fill="black")
    for r, (name, images) in enumerate(rows.items()):
        draw.text((4, header + r * cell + cell // 2 - 6), name, fill="black")
        for c, image in enumerate([*images["subject"], *images["prompts"]]):
            tile = Image.fromarray(image).resize((cell - 2, cell - 2), Image.Resampling.NEAREST)
            grid.paste(tile, (label + c * cell + 1, header + r * cell + 1))
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
    jobs = [(m, b, s) for b in args.budgets for m in args.methods for s in args.seeds]
    trained = []
    for method, budget, seed in tqdm(jobs, desc="train"):
        folder, metrics = train(args, script, method, budget, seed)
        trained.append((method, budget, seed, folder, metrics))
        gc.collect()

    judge = Judge(args)
    base, base_grid = judged(judge, Path(args.work_dir, "base"), None)
    runs, grids = [], {m: {"base": base_grid} for m in args.methods}
    diverged = []
    for method, budget, seed, folder, metrics in tqdm(trained, desc="judge"):
        if "diverged" in metrics:
            diverged.append(
                {"method": method, "budget": budget, "seed": seed, "message": metrics["diverged"]}
            )
            continue
        scores, grid = judged(judge, folder, folder / "adapter.safetensors")
        if seed == args.seeds[0]:
            grids[method][budget] = grid
        runs.append(
            {
                "method": method,
                "budget": budget,
                "seed": seed,
                "rank": BUDGETS[budget][method][0],
                "conv_rank": BUDGETS[budget][method][1],
                "params": adapter_parameters(folder / "adapter.safetensors"),
                "train_time_s": metrics.get("train_loop_time_s", float("nan")),
                **scores,
                "subject_fit": scores["subject_loss"] / base["subject_loss"],
                "prior_drift": 100 * (scores["class_loss"] / base["class_loss"] - 1),
                "prompt_accuracy_change": scores["prompt_accuracy"] - base["prompt_accuracy"],
            }
        )
    rows = summarise(runs)
    env["wall_time_s"] = round(time.time() - start)

    output = Path(args.output_dir)
    command = command_line(argv, "benchmarks/quality.py")
    ranks = "; ".join(
        f"{budget}: "
        + ", ".join(f"{m} rank {r}" + (f" conv {c}" if c else "") for m, (r, c) in BUDGETS[budget].items())
        for budget in args.budgets
    )
    body = "\n\n".join(
        [
            f"DreamBooth (`train_scripts/train_dreambooth_liera.py`, no prior preservation) on `{Path(args.base).name}` "
            f"with the subject in `{Path(args.subject).name}`: {args.max_train_steps} steps, batch "
            f"{args.train_batch_size}, the script's default learning rate"
            f"{'' if args.learning_rate is None else f' overridden to {args.learning_rate}'}; seeds {args.seeds}. "
            f"Ranks: {ranks}. Targets: attention projections and resnet/sampler convolutions.",
            "Means ± sample standard deviations over seeds. Subject loss: held-out denoising loss on the "
            f"{len(judge.subject_images)} subject images ({args.eval_timesteps} fixed timesteps x {args.eval_noises} "
            f"fixed noise draws), divided by the base model's. Prior drift: change of the denoising loss on "
            f"{args.class_images} rendered circles captioned {judge.class_prompt!r}. Prompt accuracy: the toy "
            f"analyser's colour+shape+background accuracy on {args.num_prompts} non-subject prompts "
            f"({args.inference_steps} steps, guidance {args.guidance_scale}). Subject rate: share of "
            f"{args.subject_samples} images of {judge.instance_prompt!r} the analyser recognises as the subject.",
            table(rows, base)
            + "".join(
                f"\n\nDiverged (left out of the means): {d['method']} {d['budget']} seed {d['seed']}: {d['message']}"
                for d in diverged
            ),
            f"![fit vs drift]({args.name}_fit_vs_drift.png)",
            *[f"![{m} samples]({args.name}_samples_{m}.png)" for m in args.methods],
        ]
    )
    write_markdown(output / f"{args.name}.md", "Quality at matched parameter budgets", env, body, command)
    payload = {"environment": env, "command": command, "settings": vars(args), "base": base}
    payload.update({"summary": rows, "runs": runs, "diverged": diverged})
    write_json(output / f"{args.name}.json", payload)
    if not args.no_plot:
        plot_fit_vs_drift(runs, rows, output / f"{args.name}_fit_vs_drift.png")
        for method in args.methods:
            sample_grid(
                method,
                grids[method],
                [p["prompt"] for p in judge.prompts],
                judge.instance_prompt,
                output / f"{args.name}_samples_{method}.png",
            )
    print(body)
    return payload


if __name__ == "__main__":
    main()
