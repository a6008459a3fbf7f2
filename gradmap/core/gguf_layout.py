"""Tensor layout between GGUF and transformers, for the GGUF export.

Reading uses transformers' own GGUF tensor processors and name maps (so a tensor is dequantised
exactly as `from_pretrained(gguf_file=...)` does). Writing a changed tensor needs the inverse of
those processors; the two inverses below (llama.cpp's Q/K row permutation, Gemma's norm offset)
are checked against the forward processor on every tensor they produce, so a transformers change
that makes them disagree fails loudly instead of writing wrong weights.
"""
from __future__ import annotations

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, dequantize, quantize

from gradmap.core.errors import GradmapError

__all__ = ["GGUFLayout", "QUANT_TYPES", "WRITABLE", "bits_per_weight", "writable_type"]

Q = GGMLQuantizationType
QUANT_TYPES = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}
# the types the `gguf` package can quantise to and transformers' GGUF reader dequantises (MXFP4 the
# package writes too, but no source of ours has it): every K-, I- and T-quant raises in gguf.quantize
WRITABLE = (Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.F16, Q.BF16, Q.F32)


def bits_per_weight(qtype) -> float:
    """Storage bits per weight of a GGML type (block bytes * 8 / block weights): Q4_1 5.0, Q4_K 4.5."""
    block, size = GGML_QUANT_SIZES[qtype]
    return 8 * size / block


def writable_type(qtype) -> GGMLQuantizationType:
    """`qtype` when the gguf package can write it, else the smallest writable type with at least
    one more bit per weight: Q2_K, Q3_K -> Q4_0; Q4_K, IQ4_XS, IQ4_NL -> Q5_0; Q5_K, Q6_K -> Q8_0.

    One bit, because the legacy types spend their bits less well than the K-quants of the same
    size: in llama.cpp's own table (tools/quantize/quantize.cpp, PPL increase on Llama-3-8B)
    Q4_K_M +0.1754 lies between Q5_0 +0.1316 and Q4_1 +0.4511, Q5_K_M +0.0569 and Q6_K +0.0217
    are better than Q5_1 +0.1062 and worse than Q8_0 +0.0026, Q3_K_M +0.6569 is worse than Q4_0
    +0.4685. So a tensor never comes back coarser than the source stored it, at some size.
    """
    if qtype in WRITABLE:
        return qtype
    need = bits_per_weight(qtype) + 1
    return min((t for t in WRITABLE if bits_per_weight(t) >= need), key=bits_per_weight, default=Q.F32)


def _permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    # llama.cpp stores Q/K rows with each head's two rotary halves interleaved
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class GGUFLayout:
    """Maps between a model's (current) state dict and the tensors of a GGUF file of `arch`."""

    def __init__(self, model, arch: str):
        """`arch`: the GGUF architecture written (a Mistral model is written as "llama")."""
        from transformers.modeling_gguf_pytorch_utils import (TENSOR_PROCESSORS, TensorProcessor,
                                                              get_gguf_hf_weights_map)
        self.arch = arch
        self.config = model.config.to_dict()
        self.processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=self.config)
        # GGUF name (with the model's current, dense block numbering) -> state-dict name
        self.hf_name = self._top_level_names(model, arch)
        if self.hf_name is None:
            try:
                self.hf_name = get_gguf_hf_weights_map(model, self.processor, model_type=arch)
            except NotImplementedError as exc:
                raise GradmapError(f"the gguf package has no tensor-name map for {arch!r} ({exc}); "
                                   "upgrade gguf (pip install -U gguf)") from None

    @staticmethod
    def _top_level_names(model, arch: str) -> dict[str, str] | None:
        """The map transformers' reader builds, when every tensor maps by its full name (None if not).

        transformers' `get_gguf_hf_weights_map` also tries every submodule's relative names, building
        the `gguf` name map once per module (about 17 s for SmolLM2); its first, full-name pass is
        the whole map whenever that pass already names every tensor.
        """
        from gguf import MODEL_ARCH_NAMES, get_tensor_name_map
        enum = next((k for k, v in MODEL_ARCH_NAMES.items() if v == arch), None)
        if enum is None:
            return None
        name_map = get_tensor_name_map(enum, model.config.num_hidden_layers)
        out = {}
        for hf_name in model.state_dict():
            base, dot, suffix = hf_name.rpartition(".")
            gguf_name = name_map.get_name(base) if suffix in ("weight", "bias") else None
            if gguf_name is None:
                return None
            out[f"{gguf_name}{dot}{suffix}"] = hf_name
        return out

    def to_hf(self, data: np.ndarray, qtype, gguf_name: str) -> np.ndarray:
        """A GGUF tensor's values in the model's layout, dequantised as transformers does."""
        return self.processor.process(weights=dequantize(data, qtype), name=gguf_name).weights

    def _to_gguf_float(self, w: np.ndarray, gguf_name: str) -> np.ndarray:
        if self.arch == "llama" and (".attn_q." in gguf_name or ".attn_k." in gguf_name):
            heads = self.config["num_attention_heads"]
            if ".attn_k." in gguf_name:
                heads = self.config.get("num_key_value_heads") or heads
            return _permute_qk(w, heads)
        if self.arch in ("gemma2", "gemma3") and "norm.weight" in gguf_name:
            return w + 1
        return w

    def encode(self, tensor: torch.Tensor, gguf_name: str, qtype) -> np.ndarray:
        """`tensor` (model layout) as GGUF data of type `qtype`, checked against the forward processor."""
        w = tensor.detach().to("cpu", torch.float32).numpy()
        g = np.ascontiguousarray(self._to_gguf_float(w, gguf_name), dtype=np.float32)
        back = self.processor.process(weights=g, name=gguf_name).weights
        if back.shape != w.shape or not np.allclose(back, w, rtol=0, atol=1e-6 * (1 + np.abs(w).max())):
            raise GradmapError(f"cannot write {gguf_name} for GGUF architecture {self.arch!r}: its layout "
                               "does not invert transformers' GGUF reader here; export is not "
                               "supported for this tensor")
        if qtype == GGMLQuantizationType.F32:
            return g
        if qtype == GGMLQuantizationType.F16:
            return g.astype(np.float16)
        return quantize(g, qtype)

    def decode(self, data: np.ndarray, qtype, gguf_name: str, like: torch.Tensor) -> torch.Tensor:
        """What a reader of `data` (GGUF type `qtype`) gets back, shaped and typed like `like`."""
        back = np.ascontiguousarray(self.to_hf(data, qtype, gguf_name))
        return torch.from_numpy(back).to(like.dtype).reshape(like.shape)

    @staticmethod
    def storage_type(tensor: torch.Tensor, qtype):
        """The type `tensor` is written in when `qtype` is asked for."""
        if tensor.dim() < 2:
            return GGMLQuantizationType.F32  # norms and biases: tiny, and llama.cpp keeps them F32
        if tensor.shape[-1] % GGML_QUANT_SIZES[qtype][0]:
            return GGMLQuantizationType.F16  # quantised types pack blocks of 32 (or 256) along a row
        return qtype
