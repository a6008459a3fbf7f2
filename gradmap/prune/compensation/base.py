"""The interface between the pruning driver and compensators.

The driver (`gradmap.prune.fast_prune`) removes layers one at a time, in
both schedules, and calls every compensator around each removal and once
at the end:

    for c in compensators: c.begin(ctx)                     # dense model, before any removal
    for each decision:
        for c in compensators: c.before_removal(ctx, idx)   # layer idx still in the model
        remove_layers(model, [idx]); ctx.removed_modules[idx] = <the removed module>
        for c in compensators: c.after_removal(ctx, idx)
    for c in compensators: c.finalize(ctx)                  # once, after the last removal

`idx` is always an ORIGINAL layer index. Compensators add their time to
`ctx.result` phases "compensation_statistics" and "solve", and describe what
they did in `ctx.result.compensation_report[self.name]`.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from gradmap.core.adapter import ModelAdapter, get_adapter
from gradmap.core.result import PruneResult
from gradmap.ops import Moments

__all__ = ["Compensator", "PruneContext", "NoCompensation"]


@dataclass
class PruneContext:
    """State shared by the driver and the compensators during one `fast_prune` call."""

    model: nn.Module
    calib: torch.Tensor            # LongTensor [n_samples, seq_len]
    batch_size: int
    result: PruneResult
    # ORIGINAL index -> removed decoder layer module, kept until every finalize() has run
    removed_modules: dict[int, nn.Module] = field(default_factory=dict)
    # ORIGINAL index -> fp32 mean over calibration tokens of that layer's output hidden state
    # on the DENSE model; filled during the first scoring pass when the metric runs a plain
    # forward of the dense model, else None (compensators then compute it themselves)
    dense_means: dict[int, torch.Tensor] | None = None
    # parameter name (as in the ORIGINAL model's named_parameters) -> its value before any
    # compensation changed it; compensators call remember_original() before editing a weight
    original_params: dict[str, torch.Tensor] = field(default_factory=dict)
    # ORIGINAL layer ids of the dense model, in order
    dense_layer_ids: list[int] = field(default_factory=list)
    # show tqdm bars for the compensators' calibration passes (fast_prune's `progress`)
    progress: bool = False
    # ORIGINAL index -> (Σ|h_in|, Σ|h_out|) Moments of this rank's rows, recorded by the last scoring
    # pass on the model exactly as it is now (same micro-batches as the compensators' passes);
    # None when there is none. The driver clears it before the model next changes.
    scored_abs: dict[int, tuple[Moments, Moments]] | None = None
    # the pipeline safeguard (gradmap.prune.safeguard): while `journal` is a dict, the value of
    # every parameter just before its first change in the current stage; `editing` names the
    # compensator whose hook is running, and `editors` collects those that changed a weight
    journal: dict[str, torch.Tensor] | None = None
    editing: str | None = None
    editors: list[str] = field(default_factory=list)
    # the iterative loop's kept layer inputs (runtime.prefix_cache.PrefixCache), or None: a
    # compensator that scales the whole stream before a cut tells it through `scale_prefix`
    prefix_cache: Any = None

    @property
    def adapter(self) -> ModelAdapter:
        return get_adapter(self.model)

    def remember_original(self, name: str, param: torch.Tensor) -> None:
        """Keep a copy of `param` before its first change, so the dense path can be rebuilt."""
        if self.journal is not None and name not in self.journal:
            self.journal[name] = param.detach().clone()
        if self.editing is not None and self.editing not in self.editors:
            self.editors.append(self.editing)
        if name not in self.original_params:
            self.original_params[name] = param.detach().clone()


class Compensator:
    """Base class: every hook is a no-op. Subclasses override what they need."""

    name = "none"
    # True when the compensator needs ctx.dense_means (the driver then records them if it can)
    needs_dense_means = False
    # True when before_removal reads ctx.scored_abs when it is there (the driver then has a
    # forward-only scoring pass record it, instead of the compensator running a forward itself)
    reads_scored_abs = False
    # the calibration passes it uses (gradmap.runtime.support.PASS_KINDS); a compensator that
    # runs forwards of its own cannot be streamed or sharded by the runtime
    needs: frozenset[str] = frozenset({"own_passes"})

    def options(self) -> dict[str, Any]:
        """Constructor options with the values this instance runs with (for PruneResult).

        An option folded into another on construction (projection's `ridge` becomes a
        one-value `ridge_grid`) is recorded as the option that holds it.
        """
        init = type(self).__init__
        if init is object.__init__:
            return {}
        names = [n for n, p in inspect.signature(init).parameters.items()
                 if n != "self" and p.kind is p.POSITIONAL_OR_KEYWORD]
        return {n: getattr(self, n) for n in names if hasattr(self, n)}

    def begin(self, ctx: PruneContext) -> None:
        pass

    def before_removal(self, ctx: PruneContext, idx: int) -> None:
        pass

    def after_removal(self, ctx: PruneContext, idx: int) -> None:
        pass

    def finalize(self, ctx: PruneContext) -> None:
        pass


class NoCompensation(Compensator):
    """`compensation="none"`: leave the weights as they are."""

    name = "none"
    needs: frozenset[str] = frozenset()
