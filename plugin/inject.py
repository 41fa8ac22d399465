"""Put adapters into any `nn.Module` and manage them by name: activate, weigh, fuse, remove.

An adapted Linear/ConvNd is swapped for an `AdaptedLayer` holding the original, so module paths
(and hence file keys) stay the same and every attention processor keeps working unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from .backends import BACKEND_CLASSES, Backend, accepted_options, principal_start
from .compat import uncompiled
from .compositions import composition_from
from .config import AdapterConfig, name_matches
from .layer import ADAPTABLE, AdaptedLayer, Adapter

CONFIGS_ATTR = "liera_configs"  # model attribute: adapter name -> AdapterConfig
FROZEN_ATTR = "liera_frozen"  # model attribute: {parameter name: requires_grad} before adapters froze it


def adapted_layers(model: nn.Module) -> dict[str, AdaptedLayer]:
    return {path: layer for path, layer in adaptable_layers(model).items() if isinstance(layer, AdaptedLayer)}


def adapters_named(model: nn.Module, adapter_name: str) -> dict[str, Adapter]:
    """The adapter `adapter_name` of every layer that has it, by the layer's path."""
    return {
        path: layer.adapters[adapter_name]
        for path, layer in adapted_layers(model).items()
        if adapter_name in layer.adapters
    }


def adaptable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every Linear/ConvNd by the path a file names it with, an already adapted one as its
    `AdaptedLayer`. A layer that diffusers' own LoRA (a PEFT layer) wraps is found under the PEFT
    layer's path, and neither wrapper's internals (PEFT's `lora_A`, our `base_layer`) count."""
    found = {}

    def visit(module: nn.Module, prefix: str) -> None:
        for name, child in module.named_children():
            path = f"{prefix}{name}"
            if is_peft_layer(child):
                child = child.base_layer
            if isinstance(child, (AdaptedLayer, *ADAPTABLE)):
                found[path] = child
            elif not is_peft_layer(module):
                visit(child, f"{path}.")

    visit(uncompiled(model), "")
    return found


def is_peft_layer(module: nn.Module) -> bool:
    """A layer of diffusers' own LoRAs: PEFT's tuner layer, which wraps the layer it adapts as
    `base_layer` (our adapters then go around that layer, inside PEFT's)."""
    return type(module).__module__.startswith("peft.") and isinstance(
        getattr(module, "base_layer", None), nn.Module
    )


def adapter_configs(model: nn.Module) -> dict[str, AdapterConfig]:
    model = uncompiled(model)
    if not hasattr(model, CONFIGS_ATTR):
        setattr(model, CONFIGS_ATTR, {})
    return getattr(model, CONFIGS_ATTR)


def list_adapters(model: nn.Module) -> list[str]:
    names = dict.fromkeys(adapter_configs(model))
    for layer in adapted_layers(model).values():
        names.update(dict.fromkeys(layer.adapters))
    return list(names)


def find_targets(model: nn.Module, config: AdapterConfig) -> dict[str, nn.Module]:
    patterns = config.target_patterns()
    targets = {
        name: module
        for name, module in adaptable_layers(model).items()
        if any(name_matches(name, pattern) for pattern in patterns)
    }
    if not targets:
        raise ValueError(f"targets {config.targets!r} match no Linear/Conv layer of {type(model).__name__}")
    return targets


def add_adapter(model: nn.Module, config: AdapterConfig, adapter_name: str = "default") -> list[str]:
    """Attach a new adapter that starts exactly at the base (`W' = W`) and make it the active one.

    Like PEFT, every other parameter of `model` is frozen. Returns the adapted module paths.
    """
    targets = find_targets(model, config)
    composition = composition_from(config.composition_fields())
    adapters = {}
    for name, module in targets.items():
        weight = module.weight
        backend = new_backend(config, name, weight)
        extra = composition.extra_tensors(weight)
        scale = config.scale_for(config.rank_for(name, weight.ndim))
        adapters[name] = Adapter(backend, composition, scale, extra).to(weight.device)
    attach(model, adapter_name, config, adapters)
    return list(targets)


def new_backend(config: AdapterConfig, module_name: str, weight: torch.Tensor) -> Backend:
    """The freshly initialised update `config` gives the layer `module_name` with weight `W`: `D = 0`,
    or with `init="pissa"` a principal start on a frozen residual (`principal_start`)."""
    rank = config.rank_for(module_name, weight.ndim)
    backend_cls = BACKEND_CLASSES[config.backend_for(weight.ndim)]
    options = {**config.backend_options(), "weight": weight}
    if config.init == "pissa":
        del options["init"]  # the backend's own default, then the principal start below
    backend = backend_cls(tuple(weight.shape), rank, **accepted_options(backend_cls, options))
    backend = backend.to(weight.device)
    if config.init == "pissa":
        backend = principal_start(backend, weight, config.scale_for(rank))
    return backend


def check_adapter_name(name: object) -> str:
    """A name that can key an `nn.ModuleDict`: a non-empty string without dots."""
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError(f"adapter name {name!r} must be a non-empty string without dots (e.g. 'subject_v1')")
    return name


def check_weight(weight: object, what: str = "adapter weight") -> float:
    """A user weight or scale: a finite real number."""
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
        raise ValueError(f"{what} must be a finite number, got {weight!r}")
    return float(weight)


def attach(
    model: nn.Module,
    adapter_name: str,
    config: AdapterConfig,
    adapters: dict[str, Adapter],
    weight: float = 1.0,
) -> None:
    """Wrap each named layer (once), give it its adapter under `adapter_name`, and make that adapter
    the only active one (as diffusers does with a newly loaded LoRA). Checks everything first."""
    check_adapter_name(adapter_name)
    weight = check_weight(weight)
    if adapter_name in list_adapters(model):
        raise ValueError(f"an adapter named {adapter_name!r} already exists; delete it or pick another name")
    _freeze_base(model)
    for name, adapter in adapters.items():
        _wrap(model, name).adapters[adapter_name] = adapter
    adapter_configs(model)[adapter_name] = config
    set_adapters(model, [adapter_name], [weight])


def _freeze_base(model: nn.Module) -> None:
    """Freeze every parameter but the adapters', remembering what was trainable for `unload_adapters`."""
    model = uncompiled(model)
    adapter_params = {id(p) for layer in adapted_layers(model).values() for p in layer.adapters.parameters()}
    frozen = getattr(model, FROZEN_ATTR, None)
    if frozen is None:
        frozen = {
            name: p.requires_grad for name, p in model.named_parameters() if id(p) not in adapter_params
        }
        setattr(model, FROZEN_ATTR, frozen)
    for param in model.parameters():
        if id(param) not in adapter_params:
            param.requires_grad_(False)


def _wrap(model: nn.Module, name: str) -> AdaptedLayer:
    model = uncompiled(model)
    module = model.get_submodule(name)
    if is_peft_layer(module):
        module = module.base_layer
    if isinstance(module, AdaptedLayer):
        return module
    layer = AdaptedLayer(module)
    replace_layer(model, name, layer)
    return layer


def replace_layer(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` at the layer path `name` (inside diffusers' LoRA layer, if one wraps it there)."""
    model = uncompiled(model)
    current = model.get_submodule(name)
    if is_peft_layer(current):
        current.base_layer = new
        return
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def _check_names(model: nn.Module, names: Iterable[str]) -> list[str]:
    names = [names] if isinstance(names, str) else list(names)
    known = list_adapters(model)
    for name in names:
        if name not in known:
            raise ValueError(f"no adapter named {name!r}; the model has {known}")
    return names


def set_adapters(
    model: nn.Module, names: str | list[str], weights: float | list[float] | None = None
) -> None:
    """Make exactly `names` active, each with its user weight `m` (default 1)."""
    names = _check_names(model, names)
    if weights is None or isinstance(weights, (int, float)):
        weights = [1.0 if weights is None else weights] * len(names)
    if len(weights) != len(names):
        raise ValueError(f"got {len(weights)} weights for {len(names)} adapters {names}")
    weights = [check_weight(w, f"weight of adapter {n!r}") for n, w in zip(names, weights)]
    for layer in adapted_layers(model).values():
        layer.active = {n: float(w) for n, w in zip(names, weights) if n in layer.adapters}


def active_adapters(model: nn.Module) -> list[str]:
    active = {}
    for layer in adapted_layers(model).values():
        if layer.enabled:
            active.update(dict.fromkeys(layer.active))
    return list(active)


def enable_adapters(model: nn.Module, enabled: bool = True) -> None:
    for layer in adapted_layers(model).values():
        layer.enabled = enabled


def disable_adapters(model: nn.Module) -> None:
    """Run the (possibly fused) base weights only; `enable_adapters` switches them back on."""
    enable_adapters(model, False)


def set_runtime_scale(model: nn.Module, scale: float) -> None:
    """Multiply every unfused adapter's weight, like diffusers' `cross_attention_kwargs={"scale": x}`."""
    scale = check_weight(scale, "runtime scale")
    for layer in adapted_layers(model).values():
        layer.runtime_scale = float(scale)


def fuse_adapters(model: nn.Module, scale: float = 1.0, adapter_names: list[str] | None = None) -> None:
    """Fold adapters (default: the active ones) into the base weights: inference costs what the
    base model costs. `unfuse_adapters` takes them out again."""
    names = active_adapters(model) if adapter_names is None else _check_names(model, adapter_names)
    scale = check_weight(scale, "fuse scale")
    layers = adapted_layers(model).values()
    done = []
    try:
        for layer in layers:
            if layer.fuse([n for n in names if n in layer.adapters], scale):
                done.append(layer)
    except ValueError:
        for layer in done:  # all layers or none: take out what this call fused
            layer.unfuse_names([n for n in names if n in layer.adapters])
        raise


def unfuse_adapters(model: nn.Module) -> None:
    for layer in adapted_layers(model).values():
        layer.unfuse()


def delete_adapters(model: nn.Module, names: str | list[str]) -> None:
    names = _check_names(model, names)
    layers = adapted_layers(model)
    for name in names:
        if any(name in layer.fused for layer in layers.values()):
            raise ValueError(f"adapter {name!r} is fused into the weights; call unfuse_adapters() first")
    for path, layer in layers.items():
        for name in names:
            if name in layer.adapters:
                del layer.adapters[name]
                layer.active.pop(name, None)
                layer._plan = None  # holds the adapters it was made for
        if not layer.adapters:
            replace_layer(model, path, layer.base_layer)
    for name in names:
        adapter_configs(model).pop(name, None)


def unload_adapters(model: nn.Module) -> None:
    """Put the original layers back (with whatever is fused into their weights), forget all adapters,
    and give the base parameters back the `requires_grad` they had before adapters froze them."""
    for path, layer in adapted_layers(model).items():
        replace_layer(model, path, layer.base_layer)
    adapter_configs(model).clear()
    model = uncompiled(model)
    frozen = getattr(model, FROZEN_ATTR, None) or {}
    for name, param in model.named_parameters():
        if name in frozen:
            param.requires_grad_(frozen[name])
    if hasattr(model, FROZEN_ATTR):
        delattr(model, FROZEN_ATTR)


def adapter_state_dict(
    model: nn.Module, adapter_name: str, prefix: str = "", trained_only: bool = False
) -> dict[str, torch.Tensor]:
    """FORMAT.md's tensors of one adapter: `<prefix><module path>.<param>` (`trained_only`: see
    `Adapter.tensors`)."""
    _check_names(model, adapter_name)
    state = {}
    for path, adapter in adapters_named(model, adapter_name).items():
        for param, tensor in adapter.tensors(trained_only).items():
            state[f"{prefix}{path}.{param}"] = tensor.detach()
    return state


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
