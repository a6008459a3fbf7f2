"""Hooks on decoder layers: read a layer's input and output, replace or skip a layer's forward,
stop a forward early, recompute layers in the backward. Every hook and every per-instance
`forward` patch is owned by a context manager and removed in its `finally`."""
from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
import torch.utils.checkpoint
from torch import nn

__all__ = ["LayerFn", "StopForward", "hidden_in", "hidden_out", "layer_io", "patched_forward", "skip_layer",
           "checkpointed", "capture", "input_requires_grad", "mapped_output"]

LayerFn = Callable[[int, torch.Tensor, torch.Tensor], None]


class StopForward(Exception):
    """Raised by a hook to end a forward pass once everything it needs is captured."""


def hidden_in(args: tuple, kwargs: dict) -> torch.Tensor:
    """A decoder layer's input hidden states, passed positionally or as `hidden_states=`."""
    return args[0] if args else kwargs["hidden_states"]


def hidden_out(output: Any) -> torch.Tensor:
    """A decoder layer's (or any module's) output hidden states: the tensor or the tuple's first entry."""
    return output if torch.is_tensor(output) else output[0]


@contextmanager
def layer_io(layers: Sequence[nn.Module], fn: LayerFn) -> Iterator[None]:
    """Call `fn(position, h_in, h_out)` after every forward of each decoder layer."""
    handles = []
    try:
        for pos, layer in enumerate(layers):
            def hook(module, args, kwargs, output, pos=pos):
                h_out = hidden_out(output)
                # device_map: the input may still sit on the previous layer's device
                fn(pos, hidden_in(args, kwargs).to(h_out.device), h_out)
            handles.append(layer.register_forward_hook(hook, with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()


_MISSING = object()



@contextmanager
def mapped_output(modules: Sequence[nn.Module], fns: Sequence[Callable[[torch.Tensor], torch.Tensor]]
                  ) -> Iterator[None]:
    """Replace each module's (tensor) output y by `fn(y)` while the context is open."""
    handles = []
    try:
        for module, fn in zip(modules, fns, strict=True):
            handles.append(module.register_forward_hook(lambda _m, _a, out, fn=fn: fn(out)))
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def patched_forward(module: nn.Module, forward: Callable) -> Iterator[None]:
    """Give one module instance a different `forward`; the previous one is put back on exit."""
    old = module.__dict__.get("forward", _MISSING)
    module.forward = forward
    try:
        yield
    finally:
        if old is _MISSING:
            del module.forward
        else:
            module.forward = old


def _identity_layer(hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    return hidden_states


@contextmanager
def skip_layer(layer: nn.Module) -> Iterator[None]:
    """Run the model as if `layer` were removed: its forward returns its input unchanged."""
    with patched_forward(layer, _identity_layer):
        yield


@contextmanager
def checkpointed(layers: Sequence[nn.Module], enabled: bool = True) -> Iterator[None]:
    """Recompute each decoder layer in the backward instead of storing its activations.

    Wraps the instance's `forward`, not `__call__`, so forward hooks still fire once
    per layer and the model need not be put in train mode.
    """
    with ExitStack() as stack:
        if enabled:
            for layer in layers:
                orig = layer.forward

                def forward(*args, _orig=orig, **kwargs):
                    return torch.utils.checkpoint.checkpoint(_orig, *args, use_reentrant=False, **kwargs)
                stack.enter_context(patched_forward(layer, forward))
        yield



@contextmanager
def capture(modules: dict[Hashable, nn.Module], stop_at: nn.Module | None = None,
            inputs: dict[Hashable, nn.Module] | None = None) -> Iterator[dict[Hashable, torch.Tensor]]:
    """Record the output of each module in `modules` (and the first input of each in `inputs`).

    The returned dict is filled during the forward run inside the `with` block; when
    `stop_at` is given the forward ends with `StopForward` right after that module ran.
    Every hook is removed on exit, also on error.
    """
    store: dict[Hashable, torch.Tensor] = {}
    handles = []

    def out_hook(key):
        def hook(_module, _args, out):
            store[key] = hidden_out(out)
        return hook

    def in_hook(key):
        def hook(_module, args, kwargs):
            store[key] = hidden_in(args, kwargs)
        return hook

    def stop_hook(_module, _args, _out):
        raise StopForward

    try:
        for key, module in (inputs or {}).items():
            handles.append(module.register_forward_pre_hook(in_hook(key), with_kwargs=True))
        for key, module in modules.items():
            handles.append(module.register_forward_hook(out_hook(key)))
        if stop_at is not None:  # registered last, so it runs after the capture hooks of that module
            handles.append(stop_at.register_forward_hook(stop_hook))
        yield store
    finally:
        for handle in handles:
            handle.remove()



@contextmanager
def input_requires_grad(embedding: nn.Module) -> Iterator[None]:
    """Make the embedding output a grad-requiring leaf, so activation gradients flow with frozen weights."""
    handle = embedding.register_forward_hook(
        lambda module, args, output: output.detach().requires_grad_(True))
    try:
        yield
    finally:
        handle.remove()

