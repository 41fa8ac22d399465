"""diffusers pipelines that load LieRA/FLoRA/LoRA adapters: `pipe.load_adapter("adapter.safetensors")`."""

from plugin.loader import LieraLoaderMixin, enable_liera

from .stable_diffusion import LieraStableDiffusionPipeline
from .stable_diffusion_xl import LieraStableDiffusionXLPipeline

__all__ = [
    "LieraLoaderMixin",
    "LieraStableDiffusionPipeline",
    "LieraStableDiffusionXLPipeline",
    "enable_liera",
]
