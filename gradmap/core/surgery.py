"""Removing decoder layers in place, with ORIGINAL layer numbering kept on the config."""
from __future__ import annotations

import logging
import operator
from collections.abc import Iterable

from torch import nn

from gradmap.core.adapter import LAYER_IDS_KEY, get_adapter
from gradmap.core.errors import GradmapError

__all__ = ["remove_layers", "original_layer_ids", "per_layer_config", "renumber_layer"]

log = logging.getLogger(__name__)

# Config entries that hold one value per decoder layer. A list is trimmed only when its name is
# listed here: a list that merely has as many entries as there are layers (eos_token_id with 4
# ids on a 4-layer model) is not per-layer and must survive layer removal unchanged.
PER_LAYER_FIELDS = ("layer_types", "no_rope_layers")  # any family
FAMILY_PER_LAYER_FIELDS: dict[str, tuple[str, ...]] = {}  # model_type -> extra names


def original_layer_ids(model: nn.Module) -> list[int]:
    """ORIGINAL index of every current decoder layer of `model`."""
    return get_adapter(model).original_ids


def _index(i) -> int:
    # operator.index accepts ints, numpy and 0-d torch integers; int() would truncate 1.7 to 1
    if isinstance(i, bool):
        raise TypeError
    return operator.index(i)


def _validate(indices: Iterable[int], current: list[int]) -> list[int]:
    if isinstance(indices, (str, bytes)) or not isinstance(indices, Iterable):
        raise GradmapError(f"layer indices must be a list of integers, got {indices!r}; e.g. "
                           "remove_layers(model, [3, 7])")
    indices = list(indices)
    try:
        wanted = [_index(i) for i in indices]
    except TypeError:
        bad = next(i for i in indices if not _is_index(i))
        raise GradmapError(f"layer indices must be integers, got {bad!r} in {indices!r}; pass whole "
                           "numbers such as [3, 7] (not floats, bools or strings)") from None
    if len(set(wanted)) != len(wanted):
        dup = sorted({i for i in wanted if wanted.count(i) > 1})
        raise GradmapError(f"layer indices {dup} are given more than once; pass each layer once")
    missing = [i for i in wanted if i not in current]
    if missing:
        raise GradmapError(
            f"layers {missing} are not in the model; indices are ORIGINAL layer numbers and the "
            f"model currently holds original layers {current}")
    if len(wanted) >= len(current):
        raise GradmapError(f"removing {len(wanted)} of {len(current)} layers would leave none; "
                           "keep at least one layer")
    return wanted


def _is_index(i) -> bool:
    try:
        _index(i)
    except TypeError:
        return False
    return True


def renumber_layer(layer: nn.Module, new_idx: int) -> None:
    """Point every module that indexes the KV cache at the layer's new position."""
    for module in layer.modules():
        if hasattr(module, "layer_idx"):
            module.layer_idx = new_idx


def per_layer_config(config, n_layers: int) -> dict:
    """The config entries that hold one value per decoder layer (the ones layer removal trims).

    Only names in PER_LAYER_FIELDS or the family's FAMILY_PER_LAYER_FIELDS count; one whose
    length is not `n_layers` is left alone (with a warning), as it cannot be trimmed safely.
    """
    names = PER_LAYER_FIELDS + FAMILY_PER_LAYER_FIELDS.get(getattr(config, "model_type", None), ())
    out = {}
    for key in names:
        value = getattr(config, key, None)
        if not isinstance(value, (list, tuple)):
            continue
        if len(value) == n_layers:
            out[key] = value
        else:
            log.warning("config.%s has %d entries for %d layers; leaving it unchanged",
                        key, len(value), n_layers)
    return out


def _trim_config(config, keep: list[int], n_old: int) -> None:
    for key, value in per_layer_config(config, n_old).items():
        setattr(config, key, type(value)(value[i] for i in keep))
    # Qwen2/3: layers below max_window_layers use full attention. Serving stacks that derive the
    # attention type from it (not from layer_types) must see the count among the kept layers.
    limit = getattr(config, "max_window_layers", None)
    if isinstance(limit, int) and not isinstance(limit, bool):
        config.max_window_layers = sum(1 for i in keep if i < limit)
    config.num_hidden_layers = len(keep)


def remove_layers(model: nn.Module, indices: Iterable[int]) -> list[int]:
    """Delete the decoder layers with ORIGINAL indices `indices` from `model`, in place.

    Renumbers every module's `layer_idx` (KV-cache slot), trims every per-layer
    list in the config (e.g. `layer_types`), sets `config.num_hidden_layers`,
    and records the surviving ORIGINAL indices in `config.gradmap_layer_ids`,
    so successive calls keep using the original numbering.
    Returns the ORIGINAL indices of the layers that remain.
    """
    adapter = get_adapter(model)
    current = adapter.original_ids
    wanted = set(_validate(indices, current))
    if not wanted:
        return current
    keep_pos = [p for p, orig in enumerate(current) if orig not in wanted]
    n_old = len(current)
    kept_layers = [adapter.layers[p] for p in keep_pos]
    for new_idx, layer in enumerate(kept_layers):
        renumber_layer(layer, new_idx)
    adapter.decoder.layers = nn.ModuleList(kept_layers)
    _trim_config(model.config, keep_pos, n_old)
    kept_ids = [current[p] for p in keep_pos]
    setattr(model.config, LAYER_IDS_KEY, kept_ids)
    layer_types = getattr(model.config, "layer_types", None)
    if hasattr(adapter.decoder, "has_sliding_layers") and layer_types is not None:
        adapter.decoder.has_sliding_layers = "sliding_attention" in layer_types
    log.info("removed original layers %s; %d layers remain", sorted(wanted), len(kept_ids))
    return kept_ids
