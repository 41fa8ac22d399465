"""The pipeline loader: diffusers' LoRA loader methods, for every preset's adapters in `liera/1`/`liera/2` files.

`LieraLoaderMixin` goes in front of a diffusers pipeline class (see `pipelines/`), or onto a pipeline a
user already has with `enable_liera(pipe)`. The pipeline attributes named in `liera_components`
(`unet`, `transformer`, text encoders) are the components a file's keys name. Methods that diffusers'
LoRA loader also has (`set_adapters`, `delete_adapters`, `get_active_adapters`, `get_list_adapters`,
`fuse_lora`, `unfuse_lora`, `unload_lora_weights`, `disable_lora`, `enable_lora`) act on our adapters
and on PEFT LoRAs loaded with `load_lora_weights` alike (on different layers); the others act on ours.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from . import files, inject
from .pivotal import EMBEDDINGS_FILENAME, check_embeddings, set_embeddings

DENOISERS = ("unet", "transformer")
TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")
# diffusers' names for the kwargs that carry the LoRA runtime scale, by model family.
SCALE_KWARGS = ("cross_attention_kwargs", "joint_attention_kwargs", "attention_kwargs")
_HOOKS_ATTR = "_liera_scale_hooks"

Source = str | os.PathLike | tuple[dict[str, torch.Tensor], dict[str, str]] | Mapping[str, torch.Tensor]
Weights = float | list[float | Mapping[str, float]] | Mapping[str, float] | None


class LieraLoaderMixin:
    """Load, mix, fuse and save LieRA/FLoRA/LoRA adapters in a diffusers pipeline."""

    liera_components: tuple[str, ...] = DENOISERS + TEXT_ENCODERS

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        # `enable_liera` prefers a named class (pipelines/) over one it makes up itself.
        base = diffusers_class(cls)
        if base not in _LIERA_CLASSES or _LIERA_CLASSES[base].__dict__.get("_liera_made_up"):
            _LIERA_CLASSES[base] = cls

    def liera_models(self) -> dict[str, nn.Module]:
        """The components adapters can live in, by the name a file's keys use."""
        found = {}
        for name in self.liera_components:
            model = getattr(self, name, None)
            if isinstance(model, nn.Module):
                found[name] = model
        return found

    # --- loading and saving -------------------------------------------------------------------

    def load_adapter(
        self,
        path_or_dir_or_state_dict: Source,
        adapter_name: str | None = None,
        weight: float = 1.0,
        metadata: dict[str, str] | None = None,
        hotswap: bool = False,
        weight_name: str | None = None,
        subfolder: str | None = None,
        **hub_kwargs,
    ) -> str:
        """Load a `liera/1` or `liera/2` adapter into every component its file names and make it the only active one.

        The source is what `load_lora_weights` takes: a file; a folder (a training run's, or any with
        `weight_name`, in `subfolder`); a Hugging Face repo id (`weight_name`, default
        `adapter.safetensors`; `revision`, `cache_dir`, `local_files_only`, `token`; read from the local
        cache when offline); `(tensors, metadata)` as `read_adapter_file` returns; or a state dict with
        `metadata=`. `hotswap=True` puts the file's tensors into the loaded adapter `adapter_name` in
        place (same modules and shapes), re-wrapping nothing: what a compiled model needs. Everything
        is validated against all components first: on `AdapterFileError` the pipeline is unchanged.
        The `embeddings.safetensors` beside the adapter in a folder or repo (a pivotal-tuning run's new
        tokens) loads with it. Returns
        the name.
        """
        source, tokens = path_or_dir_or_state_dict, None
        if isinstance(source, Mapping):
            if metadata is None:
                raise files.AdapterFileError(
                    "a state dict needs its file header too: pass metadata= (see plugin.read_adapter_file)"
                )
            source = (dict(source), metadata)
        elif not isinstance(source, tuple):
            adapter_path = files.locate_adapter(source, weight_name, subfolder, **hub_kwargs)
            embeddings = files.locate_companion(source, EMBEDDINGS_FILENAME, subfolder, **hub_kwargs)
            source = adapter_path
            if embeddings is not None:
                try:
                    tokens = check_embeddings(self, embeddings)
                except ValueError as error:
                    raise files.AdapterFileError(str(error)) from error
        models = self.liera_models()
        if hotswap:
            if adapter_name is None:
                raise ValueError("hotswap=True replaces a loaded adapter: name it with adapter_name=")
            name = files.hotswap_adapter(source, models, adapter_name)
        else:
            name = files.load_adapter(source, models, adapter_name=adapter_name, weight=weight)
            # Like diffusers: the new adapter is the active one, in every component, not just its own.
            for model in models.values():
                names = [name] if name in inject.list_adapters(model) else []
                inject.set_adapters(model, names, weight)
            for component in DENOISERS:
                if component in models:
                    _install_scale_hooks(models[component])
        if tokens:
            set_embeddings(self, tokens)
        return name

    def save_adapter(
        self,
        path: str | os.PathLike,
        adapter_name: str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> Path:
        """Write one adapter of all components that have it into one file (`liera/1`, or `liera/2` when it needs it)."""
        if adapter_name is None:
            names = self._our_adapters()
            if len(names) != 1:
                raise ValueError(f"the pipeline has adapters {names}: say which one to save")
            adapter_name = names[0]
        models = {c: m for c, m in self.liera_models().items() if adapter_name in inject.list_adapters(m)}
        if not models:
            raise ValueError(f"no adapter named {adapter_name!r}; the pipeline has {self._our_adapters()}")
        return files.save_adapter(path, models, adapter_name, dtype=dtype, base_model=self._base_name())

    # --- choosing and weighing ----------------------------------------------------------------

    def set_adapters(self, adapter_names: str | list[str], adapter_weights: Weights = None) -> None:
        """Make exactly `adapter_names` active, each with its weight (a float, or `{component: float}`).

        Several adapters combine by FORMAT.md's rule: lie ones multiply the weight, additive ones add.
        """
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        weights = adapter_weights if isinstance(adapter_weights, list) else [adapter_weights] * len(names)
        if len(weights) != len(names):
            raise ValueError(f"got {len(weights)} weights for {len(names)} adapters {names}")
        for name, weight in zip(names, weights):
            if isinstance(weight, Mapping):
                unknown = [key for key in weight if key not in self.liera_components]
                if unknown:
                    raise ValueError(
                        f"weights of adapter {name!r} name unknown components {unknown}; the pipeline's are "
                        f"{sorted(self.liera_models())}"
                    )
        ours, peft = self._our_adapters(), self._peft_adapters()
        unknown = [n for n in names if n not in ours and n not in peft]
        if unknown:
            raise ValueError(f"no adapter named {unknown}; the pipeline has {ours + peft}")
        for component, model in self.liera_models().items():
            present = inject.list_adapters(model)
            chosen = [(n, _weight_for(w, component)) for n, w in zip(names, weights) if n in present]
            inject.set_adapters(model, [n for n, _ in chosen], [w for _, w in chosen])
        if peft:
            chosen = [(n, w) for n, w in zip(names, weights) if n in peft]
            # Not naming a PEFT LoRA turns it off, as for ours: weight 0 is diffusers' way to do that.
            chosen = chosen or [(n, 0.0) for n in peft]
            super().set_adapters([n for n, _ in chosen], [w for _, w in chosen])

    def get_active_adapters(self) -> list[str]:
        active = {}
        for model in self.liera_models().values():
            active.update(dict.fromkeys(inject.active_adapters(model)))
        parent = getattr(super(), "get_active_adapters", None)
        if self._peft_adapters() and parent is not None:
            active.update(dict.fromkeys(parent()))
        return list(active)

    def get_list_adapters(self) -> dict[str, list[str]]:
        """`{component: [adapter names]}`, diffusers' shape, our adapters and PEFT LoRAs together."""
        listed = {}
        for component, model in self.liera_models().items():
            if names := inject.list_adapters(model):
                listed[component] = names
        for component, names in self._peft_list().items():
            known = listed.get(component, [])
            if extra := [n for n in names if n not in known]:
                listed[component] = known + extra
        return listed

    def disable_adapters(self) -> None:
        """Run the (possibly fused) base weights only, until `enable_adapters()`."""
        for model in self.liera_models().values():
            inject.disable_adapters(model)

    def enable_adapters(self) -> None:
        for model in self.liera_models().values():
            inject.enable_adapters(model)

    # --- fusing and removing ------------------------------------------------------------------

    def fuse_adapters(
        self, scale: float = 1.0, adapter_names: list[str] | None = None, components: list[str] | None = None
    ) -> None:
        """Fold adapters (default: the active ones, with their weights times `scale`) into the weights,
        so generation costs what the base costs. `unfuse_adapters()` takes them out again."""
        if adapter_names is not None:
            unknown = [n for n in adapter_names if n not in self._our_adapters()]
            if unknown:
                raise ValueError(f"no adapter named {unknown}; the pipeline has {self._our_adapters()}")
        self._check_peft_unmerged(components, "fuse")
        for model in self._selected(components).values():
            names = None
            if adapter_names is not None:
                names = [n for n in adapter_names if n in inject.list_adapters(model)]
            inject.fuse_adapters(model, scale=scale, adapter_names=names)

    def unfuse_adapters(self, components: list[str] | None = None) -> None:
        self._check_peft_unmerged(components, "unfuse")
        for model in self._selected(components).values():
            inject.unfuse_adapters(model)

    def delete_adapters(self, adapter_names: str | list[str]) -> None:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        ours, peft = self._our_adapters(), self._peft_adapters()
        unknown = [n for n in names if n not in ours and n not in peft]
        if unknown:
            raise ValueError(f"no adapter named {unknown}; the pipeline has {ours + peft}")
        for model in self.liera_models().values():
            inject.delete_adapters(model, [n for n in names if n in inject.list_adapters(model)])
        if peft_names := [n for n in names if n in peft]:
            super().delete_adapters(peft_names)

    def unload_adapters(self) -> None:
        """Put the original layers back (keeping whatever is fused into their weights), forget all
        adapters and drop the runtime-scale hooks."""
        for model in self.liera_models().values():
            inject.unload_adapters(model)
            for handle in getattr(model, _HOOKS_ATTR, ()):
                handle.remove()
            if hasattr(model, _HOOKS_ATTR):
                delattr(model, _HOOKS_ATTR)

    # --- diffusers' LoRA names, acting on our adapters and on diffusers' own LoRAs alike -----------

    def load_lora_weights(self, *args, **kwargs):
        """diffusers' `load_lora_weights`. Where our adapters already wrap a layer, PEFT could not
        recognise it: they step aside while diffusers wraps the plain layer, then go back inside its
        LoRA layer, so that layer computes `W' x` (FORMAT.md) plus diffusers' LoRA term."""
        parked = []
        for model in self.liera_models().values():
            for path, layer in inject.adapted_layers(model).items():
                parked.append((model, path, layer))
                inject.replace_layer(model, path, layer.base_layer)
        try:
            return super().load_lora_weights(*args, **kwargs)
        finally:
            for model, path, layer in parked:
                inject.replace_layer(model, path, layer)

    def fuse_lora(
        self,
        components: list[str] | None = None,
        lora_scale: float = 1.0,
        safe_fusing: bool = False,
        adapter_names: list[str] | None = None,
        **kwargs,
    ) -> None:
        """diffusers' `fuse_lora`: ours are fused as `fuse_adapters` does (it always refuses non-finite
        weights, so `safe_fusing` is implied), diffusers' LoRAs by diffusers."""
        ours, peft = self._our_adapters(), self._peft_adapters()
        if adapter_names is not None:
            unknown = [n for n in adapter_names if n not in ours and n not in peft]
            if unknown:
                raise ValueError(f"no adapter named {unknown}; the pipeline has {ours + peft}")
        chosen = None if adapter_names is None else [n for n in adapter_names if n in ours]
        if ours and chosen != []:
            mine = [c for c in (components or self.liera_models()) if c in self.liera_models()]
            self.fuse_adapters(scale=lora_scale, adapter_names=chosen, components=mine)
        theirs = None if adapter_names is None else [n for n in adapter_names if n in peft]
        if peft and theirs != []:
            components = [
                c for c in (components or self._lora_loadable_modules) if c in self._lora_loadable_modules
            ]
            super().fuse_lora(components, lora_scale, safe_fusing, theirs, **kwargs)

    def unfuse_lora(self, components: list[str] | None = None, **kwargs) -> None:
        """diffusers' LoRAs come out first (they were merged on top of ours), then ours: exact."""
        mine = [c for c in (components or self.liera_models()) if c in self.liera_models()]
        if self._peft_adapters():
            theirs = [
                c for c in (components or self._lora_loadable_modules) if c in self._lora_loadable_modules
            ]
            super().unfuse_lora(theirs, **kwargs)
        self.unfuse_adapters(components=mine)

    def unload_lora_weights(self, *args, **kwargs) -> None:
        """Unload our adapters and diffusers' LoRAs (what is fused stays in the weights, as in diffusers)."""
        self.unload_adapters()
        if self._peft_adapters():
            super().unload_lora_weights(*args, **kwargs)

    def disable_lora(self) -> None:
        self.disable_adapters()
        if self._peft_adapters():
            super().disable_lora()

    def enable_lora(self) -> None:
        self.enable_adapters()
        if self._peft_adapters():
            super().enable_lora()

    # --- the runtime scale for text encoders --------------------------------------------------

    def encode_prompt(self, *args, **kwargs):
        """The parent's `encode_prompt`, with diffusers' `lora_scale` applied to our unfused adapters
        in the text encoders (the pipelines pass `cross_attention_kwargs["scale"]` as `lora_scale`)."""
        scale = kwargs.get("lora_scale")
        encoders = [m for c, m in self.liera_models().items() if c in TEXT_ENCODERS]
        if scale is None or scale == 1.0 or not encoders:
            return super().encode_prompt(*args, **kwargs)
        for model in encoders:
            inject.set_runtime_scale(model, scale)
        try:
            return super().encode_prompt(*args, **kwargs)
        finally:
            for model in encoders:
                inject.set_runtime_scale(model, 1.0)

    # --- saving the pipeline ------------------------------------------------------------------

    def save_pretrained(self, save_directory, *args, **kwargs):
        """diffusers' `save_pretrained`, refused while adapters are in the models: their wrapped layers
        would be saved under names a plain pipeline can't load."""
        wrapped = {
            c: inject.list_adapters(m) for c, m in self.liera_models().items() if inject.adapted_layers(m)
        }
        if wrapped:
            raise ValueError(
                f"the pipeline holds adapters {wrapped}: to save it with them merged, call fuse_adapters() and then "
                "unload_adapters() first (python -m plugin merge does both); to save an adapter, save_adapter()"
            )
        return super().save_pretrained(save_directory, *args, **kwargs)

    def to_json_string(self) -> str:
        """`model_index.json` names the diffusers class, so a saved (merged) pipeline loads without us."""
        config = json.loads(super().to_json_string())
        config["_class_name"] = diffusers_class(type(self)).__name__
        return json.dumps(config, indent=2, sort_keys=True) + "\n"

    # --- helpers ------------------------------------------------------------------------------

    def _check_peft_unmerged(self, components: list[str] | None, action: str) -> None:
        """Ours fuse from (and unfuse to) the original `W`, so a diffusers LoRA merged on top of them
        would be lost: refuse while one is merged around our layers (`fuse_lora`/`unfuse_lora` order
        them: ours in first, out last)."""
        found = []
        for component, model in self._selected(components).items():
            model = inject.uncompiled(model)
            for path in inject.adapted_layers(model):
                outer = model.get_submodule(path)
                if inject.is_peft_layer(outer) and getattr(outer, "merged_adapters", None):
                    found.append(f"{component}.{path}")
        if found:
            raise ValueError(
                f"diffusers' LoRAs are fused around our adapters at {found[:3]}: cannot {action} ours alone; "
                "use unfuse_lora() and fuse_lora(), which take both out and put both in, in order"
            )

    def _our_adapters(self) -> list[str]:
        names = {}
        for model in self.liera_models().values():
            names.update(dict.fromkeys(inject.list_adapters(model)))
        return list(names)

    def _peft_list(self) -> dict[str, list[str]]:
        parent = getattr(super(), "get_list_adapters", None)
        if parent is None:
            return {}
        try:
            return parent()
        except ValueError:  # diffusers without its PEFT backend
            return {}

    def _peft_adapters(self) -> list[str]:
        names = {}
        for listed in self._peft_list().values():
            names.update(dict.fromkeys(listed))
        return list(names)

    def _selected(self, components: list[str] | None) -> dict[str, nn.Module]:
        models = self.liera_models()
        if components is None:
            return models
        unknown = [c for c in components if c not in models]
        if unknown:
            raise ValueError(f"no component {unknown}; the pipeline has {sorted(models)}")
        return {c: models[c] for c in components}

    def _base_name(self) -> str | None:
        name = getattr(getattr(self, "config", None), "_name_or_path", None)
        return str(name) if name else None


def _weight_for(weight: float | Mapping[str, float] | None, component: str) -> float:
    if weight is None:
        return 1.0
    if isinstance(weight, Mapping):
        value = weight.get(component, 1.0)
        if isinstance(value, Mapping):
            raise ValueError(
                "per-block weights are for PEFT LoRAs; give our adapters one float per component"
            )
        return float(value)
    return float(weight)


# --- the runtime scale for the denoiser -----------------------------------------------------------


def _scale_from_kwargs(model: nn.Module, args: tuple, kwargs: dict) -> None:
    """Before the UNet/transformer runs: apply `*_attention_kwargs["scale"]` to our unfused adapters.
    diffusers' own `apply_lora_scale` pops it from a copy, so the caller's dict still has it here."""
    scale = 1.0
    for key in SCALE_KWARGS:
        if isinstance(kwargs.get(key), Mapping) and "scale" in kwargs[key]:
            scale = float(kwargs[key]["scale"])
    if scale != 1.0:
        inject.set_runtime_scale(model, scale)
        model._liera_scaled = True


def _reset_scale(model: nn.Module, args: tuple, output) -> None:
    if getattr(model, "_liera_scaled", False):
        inject.set_runtime_scale(model, 1.0)
        model._liera_scaled = False


def _install_scale_hooks(model: nn.Module) -> None:
    if getattr(model, _HOOKS_ATTR, None):
        return
    pre = model.register_forward_pre_hook(_scale_from_kwargs, with_kwargs=True)
    post = model.register_forward_hook(_reset_scale, always_call=True)
    setattr(model, _HOOKS_ATTR, (pre, post))


# --- giving a pipeline the methods ---------------------------------------------------------------

_LIERA_CLASSES: dict[type, type] = {}  # diffusers pipeline class -> its class with the mixin


def diffusers_class(cls: type) -> type:
    """The first class in `cls`'s MRO that is not ours: the diffusers pipeline it extends."""
    for base in cls.__mro__:
        if not issubclass(base, LieraLoaderMixin):
            return base
    raise TypeError(f"{cls.__name__} extends no diffusers pipeline")


def enable_liera(pipe):
    """Give a pipeline the user already has the loader methods, in place, and return it.

    Its class becomes a subclass of its own class with `LieraLoaderMixin` in front (the named one from
    `pipelines/` where there is one), so everything else about the pipeline stays as it was.
    """
    if isinstance(pipe, LieraLoaderMixin):
        return pipe
    base = type(pipe)
    if not any(isinstance(getattr(pipe, c, None), nn.Module) for c in DENOISERS + TEXT_ENCODERS):
        raise TypeError(f"{base.__name__} has no unet, transformer or text encoder to put adapters in")
    cls = _LIERA_CLASSES.get(base)
    if cls is None:
        namespace = {"__module__": base.__module__, "_liera_made_up": True}
        cls = type(f"Liera{base.__name__}", (LieraLoaderMixin, base), namespace)
    pipe.__class__ = cls
    return pipe
