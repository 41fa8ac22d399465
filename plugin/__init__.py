"""LieRA and FLoRA adapters for diffusers, and the other methods of the literature as presets of the
same engine: tensor-decomposition updates that keep kernels' shapes."""

from .backends import BACKEND_CLASSES, CP, Backend, BlockDiag, BlockLowRank, Hadamard, LowRank, RowCol, Tucker
from .compositions import COMPOSITION_CLASSES, Additive, Composition, Dora, Lie
from .config import METHODS, TARGET_PRESETS, AdapterConfig, Preset
from .export import lora_state_dict as export_lora
from .export import save_lora
from .files import (
    FORMAT_VERSION,
    AdapterFileError,
    hotswap_adapter,
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
from .loader import LieraLoaderMixin, enable_liera

__all__ = [
    "BACKEND_CLASSES",
    "COMPOSITION_CLASSES",
    "CP",
    "Additive",
    "BlockDiag",
    "BlockLowRank",
    "Composition",
    "Dora",
    "Hadamard",
    "Lie",
    "Preset",
    "RowCol",
    "FORMAT_VERSION",
    "METHODS",
    "TARGET_PRESETS",
    "Adapter",
    "AdaptedLayer",
    "AdapterConfig",
    "AdapterFileError",
    "Backend",
    "LieraLoaderMixin",
    "LowRank",
    "Tucker",
    "active_adapters",
    "adapted_layers",
    "adapter_state_dict",
    "add_adapter",
    "delete_adapters",
    "disable_adapters",
    "enable_adapters",
    "enable_liera",
    "export_lora",
    "fuse_adapters",
    "list_adapters",
    "hotswap_adapter",
    "load_adapter",
    "read_adapter_file",
    "save_adapter",
    "save_lora",
    "set_adapters",
    "set_runtime_scale",
    "trainable_parameters",
    "unfuse_adapters",
    "unload_adapters",
]
