"""Writing a model loaded from an HF folder (no GGUF source to copy from) as a GGUF file.

Every tensor is converted: names from the `gguf` package's tensor-name map (as transformers' GGUF
reader maps them back), layout through `GGUFLayout` (llama.cpp's
Q/K row order for Llama/Mistral, Gemma's norm offset; Phi-3's fused qkv/gate_up and Qwen's layouts
are the same in both), tokenizer through `gguf.vocab`. A GGUF file holds a handful of
hyper-parameters, and each reader fills in the rest from its own defaults; before anything is
written, the metadata is read back with transformers' GGUF config reader and every setting that
changes the forward pass must come back equal, so a model the format cannot describe (RoPE
scaling, a Gemma sliding-window pattern that pruning broke, a Gemma query scale llama.cpp would
not infer) is refused instead of written as a different model.
"""
from __future__ import annotations

import math
import tempfile
from collections import Counter
from pathlib import Path

from gguf import GGML_QUANT_VERSION, GGUFWriter, LlamaFileType

from gradmap.core.errors import GradmapError
from gradmap.core.gguf_layout import QUANT_TYPES, GGUFLayout
from gradmap.core.gguf_vocab import tokenizer_metadata
from gradmap.core.gguf_write import check_gguf_target, write_gguf

__all__ = ["convert_to_gguf", "check_read_back", "FAMILIES", "CONVERT_DTYPES", "AUTO_DTYPE"]

# transformers model_type -> GGUF architecture. Mistral is written as "llama", as llama.cpp does, and
# named so that transformers reads it back as the Llama it is: its reader turns a "llama" file named
# exactly "mistral" into Mistral, which this transformers/gguf pair then cannot load.
FAMILIES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3",
            "gemma2": "gemma2", "gemma3_text": "gemma3", "phi3": "phi3"}
CONVERT_DTYPES = ("auto", "f32", "f16", "bf16", "q8_0")
AUTO_DTYPE = "f16"  # near-lossless for every family (measured: docs/guide.md), half the fp32 size
FILE_TYPES = {"f32": LlamaFileType.ALL_F32, "f16": LlamaFileType.MOSTLY_F16,
              "bf16": LlamaFileType.MOSTLY_BF16, "q8_0": LlamaFileType.MOSTLY_Q8_0}
# config entries that change the forward pass: each must read back from the file as it is
FORWARD_KEYS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act",
                "hidden_activation", "rms_norm_eps", "rope_parameters", "rope_theta", "rope_scaling",
                "rope_local_base_freq", "partial_rotary_factor", "max_position_embeddings",
                "original_max_position_embeddings", "sliding_window", "use_sliding_window",
                "layer_types", "query_pre_attn_scalar", "attn_logit_softcapping",
                "final_logit_softcapping", "attention_bias", "mlp_bias")


def _rope(config) -> tuple[dict, dict | None]:
    """(RoPE parameters of full attention, of sliding-window attention or None)."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    if "full_attention" in params:  # Gemma 3: one entry per attention type
        return dict(params["full_attention"]), params.get("sliding_attention")
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    scaling = getattr(config, "rope_scaling", None)
    if scaling and "rope_type" not in params:  # transformers 4.x configs
        params.update(scaling)
    return params, None


def _add_hparams(writer: GGUFWriter, config, n_vocab: int, dtype: str) -> None:
    c = config
    heads = c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    name = Path(getattr(c, "_name_or_path", "") or c.model_type).name or c.model_type
    writer.add_name("mistral-llama" if name == "mistral" else name)  # see FAMILIES
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(c, "num_key_value_heads", None) or heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(int(head_dim * getattr(c, "partial_rotary_factor", 1.0)))
    full, sliding = _rope(c)
    writer.add_rope_freq_base(full["rope_theta"])
    if sliding is not None:
        writer.add_rope_freq_base_swa(sliding["rope_theta"])
    # no RoPE scaling keys: transformers' reader ignores them, so _check_read_back refuses scaling
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_vocab_size(n_vocab)
    if getattr(c, "sliding_window", None):
        writer.add_sliding_window(c.sliding_window)
        if getattr(c, "layer_types", None):
            writer.add_sliding_window_pattern([t == "sliding_attention" for t in c.layer_types])
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if getattr(c, key, None) is not None:
            getattr(writer, f"add_{key}")(getattr(c, key))
    writer.add_file_type(FILE_TYPES[dtype])
    if dtype == "q8_0":
        writer.add_quantization_version(GGML_QUANT_VERSION)


def _same(a, b) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):  # stored as float32
        return a is not None and b is not None and math.isclose(a, b, rel_tol=1e-6)
    return a == b


# llama.cpp does not read Gemma's query scale: it uses hidden/heads for the one model size it knows
# needs it (27B, told apart by its block count) and head_dim for every other
GEMMA_27B_BLOCKS = {"gemma2": 46, "gemma3_text": 62}


def _check_llama_cpp_query_scale(config) -> None:
    blocks = GEMMA_27B_BLOCKS.get(config.model_type)
    if blocks is None:
        return
    scale = (config.hidden_size // config.num_attention_heads if config.num_hidden_layers == blocks
             else config.head_dim)
    if config.query_pre_attn_scalar != scale:
        raise GradmapError(f"llama.cpp would scale this {config.model_type} model's queries by "
                           f"1/sqrt({scale}) (it infers the scale from the block count and head size), "
                           f"the model uses query_pre_attn_scalar={config.query_pre_attn_scalar}; "
                           "a GGUF file cannot say so, keep the safetensors checkpoint for it")


def _expected(config) -> dict:
    """The forward-pass settings a reader of the file must rebuild."""
    want = {k: getattr(config, k) for k in FORWARD_KEYS if hasattr(config, k)}
    if config.model_type == "mistral":  # read back as the Llama it is when it has no window
        want["model_type"] = "llama"
        if want.get("sliding_window", 0) is None:
            del want["sliding_window"]
    return want


def check_read_back(config, arch: str, fill) -> None:
    """Refuse a model whose forward-pass settings transformers' GGUF reader would not reproduce."""
    from transformers import AutoConfig
    with tempfile.TemporaryDirectory(prefix="gradmap-gguf-probe-") as tmp:
        writer = GGUFWriter(Path(tmp, "probe.gguf"), arch)
        fill(writer)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()  # no tensors: the header says so
        writer.close()
        back = AutoConfig.from_pretrained(tmp, gguf_file="probe.gguf")
    missing = object()
    for key, want in _expected(config).items():
        got = getattr(back, key, missing)
        if not _same(want, None if got is missing else got):
            if key == "layer_types" and got is not missing:
                raise GradmapError(_pattern_message(config, got))
            raise GradmapError(
                f"a GGUF file cannot carry this {config.model_type} model's {key}={want!r}: "
                f"transformers' GGUF reader would rebuild it as {key}="
                f"{'(unset)' if got is missing else repr(got)}, a different model; keep the "
                "safetensors checkpoint (gradmap.save_pretrained) for it")


def _pattern_message(config, got: list) -> str:
    """The refusal for a sliding/full attention pattern that pruning shifted, with the way out.

    The reader derives each layer's type from its position (full every `period`-th layer), so
    removing whole periods of adjacent layers keeps every later layer's type where it was.
    """
    period = 2 if config.model_type == "gemma2" else (
        getattr(config, "sliding_window_pattern", None) or getattr(config, "_sliding_window_pattern", None)
        or next((i + 1 for i, t in enumerate(got) if t == "full_attention"), len(got)))
    return (f"a GGUF file cannot carry this {config.model_type} model's layer_types= "
            f"({len(config.layer_types)} layers, "
            "the sliding/full attention pattern shifted by the removal): transformers derives each "
            "layer's type from its position and llama.cpp reads it per layer, so they would load "
            f"different models; to export it, prune the dense model with fast_prune(..., "
            f"keep_attention_pattern=True) (CLI: --keep-attention-pattern, implied by --gguf), which "
            f"removes only runs of {period} adjacent layers, or remove such runs yourself (the number "
            f"removed before every kept layer a multiple of {period}), e.g. "
            f"gradmap.remove_layers(model, {list(range(1, 1 + period))}) on the dense model, or keep "
            "the safetensors checkpoint (gradmap.save_pretrained) for it")


def _tensors(model, layout: GGUFLayout) -> list[tuple[str, object]]:
    """(GGUF name, tensor) for every weight, the LM head left out when tied to the embedding."""
    gguf_of = {hf: g for g, hf in layout.hf_name.items()}
    out, seen = [], set()
    for hf_name, tensor in model.state_dict().items():
        if tensor.data_ptr() in seen:
            continue  # a tied LM head: readers tie output to token_embd when output.weight is absent
        seen.add(tensor.data_ptr())
        name = gguf_of.get(hf_name)
        if name is None:
            raise GradmapError(f"model tensor {hf_name} has no GGUF name for architecture "
                               f"{layout.arch!r}; this model cannot be exported to GGUF")
        out.append((name, tensor))
    return out


def convert_to_gguf(model, tokenizer, path, dtype: str = "auto", overwrite: bool = False) -> dict:
    """Write `model` (any state, e.g. pruned in place) and `tokenizer` as a GGUF file, atomically.

    `dtype`: "f32", "f16", "bf16", "q8_0" for the matrices ("auto" = f16); 1-D tensors (norms,
    biases) are always F32, and a Q8_0 matrix whose rows are not a multiple of 32 is written F16.
    Families: FAMILIES. Returns path, bytes, dtype, architecture, blocks, tensors per type,
    tokenizer summary.
    """
    if dtype not in CONVERT_DTYPES:
        raise GradmapError(f"GGUF dtype {dtype!r} is not one of {', '.join(CONVERT_DTYPES)}")
    dtype = AUTO_DTYPE if dtype == "auto" else dtype
    from gradmap.core.output_paths import check_finite, model_sources
    path = check_gguf_target(path, overwrite, inputs=model_sources(model))
    check_finite(model, "GGUF file")
    family = model.config.model_type
    if family not in FAMILIES:
        raise GradmapError(f"GGUF export of {family!r} models is not supported; supported: "
                           f"{', '.join(sorted(FAMILIES))} (families transformers' GGUF reader can "
                           "load back to check the file)")
    arch = FAMILIES[family]
    n_vocab = model.get_input_embeddings().weight.shape[0]
    _check_llama_cpp_query_scale(model.config)
    check_read_back(model.config, arch, lambda w: _add_hparams(w, model.config, n_vocab, dtype))
    add_tokenizer, vocab_info = tokenizer_metadata(tokenizer, model.config, n_vocab)
    layout = GGUFLayout(model, arch)
    tensors = _tensors(model, layout)
    qtype, types = QUANT_TYPES[dtype], Counter()

    def fill(writer):
        _add_hparams(writer, model.config, n_vocab, dtype)
        add_tokenizer(writer)
        for name, tensor in tensors:
            qt = GGUFLayout.storage_type(tensor, qtype)
            writer.add_tensor(name, layout.encode(tensor, name, qt), raw_dtype=qt)
            types[qt.name] += 1
    write_gguf(path, arch, fill, overwrite=overwrite)
    return {"path": str(path), "bytes": path.stat().st_size, "source": None, "dtype": dtype,
            "architecture": arch, "blocks": model.config.num_hidden_layers, "tensors": dict(types),
            "tokenizer": vocab_info}
