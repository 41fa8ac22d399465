"""`python -m plugin`: inspect adapter files, export them as standard LoRAs, merge them into a pipeline.

    python -m plugin inspect adapter.safetensors
    python -m plugin presets --config assets/configs/sd15_unet.json
    python -m plugin export adapter.safetensors --base runwayml/stable-diffusion-v1-5 --rank 32
    python -m plugin merge --base ./sd15 --adapter style.safetensors:0.8 --adapter subject.safetensors --out ./merged

diffusers is imported only by the commands that load a pipeline, so `inspect` starts quickly.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import tempfile
from collections import Counter
from pathlib import Path

import torch

from .backends import backend_owning
from .files import ADAPTER_FILENAME, KEY, AdapterFileError, read_adapter_file, resolve_adapter_path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_BASE = REPO_ROOT / "assets" / "toy-sd"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


# --- inspect ---------------------------------------------------------------------------------------


def describe(path: str | os.PathLike) -> dict:
    """What a file holds: a `liera/1` or `liera/2` adapter, or a kohya LoRA (such as our own exports)."""
    path = resolve_adapter_path(path)
    tensors, metadata = read_adapter_file(path)
    info = {
        "file": str(path),
        "size_mb": round(path.stat().st_size / 2**20, 3),
        "parameters": sum(t.numel() for k, t in tensors.items() if not k.endswith((".scale", ".alpha"))),
        "dtypes": sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values()}),
    }
    if any(k.endswith(".lora_down.weight") for k in tensors):
        return {**info, **_describe_kohya(tensors, metadata)}
    return {**info, **_describe_liera(tensors, metadata)}


def _describe_liera(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict:
    modules: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = KEY.match(key)
        if match is None:
            raise AdapterFileError(f"key {key!r} is not <component>.<module>.<param>")
        modules.setdefault((match["component"], match["module"]), {})[match["param"]] = tensor
    backends, ranks = Counter(), Counter()
    for params in modules.values():
        owners = {backend_owning(name) for name in params} - {None}
        if len(owners) == 1:
            backend = owners.pop()
            backends[backend.name] += 1
            ranks[backend.summary({name: tuple(t.shape) for name, t in params.items()})] += 1
    try:
        config = json.loads(metadata.get("config", "{}"))
    except json.JSONDecodeError:
        config = {}
    composition = metadata.get("composition")
    return {
        "format": metadata.get("format", "unknown (no liera/1 or liera/2 header)"),
        "composition": composition,
        "lie_map": metadata.get("lie_map", "exp") if composition == "lie" else None,
        "method": config.get("method"),
        "targets": config.get("targets"),
        "base_model": metadata.get("base_model") or config.get("base_model"),
        "components": dict(Counter(component for component, _ in modules)),
        "modules": len(modules),
        "backends": dict(backends),
        "ranks": dict(ranks),
    }


def _describe_kohya(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict:
    names = [k.removesuffix(".lora_down.weight") for k in tensors if k.endswith(".lora_down.weight")]
    components = Counter(
        re.match(r"lora_(unet|te\d?)_", n).group(1) if n.startswith("lora_") else "?" for n in names
    )
    info = {
        "format": "LoRA (kohya/A1111 keys)",
        "components": dict(components),
        "modules": len(names),
        "ranks": dict(Counter(f"r={tensors[f'{n}.lora_down.weight'].shape[0]}" for n in names)),
        "alphas": sorted({float(tensors[f"{n}.alpha"]) for n in names if f"{n}.alpha" in tensors}),
    }
    if "liera_export" in metadata:
        info["export"] = json.loads(metadata["liera_export"])
    return info


def format_description(info: dict) -> str:
    lines = []
    for key, value in info.items():
        if value is None or value == {}:
            continue
        if isinstance(value, dict):
            value = ", ".join(f"{k}: {v}" for k, v in value.items())
        elif isinstance(value, list):
            value = ", ".join(str(v) for v in value)
        elif key == "parameters":
            value = f"{value:,}"
        lines.append(f"{key.replace('_', ' '):<12} {value}")
    return "\n".join(lines)


def cmd_inspect(args: argparse.Namespace) -> int:
    info = describe(args.file)
    print(json.dumps(info, indent=2) if args.json else format_description(info))
    return 0


# --- presets ---------------------------------------------------------------------------------------------


def preset_rows(unet, rank: int = 8, targets: str = "attn+conv") -> list[dict]:
    """Every preset's composition, backends and options, and its trainable parameters on `unet`."""
    from .config import METHODS, AdapterConfig
    from .inject import add_adapter, delete_adapters, trainable_parameters

    rows = []
    for method, preset in METHODS.items():
        config = AdapterConfig(method=method, rank=rank, targets=targets)
        torch.manual_seed(0)
        modules = len(add_adapter(unet, config, "preset"))
        parameters = trainable_parameters(unet)
        delete_adapters(unet, "preset")
        composition = config.composition + (f" ({config.lie_map})" if config.composition == "lie" else "")
        backends = config.backend_for(2)
        if config.backend_for(4) != backends:
            backends += f" / {config.backend_for(4)} on convs"
        options = ", ".join(f"{k}={v}" for k, v in config.backend_options().items())
        rows.append(
            {
                "preset": method,
                "composition": composition,
                "backend": backends,
                "options": options,
                "scale": config.scale,
                "modules": modules,
                "parameters": parameters,
                "paper": preset.paper,
            }
        )
    return rows


def cmd_presets(args: argparse.Namespace) -> int:
    import diffusers
    from diffusers import UNet2DConditionModel

    if args.config:
        # Built on the meta device: parameter counts need shapes only, and Flux has 12B weights.
        config = json.loads(Path(args.config).read_text())
        model_class = getattr(diffusers, config.get("_class_name", "UNet2DConditionModel"))
        with torch.device("meta"):
            unet = model_class.from_config(config)
            rows = preset_rows(unet, args.rank, args.targets)
        where = f"{args.config} (shapes only)"
    else:
        unet = UNet2DConditionModel.from_pretrained(args.base, subfolder="unet")
        where = f"{args.base}/unet"
        rows = preset_rows(unet, args.rank, args.targets)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"parameters: rank {args.rank}, targets {args.targets}, on {where}")
    columns = ["preset", "composition", "backend", "options", "scale", "modules", "parameters", "paper"]
    cells = [[f"{r[c]:,}" if c == "parameters" else str(r[c]) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip())
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())
    return 0


# --- export and merge --------------------------------------------------------------------------------


def load_pipeline(base: str, dtype: torch.dtype, device: str):
    """A diffusers pipeline from a folder or hub id, with the loader methods added (`enable_liera`)."""
    from diffusers import DiffusionPipeline

    from .loader import enable_liera

    pipe = DiffusionPipeline.from_pretrained(base, torch_dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return enable_liera(pipe.to(device))


def _base_of(adapter: str, base: str | None) -> str:
    if base:
        return base
    _, metadata = read_adapter_file(adapter)
    name = metadata.get("base_model")
    if name:
        # The training script writes the shipped toy base repo-relative: find it from anywhere.
        for candidate in (Path(name), REPO_ROOT / name):
            if candidate.is_dir():
                return str(candidate)
        return name  # a hub id
    raise SystemExit(f"{adapter} names no base model: pass --base (a pipeline folder or hub id)")


def _export_state(models: dict, name: str, layout: str, args: argparse.Namespace, dtype: torch.dtype):
    """The exported state dict and report of adapter `name` in `layout`."""
    from . import export

    if layout == "lora":
        rank = args.rank
        if rank is None and args.energy is None:
            rank = export.own_rank(models, name)
            if rank is None:
                raise SystemExit(
                    "export: this adapter is not a LoRA exactly (it needs an SVD): give --rank R, --rank auto "
                    "--keep SHARE, or both"
                )
        state, report = export.lora_state_dict(models, name, rank, args.energy, dtype)
    elif layout == "loha":
        state, report = export.loha_state_dict(models, name, dtype)
    elif layout == "locon":
        state, report = export.locon_state_dict(models, name, dtype)
    else:
        state, report = export.dora_state_dict(models, name, dtype)
    return state, report


def cmd_export(args: argparse.Namespace) -> int:
    from . import export

    source = resolve_adapter_path(args.file)
    if args.rank == "auto":  # as many per module as it takes to keep --keep of the update
        args.rank, args.energy = None, 0.99 if args.energy is None else args.energy
    elif args.rank is not None:
        if not args.rank.isdigit() or int(args.rank) < 1:
            raise SystemExit(f"export: --rank must be a positive integer or auto, got {args.rank}")
        args.rank = int(args.rank)
    out = Path(args.out) if args.out else None
    if out is not None and out.resolve() == source.resolve():
        raise SystemExit(f"export: --out {out} is the adapter itself; pick another file")
    base = _base_of(args.file, args.base)
    # float32 weights: a lie adapter's delta W ⊙ (exp(sD) - 1) depends on W.
    pipe = load_pipeline(base, torch.float32, args.device)
    name = pipe.load_adapter(source, adapter_name="export")
    models = pipe.liera_models()
    layout = export.exact_layout(models, name) if args.format == "auto" else args.format
    dtype = DTYPES[args.dtype]
    try:
        state, report = _export_state(models, name, layout, args, dtype)
    except ValueError as error:  # a layout that can't hold the adapter, an update the dtype can't hold
        raise SystemExit(f"export: {error}") from error
    out = out or source.with_name(f"{_stem(source)}_{layout}.safetensors")
    info = {"liera_source": source.name, "liera_base_model": base, "liera_layout": layout}
    info.update(
        {f"liera_{k}": str(v) for k, v in [("rank", args.rank), ("energy", args.energy)] if v is not None}
    )
    export.save_lora(out, state, report, info)
    print(export.format_table(report))
    total = export.summary(report)
    exact = all(m.exact_factors or m.rank == 0 for m in report)
    verdict = "exact (the adapter's own tensors)" if exact else "lossy (truncated SVD)"
    print(
        f"{layout} export, {verdict}: it keeps {100 * total['share_kept']:.2f}% of the update (of sum "
        f"||W' - W||^2), at least {100 * total['min_module_share_kept']:.2f}% of each module's; relative "
        f"error of W' - W mean {total['mean_relative_error']:.2e}, "
        f"max {total['max_relative_error']:.2e} ({args.dtype})"
    )
    print(f"wrote {out} ({export.lora_parameter_count(state):,} parameters, {args.dtype})")
    return 0


def parse_adapter(spec: str) -> tuple[str, float]:
    """`FILE` or `FILE:WEIGHT` (a path's own colons, as in `C:\\...`, are kept)."""
    path, sep, weight = spec.rpartition(":")
    if sep:
        try:
            value = float(weight)
        except ValueError:
            return spec, 1.0
        if not math.isfinite(value):
            raise SystemExit(f"merge: the weight of {path} must be a finite number, got {weight}")
        return path, value
    return spec, 1.0


def cmd_merge(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from .loader import diffusers_class

    adapters = [parse_adapter(spec) for spec in args.adapter]
    out = Path(args.out)
    if out.resolve() == Path(args.base).resolve():
        raise SystemExit(f"merge: --out {out} is the base pipeline; pick a new folder")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SystemExit(f"merge: --out {out} already exists and is not empty; pick a new folder")
    if not math.isfinite(args.scale):
        raise SystemExit(f"merge: --scale must be a finite number, got {args.scale}")
    pipe = load_pipeline(args.base, torch.float32, args.device)
    names, weights = [], []
    for path, weight in tqdm(adapters, desc="merge: load adapters"):
        name = _unique(_stem(resolve_adapter_path(path)), names)
        names.append(pipe.load_adapter(path, adapter_name=name))
        weights.append(weight)
    pipe.set_adapters(names, weights)
    pipe.fuse_adapters(scale=args.scale)
    pipe.unload_adapters()
    pipe.to(dtype=DTYPES[args.dtype])
    # Into a temporary folder beside --out, renamed at the end: a kill never leaves half a pipeline.
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        os.replace(tmp, out)
        os.mkdir(tmp)  # for TemporaryDirectory's own clean-up
    merged = ", ".join(f"{n} x{w:g}" for n, w in zip(names, weights))
    print(f"wrote {args.out}: {diffusers_class(type(pipe)).__name__} with {merged} fused ({args.dtype})")
    return 0


def _stem(path: Path) -> str:
    return path.parent.name if path.name == ADAPTER_FILENAME else path.stem


def _unique(name: str, taken: list[str]) -> str:
    candidate, i = name, 1
    while candidate in taken:
        i += 1
        candidate = f"{name}_{i}"
    return candidate


# --- entry point ---------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m plugin", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    inspect = commands.add_parser(
        "inspect", help="format, composition, backends, modules, ranks, size of a file"
    )
    inspect.add_argument(
        "file", help="an adapter .safetensors, a run folder with adapter.safetensors, or a LoRA"
    )
    inspect.add_argument("--json", action="store_true", help="print JSON instead of a table")
    inspect.set_defaults(run=cmd_inspect)

    presets = commands.add_parser(
        "presets", help="every preset's composition, backends and parameter count on a UNet"
    )
    presets.add_argument(
        "--base",
        default=str(DEFAULT_BASE),
        help="a pipeline folder whose unet to count on (default: the toy base)",
    )
    presets.add_argument("--config", help="a UNet config JSON to build with random weights instead")
    presets.add_argument("--rank", type=int, default=8)
    presets.add_argument("--targets", default="attn+conv")
    presets.add_argument("--json", action="store_true", help="print JSON instead of a table")
    presets.set_defaults(run=cmd_presets)

    export = commands.add_parser(
        "export",
        help="a file other tools read: LoHa (hadamard), DoRA (dora + lowrank), else a kohya LoRA (SVD of W' - W)",
    )
    export.add_argument("file", help="the liera/1 or liera/2 adapter file (or run folder)")
    export.add_argument(
        "--format",
        choices=("auto", "lora", "loha", "dora", "locon"),
        default="auto",
        help="auto: the layout that holds the adapter exactly (LyCORIS LoHa keys for additive hadamard, "
        "diffusers/PEFT DoRA keys for dora + lowrank), else a kohya LoRA; locon: LyCORIS LoCon with "
        "its Tucker convs, exact and compact for flora (ComfyUI and LyCORIS read it, diffusers does not)",
    )
    export.add_argument("--base", help="the base pipeline (folder or hub id); default: the file's base_model")
    export.add_argument(
        "--out", help="output .safetensors (default: <adapter>_<format>.safetensors beside it)"
    )
    export.add_argument(
        "--rank",
        help="LoRA: keep at most this rank per module (default: the adapter's own, if exact); auto: "
        "per module, the fewest ranks that keep --keep of the update",
    )
    export.add_argument(
        "--keep",
        "--energy",
        dest="energy",
        type=float,
        help="keep the fewest ranks holding this share of sum(sigma^2) (with --rank auto: 0.99)",
    )
    export.add_argument(
        "--dtype", choices=DTYPES, default="fp16", help="dtype of the LoRA tensors (default fp16)"
    )
    export.add_argument("--device", default="cpu", help="where to run the SVDs, e.g. cuda")
    export.set_defaults(run=cmd_export)

    merge = commands.add_parser(
        "merge", help="fuse adapters into a pipeline and save it with save_pretrained"
    )
    merge.add_argument("--base", required=True, help="the base pipeline (folder or hub id)")
    merge.add_argument(
        "--adapter", action="append", required=True, metavar="FILE[:WEIGHT]", help="repeatable"
    )
    merge.add_argument("--out", required=True, help="output folder for the merged pipeline")
    merge.add_argument("--scale", type=float, default=1.0, help="multiplies every adapter's weight")
    merge.add_argument(
        "--dtype", choices=DTYPES, default="fp32", help="dtype of the saved weights (default fp32)"
    )
    merge.add_argument("--device", default="cpu", help="where to fuse, e.g. cuda")
    merge.set_defaults(run=cmd_merge)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (AdapterFileError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
