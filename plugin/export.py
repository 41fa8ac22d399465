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

import torch
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from .inject import adapted_layers, list_adapters
from .layer import AdaptedLayer, Adapter

# Component -> kohya prefix; SDXL's two text encoders are te1/te2.
PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
SDXL_PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
# Module paths whose diffusers name readers mangle: use the original (sgm) name, as kohya does.
SGM_NAMES = {"add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}
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


def effective_delta(layer: AdaptedLayer, adapter: Adapter) -> torch.Tensor:
    """`W' - W` of one adapter alone at weight 1, in float32 (FORMAT.md; each composition says how)."""
    return adapter.composition.effective_delta(adapter, layer.original_weight())


def choose_rank(singular_values: torch.Tensor, rank: int | None, energy: float | None) -> int:
    """The rank to keep: `rank`, or the fewest singular values holding `energy` of the squared sum
    (capped by `rank` when both are given)."""
    limit = len(singular_values) if rank is None else min(rank, len(singular_values))
    if energy is None:
        return limit
    squared = singular_values.double() ** 2
    kept = torch.cumsum(squared, 0) / squared.sum()
    needed = int(torch.searchsorted(kept, torch.tensor(energy, dtype=kept.dtype) - 1e-12).item()) + 1
    return max(1, min(needed, limit))


def lora_factors(
    layer: AdaptedLayer, adapter: Adapter, rank: int | None, energy: float | None
) -> tuple[torch.Tensor, torch.Tensor, bool] | None:
    """`(up, down, exact)`: float32 matrices `(out, r)`, `(r, fan_in)` with `up @ down ≈ W' - W`, and
    whether they are the adapter's own factors (no SVD); None for a zero delta."""
    delta = effective_delta(layer, adapter).reshape(layer.base_layer.weight.shape[0], -1)
    if not torch.any(delta):
        return None
    if adapter.composition.bypassable and adapter.backend.has_factors:
        # An added update that is one matrix product is a LoRA already (lowrank, tucker, cp, rowcol).
        up, down = (f.detach().float() for f in adapter.factors(1.0))
        own_rank, own = down.shape[0], (up, down, True)
        if energy is None and rank is not None and own_rank <= rank:
            return own
    else:
        own_rank, own = None, None
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    k = choose_rank(s, rank, energy)
    if own is not None and k >= own_rank:
        return own
    root = s[:k].sqrt()
    return u[:, :k] * root, root[:, None] * vh[:k], False


def kohya_name(prefix: str, module_path: str) -> str:
    """`lora_unet_down_blocks_0_..._to_q` for `down_blocks.0.....to_q`, in the names LoRA files use."""
    if prefix == "lora_unet_":
        module_path = SGM_NAMES.get(module_path, module_path)
    elif module_path.startswith(CLIP_TEXT_MODEL_PARTS):
        module_path = f"text_model.{module_path}"
    return prefix + module_path.replace(".", "_")


def kohya_prefixes(models: Mapping[str, nn.Module]) -> dict[str, str]:
    return SDXL_PREFIXES if "text_encoder_2" in models else PREFIXES


def lora_state_dict(
    models: Mapping[str, nn.Module],
    adapter_name: str,
    rank: int | None = None,
    energy: float | None = None,
    dtype: torch.dtype = torch.float16,
    progress: bool = True,
) -> tuple[dict[str, torch.Tensor], list[ModuleExport]]:
    """The kohya LoRA state dict of one loaded (unfused) adapter, and a report per module."""
    if rank is None and energy is None:
        raise ValueError("give a rank, an energy threshold, or both")
    if energy is not None and not 0 < energy <= 1:
        raise ValueError(f"energy must be in (0, 1], got {energy}")
    prefixes = kohya_prefixes(models)
    work = []
    for component, model in models.items():
        if adapter_name not in list_adapters(model):
            continue
        if component not in prefixes:
            raise ValueError(f"the kohya LoRA layout has no key prefix for component {component!r}")
        for path, layer in adapted_layers(model).items():
            if adapter_name not in layer.adapters:
                continue
            if layer.fused:
                raise ValueError(f"{component}.{path} has fused adapters {list(layer.fused)}: unfuse first")
            if getattr(layer.base_layer, "groups", 1) != 1:
                raise ValueError(f"{component}.{path} is a grouped conv, which a LoRA cannot express")
            work.append((kohya_name(prefixes[component], path), layer))
    if not work:
        raise ValueError(f"no adapter named {adapter_name!r} in {sorted(models)}")

    with torch.no_grad():
        factors = {}
        for key, layer in tqdm(work, desc="export: SVD", disable=not progress):
            factors[key] = lora_factors(layer, layer.adapters[adapter_name], rank, energy)
        ranks = [f[1].shape[0] for f in factors.values() if f is not None]
        alpha = Counter(ranks).most_common(1)[0][0] if ranks else 1
        state, report = {}, []
        for key, layer in tqdm(work, desc="export: error", disable=not progress):
            shape = tuple(layer.base_layer.weight.shape)
            if factors[key] is None:
                report.append(ModuleExport(key, shape, 0, 0.0, False))
                continue
            up, down, exact = factors.pop(key)
            k = down.shape[0]
            # One alpha for the file; a module of another rank carries k / alpha in its up factor.
            up, down = (up * (k / alpha)).to(dtype).contiguous(), down.to(dtype).contiguous()
            delta = effective_delta(layer, layer.adapters[adapter_name]).reshape(shape[0], -1)
            stored = (alpha / k) * (up.float() @ down.float())
            error = float(torch.linalg.norm(delta - stored) / torch.linalg.norm(delta))
            state[f"{key}.lora_down.weight"] = down.reshape(k, *shape[1:]).cpu()
            state[f"{key}.lora_up.weight"] = up.reshape(shape[0], k, *[1] * len(shape[2:])).cpu()
            state[f"{key}.alpha"] = torch.tensor(float(alpha), dtype=dtype)
            report.append(ModuleExport(key, shape, k, error, exact))
    return state, report


def summary(report: list[ModuleExport]) -> dict:
    errors = [m.error for m in report if m.rank > 0]
    return {
        "modules": len(errors),
        "zero_modules": len(report) - len(errors),
        "max_relative_error": max(errors, default=0.0),
        "mean_relative_error": sum(errors) / len(errors) if errors else 0.0,
        "ranks": sorted({m.rank for m in report if m.rank > 0}),
    }


def save_lora(
    path: str | os.PathLike,
    state: dict[str, torch.Tensor],
    report: list[ModuleExport],
    info: Mapping[str, str] | None = None,
) -> Path:
    """Write the LoRA with the error summary (and every module's error) in its header metadata."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {
        "liera_export": json.dumps(summary(report)),
        "liera_export_modules": json.dumps([asdict(m) for m in report]),
        **{k: str(v) for k, v in (info or {}).items()},
    }
    save_file(state, str(path), metadata=metadata)
    return path


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
