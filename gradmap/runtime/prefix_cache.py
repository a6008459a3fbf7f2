"""Layer inputs kept between the iterative loop's plain scoring passes, so that each pass
recomputes only from the first layer that changed.

After a removal at position q the layers before q are untouched: their inputs and outputs are
those of the last pass. The one edit the loop makes there is magnitude compensation's fold
(`fold.fold_residual_scale_`), which multiplies every hidden state before the cut by s (up to
the RMSNorm eps, as its docstring says); `scale_prefix` runs that fold and scales the kept
states to match. A pass then replays the kept positions to the metric's callbacks (cheap:
element-wise statistics) and runs the decoder layers only from the first changed one.

Validity is checked, never assumed. A kept position is reused only while the layers before it
are the same ones in the same order and each layer's parameters (and the embedding) match the
checksum taken when the state was kept: the sum and sum of squares of every tensor.
Version counters are not enough (an edit through `.data` does not bump them). An edit the cache
was not told of changes a checksum and makes the pass start at that layer, so the result is the
full pass's. Memory: the inputs of as many leading layers as fit `max_bytes` (env
`GRADMAP_PREFIX_CACHE_BYTES`, default 2 GiB); in-memory runs only (streamed runs recompute
every layer, as before).
"""
from __future__ import annotations

import os
from collections.abc import Callable

import torch
from torch import nn

from gradmap.core.adapter import ModelAdapter
from gradmap.core.errors import GradmapError

__all__ = ["PrefixCache", "DEFAULT_MAX_BYTES", "max_bytes_from_env"]

DEFAULT_MAX_BYTES = 2 << 30
ENV = "GRADMAP_PREFIX_CACHE_BYTES"


def max_bytes_from_env() -> int:
    """The memory bound: `GRADMAP_PREFIX_CACHE_BYTES` (an integer >= 0; 0 turns the cache off),
    else `DEFAULT_MAX_BYTES`."""
    raw = os.environ.get(ENV)
    if raw is None:
        return DEFAULT_MAX_BYTES
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise GradmapError(f"{ENV}={raw!r} is not a byte count; set it to an integer >= 0 (0 turns the "
                           "iterative loop's prefix cache off) or unset it for the default of 2 GiB")
    return value


@torch.no_grad()
def _checksum(tensors: list[torch.Tensor]) -> tuple[float, ...]:
    # in the tensor's own precision, no copy (a float64 copy made the checks cost ~6 s of an
    # 8-layer SmolLM2 run); deterministic for the same values and thread count, and a thread
    # count that changed between passes only makes a pass recompute more
    out = []
    for t in tensors:
        v = t.detach().reshape(-1)
        if v.dtype not in (torch.float32, torch.float64):  # half types: a float32 copy
            v = v.float()
        out += [float(v.sum()), float(torch.dot(v, v))]
    return tuple(out)


class PrefixCache:
    """Inputs of the leading decoder layers from the last pass, per micro-batch (module docstring)."""

    def __init__(self, max_bytes: int | None = None):
        self.max_bytes = max_bytes_from_env() if max_bytes is None else max_bytes
        self.ids: list[int] = []                  # original ids of the layers when kept
        self.sums: list[tuple[float, ...]] = []   # checksum of each of those layers
        self.embed_sum: tuple[float, ...] = ()
        self.states: list[list[torch.Tensor]] = []  # states[p][b]: input of position p, micro-batch b
        self.key: tuple | None = None             # the rows and micro-batching the states belong to
        self.reused = 0                           # layer positions replayed instead of run, all passes
        self.run = 0                              # layer positions run, all passes

    @staticmethod
    def _layer_sum(adapter: ModelAdapter, pos: int) -> tuple[float, ...]:
        return _checksum(list(adapter.layers[pos].parameters()))

    @staticmethod
    def _embed_sum(adapter: ModelAdapter) -> tuple[float, ...]:
        return _checksum([adapter.embed_tokens.weight])

    def usable(self, adapter: ModelAdapter, key: tuple) -> int:
        """How many leading positions can be replayed: their layers, the layers before them
        and their kept inputs and outputs are all still valid."""
        if key != self.key or not self.states or self._embed_sum(adapter) != self.embed_sum:
            return 0
        ids = adapter.original_ids
        k = 0
        while (k < min(len(ids), len(self.ids)) and k + 1 < len(self.states) and ids[k] == self.ids[k]
               and self._layer_sum(adapter, k) == self.sums[k]):
            k += 1
        # the input of position k is valid too when the layers before it are (a removal at k)
        return k

    def keep(self, adapter: ModelAdapter, key: tuple, states: list[list[torch.Tensor]], reused: int = 0) -> None:
        """Record the states of the pass that just ran (`states[p]`: inputs of position p; the
        last entry may be the final output) with the checksums of the layers that made them.
        The first `reused` positions were replayed: `usable` has just checked their sums (and the
        embedding's), so they are kept, not taken again."""
        self.key, self.ids = key, list(adapter.original_ids)
        self.states = states
        if not reused:
            self.embed_sum = self._embed_sum(adapter)
        n = min(len(states), adapter.num_layers)
        self.sums = self.sums[:min(reused, n)] + [self._layer_sum(adapter, p) for p in range(min(reused, n), n)]

    def positions_within_budget(self, per_position_bytes: int, n_layers: int) -> int:
        """How many states (inputs of positions 0.., then the final output) fit `max_bytes`."""
        if per_position_bytes <= 0:
            return n_layers + 1
        return max(0, min(n_layers + 1, self.max_bytes // per_position_bytes))

    def scale_prefix(self, adapter: ModelAdapter, n_layers: int, s: float, fold: Callable[[], None]) -> None:
        """Run `fold` (which scales every write before position `n_layers` by `s`) and scale the
        kept states of positions 0..n_layers to match. When the prefix had changed since it was
        kept, the states are dropped instead (the next pass then runs every layer)."""
        valid = self.usable(adapter, self.key) >= n_layers and len(self.states) > n_layers
        fold()
        if not valid:
            self.states = []
            return
        with torch.no_grad():
            for p in range(n_layers + 1):
                for h in self.states[p]:
                    h.mul_(s)
        self.embed_sum = self._embed_sum(adapter)
        for p in range(n_layers):
            self.sums[p] = self._layer_sum(adapter, p)


def state_bytes(rows: int, seq_len: int, hidden: int, dtype: torch.dtype) -> int:
    """Bytes of one position's hidden states over all rows."""
    return rows * seq_len * hidden * torch.empty((), dtype=dtype).element_size()


def model_hidden(model: nn.Module) -> int:
    return int(getattr(model.config, "hidden_size", 0) or 0)
