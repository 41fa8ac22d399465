"""What resuming a procedure needs beyond the adapter file: the trained and the frozen parts apart.

A file holds `frozen + trained` combined (that is all a user needs), but training goes on with the
trained part alone, and a sum of vectors or blocks can't be split again. So checkpoints and the
best-held-out copy keep the trained tensors under their file keys and the frozen ones under
`frozen.<key>`; without frozen parts this is exactly the adapter's file content.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ..backends import Continued, backend_owning, frozen_part, trained_part
from ..files import KEY
from ..inject import adapter_state_dict, adapters_named

FROZEN = "frozen."


def training_state(models: Mapping[str, nn.Module], adapter_name: str) -> dict[str, torch.Tensor]:
    """`{component}.{path}.{tensor}` of the trained parts, `frozen.{...}` of the frozen ones."""
    state = {}
    for component, model in models.items():
        state.update(adapter_state_dict(model, adapter_name, prefix=f"{component}.", trained_only=True))
        for path, adapter in adapters_named(model, adapter_name).items():
            frozen = frozen_part(adapter.backend)
            if frozen is not None:
                for name, tensor in frozen.named_parameters():
                    state[f"{FROZEN}{component}.{path}.{name}"] = tensor.detach()
    return state


def restore_training_state(
    models: Mapping[str, nn.Module], adapter_name: str, tensors: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Give every adapter the frozen part `tensors` hold (or none), and return the trained tensors,
    for the caller to copy in place (`copy_adapter_tensors`)."""
    frozen: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        if key.startswith(FROZEN):
            match = KEY.match(key[len(FROZEN) :])  # a file key's <component>.<module>.<param>
            if match is None:
                raise ValueError(f"training state key {key!r} is not frozen.<component>.<module>.<param>")
            frozen.setdefault(f"{match['component']}.{match['module']}", {})[match["param"]] = tensor
    for component, model in models.items():
        for path, adapter in adapters_named(model, adapter_name).items():
            trained = trained_part(adapter.backend)
            mine = frozen.pop(f"{component}.{path}", None)
            if mine is None:
                adapter.backend = trained
                continue
            cls = backend_owning(next(iter(mine)))
            if cls is not type(trained):
                raise ValueError(f"frozen part of {component}.{path} is not a {trained.name} update")
            part = cls.from_tensors(trained.shape, mine).to(adapter.scale.device)
            adapter.backend = Continued(part, trained)
    if frozen:
        raise ValueError(f"frozen parts for modules the adapter does not have: {sorted(frozen)[:3]}")
    return {key: tensor for key, tensor in tensors.items() if not key.startswith(FROZEN)}
