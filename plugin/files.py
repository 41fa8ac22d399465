"""`liera/1` and `liera/2` adapter files (FORMAT.md): atomic saves, and loads that validate everything first.

A load either fits completely or changes nothing: every key, shape and value is checked against
the target models before the first layer is touched.
"""

from __future__ import annotations

import glob
import json
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .backends import BACKEND_CLASSES, backend_owning, frozen_part
from .compositions import COMPOSITION_CLASSES, all_finite, composition_from
from .config import AdapterConfig
from .inject import (
    adaptable_layers,
    adapted_layers,
    adapter_configs,
    adapter_state_dict,
    adapters_named,
    attach,
    check_adapter_name,
    check_weight,
    list_adapters,
)
from .layer import Adapter, one_adapted_weight

FORMAT_VERSION = "liera/1"  # what a file needs nothing newer than; `liera/2` adds backends and `dora`
FORMAT_VERSIONS = {"liera/1": 1, "liera/2": 2}
ADAPTER_FILENAME = "adapter.safetensors"
SAVE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_PARAM = "|".join(
    [cls.tensor_names for cls in BACKEND_CLASSES.values()]
    + [re.escape(name) for cls in COMPOSITION_CLASSES.values() for name in cls.extra_names]
    + ["scale"]
)
# A file key: `<component>.<module path>.<param>` (FORMAT.md).
KEY = re.compile(rf"^(?P<component>[^.]+)\.(?P<module>.+)\.(?P<param>{_PARAM})$")


class AdapterFileError(ValueError):
    """An adapter file that does not fit: the message names the file, the key and the shapes."""


def save_adapter(
    path: str | os.PathLike,
    models: Mapping[str, nn.Module],
    adapter_name: str = "default",
    dtype: torch.dtype = torch.float32,
    base_model: str | None = None,
) -> Path:
    """Write one adapter of `models` (`{"unet": unet, "text_encoder": ...}`) to `path`, atomically."""
    if dtype not in SAVE_DTYPES:
        raise ValueError(
            f"cannot save adapter tensors as {dtype}; FORMAT.md allows {', '.join(map(str, SAVE_DTYPES))}"
        )
    path = Path(path)
    tensors, config, adapters = {}, None, []
    for component, model in models.items():
        if adapter_name not in list_adapters(model):
            continue
        config = config or adapter_configs(model).get(adapter_name)
        adapters += list(adapters_named(model, adapter_name).values())
        state = adapter_state_dict(model, adapter_name, prefix=f"{component}.")
        tensors.update({k: v.to(dtype=dtype, device="cpu").contiguous() for k, v in state.items()})
    if not tensors:
        raise ValueError(f"no adapter named {adapter_name!r} in {sorted(models)}")
    config = config or AdapterConfig()
    version = max(max(a.backend.since, a.composition.since) for a in adapters)
    metadata = {
        "format": f"liera/{version}",
        **adapters[0].composition.metadata(),
        "config": config.to_json(),
    }
    if base_model or config.base_model:
        metadata["base_model"] = str(base_model or config.base_model)
    return save_atomically(tensors, metadata, path)


def save_atomically(
    tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: str | os.PathLike
) -> Path:
    """Write a safetensors file under a temporary name beside `path`, then rename it: a reader (or a
    kill) never sees a half-written file under the final name. The file gets the usual permissions
    (0666 less the umask), not the temporary file's 0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):  # left by a save that was killed
        stale.unlink(missing_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        save_file(tensors, tmp, metadata=metadata)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def resolve_adapter_path(path: str | os.PathLike) -> Path:
    """A file, or a directory holding `adapter.safetensors` (a training run's output)."""
    path = Path(path)
    if path.is_dir():
        path = path / ADAPTER_FILENAME
    if not path.is_file():
        raise FileNotFoundError(f"no adapter file at {path}")
    return path


def locate_adapter(
    source: str | os.PathLike, weight_name: str | None = None, subfolder: str | None = None, **hub_kwargs
) -> Path:
    """Where `load_lora_weights` would look: a file; a folder (`weight_name`, default
    `adapter.safetensors`, in `subfolder`); else a Hugging Face repo id, fetched by `huggingface_hub`
    (from its cache when offline; `hub_kwargs`: `revision`, `cache_dir`, `local_files_only`, `token`)."""
    folder = Path(source, subfolder) if subfolder else Path(source)
    if folder.is_file() and weight_name is None:
        return folder
    if folder.is_dir():
        path = folder / (weight_name or ADAPTER_FILENAME)
        if not path.is_file():
            found = sorted(p.name for p in folder.glob("*.safetensors"))
            raise FileNotFoundError(
                f"no {path.name} in {folder} (its .safetensors files: {found}); pass weight_name="
            )
        return path
    if _is_repo_id(source):
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

        filename = weight_name or ADAPTER_FILENAME
        try:
            return Path(hf_hub_download(source, filename, subfolder=subfolder, **hub_kwargs))
        except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as error:
            raise FileNotFoundError(
                f"no adapter {filename} for {source!r}: not a local file or folder, and the Hugging Face Hub "
                f"(or its cache, offline) has none ({type(error).__name__})"
            ) from error
    raise FileNotFoundError(f"no adapter file at {folder}")


def locate_companion(
    source: str | os.PathLike, filename: str, subfolder: str | None = None, **hub_kwargs
) -> Path | None:
    """A file that travels beside the adapter `locate_adapter` found (a pivotal-tuning run's
    `embeddings.safetensors`): in the same folder or Hub repo, or None where there is none (offline:
    where the cache has none). A file source has no companion."""
    folder = Path(source, subfolder) if subfolder else Path(source)
    if folder.is_dir():
        return folder / filename if (folder / filename).is_file() else None
    if folder.exists() or not _is_repo_id(source):
        return None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(source, filename, subfolder=subfolder, **hub_kwargs))
    except (EntryNotFoundError, LocalEntryNotFoundError):
        return None


def _is_repo_id(source: str | os.PathLike) -> bool:
    return isinstance(source, str) and re.fullmatch(r"[\w.-]+/[\w.-]+", source) is not None


def read_adapter_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and header metadata of a `.safetensors` file (never unpickles anything)."""
    path = resolve_adapter_path(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError) as error:
        raise AdapterFileError(f"{path}: not a readable safetensors file ({error})") from error
    return tensors, metadata


def load_adapter(
    source: str | os.PathLike | tuple[dict[str, torch.Tensor], dict[str, str]],
    models: Mapping[str, nn.Module],
    adapter_name: str | None = None,
    weight: float = 1.0,
) -> str:
    """Load a `liera/1` or `liera/2` adapter into `models` and make it active with user weight `weight`.

    `source` is a file, a directory with `adapter.safetensors`, or `(tensors, metadata)`. Returns
    the adapter's name (default: the file's stem, dots made underscores). Raises `AdapterFileError` and changes nothing
    if anything in the file does not fit.
    """
    weight = check_weight(weight)
    if adapter_name is not None:
        check_adapter_name(adapter_name)
    tensors, metadata, where = _read_source(source)
    if adapter_name is None:  # a file's stem (module names can't hold dots)
        adapter_name = "default" if isinstance(source, tuple) else Path(where).stem.replace(".", "_")
    plan, config = plan_load(tensors, metadata, models, where)
    check_adapted_weights(plan, models, weight, where)
    for component, model in models.items():
        if adapter_name in list_adapters(model):
            raise AdapterFileError(f"{where}: {component} already has an adapter named {adapter_name!r}")
    for component, adapters in plan.items():
        attach(models[component], adapter_name, config, adapters, weight)
    return adapter_name


def hotswap_adapter(
    source: str | os.PathLike | tuple[dict[str, torch.Tensor], dict[str, str]],
    models: Mapping[str, nn.Module],
    adapter_name: str,
) -> str:
    """Replace the tensors of the loaded adapter `adapter_name` with a file's, in place (diffusers'
    `hotswap=True`): no layer is re-wrapped and no parameter replaced, so a compiled model keeps its
    graphs. The file must have the same modules, composition, backends and shapes; everything is
    checked before the first tensor is copied."""
    tensors, metadata, where = _read_source(source)
    plan, config = plan_load(tensors, metadata, models, where)
    check_adapted_weights(plan, models, 1.0, where)
    live = {component: adapters_named(model, adapter_name) for component, model in models.items()}
    if not any(live.values()):
        raise AdapterFileError(
            f"{where}: hotswap needs a loaded adapter named {adapter_name!r}; load it first"
        )
    for component in sorted(set(live) | set(plan)):
        ours, theirs = set(live.get(component, {})), set(plan.get(component, {}))
        if ours != theirs:
            differ = sorted(ours ^ theirs)[:3]
            raise AdapterFileError(
                f"{where}: hotswap needs the same modules as {adapter_name!r}; {component} differs at {differ}"
            )
    pairs = []
    for component, adapters in plan.items():
        layers = adapted_layers(models[component])
        for path, new in adapters.items():
            old, prefix = live[component][path], f"{component}.{path}"
            if frozen_part(old.backend) is not None:
                raise AdapterFileError(
                    f"{where}: {prefix} is being trained on a frozen part; hotswap a loaded adapter"
                )
            if layers[path].fused.get(adapter_name) is not None:
                raise AdapterFileError(
                    f"{where}: {adapter_name!r} is fused into {prefix}; unfuse it before a hotswap"
                )
            if (
                type(old.backend) is not type(new.backend)
                or old.composition.metadata() != new.composition.metadata()
            ):
                raise AdapterFileError(
                    f"{where}: {prefix} is {new.composition.name} + {new.backend.name} in the file, "
                    f"{old.composition.name} + {old.backend.name} in the loaded adapter"
                )
            olds, news = old.tensors(), new.tensors()
            for name in sorted(set(olds) | set(news)):
                if name not in olds or name not in news or olds[name].shape != news[name].shape:
                    got = tuple(news[name].shape) if name in news else "missing"
                    want = tuple(olds[name].shape) if name in olds else "no such tensor"
                    raise AdapterFileError(
                        f"{where}: key {prefix}.{name} has shape {got}, the loaded adapter {want}"
                    )
                pairs.append((olds[name], news[name]))
    with torch.no_grad():
        for old, new in pairs:
            old.copy_(new)
    for model in models.values():
        if adapter_name in adapter_configs(model):
            adapter_configs(model)[adapter_name] = config
    return adapter_name


def _read_source(
    source: str | os.PathLike | tuple[dict[str, torch.Tensor], dict[str, str]],
) -> tuple[dict[str, torch.Tensor], dict[str, str], str]:
    if isinstance(source, tuple):
        tensors, metadata = source
        return tensors, metadata, "<state dict>"
    where = str(resolve_adapter_path(source))
    return *read_adapter_file(where), where


def plan_load(
    tensors: dict[str, torch.Tensor], metadata: dict[str, str], models: Mapping[str, nn.Module], where: str
) -> tuple[dict[str, dict], AdapterConfig]:
    """Validate a file against `models`; return per component `{module path: Adapter}`."""
    fmt = metadata.get("format")
    if fmt not in FORMAT_VERSIONS:
        raise AdapterFileError(
            f"{where}: unknown format {fmt!r} in the header; expected one of {tuple(FORMAT_VERSIONS)}"
        )
    version = FORMAT_VERSIONS[fmt]
    try:
        composition = composition_from(metadata)
    except ValueError as error:
        raise AdapterFileError(f"{where}: {error} (header)") from error
    if composition.since > version:
        raise AdapterFileError(
            f"{where}: the {composition.name!r} composition needs liera/{composition.since}, but the header says {fmt}"
        )
    config = _config_from(metadata, composition.metadata())
    if not tensors:
        raise AdapterFileError(f"{where}: the file holds no tensors")

    grouped: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = KEY.match(key)
        if match is None:
            raise AdapterFileError(f"{where}: key {key!r} is not <component>.<module>.<{_PARAM}>")
        if match["component"] not in models:
            raise AdapterFileError(
                f"{where}: key {key!r} is for component {match['component']!r}, which is not among {sorted(models)}"
            )
        if not tensor.is_floating_point():
            raise AdapterFileError(
                f"{where}: key {key!r} has dtype {tensor.dtype}; FORMAT.md allows floats only"
            )
        if not all_finite(tensor):
            raise AdapterFileError(f"{where}: key {key!r} holds non-finite values (NaN or inf)")
        grouped.setdefault((match["component"], match["module"]), {})[match["param"]] = tensor

    layers = {component: adaptable_layers(model) for component, model in models.items()}
    plan: dict[str, dict[str, Adapter]] = {}
    for (component, module), params in grouped.items():
        prefix = f"{component}.{module}"
        module = _same_module(module, layers[component])
        layer = layers[component].get(module)
        if layer is None:
            raise AdapterFileError(
                f"{where}: key {prefix}.* names a module that {component} has no Linear/Conv at"
            )
        shape = tuple(layer.weight.shape)
        extra_shapes = composition.extra_shapes(shape)
        backend_params = {p: t for p, t in params.items() if p != "scale" and p not in extra_shapes}
        owners = {name: backend_owning(name) for name in backend_params}
        for name, owner in owners.items():
            if owner is None:
                raise AdapterFileError(
                    f"{where}: key {prefix}.{name} is not a tensor of the {composition.name!r} composition "
                    "or of any backend"
                )
        if len(set(owners.values())) != 1:
            raise AdapterFileError(
                f"{where}: {prefix} needs exactly one backend's tensors, found {sorted(params)}"
            )
        backend_cls = next(iter(owners.values()))
        if backend_cls.since > version:
            raise AdapterFileError(
                f"{where}: key {prefix}.{next(iter(backend_params))} is a {backend_cls.name!r} tensor, which needs "
                f"liera/{backend_cls.since}, but the header says {fmt}"
            )
        shapes = {name: tuple(t.shape) for name, t in params.items() if name != "scale"}
        expected = {**backend_cls.expected_shapes(shape, shapes), **extra_shapes}
        for name in sorted(set(expected) | set(shapes)):
            if expected.get(name) != shapes.get(name):
                raise AdapterFileError(
                    f"{where}: key {prefix}.{name} has shape {shapes.get(name, 'missing')}, but the module's weight "
                    f"{shape} needs {expected.get(name, 'no such tensor')}"
                )
        if any(params[name].numel() == 0 for name in shapes):
            raise AdapterFileError(f"{where}: {prefix} has a zero rank")
        scale = params.get("scale")
        if scale is None or scale.dim() != 0:
            got = "missing" if scale is None else tuple(scale.shape)
            raise AdapterFileError(f"{where}: key {prefix}.scale must be a 0-d tensor, got {got}")
        backend = backend_cls.from_tensors(shape, backend_params)
        extra = {name: params[name] for name in extra_shapes}
        adapter = Adapter(backend, composition, float(scale), extra).to(layer.weight.device)
        plan.setdefault(component, {})[module] = adapter
    return plan, config


@torch.no_grad()
def check_adapted_weights(
    plan: dict[str, dict[str, Adapter]], models: Mapping[str, nn.Module], weight: float, where: str
) -> None:
    """Refuse a file whose adapted weight `W'` (alone, at user weight `weight`) is not finite in the
    layer's dtype: finite tensors can still overflow (a huge scale, an `exp` of a large update)."""
    for component, adapters in plan.items():
        layers = adaptable_layers(models[component])
        for module, adapter in adapters.items():
            layer = layers[module]
            original = layer.original_weight() if hasattr(layer, "original_weight") else layer.weight
            if not all_finite(one_adapted_weight(original, adapter, weight)):
                raise AdapterFileError(
                    f"{where}: {component}.{module} would get a non-finite adapted weight W' at weight {weight} "
                    f"(its update overflows {original.dtype})"
                )


def _same_module(module: str, layers: Mapping[str, nn.Module]) -> str:
    """transformers 5's CLIPTextModel lost its `text_model.` level: a file from either version names
    the same layer (diffusers' LoRA loader does the same)."""
    if module in layers:
        return module
    alias = module.removeprefix("text_model.") if module.startswith("text_model.") else f"text_model.{module}"
    return alias if alias in layers else module


def _config_from(metadata: dict[str, str], fields: dict[str, str]) -> AdapterConfig:
    """The header's config where it parses; the tensors and the header fields are what count."""
    try:
        config = AdapterConfig.from_json(metadata.get("config", "{}"))
    except (ValueError, TypeError, json.JSONDecodeError):
        config = AdapterConfig()
    config.composition = fields["composition"]
    config.lie_map = fields.get("lie_map", config.lie_map)
    if metadata.get("base_model"):
        config.base_model = metadata["base_model"]
    return config
