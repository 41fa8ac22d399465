#!/usr/bin/env python
"""Why prompt following falls after DreamBooth: which attribute of the non-subject prompts fails, and
how often the failure is the trained subject's own pattern or colours (the subject bleeding into
prompts that never named it), and which half of the adapter loses it: the prompts' accuracy with
only the UNet's adapter switched on, and with only the text encoder's; with `--layer-kinds`, also with
only one kind of the UNet's adapted layers on (convs, attention, cross-attention's K/V, all but those).

    python benchmarks/bleed.py --recipes defaults --methods lora flora liera --subjects 1 3 4 6 --seeds 0

Reads the adapters `benchmarks/quality.py` trained (same arguments, same `--work-dir`; it trains
nothing) and generates its 16 non-subject prompts with the base and with each adapter, judged by
the toy analyser. Results: `benchmarks/results/<name>.{md,json}`.
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (
    command_line,
    environment,
    markdown_table,
    write_json,
    write_markdown,
)
from benchmarks.quality import Judge, parse_args, run_folder, subject_info

ATTRIBUTES = ("count", "shape", "colour", "pattern", "background")


def attribute_failures(judge: Judge, subject: dict | None) -> dict:
    """Failures per attribute on the judge's non-subject prompts, and how many of the wrong patterns
    (wrong colour sets) are the subject's."""
    from plugin.toy.analyser import _colours_match, analyse, score_image

    texts, images = judge.prompt_images()
    rows = [score_image(image, text) for image, text in zip(images, texts)]
    found = [analyse(image).main for image in images]
    out = {"prompts": len(rows), "all right": sum(all(v for v in r.values() if v is not None) for r in rows)}
    out.update({f"{key} wrong": sum(r[key] is False for r in rows) for key in ATTRIBUTES})
    if subject is not None:
        out["subject's pattern instead"] = sum(
            r["pattern"] is False and g is not None and g.pattern == subject["pattern"]
            for r, g in zip(rows, found)
        )
        out["subject's colours instead"] = sum(
            r["colour"] is False and g is not None and _colours_match(tuple(subject["colours"]), g.colours)
            for r, g in zip(rows, found)
        )
    return out


def accuracy_by_part(judge: Judge, models: dict) -> dict:
    """All-attributes-right count with one model's adapter switched off at a time: which part of the
    adapter (or the two together) costs prompt following."""
    import plugin
    from plugin.toy.analyser import score_images

    out = {}
    for part, model in models.items():
        if not plugin.list_adapters(model):
            continue
        others = [other for other in models.values() if other is not model]
        for other in others:
            plugin.disable_adapters(other)
        try:
            texts, images = judge.prompt_images()
            accuracy = score_images(images, texts)["all"]
        finally:
            for other in others:
                plugin.enable_adapters(other)
        out[f"all right, {part} adapter only"] = round(accuracy * len(texts))
    return out


# Kinds of the UNet's adapted layers, switched on alone (the rest of the UNet's adapter off).
LAYER_KINDS = {
    "convs": lambda name, layer: layer.base_layer.weight.ndim == 4,
    "attention": lambda name, layer: layer.base_layer.weight.ndim == 2,
    "cross-attention K/V": lambda name, layer: name.endswith(("attn2.to_k", "attn2.to_v")),
    "all but cross-attention K/V": lambda name, layer: not name.endswith(("attn2.to_k", "attn2.to_v")),
}


def accuracy_by_layer_kind(judge: Judge, unet) -> dict:
    """All-attributes-right count with only one kind of the UNet's adapted layers on (the text side as
    loaded): which layers' adapters cost prompt following."""
    from plugin.inject import adapted_layers
    from plugin.toy.analyser import score_images

    layers = adapted_layers(unet)
    out = {}
    for kind, chosen in LAYER_KINDS.items():
        for name, layer in layers.items():
            layer.enabled = chosen(name, layer)
        try:
            texts, images = judge.prompt_images()
            out[f"all right, UNet {kind} only"] = round(score_images(images, texts)["all"] * len(texts))
        finally:
            for layer in layers.values():
                layer.enabled = True
    return out


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    layer_kinds = "--layer-kinds" in argv  # bleed's own flag; the rest are quality's arguments
    argv = [arg for arg in argv if arg != "--layer-kinds"]
    args = parse_args(["--name", "bleed", *argv])  # a --name given wins
    args.layer_kinds = layer_kinds
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    judge = Judge(args)
    rows = [{"model": "base", "subject": "-", **attribute_failures(judge, None)}]
    for recipe, method, budget, index, seed in itertools.product(
        args.recipes, args.methods, args.budgets, args.subjects, args.seeds
    ):
        adapter = run_folder(args, (recipe, method, budget, index, seed)) / "adapter.safetensors"
        if not adapter.is_file():
            print(f"skipped (not trained): {adapter}")
            continue
        info = subject_info(index)
        with judge.loaded(adapter, "bleed") as models:
            counts = {**attribute_failures(judge, info), **accuracy_by_part(judge, models)}
            if args.layer_kinds:
                counts.update(accuracy_by_layer_kind(judge, models["unet"]))
        rows.append({"model": f"{method} {budget} {recipe} seed {seed}", "subject": info["name"], **counts})
    keys = list(rows[-1])
    body = (
        f"Counts over the {rows[0]['prompts']} non-subject prompts of `benchmarks/quality.py` (prompt "
        'following), per trained adapter; "instead": the wrong pattern (colour set) found is the '
        "subject's; \"<model> adapter only\": all right with the other model's adapter switched off.\n\n"
        + markdown_table(keys, [[row.get(k, "-") for k in keys] for row in rows])
    )
    command = command_line(argv, "benchmarks/bleed.py")
    output = Path(args.output_dir)
    write_markdown(
        output / f"{args.name}.md", "Subject bleed into non-subject prompts", environment(), body, command
    )
    write_json(output / f"{args.name}.json", {"environment": environment(), "command": command, "rows": rows})
    print(body)
    return {"rows": rows}


if __name__ == "__main__":
    main()
