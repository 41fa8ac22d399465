"""Export any adapter as a standard LoRA: truncated SVD of its effective delta `W' - W`.

The output uses the kohya/A1111 key layout (`lora_unet_..._to_q.lora_down.weight`, `.lora_up.weight`,
`.alpha`) that diffusers' `load_lora_weights`, ComfyUI and A1111 read. Convolutions become LoRA convs
(down `(r, in, kh, kw)`, up `(out, r, 1, 1)`). Every reader scales a module by `alpha / r`; the file has
one `alpha` (the most common rank) and a module of another rank `r` carries `r / alpha` in its up factor,
so no reader depends on per-module alpha handling. A `lora` adapter whose rank fits is written from its
own factors: exact.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import tensorly as tl
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .backends import tensorly
from .inject import adapted_layers, list_adapters
from .layer import AdaptedLayer, Adapter

# Component -> kohya prefix; SDXL's two text encoders are te1/te2.
PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
SDXL_PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
# Module paths whose diffusers name readers mangle: use the original (sgm) name, as kohya does.
SGM_NAMES = {"add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}
# SDXL files name the UNet's modules as the original (sgm) UNet does, as kohya's SDXL LoRAs do: A1111
# converts diffusers-style names with SD 1.x's block layout (wrong for SDXL's first up block, which has
# attention: its upsampler would be missed), ComfyUI and diffusers read sgm names for SDXL directly.
SGM_TOP_LEVEL = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
SGM_RESNET_PARTS = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
# transformers 5's CLIPTextModel dropped its `text_model.` level; LoRA files keep it (`lora_te_text_model_...`).
CLIP_TEXT_MODEL_PARTS = ("embeddings.", "encoder.", "final_layer_norm")


@dataclass
class ModuleExport:
    """One exported module: its kohya name, rank and relative Frobenius error of `up @ down` (as
    stored, in the output dtype) against the true delta."""

    key: str
    shape: tuple[int, ...]
    rank: int
    error: float
    exact_factors: bool  # written from the adapter's own factors, no SVD
    delta_norm: float = 0.0  # Frobenius norm of W' - W, to weigh the module in the share kept


def effective_delta(layer: AdaptedLayer, adapter: Adapter) -> torch.Tensor:
    """`W' - W` of one adapter alone at weight 1, in float32 (FORMAT.md; each composition says how)."""
    return adapter.composition.effective_delta(adapter, layer.original_weight())


def choose_rank(singular_values: torch.Tensor, rank: int | None, energy: float | None) -> int:
    """The rank to keep: `rank`, or the fewest singular values holding `energy` of the squared sum
    (capped by `rank` when both are given)."""
    squared = singular_values.double() ** 2
    return choose_rank_of_share(torch.cumsum(squared, 0) / squared.sum(), rank, energy)


def lora_factors(
    layer: AdaptedLayer, adapter: Adapter, rank: int | None, energy: float | None
) -> tuple[torch.Tensor, torch.Tensor, bool] | None:
    """`(up, down, exact)`: float32 matrices `(out, r)`, `(r, fan_in)` with `up @ down ≈ W' - W`, and
    whether they are the adapter's own factors (no SVD); None for a zero delta."""
    delta = effective_delta(layer, adapter).reshape(layer.base_layer.weight.shape[0], -1)
    if not torch.any(delta):
        return None
    if adapter.composition.adds_update and adapter.backend.has_factors:
        # An added update that is one matrix product is a LoRA already (lowrank, tucker, cp, rowcol).
        up, down = (f.detach().float() for f in adapter.factors(1.0))
        own_rank, own = down.shape[0], (up, down, True)
        if energy is None and rank is not None and own_rank <= rank:
            return own
    else:
        own_rank, own = None, None
    up, down = truncated_svd(delta, rank, energy)
    if own is not None and down.shape[0] >= own_rank:
        return own
    return up, down, False


def truncated_svd(
    matrix: torch.Tensor, rank: int | None, energy: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(up, down)`, `up @ down` the best approximation of `matrix` of the rank `rank` and `energy` ask
    for (`choose_rank`; the energy share is of the whole `||matrix||²`).

    A full SVD of every module takes minutes on a CPU. A randomised SVD (`torch.svd_lowrank`, seeded,
    two power iterations) finds the top directions in a few products with the matrix; for an energy
    threshold it widens until the share is reached. Where the width nears the matrix's shorter
    side, the eigenvectors of the Gram matrix of that side give all directions at once instead. Either
    way `up @ down` is the projection of `matrix` onto the kept directions.
    """
    short = min(matrix.shape)
    total = matrix.double().square().sum()
    width = rank if energy is None else min(rank or 32, 32)
    devices = [matrix.device] if matrix.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(0)
        while 2 * (width + 8) < short:
            u, s, v = torch.svd_lowrank(matrix, q=width + 8, niter=2)
            kept = torch.cumsum(s.double() ** 2, 0) / total
            if energy is None or kept[-1] >= energy or (rank is not None and width >= rank):
                k = choose_rank_of_share(kept, rank, energy)
                root = s[:k].sqrt()
                return u[:, :k] * root, root[:, None] * v[:, :k].T
            # Wider: at least twice, and as wide as the share so far says the threshold needs (a flat
            # spectrum then goes to the Gram matrix at once).
            width = max(2 * width, math.ceil(1.2 * width * energy / float(kept[-1])))
    return _gram_svd(matrix, rank, energy, total)


def choose_rank_of_share(kept: torch.Tensor, rank: int | None, energy: float | None) -> int:
    """The fewest leading directions whose cumulative share `kept` reaches `energy` (all of them if none
    does), capped by `rank`."""
    limit = len(kept) if rank is None else min(rank, len(kept))
    if energy is None:
        return limit
    needed = int(torch.searchsorted(kept, torch.tensor(energy, dtype=kept.dtype) - 1e-12).item()) + 1
    return max(1, min(needed, limit))


def _gram_svd(
    matrix: torch.Tensor, rank: int | None, energy: float | None, total: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """All directions from the eigenvectors of the Gram matrix of the shorter side (its eigenvalues are
    the squared singular values; those below ~1e-4 of the largest are lost, which no kept share needs)."""
    tall = matrix.shape[0] > matrix.shape[1]
    wide = matrix.T if tall else matrix  # (short, long)
    eigenvalues, vectors = torch.linalg.eigh((wide @ wide.T).double())
    singular = eigenvalues.flip(0).clamp_min(0).sqrt()
    k = choose_rank_of_share(torch.cumsum(singular**2, 0) / total, rank, energy)
    basis = vectors.flip(1)[:, :k].to(matrix.dtype)  # (short, k), orthonormal
    root = singular[:k].clamp_min(singular[0] * 1e-12).sqrt().to(matrix.dtype)
    left, right = basis * root, (basis.T @ wide) / root[:, None]  # left @ right = U Uᵀ M
    return (right.T, left.T) if tall else (left, right)


def kohya_name(prefix: str, module_path: str) -> str:
    """`lora_unet_down_blocks_0_..._to_q` for `down_blocks.0.....to_q`, in the names LoRA files use."""
    if prefix == "lora_unet_":
        module_path = SGM_NAMES.get(module_path, module_path)
    elif module_path.startswith(CLIP_TEXT_MODEL_PARTS):
        module_path = f"text_model.{module_path}"
    return prefix + module_path.replace(".", "_")


def kohya_prefixes(models: Mapping[str, nn.Module]) -> dict[str, str]:
    return SDXL_PREFIXES if "text_encoder_2" in models else PREFIXES


def sgm_path(module_path: str, config) -> str:
    """The original (sgm) UNet's name of a diffusers SDXL UNet module: `down_blocks.1.attentions.0.proj_in`
    is `input_blocks.4.1.proj_in` (with SDXL's 2 layers a block), an up block's upsampler is the last
    layer of its output block, after the attention if the block has one. (diffusers' sgm reader takes
    `output_blocks.N.1` for an attention: right for SDXL, whose upsampling blocks all have attention.)"""
    if module_path in SGM_TOP_LEVEL:
        return SGM_TOP_LEVEL[module_path]
    if not isinstance(config.layers_per_block, int):
        raise ValueError(
            f"unet.{module_path}: no sgm name for per-block layer counts {config.layers_per_block}"
        )
    per_block = (
        config.layers_per_block + 1
    )  # an input block's layers and its downsampler; an output block's layers
    parts = module_path.split(".")

    def inner(kind: str, rest: list[str]) -> str:
        if kind == "resnets" and rest[0] in SGM_RESNET_PARTS:
            rest = [SGM_RESNET_PARTS[rest[0]], *rest[1:]]
        return ".".join(rest)

    if parts[0] == "down_blocks" and len(parts) > 4:
        block, kind, index, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
        if kind == "downsamplers":
            return f"input_blocks.{(block + 1) * per_block}.0.op"
        return f"input_blocks.{1 + block * per_block + index}.{int(kind == 'attentions')}.{inner(kind, rest)}"
    if parts[0] == "mid_block" and len(parts) > 3:
        kind, index, rest = parts[1], int(parts[2]), parts[3:]
        return f"middle_block.{1 if kind == 'attentions' else 2 * index}.{inner(kind, rest)}"
    if parts[0] == "up_blocks" and len(parts) > 4:
        block, kind, index, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
        if kind == "upsamplers":
            attention = config.up_block_types[block].startswith("CrossAttn")
            return (
                f"output_blocks.{block * per_block + per_block - 1}.{2 if attention else 1}.{'.'.join(rest)}"
            )
        return f"output_blocks.{block * per_block + index}.{int(kind == 'attentions')}.{inner(kind, rest)}"
    raise ValueError(f"unet.{module_path} has no name in the original SDXL UNet (sgm) that LoRA files use")


def module_key(prefixes: Mapping[str, str], component: str, module_path: str, model: nn.Module) -> str:
    """A module's key in a kohya file: sgm names for an SDXL UNet (see SGM_TOP_LEVEL), `kohya_name` else."""
    if prefixes is SDXL_PREFIXES and component == "unet":
        return "lora_unet_" + sgm_path(module_path, model.config).replace(".", "_")
    return kohya_name(prefixes[component], module_path)


def adapted_modules(
    models: Mapping[str, nn.Module], adapter_name: str, layout: str, prefixes: Mapping[str, str] | None = None
) -> list[tuple[str, str, AdaptedLayer]]:
    """`(component, module path, layer)` of every module with the adapter, refusing what `layout`
    can't hold: fused adapters, grouped convs, components without a key prefix."""
    found = []
    for component, model in models.items():
        if adapter_name not in list_adapters(model):
            continue
        if prefixes is not None and component not in prefixes:
            raise ValueError(f"the {layout} layout has no key prefix for component {component!r}")
        for path, layer in adapted_layers(model).items():
            if adapter_name not in layer.adapters:
                continue
            if layer.fused:
                raise ValueError(f"{component}.{path} has fused adapters {list(layer.fused)}: unfuse first")
            if getattr(layer.base_layer, "groups", 1) != 1:
                raise ValueError(f"{component}.{path} is a grouped conv, which a {layout} cannot express")
            found.append((component, path, layer))
    if not found:
        raise ValueError(f"no adapter named {adapter_name!r} in {sorted(models)}")
    return found


def relative_error(expected: torch.Tensor, stored: torch.Tensor) -> float:
    return float(torch.linalg.norm(expected - stored) / torch.linalg.norm(expected).clamp_min(1e-30))


def lora_state_dict(
    models: Mapping[str, nn.Module],
    adapter_name: str,
    rank: int | None = None,
    energy: float | None = None,
    dtype: torch.dtype = torch.float16,
    progress: bool = True,
) -> tuple[dict[str, torch.Tensor], list[ModuleExport]]:
    """The LoRA state dict of one loaded (unfused) adapter, and a report per module: kohya keys for
    UNet pipelines (what A1111 and ComfyUI read too), diffusers' own `<component>.<path>.lora_A/B`
    keys for pipelines with a `transformer` (SD3, Flux: what their `load_lora_weights` reads; no
    alpha, so PEFT's scale is 1 and each up factor holds its update as it is)."""
    if rank is None and energy is None:
        raise ValueError("give a rank, an energy threshold, or both")
    if energy is not None and not 0 < energy <= 1:
        raise ValueError(f"energy must be in (0, 1], got {energy}")
    kohya = "transformer" not in models
    if kohya:
        prefixes = kohya_prefixes(models)
        work = [
            (module_key(prefixes, component, path, models[component]), layer)
            for component, path, layer in adapted_modules(models, adapter_name, "kohya LoRA", prefixes)
        ]
    else:
        work = [
            (f"{component}.{path}", layer)
            for component, path, layer in adapted_modules(models, adapter_name, "diffusers LoRA")
        ]

    with torch.no_grad():
        factors = {}
        for key, layer in tqdm(work, desc="export: SVD", disable=not progress):
            factors[key] = lora_factors(layer, layer.adapters[adapter_name], rank, energy)
        ranks = [f[1].shape[0] for f in factors.values() if f is not None]
        alpha = Counter(ranks).most_common(1)[0][0] if ranks and kohya else None
        state, report = {}, []
        for key, layer in tqdm(work, desc="export: error", disable=not progress):
            shape = tuple(layer.base_layer.weight.shape)
            if factors[key] is None:
                report.append(ModuleExport(key, shape, 0, 0.0, False))
                continue
            up, down, exact = factors.pop(key)
            k = down.shape[0]
            # kohya: one alpha for the file; a module of another rank carries k / alpha in its up factor.
            read_scale = alpha / k if alpha else 1.0  # what a reader multiplies `up @ down` by
            up, down = (up / read_scale).to(dtype).contiguous(), down.to(dtype).contiguous()
            if not (torch.isfinite(up).all() and torch.isfinite(down).all()):
                raise ValueError(
                    f"{key}: its update W' - W is too large for {dtype} (its factors overflow); export "
                    "with --dtype fp32 or bf16"
                )
            delta = effective_delta(layer, layer.adapters[adapter_name]).reshape(shape[0], -1)
            stored = read_scale * (up.float() @ down.float())
            norm = float(torch.linalg.norm(delta))
            error = float(torch.linalg.norm(delta - stored)) / norm
            down_name, up_name = ("lora_down", "lora_up") if kohya else ("lora_A", "lora_B")
            state[f"{key}.{down_name}.weight"] = down.reshape(k, *shape[1:]).cpu()
            state[f"{key}.{up_name}.weight"] = up.reshape(shape[0], k, *[1] * len(shape[2:])).cpu()
            if kohya:
                state[f"{key}.alpha"] = torch.tensor(float(alpha), dtype=dtype)
            report.append(ModuleExport(key, shape, k, error, exact, norm))
    return state, report


def summary(report: list[ModuleExport]) -> dict:
    errors = [m.error for m in report if m.rank > 0]
    total = sum(m.delta_norm**2 for m in report)
    lost = sum((m.error * m.delta_norm) ** 2 for m in report)
    return {
        "modules": len(errors),
        "zero_modules": len(report) - len(errors),
        "max_relative_error": max(errors, default=0.0),
        "mean_relative_error": sum(errors) / len(errors) if errors else 0.0,
        # Of the whole update (all modules' ||W' - W||^2 together), the share the file holds, and the
        # least share of any one module's (the whole is dominated by the modules with large updates).
        "share_kept": 1 - lost / total if total else 1.0,
        "min_module_share_kept": 1 - max(errors, default=0.0) ** 2,
        "ranks": sorted({m.rank for m in report if m.rank > 0}),
    }


def save_lora(
    path: str | os.PathLike,
    state: dict[str, torch.Tensor],
    report: list[ModuleExport],
    info: Mapping[str, str] | None = None,
) -> Path:
    """Write the LoRA with the error summary (and every module's error) in its header metadata, atomically."""
    from .files import save_atomically

    metadata = {
        "liera_export": json.dumps(summary(report)),
        "liera_export_modules": json.dumps([asdict(m) for m in report]),
        **{k: str(v) for k, v in (info or {}).items()},
    }
    return save_atomically(state, metadata, path)


def format_table(report: list[ModuleExport]) -> str:
    """A plain-text table: module, shape, rank, relative error, then the summary line."""
    width = max(len(m.key) for m in report)
    lines = [f"{'module':<{width}}  {'shape':<20}  {'rank':>4}  rel. error"]
    for m in report:
        error = (
            "zero delta"
            if m.rank == 0
            else f"{m.error:.2e}" + (" (exact factors)" if m.exact_factors else "")
        )
        lines.append(f"{m.key:<{width}}  {str(m.shape):<20}  {m.rank:>4}  {error}")
    total = summary(report)
    lines.append(
        f"{total['modules']} modules, ranks {total['ranks']}, relative error mean "
        f"{total['mean_relative_error']:.2e}, max {total['max_relative_error']:.2e}"
    )
    return "\n".join(lines)


def lora_parameter_count(state: dict[str, torch.Tensor]) -> int:
    return sum(math.prod(t.shape) for k, t in state.items() if not k.endswith(".alpha"))


def exact_export(
    key: str, shape: tuple, rank: int, expected: torch.Tensor, stored: torch.Tensor
) -> ModuleExport:
    """The report of a module written from the adapter's own tensors (its error: the dtype's rounding)."""
    return ModuleExport(
        key, shape, rank, relative_error(expected, stored), True, float(torch.linalg.norm(expected))
    )


def _require(
    layer: AdaptedLayer,
    adapter: Adapter,
    where: str,
    composition: str,
    backends: tuple[str, ...],
    layout: str,
):
    if adapter.composition.name != composition or adapter.backend.name not in backends:
        raise ValueError(
            f"{where}: a {layout} holds {composition} + {' or '.join(backends)} adapters exactly; this "
            f"module is {adapter.composition.name} + {adapter.backend.name} (export it as a LoRA instead)"
        )


def kohya_modules(
    models: Mapping[str, nn.Module],
    adapter_name: str,
    layout: str,
    composition: str,
    backends: tuple[str, ...],
) -> list[tuple[str, AdaptedLayer, Adapter]]:
    """`(kohya key, layer, adapter)` of every module of an exact `layout` export, refusing any module
    whose adapter is not `composition` + one of `backends`."""
    prefixes = kohya_prefixes(models)
    found = []
    for component, path, layer in adapted_modules(models, adapter_name, layout, prefixes):
        adapter = layer.adapters[adapter_name]
        _require(layer, adapter, f"{component}.{path}", composition, backends, layout)
        found.append((module_key(prefixes, component, path, models[component]), layer, adapter))
    return found


def loha_state_dict(
    models: Mapping[str, nn.Module], adapter_name: str, dtype: torch.dtype = torch.float16
) -> tuple[dict[str, torch.Tensor], list[ModuleExport]]:
    """LyCORIS/kohya LoHa keys (`<kohya name>.hada_w1_a`, ..., `.alpha`) of an additive hadamard adapter:
    exact. LyCORIS rebuilds `(w1_a @ w1_b) ⊙ (w2_a @ w2_b) · alpha / r` with `r = w1_b.shape[0]`, so
    `alpha = r` and the scale `s` goes into `w1_a`."""
    state, report = {}, []
    with torch.no_grad():
        for key, layer, adapter in kohya_modules(models, adapter_name, "LoHa", "additive", ("hadamard",)):
            backend = adapter.backend.plain()
            tensors = {
                "hada_w1_a": adapter.scale * backend.hada_w1_a,
                "hada_w1_b": backend.hada_w1_b,
                "hada_w2_a": backend.hada_w2_a,
                "hada_w2_b": backend.hada_w2_b,
            }
            tensors = {name: t.detach().to("cpu", dtype).contiguous() for name, t in tensors.items()}
            r = tensors["hada_w1_b"].shape[0]
            state.update({f"{key}.{name}": t for name, t in tensors.items()})
            state[f"{key}.alpha"] = torch.tensor(float(r), dtype=dtype)
            stored = (tensors["hada_w1_a"].float() @ tensors["hada_w1_b"].float()) * (
                tensors["hada_w2_a"].float() @ tensors["hada_w2_b"].float()
            )
            expected = effective_delta(layer, adapter).reshape(stored.shape)
            shape = tuple(layer.base_layer.weight.shape)
            report.append(exact_export(key, shape, r, expected, stored))
    return state, report


def locon_state_dict(
    models: Mapping[str, nn.Module], adapter_name: str, dtype: torch.dtype = torch.float16
) -> tuple[dict[str, torch.Tensor], list[ModuleExport]]:
    """LyCORIS LoCon keys of an additive tucker adapter (FLoRA), or of lowrank and tucker modules mixed
    (`lora` with `conv_backend="tucker"`, LoCon-Tucker itself), exact: a conv's Tucker update is LoCon
    with its Tucker option, `lora_up` `(out, r, 1, 1)`, `lora_mid` `(r, r, kh, kw)`, `lora_down`
    `(r, in, 1, 1)`, which LyCORIS rebuilds as `mid ×_0 up ×_1 downᵀ · alpha / r`; a Linear's (and a
    1x1 conv's, which LoCon gives no mid) is a LoRA, and so is a lowrank module. Our kernel factors are
    multiplied into the core (LoCon keeps the kernel whole), and the two channel ranks are padded with
    zeros to one `r` (LoCon's mid is square). `alpha = r`, `s` goes into `up`."""
    state, report = {}, []
    with torch.no_grad():
        for key, layer, adapter in kohya_modules(
            models, adapter_name, "LoCon", "additive", ("tucker", "lowrank")
        ):
            shape = tuple(layer.base_layer.weight.shape)
            if adapter.backend.name == "lowrank":
                tensors = _locon_pair(adapter, shape)
            else:
                tensors = _locon_tucker(adapter, shape)
            r = tensors["lora_down"].shape[0]
            tensors = {name: t.to("cpu", dtype).contiguous() for name, t in tensors.items()}
            state.update({f"{key}.{name}.weight": t for name, t in tensors.items()})
            state[f"{key}.alpha"] = torch.tensor(float(r), dtype=dtype)
            stored = locon_delta({name: t.float() for name, t in tensors.items()})
            expected = effective_delta(layer, adapter).reshape(stored.shape)
            report.append(exact_export(key, shape, r, expected, stored))
    return state, report


def _locon_pair(adapter: Adapter, shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """A lowrank update as LoCon's LoRA pair: `up` `(out, r, 1, 1)`, `down` with the kernel's shape."""
    backend = adapter.backend.plain()  # a PiSSA/ReLoRA update as one lowrank update
    up, down = (adapter.scale * backend.lora_up).detach().float(), backend.lora_down.detach().float()
    r = down.shape[0]
    return {
        "lora_up": up.reshape(shape[0], r, *[1] * len(shape[2:])),
        "lora_down": down.reshape(r, *shape[1:]),
    }


def _locon_tucker(adapter: Adapter, shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """A Tucker update as LoCon's Tucker triple (a mid on kernels larger than 1), or a pair."""
    backend = adapter.backend.plain()
    out_factor, in_factor, *kernel_factors = (f.detach().float() for f in backend.tucker_factor)
    core = backend.tucker_core.detach().float()
    if kernel_factors:
        modes = list(range(2, core.ndim))
        core = tensorly(tl.tenalg.multi_mode_dot, core, kernel_factors, modes)
    r = max(core.shape[:2])
    pad_out, pad_in = r - core.shape[0], r - core.shape[1]
    mid = F.pad(core, [0, 0] * len(shape[2:]) + [0, pad_in, 0, pad_out])
    up = F.pad(adapter.scale * out_factor, [0, pad_out])
    down = F.pad(in_factor, [0, pad_in]).T
    ones = [1] * len(shape[2:])
    if any(size != 1 for size in shape[2:]):
        tensors = {"lora_up": up.reshape(shape[0], r, *ones), "lora_mid": mid}
    else:  # a Linear or a 1x1 conv (LoCon has no mid there): up @ core is the LoRA's up
        tensors = {"lora_up": (up @ mid.reshape(r, r)).reshape(shape[0], r, *ones)}
    tensors["lora_down"] = down.reshape(r, shape[1], *ones)
    return tensors


def locon_delta(tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The update LyCORIS rebuilds from one LoCon module's tensors (alpha = r)."""
    up, down = tensors["lora_up"].flatten(1), tensors["lora_down"].flatten(1)
    if "lora_mid" not in tensors:
        return up @ down
    return torch.einsum("ij...,pi,jq->pq...", tensors["lora_mid"], up, down)


def dora_state_dict(
    models: Mapping[str, nn.Module], adapter_name: str, dtype: torch.dtype = torch.float16
) -> tuple[dict[str, torch.Tensor], list[ModuleExport]]:
    """diffusers/PEFT DoRA keys (`<component>.<module>.lora_A.weight`, `.lora_B.weight`,
    `.lora_magnitude_vector.weight`) of a dora + lowrank adapter: exact. diffusers' `load_lora_weights`
    reads them (it drops kohya's `dora_scale` keys); its alpha defaults to the rank, so `s` goes into
    `lora_B`. (transformers' text-encoder loader wants the magnitude's `.weight`; PEFT takes either.)"""
    state, report = {}, []
    with torch.no_grad():
        for component, path, layer in adapted_modules(models, adapter_name, "DoRA"):
            adapter = layer.adapters[adapter_name]
            _require(layer, adapter, f"{component}.{path}", "dora", ("lowrank",), "DoRA")
            shape = tuple(layer.base_layer.weight.shape)
            backend = adapter.backend.plain()  # a PiSSA/ReLoRA update as one lowrank update
            up = (adapter.scale * backend.lora_up).to("cpu", dtype).contiguous()
            down = backend.lora_down.detach().to("cpu", dtype).contiguous()
            magnitude = adapter.magnitude.detach().to("cpu", dtype)
            r, key = down.shape[0], f"{component}.{path}"
            state[f"{key}.lora_A.weight"] = down.reshape(r, *shape[1:])
            state[f"{key}.lora_B.weight"] = up.reshape(shape[0], r, *[1] * len(shape[2:]))
            # PEFT keeps a conv's magnitude as (1, out, 1, 1), a Linear's as (out,).
            state[f"{key}.lora_magnitude_vector.weight"] = (
                magnitude.reshape(1, -1, *[1] * len(shape[2:])) if len(shape) > 2 else magnitude
            )
            weight = layer.original_weight().float().reshape(shape[0], -1)
            direction = weight + up.float() @ down.float()
            stored = magnitude.float()[:, None] / direction.norm(dim=1, keepdim=True) * direction - weight
            expected = effective_delta(layer, adapter).reshape(stored.shape)
            report.append(exact_export(key, shape, r, expected, stored))
    return state, report


def exact_layout(models: Mapping[str, nn.Module], adapter_name: str) -> str:
    """The layout that holds this adapter exactly: `loha` for additive + hadamard, `dora` for dora +
    lowrank, else `lora` (exact for an additive update that is one matrix product, else an SVD)."""
    kinds = set()
    for model in models.values():
        for layer in adapted_layers(model).values():
            if adapter_name in layer.adapters:
                adapter = layer.adapters[adapter_name]
                kinds.add((adapter.composition.name, adapter.backend.name))
    if kinds == {("additive", "hadamard")}:
        return "loha"
    if kinds == {("dora", "lowrank")}:
        return "dora"
    return "lora"


def own_rank(models: Mapping[str, nn.Module], adapter_name: str) -> int | None:
    """The largest rank at which a `lora` export is exact (an added update that is one matrix
    product on every module), or None if some module needs an SVD."""
    ranks = []
    for model in models.values():
        for layer in adapted_layers(model).values():
            if adapter_name not in layer.adapters:
                continue
            adapter = layer.adapters[adapter_name]
            if not (adapter.composition.adds_update and adapter.backend.has_factors):
                return None
            with torch.no_grad():
                ranks.append(adapter.factors(1.0)[1].shape[0])
    return max(ranks, default=None)
