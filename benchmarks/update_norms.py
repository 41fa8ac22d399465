#!/usr/bin/env python
"""How large and how spread the trained updates are, per kind of layer: a method's `‖W'−W‖/‖W‖` and
the effective rank of `W'−W` (unfolded along the output channels: `(Σσ)²/Σσ²` of its singular values,
1 for a rank-1 update, the rank for equal singular values), averaged over the layers of each kind.

    python benchmarks/update_norms.py --recipes lora-kv5e-4-conv5e-4 --methods lora --subjects 1 3 4 6 --seeds 0

Reads the adapters `benchmarks/quality.py` trained (same arguments, same `--work-dir`; it trains
nothing). Results: `benchmarks/results/<name>.{md,json}`.
"""

from __future__ import annotations

import itertools
import sys
from collections import defaultdict
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import command_line, environment, markdown_table, write_json, write_markdown
from benchmarks.quality import parse_args, run_folder, subject_info

KINDS = ("linear", "conv 3x3", "conv 1x1", "text encoder")


def layer_kind(weight) -> str:
    if weight.ndim == 2:
        return "linear"
    return "conv 1x1" if all(size == 1 for size in weight.shape[2:]) else "conv 3x3"


def update_measures(models: dict, adapter_name: str) -> dict[str, tuple[float, float, int]]:
    """Per kind of layer (the UNet's Linear layers, 3x3 and 1x1 convs; the text encoder's layers): mean
    relative norm, mean effective rank, number of layers."""
    import torch

    from plugin.export import effective_delta
    from plugin.inject import adapted_layers

    found = defaultdict(list)
    with torch.no_grad():
        for component, model in models.items():
            for layer in adapted_layers(model).values():
                if adapter_name not in layer.adapters:
                    continue
                weight = layer.base_layer.weight.float()
                kind = "text encoder" if component == "text_encoder" else layer_kind(weight)
                delta = effective_delta(layer, layer.adapters[adapter_name]).float()
                singular = torch.linalg.svdvals(delta.reshape(delta.shape[0], -1))
                rank = float(singular.sum() ** 2 / (singular**2).sum().clamp_min(1e-30))
                found[kind].append((float(delta.norm() / weight.norm()), rank))
    return {
        kind: (sum(n for n, _ in rows) / len(rows), sum(r for _, r in rows) / len(rows), len(rows))
        for kind, rows in found.items()
    }


def main(argv: list[str] | None = None) -> dict:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    import plugin

    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(["--name", "update_norms", *argv])  # a --name given wins
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    rows = []
    for recipe, method, budget, index, seed in itertools.product(
        args.recipes, args.methods, args.budgets, args.subjects, args.seeds
    ):
        adapter = run_folder(args, (recipe, method, budget, index, seed)) / "adapter.safetensors"
        if not adapter.is_file():
            continue  # a recipe of another method, or not trained
        models = {
            "unet": UNet2DConditionModel.from_pretrained(args.base, subfolder="unet"),
            "text_encoder": CLIPTextModel.from_pretrained(args.base, subfolder="text_encoder"),
        }
        measures = update_measures(models, plugin.load_adapter(adapter, models))
        row = {"recipe": recipe, "method": method, "subject": subject_info(index)["name"], "seed": seed}
        for kind in KINDS:
            if kind in measures:
                norm, rank, count = measures[kind]
                row.update({f"{kind}: ‖ΔW‖/‖W‖": round(norm, 4), f"{kind}: effective rank": round(rank, 1)})
                row[f"{kind}: layers"] = count
        rows.append(row)
    keys = list(dict.fromkeys(key for row in rows for key in row))
    body = (
        "Per trained adapter and kind of adapted layer: the mean of `‖W'−W‖/‖W‖` and of the effective "
        "rank `(Σσ)²/Σσ²` of `W'−W` unfolded along its output channels.\n\n"
        + markdown_table(keys, [[row.get(k, "-") for k in keys] for row in rows])
    )
    command = command_line(argv, "benchmarks/update_norms.py")
    output = Path(args.output_dir)
    title = "The trained updates' size and spread, per kind of layer"
    write_markdown(output / f"{args.name}.md", title, environment(), body, command)
    write_json(output / f"{args.name}.json", {"environment": environment(), "command": command, "rows": rows})
    print(body)
    return {"rows": rows}


if __name__ == "__main__":
    main()
