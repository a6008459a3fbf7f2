"""What each execution strategy can run, stated as the passes algorithms declare they need.

An algorithm (metric or compensator) declares `needs`, a set of the pass kinds below, as a
class attribute (`requirements()` may refine it per instance, e.g. GradMAP's `param` variant
needs weight gradients). The runtime checks the set against the strategy before any work:

- "layer_io": each decoder layer's input and output over the calibration set;
- "activation_grads": ∂L/∂h at layer outputs, weights frozen;
- "weight_grads": ∂L/∂θ of the decoder layers' weights;
- "skip_losses": the calibration loss with given layers bypassed;
- "weights": reads or edits weights in place (folds, pruning, magnitudes);
- "own_passes": runs forwards of its own outside the runtime (a user-defined compensator,
  unless it declares otherwise), so the runtime cannot stream or shard them.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn

from gradmap.core.errors import GradmapError
from gradmap.runtime.placement import offloaded_modules

__all__ = ["PASS_KINDS", "STREAMABLE", "WITH_OFFLOADED_WEIGHTS", "requirements_of", "unsupported",
           "check_dispatch_support"]

PASS_KINDS = frozenset({"layer_io", "activation_grads", "weight_grads", "skip_losses", "weights", "own_passes"})
# layer streaming recomputes layers one at a time: no weight gradients, no foreign forwards
STREAMABLE = frozenset({"layer_io", "activation_grads", "skip_losses", "weights"})
# accelerate re-creates cpu/disk-offloaded weights at every forward: edits and .grad are lost
WITH_OFFLOADED_WEIGHTS = frozenset({"layer_io", "activation_grads", "skip_losses"})


def requirements_of(algorithm: Any) -> frozenset[str]:
    """The pass kinds `algorithm` needs: its `requirements()` if it has one, else its `needs`."""
    fn = getattr(algorithm, "requirements", None)
    needs = frozenset(fn() if callable(fn) else getattr(algorithm, "needs", {"own_passes"}))
    unknown = needs - PASS_KINDS
    if unknown:
        raise GradmapError(f"{type(algorithm).__name__} declares unknown pass kinds {sorted(unknown)}; "
                           f"valid: {sorted(PASS_KINDS)}")
    return needs


def unsupported(algorithms: Iterable[Any], supported: frozenset[str]) -> list[Any]:
    """The algorithms that need a pass kind outside `supported`."""
    return [a for a in algorithms if not requirements_of(a) <= supported]


def check_dispatch_support(model: nn.Module, algorithms: Iterable[Any], describe) -> None:
    """A model dispatched with weights offloaded to cpu/disk: refuse algorithms that need the weights.

    `describe(algorithm) -> str` names an algorithm in the error message.
    """
    offloaded = offloaded_modules(model)
    if not offloaded:
        return
    bad = unsupported(algorithms, WITH_OFFLOADED_WEIGHTS)
    if bad:
        raise GradmapError(f"{', '.join(map(describe, bad))} needs the weights themselves (or their gradients), "
                           f"but accelerate offloaded {offloaded[:4]}{' ...' if len(offloaded) > 4 else ''} to "
                           "cpu/disk (parameters on 'meta'); give every layer a device in device_map (GPUs, or "
                           "'cpu' as the execution device), or use an activation metric (gradmap "
                           "token/gate/fisher, block-influence, angular, ppl, sleb) with compensation='none'")
