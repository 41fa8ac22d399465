#!/usr/bin/env python
"""How long exporting a LieRA adapter of an SD 1.5 UNet to a kohya LoRA takes, and how much it keeps.

    python benchmarks/export_speed.py                  # SD 1.5 UNet config, liera rank 8, attn+conv
    python benchmarks/export_speed.py --compare 8      # also a full SVD of the 8 largest deltas

A LieRA update `W ⊙ (exp(sD) - 1)` is full rank, so a LoRA holds it only approximately: the export
takes a truncated SVD of every module's `W' - W` (`plugin.export.truncated_svd`, through the Gram
matrix of the shorter side). The UNet is built from `assets/configs/sd15_unet.json` with random weights
(seed 0); the adapter's trained tensors get random values (seed 1, `--std`) so that its update is as
large as a trained one's (`--std 0.02` moves W' by about 5% of W). Times are wall seconds of
`lora_state_dict` (the whole export but the pipeline load and the file write), at a fixed rank and with
`rank auto` (the fewest ranks per module that keep `--keep` of its update); `--compare N` times the
previous method, a full `torch.linalg.svd`, on the N largest modules against the Gram path on the same.
Results: `benchmarks/results/export_speed.{md,json}`.
"""

from __future__ import annotations

import argparse
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
    write_json,
    write_markdown,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(REPO_ROOT / "assets" / "configs" / "sd15_unet.json"))
    parser.add_argument("--method", default="liera")
    parser.add_argument("--rank", type=int, default=8, help="The adapter's rank.")
    parser.add_argument("--export-rank", type=int, default=16, help="The fixed rank of the LoRA export.")
    parser.add_argument("--keep", type=float, default=0.99, help="The share kept by the rank-auto export.")
    parser.add_argument("--std", type=float, default=0.02, help="Std of the adapter's random trained values.")
    parser.add_argument("--compare", type=int, default=8, help="Modules timed with a full SVD too (0: none).")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--output-dir", default=str(RESULTS_DIR))
    parser.add_argument("--name", default="export_speed")
    return parser.parse_args(argv)


def adapted_unet(args: argparse.Namespace):
    import torch
    from diffusers import UNet2DConditionModel

    import plugin
    from plugin.config import AdapterConfig

    config = json.loads(Path(args.config).read_text())
    config.pop("_class_name", None)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**config).eval()
    plugin.add_adapter(unet, AdapterConfig(method=args.method, rank=args.rank), "a")
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in unet.parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=generator) * args.std)
    return unet


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import torch

    from plugin.export import effective_delta, lora_state_dict, summary, truncated_svd
    from plugin.inject import adapted_layers

    if args.threads:
        torch.set_num_threads(args.threads)
    env = environment("cpu", torch.get_num_threads())
    unet = adapted_unet(args)
    models = {"unet": unet}
    layers = adapted_layers(unet)
    rows, results = [], {}
    for label, rank, keep in [
        (f"rank {args.export_rank}", args.export_rank, None),
        (f"rank auto, keep {args.keep}", None, args.keep),
    ]:
        start = time.perf_counter()
        state, report = lora_state_dict(models, "a", rank, keep, progress=False)
        seconds = time.perf_counter() - start
        total = summary(report)
        params = sum(t.numel() for k, t in state.items() if not k.endswith(".alpha"))
        results[label] = {
            "seconds": seconds,
            "share_kept": total["share_kept"],
            "parameters": params,
            "ranks": total["ranks"],
        }
        rows.append(
            [
                label,
                f"{seconds:.1f}",
                f"{100 * total['share_kept']:.2f}",
                f"{params:,}",
                f"{min(total['ranks'])}-{max(total['ranks'])}",
            ]
        )
        print(rows[-1], flush=True)

    comparison = None
    if args.compare:
        largest = sorted(layers.values(), key=lambda layer: layer.base_layer.weight.numel(), reverse=True)
        timings = {"full SVD (torch.linalg.svd)": 0.0, "truncated_svd (randomised at a fixed rank)": 0.0}
        with torch.no_grad():
            for layer in largest[: args.compare]:
                delta = effective_delta(layer, layer.adapters["a"]).reshape(
                    layer.base_layer.weight.shape[0], -1
                )
                start = time.perf_counter()
                torch.linalg.svd(delta, full_matrices=False)
                timings["full SVD (torch.linalg.svd)"] += time.perf_counter() - start
                start = time.perf_counter()
                truncated_svd(delta, args.export_rank, None)
                timings["truncated_svd (randomised at a fixed rank)"] += time.perf_counter() - start
        comparison = {"modules": args.compare, **timings}
        print(comparison, flush=True)

    body = [
        f"A `{args.method}` adapter (rank {args.rank}, `attn+conv`: {len(layers)} modules) on the SD 1.5 UNet "
        f"config with random weights; its trained tensors random with std {args.std}. Export to a kohya LoRA "
        "(`plugin.export.lora_state_dict`, what `python -m plugin export` runs after loading the pipeline):",
        "",
        markdown_table(
            ["export", "seconds", "share of the update kept %", "LoRA parameters", "ranks"], rows, "lrrrr"
        ),
    ]
    if comparison:
        body += [
            "",
            f"The {args.compare} largest modules' SVDs alone, the previous method against the current one:",
            "",
            markdown_table(
                ["method", "seconds"],
                [[name, f"{comparison[name]:.1f}"] for name in list(comparison)[1:]],
                "lr",
            ),
        ]
    payload = {"environment": env, "args": vars(args), "exports": results, "svd_comparison": comparison}
    out = Path(args.output_dir)
    write_json(out / f"{args.name}.json", payload)
    write_markdown(
        out / f"{args.name}.md",
        "Exporting a LieRA adapter to a LoRA",
        env,
        "\n".join(body),
        command_line(sys.argv[1:] if argv is None else argv, "benchmarks/export_speed.py"),
    )
    return payload


if __name__ == "__main__":
    main()
