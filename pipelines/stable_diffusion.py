"""Stable Diffusion 1.x/2.x with the adapter loader."""

from diffusers import StableDiffusionPipeline

from plugin.loader import LieraLoaderMixin


class LieraStableDiffusionPipeline(LieraLoaderMixin, StableDiffusionPipeline):
    """`StableDiffusionPipeline` plus `load_adapter`, `set_adapters`, `fuse_adapters`, ... (plugin.loader).

    Created like its parent (`from_pretrained`, or from components); saved pipelines name the parent
    class, so plain diffusers loads them.
    """
