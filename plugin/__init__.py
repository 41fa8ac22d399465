"""LieRA and FLoRA adapters for diffusers: tensor-decomposition updates that keep kernels' shapes."""

from .backends import BACKEND_CLASSES, CP, Backend, LowRank, Tucker
from .config import METHODS, TARGET_PRESETS, AdapterConfig
from .files import (
    FORMAT_VERSION,
    AdapterFileError,
    load_adapter,
    read_adapter_file,
    save_adapter,
)
from .inject import (
    active_adapters,
    adapted_layers,
    adapter_state_dict,
    add_adapter,
    delete_adapters,
    disable_adapters,
    enable_adapters,
    fuse_adapters,
    list_adapters,
    set_adapters,
    set_runtime_scale,
    trainable_parameters,
    unfuse_adapters,
    unload_adapters,
)
from .layer import AdaptedLayer, Adapter

__all__ = [
    "BACKEND_CLASSES",
    "CP",
    "FORMAT_VERSION",
    "METHODS",
    "TARGET_PRESETS",
    "Adapter",
    "AdaptedLayer",
    "AdapterConfig",
    "AdapterFileError",
    "Backend",
    "LowRank",
    "Tucker",
    "active_adapters",
    "adapted_layers",
    "adapter_state_dict",
    "add_adapter",
    "delete_adapters",
    "disable_adapters",
    "enable_adapters",
    "fuse_adapters",
    "list_adapters",
    "load_adapter",
    "read_adapter_file",
    "save_adapter",
    "set_adapters",
    "set_runtime_scale",
    "trainable_parameters",
    "unfuse_adapters",
    "unload_adapters",
]
