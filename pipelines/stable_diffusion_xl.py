"""Stable Diffusion XL with the adapter loader."""

from diffusers import StableDiffusionXLPipeline

from plugin.loader import LieraLoaderMixin


class LieraStableDiffusionXLPipeline(LieraLoaderMixin, StableDiffusionXLPipeline):
    """`StableDiffusionXLPipeline` plus `load_adapter`, `set_adapters`, `fuse_adapters`, ... (plugin.loader).

    Adapters can live in the UNet and both text encoders (`text_encoder`, `text_encoder_2`).
    """
