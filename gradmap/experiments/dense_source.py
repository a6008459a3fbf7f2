"""Pristine dense models for comparisons: every method must start from the same weights.

`DenseSource` hands out copies (or fresh loads) of the dense model, each checked against a
fingerprint of the dense weights, so a pruned or edited model is never pruned again.
"""
from __future__ import annotations

import copy
import hashlib
import time
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["DenseSource", "weights_fingerprint", "check_calibration_untouched"]


def check_calibration_untouched(calib: torch.Tensor, copy_before: torch.Tensor, method: str) -> None:
    """Every method must see the same calibration rows: refuse one that edited them in place."""
    if not torch.equal(calib, copy_before):
        raise RuntimeError(f"method {method} changed the calibration tensor in place; "
                           "later methods would not see the same data")


def weights_fingerprint(model: torch.nn.Module) -> str:
    """blake2b over every parameter's name, shape, dtype and bytes (tied weights counted once)."""
    h = hashlib.blake2b(digest_size=16)
    for name, p in model.named_parameters():
        t = p.detach().to("cpu").contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class DenseSource:
    """Hands out pristine dense models, each checked against the dense weights' fingerprint.

    `restore="copy"` keeps the loaded dense model (on CPU) and returns a deep copy moved to
    the device; `"reload"` loads the model again each time (lean on memory, slower).
    """

    def __init__(self, loader: Callable[..., tuple[Any, Any]], name: str, dtype: str | None,
                 device: str, restore: str):
        self._loader, self._name, self._dtype, self._device = loader, name, dtype, device
        self._restore = restore
        start = time.perf_counter()
        model, self.tokenizer = loader(name, dtype=dtype, device="cpu")
        self.load_seconds = time.perf_counter() - start
        from gradmap.core.adapter import get_adapter
        adapter = get_adapter(model)
        self.num_layers = adapter.num_layers
        self.layer_ids = adapter.original_ids
        self.fingerprint = weights_fingerprint(model)
        self._pristine = model if restore == "copy" else None
        if restore == "reload":
            del model

    def fresh(self):
        """A dense model on the device, identical to the one loaded first (else RuntimeError)."""
        if self._pristine is not None:
            model = copy.deepcopy(self._pristine)
        else:
            model, _ = self._loader(self._name, dtype=self._dtype, device="cpu")
        self.check(model)
        return model.to(self._device).eval()

    def reference(self):
        """The dense model for read-only use (timing): the kept copy itself when it is already on
        the device, else `fresh()`; never prune or edit it."""
        if self._pristine is not None and \
                next(self._pristine.parameters()).device == torch.device(self._device):
            return self._pristine
        return self.fresh()

    def check(self, model) -> None:
        """Refuse anything but the dense weights: a pruned or edited model must never be pruned."""
        from gradmap.core.adapter import get_adapter
        adapter = get_adapter(model)
        if adapter.num_layers != self.num_layers or adapter.original_ids != self.layer_ids:
            raise RuntimeError(f"the model handed to a method has layers {adapter.original_ids}, "
                               f"not the dense {self.layer_ids}; refusing to prune a pruned model")
        if weights_fingerprint(model) != self.fingerprint:
            raise RuntimeError("the model handed to a method differs from the dense weights "
                               "(fingerprint mismatch); refusing to compare from edited weights")
