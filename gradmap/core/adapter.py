"""One generic adapter over decoder-only HF causal LMs.

A family is a table entry naming where its modules live; nothing is copied
per family. Supporting a new family means adding one `FamilySpec` row.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from gradmap.core.errors import UnsupportedModelError

__all__ = ["FamilySpec", "LayerParts", "ModelAdapter", "get_adapter", "FAMILIES", "LAYER_IDS_KEY"]

# config attribute holding the ORIGINAL index of every current layer; it is
# saved in config.json so original numbering survives save -> reload -> prune.
LAYER_IDS_KEY = "gradmap_layer_ids"


@dataclass(frozen=True)
class FamilySpec:
    """Where a family keeps its modules, as dotted paths relative to one decoder layer."""

    attn_out: str = "self_attn.o_proj"
    mlp_down: str = "mlp.down_proj"
    attn_pre_norm: str = "input_layernorm"
    mlp_pre_norm: str = "post_attention_layernorm"
    attn_post_norm: str | None = None  # norm applied to the attention output before the residual add
    mlp_post_norm: str | None = None   # norm applied to the MLP output before the residual add
    norm_offset: float = 0.0           # RMSNorm scale is (norm_offset + weight): Gemma stores w for 1 + w


_PRE_NORM = FamilySpec()
_GEMMA = FamilySpec(attn_post_norm="post_attention_layernorm", mlp_pre_norm="pre_feedforward_layernorm",
                    mlp_post_norm="post_feedforward_layernorm", norm_offset=1.0)

FAMILIES: dict[str, FamilySpec] = {
    "llama": _PRE_NORM,
    "mistral": _PRE_NORM,
    "qwen2": _PRE_NORM,
    "qwen3": _PRE_NORM,
    "phi3": _PRE_NORM,
    "gemma2": _GEMMA,
    "gemma3_text": _GEMMA,
}


@dataclass
class LayerParts:
    """The modules of one decoder layer that pruning and compensation touch."""

    layer: nn.Module
    attn_out: nn.Linear
    mlp_down: nn.Linear
    attn_pre_norm: nn.Module
    mlp_pre_norm: nn.Module
    attn_post_norm: nn.Module | None
    mlp_post_norm: nn.Module | None


def _get(module: nn.Module, path: str) -> nn.Module:
    for name in path.split("."):
        module = getattr(module, name)
    return module


class ModelAdapter:
    """Uniform access to the decoder stack of a supported causal LM."""

    def __init__(self, model: nn.Module):
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in FAMILIES:
            raise UnsupportedModelError(
                f"model type {model_type!r} ({type(model).__name__}) is not supported; supported "
                f"model types: {', '.join(sorted(FAMILIES))}. Pass a decoder-only causal LM of one "
                "of these families.")
        self.model = model
        self.config = model.config
        self.model_type = model_type
        self.spec = FAMILIES[model_type]
        self.decoder = model.model

    @property
    def layers(self) -> nn.ModuleList:
        return self.decoder.layers

    @property
    def num_layers(self) -> int:
        return len(self.decoder.layers)

    @property
    def embed_tokens(self) -> nn.Embedding:
        return self.decoder.embed_tokens

    @property
    def final_norm(self) -> nn.Module:
        return self.decoder.norm

    @property
    def lm_head(self) -> nn.Linear:
        return self.model.lm_head

    @property
    def tied(self) -> bool:
        """True when the LM head shares its weight tensor with the token embeddings."""
        return self.lm_head.weight is self.embed_tokens.weight

    @property
    def norm_offset(self) -> float:
        return self.spec.norm_offset

    @property
    def original_ids(self) -> list[int]:
        """ORIGINAL index of each current layer (identity for an unpruned model)."""
        ids = getattr(self.config, LAYER_IDS_KEY, None)
        if ids is None or len(ids) != self.num_layers:
            return list(range(self.num_layers))
        return [int(i) for i in ids]

    def position_of(self, original_id: int) -> int:
        """Current position of the layer whose ORIGINAL index is `original_id`."""
        return self.original_ids.index(original_id)

    def parts(self, position: int) -> LayerParts:
        """Modules of the layer at current `position`."""
        layer = self.layers[position]
        s = self.spec
        return LayerParts(
            layer=layer,
            attn_out=_get(layer, s.attn_out),
            mlp_down=_get(layer, s.mlp_down),
            attn_pre_norm=_get(layer, s.attn_pre_norm),
            mlp_pre_norm=_get(layer, s.mlp_pre_norm),
            attn_post_norm=_get(layer, s.attn_post_norm) if s.attn_post_norm else None,
            mlp_post_norm=_get(layer, s.mlp_post_norm) if s.mlp_post_norm else None,
        )

    def norm_scale(self, norm: nn.Module) -> torch.Tensor:
        """The effective multiplicative scale of an RMSNorm (offset + weight)."""
        return norm.weight + self.norm_offset

    @torch.no_grad()
    def scale_norm_(self, norm: nn.Module, factor: torch.Tensor | float) -> None:
        """Multiply an RMSNorm's effective scale by `factor`, respecting the family's parameterisation."""
        w = norm.weight
        new = (w.double() + self.norm_offset) * (factor.double() if torch.is_tensor(factor) else factor)
        w.copy_((new - self.norm_offset).to(w.dtype))

    def linear_modules(self, position: int) -> dict[str, nn.Linear]:
        """All nn.Linear modules inside the layer at `position`, by their dotted name."""
        return {n: m for n, m in self.layers[position].named_modules() if isinstance(m, nn.Linear)}


def get_adapter(model: nn.Module) -> ModelAdapter:
    """Adapter for `model`; raises UnsupportedModelError listing the supported families."""
    return ModelAdapter(model)
