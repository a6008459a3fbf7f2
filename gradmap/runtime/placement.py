"""Where tensors live: the model's compute device, the host of its weights, and layer streaming's
placement of one module group at a time on the compute device (`offload="layer"`).

Layer streaming is switched on per model instance by `layer_offload(model, compute_device)`;
`offload_of(model)` is the one test every pass uses to choose between the in-memory and the
streamed execution of the same algorithm.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from gradmap.core.adapter import ModelAdapter
from gradmap.core.errors import GradmapError

__all__ = ["OFFLOAD_MODES", "LayerOffload", "layer_offload", "offload_of", "resolve_compute_device",
           "is_dispatched", "model_device", "host_device", "to_device", "on_device", "embedding_modules",
           "head_modules", "offloaded_modules", "check_weights_editable"]

log = logging.getLogger(__name__)

OFFLOAD_MODES = (None, "layer")
_ATTR = "_gradmap_layer_offload"


@dataclass(frozen=True)
class LayerOffload:
    """Layer streaming is active on a model: compute on `compute_device`, weights stay on the host."""

    compute_device: torch.device


def offload_of(model: nn.Module) -> LayerOffload | None:
    """The active `LayerOffload` of `model`, or None (the in-memory path)."""
    return model.__dict__.get(_ATTR)


def is_dispatched(model: nn.Module) -> bool:
    """True for a model spread by accelerate (`device_map=...`: hf_device_map or AlignDevicesHooks)."""
    return getattr(model, "hf_device_map", None) is not None or any(
        hasattr(m, "_hf_hook") for m in model.modules())


def resolve_compute_device(model: nn.Module, compute_device: str | torch.device | None) -> torch.device:
    """`compute_device`, default CUDA when available else the device of the model's weights."""
    if compute_device is None:
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return next(model.parameters()).device
    try:
        device = torch.device(compute_device)
    except (RuntimeError, TypeError) as err:
        raise GradmapError(f"compute_device={compute_device!r} is not a device ({err}); pass e.g. "
                           "'cuda', 'cuda:1' or 'cpu'") from None
    if device.type == "meta":
        raise GradmapError("compute_device='meta' cannot compute; pass 'cuda' or 'cpu'")
    return device


@contextmanager
def layer_offload(model: nn.Module, compute_device: str | torch.device | None = None
                  ) -> Iterator[LayerOffload]:
    """Turn layer streaming on for `model` inside the `with` block (per instance, removed on exit)."""
    if is_dispatched(model):
        raise GradmapError("offload='layer' needs a model whose weights sit on one device (e.g. loaded "
                           "on CPU); this model was dispatched by accelerate (device_map=...). Use either "
                           "device_map='auto' with offload=None, or load on CPU with offload='layer'")
    if offload_of(model) is not None:
        raise GradmapError("layer streaming is already active on this model; do not nest layer_offload")
    state = LayerOffload(resolve_compute_device(model, compute_device))
    log.debug("layer streaming on %s (weights stay on %s)", state.compute_device, host_device(model))
    model.__dict__[_ATTR] = state
    try:
        yield state
    finally:
        model.__dict__.pop(_ATTR, None)



def model_device(model: nn.Module) -> torch.device:
    """Where the model's inputs (and running statistics) go.

    Layer streaming active: its compute device. A model dispatched by accelerate
    (device_map): the execution device of its top-level hook, else the first
    parameter not offloaded to "meta". Otherwise: the device of the first parameter.
    """
    offload = offload_of(model)
    if offload is not None:
        return offload.compute_device
    hook_device = getattr(getattr(model, "_hf_hook", None), "execution_device", None)
    if hook_device is not None:
        return torch.device(hook_device)
    first = None
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
        first = first or p.device
    return first or torch.device("cpu")



def host_device(model: nn.Module) -> torch.device:
    """Where the model's weights live (under layer streaming: the host, not the compute device)."""
    return next(model.parameters()).device


def to_device(value: Any, device: torch.device, memo: dict[int, Any]) -> Any:
    """`value` with every tensor inside (tuples, lists, dicts) on `device`; shared tensors moved once."""
    if torch.is_tensor(value):
        if id(value) not in memo:
            memo[id(value)] = value.to(device)
        return memo[id(value)]
    if isinstance(value, (tuple, list)):
        return type(value)(to_device(v, device, memo) for v in value)
    if isinstance(value, dict):
        return {k: to_device(v, device, memo) for k, v in value.items()}
    return value


def _tensors(modules: Iterable[nn.Module]) -> list[torch.Tensor]:
    seen, out = set(), []
    for module in modules:
        for t in list(module.parameters()) + list(module.buffers()):
            if id(t) not in seen:
                seen.add(id(t))
                out.append(t)
    return out


@contextmanager
def on_device(modules: Sequence[nn.Module], device: torch.device, write_back: bool = False
              ) -> Iterator[None]:
    """Place `modules` on `device` for the block: each parameter/buffer's `.data` becomes a device copy.

    The host tensors are kept and put back on exit, so the host storage — possibly a memory
    map — is untouched unless `write_back`: then, when the block ends without error, the
    device values are copied into the host tensors (weight edits made on the device, e.g.
    `sparsify`). Always a copy, even when `device` is the host's: an edit that forgets
    `write_back` is lost on a CPU test run too, not only on a GPU.
    """
    swapped: list[tuple[torch.Tensor, torch.Tensor]] = []
    try:
        for t in _tensors(modules):
            swapped.append((t, t.data))
            t.data = t.data.to(device, copy=True)
        yield
        if write_back:
            with torch.no_grad():
                for t, host in swapped:
                    host.copy_(t.data)
    finally:
        for t, host in swapped:
            t.data = host


def embedding_modules(adapter: ModelAdapter) -> list[nn.Module]:
    """Everything of the decoder except its layers and final norm (embedding, rotary tables, ...)."""
    skip = {id(adapter.layers), id(adapter.final_norm)}
    return [m for m in adapter.decoder.children() if id(m) not in skip]


def head_modules(adapter: ModelAdapter) -> list[nn.Module]:
    return [adapter.final_norm, adapter.lm_head]


def offloaded_modules(model: nn.Module) -> list[str]:
    """Modules whose weights accelerate offloaded to cpu/disk (parameters on "meta")."""
    if not is_dispatched(model):
        return []
    return sorted({n.rsplit(".", 1)[0] for n, p in model.named_parameters() if p.device.type == "meta"})


def check_weights_editable(model: nn.Module, what: str) -> None:
    """Raise when `what` would edit (or read) weights that accelerate offloaded (on "meta").

    An offloaded weight lives in accelerate's weights map and is re-created at every forward:
    a write to its meta placeholder, or a `.grad` on the temporary copy, is silently lost.
    """
    offloaded = offloaded_modules(model)
    if offloaded:
        raise GradmapError(f"{what} needs the weights themselves, but accelerate offloaded {offloaded[:4]}"
                           f"{' ...' if len(offloaded) > 4 else ''} to cpu/disk (parameters on 'meta'); "
                           "give every layer a device in device_map (GPUs, or 'cpu' as the execution "
                           "device)")

