"""Writing a pruned model back to GGUF for llama.cpp / ollama, from the GGUF it was loaded from.

Every tensor the pruning left untouched is copied byte for byte in its original quantisation; the
removed blocks' tensors are dropped and the kept `blk.N.*` renumbered densely; `<arch>.block_count`
and every per-layer metadata array are trimmed; all other metadata (tokenizer, chat template, RoPE)
is copied unchanged. Tensors that compensation changed are written as Q8_0 when that keeps the
next-token distribution within Q8_KL_TOL of the in-memory model on a few text rows, else as F16.
A model with no GGUF source (loaded from an HF folder) is converted whole by gguf_convert.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter

from gradmap.core.output_paths import check_finite
from gradmap.core.errors import GradmapError
from gradmap.core.gguf_convert import check_read_back, convert_to_gguf
from gradmap.core.gguf_layout import QUANT_TYPES, GGUFLayout
from gradmap.core.gguf_write import check_gguf_target, write_gguf
from gradmap.core.models import GGUF_SOURCE_ATTR
from gradmap.core.surgery import original_layer_ids

__all__ = ["export_gguf", "check_gguf_paths", "copy_metadata", "Q8_KL_TOL", "DTYPES"]

DTYPES = ("auto", "q8_0", "f16", "bf16", "f32")
# mean KL(in-memory || exported) per token, nats, over ROWS; Q8_0 is used for changed tensors below it
Q8_KL_TOL = 1e-3
ROWS = ["The capital of France is Paris, and the capital of Italy is Rome.",
        "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
        "Layer pruning removes whole decoder layers from a language model to make it faster."]
_BLOCK = re.compile(r"blk\.(\d+)\.(.+)")


def check_gguf_paths(source, path, overwrite: bool, inputs=()) -> tuple[Path, Path]:
    """Check the source GGUF and the output file (never one of `inputs`) before any work."""
    source, path = Path(source).expanduser(), Path(path).expanduser()
    if not source.is_file():
        raise GradmapError(f"GGUF source {str(source)!r} does not exist; pass the .gguf file the model "
                           "was loaded from")
    if path.suffix == ".gguf" and path.exists() and (path.resolve() == source.resolve()
                                                     or os.path.samefile(path, source)):
        raise GradmapError(f"GGUF output {str(path)!r} is the source file; the source is never "
                           "modified, choose another output file")
    return source, check_gguf_target(path, overwrite, inputs=[source, *inputs])


def _plan(reader: GGUFReader, kept: list[int]) -> list[tuple[object, str]]:
    """(source tensor, output name) for every tensor the export keeps, in the source's order."""
    new_of = {orig: new for new, orig in enumerate(kept)}
    plan = []
    for t in reader.tensors:
        m = _BLOCK.fullmatch(t.name)
        if m is None:
            plan.append((t, t.name))
        elif int(m[1]) in new_of:
            plan.append((t, f"blk.{new_of[int(m[1])]}.{m[2]}"))
    return plan


def _new_tensors(layout: GGUFLayout, state: dict, covered: set[str]) -> dict[str, str]:
    """Model tensors the source GGUF has no tensor for (e.g. an LM head untied by compensation)."""
    gguf_of = {hf: g for g, hf in layout.hf_name.items()}
    covered_ptrs = {state[n].data_ptr() for n in covered}
    new = {}
    for hf_name, tensor in state.items():
        if hf_name in covered or tensor.data_ptr() in covered_ptrs:
            continue  # present, or tied to a present tensor (a tied LM head)
        if hf_name not in gguf_of:
            raise GradmapError(f"model tensor {hf_name} has no GGUF name for architecture "
                               f"{layout.arch!r}; this model cannot be exported to GGUF")
        new[hf_name] = gguf_of[hf_name]
    return new


def _logits(model, rows: dict) -> torch.Tensor:
    """Next-token log-probabilities at the real (unpadded) positions of `rows`."""
    with torch.no_grad():
        out = model(**{k: v.to(model.device) for k, v in rows.items()}).logits.float().log_softmax(-1)
    return out[rows["attention_mask"].bool().to(out.device)]


def _rows(model, tokenizer) -> dict:
    if tokenizer is not None and tokenizer.pad_token_id is not None:
        return dict(tokenizer(ROWS, return_tensors="pt", padding=True))
    g = torch.Generator().manual_seed(0)  # no tokenizer: fixed random ids still exercise every weight
    ids = torch.randint(0, model.config.vocab_size, (len(ROWS), 24), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _kl_if_written(model, layout: GGUFLayout, changed: dict[str, str], qtype, ref, rows) -> float:
    """Mean KL(in-memory || model with the changed tensors as a reader of `qtype` data sees them)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    saved = {}
    try:
        for hf_name, gguf_name in changed.items():
            p = params[hf_name]
            saved[hf_name] = p.data
            p.data = layout.round_trip(p.data, gguf_name, qtype).to(p.device)
        got = _logits(model, rows)
    finally:
        for hf_name, data in saved.items():
            params[hf_name].data = data
    return max(0.0, float((ref.exp() * (ref - got)).sum(-1).mean()))  # rounding can dip below 0


def _choose_type(model, tokenizer, layout, changed, dtype: str) -> tuple[GGMLQuantizationType, dict]:
    if dtype != "auto":
        return QUANT_TYPES[dtype], {}
    rows = _rows(model, tokenizer)
    ref = _logits(model, rows)
    kl = {name: _kl_if_written(model, layout, changed, QUANT_TYPES[name], ref, rows)
          for name in ("q8_0", "f16")}
    pick = "q8_0" if kl["q8_0"] <= Q8_KL_TOL else "f16"
    return QUANT_TYPES[pick], {"kl_q8_0": kl["q8_0"], "kl_f16": kl["f16"], "tolerance": Q8_KL_TOL}


def copy_metadata(reader: GGUFReader, writer: GGUFWriter, arch: str, n_src: int, kept: list[int]) -> None:
    """Every key of `reader` into `writer`; block_count and per-block `<arch>.*` arrays cut to `kept`."""
    for field in reader.fields.values():
        if field.name == "general.architecture" or field.name.startswith("GGUF."):
            continue  # the writer adds these itself
        vtype = field.types[0]
        sub = field.types[-1] if vtype == GGUFValueType.ARRAY else None
        value = field.contents()
        if field.name == f"{arch}.block_count":
            value = len(kept)
        elif (field.name.startswith(f"{arch}.") and vtype == GGUFValueType.ARRAY
              and len(field.types) == 2 and len(value) == n_src):
            value = [value[i] for i in kept]  # one entry per block (e.g. per-layer head counts)
        writer.add_key_value(field.name, value, vtype, sub_type=sub)


def export_gguf(model, tokenizer, path, source=None, dtype: str = "auto", overwrite: bool = False) -> dict:
    """Write `model` as a new GGUF file at `path`, atomically.

    From a GGUF source (`source`, default: the file `gradmap.load_model` loaded the model from;
    it is only read): untouched tensors keep their original type and bytes; `dtype` is the type
    of tensors the pruning changed: "auto" (Q8_0 if its measured KL on a few rows is within
    Q8_KL_TOL, else F16), "q8_0", "f16", "bf16" or "f32". Returns a summary: path, bytes, tensors
    copied/dropped/changed, the changed tensors' type and the measured errors.
    Without a source (a model loaded from an HF folder) every tensor is converted: see
    `gradmap.core.gguf_convert.convert_to_gguf` ("auto" = f16 there).
    """
    if dtype not in DTYPES:
        raise GradmapError(f"GGUF dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    source = source if source is not None else getattr(model, GGUF_SOURCE_ATTR, None)
    if source is None:  # loaded from an HF folder: nothing to copy from, every tensor is converted
        return convert_to_gguf(model, tokenizer, path, dtype=dtype, overwrite=overwrite)
    source, path = check_gguf_paths(source, path, overwrite)
    check_finite(model, "GGUF file")
    reader = GGUFReader(source)
    arch = reader.fields["general.architecture"].contents()
    n_src = int(reader.fields[f"{arch}.block_count"].contents())
    kept = original_layer_ids(model)
    if max(kept) >= n_src or model.config.hidden_size != int(
            reader.fields[f"{arch}.embedding_length"].contents()):
        raise GradmapError(f"the model does not come from GGUF {str(source)!r} ({n_src} blocks of width "
                           f"{reader.fields[f'{arch}.embedding_length'].contents()}; the model keeps "
                           f"original layers up to {max(kept)}, width {model.config.hidden_size})")
    layout = GGUFLayout(model, arch)
    state = model.state_dict()
    plan, changed = _plan(reader, kept), {}
    for t, name in plan:
        hf_name = layout.hf_name.get(name)
        if hf_name is None:
            continue
        cur = state[hf_name]
        src = torch.from_numpy(np.array(layout.to_hf(t.data, t.tensor_type, t.name)))  # a writable copy
        if src.shape != cur.shape or not torch.equal(src.to(cur.dtype).reshape(cur.shape), cur.cpu()):
            changed[hf_name] = name
    new = _new_tensors(layout, state, {layout.hf_name[n] for _, n in plan if n in layout.hf_name})
    changed.update(new)
    qtype, errors = _choose_type(model, tokenizer, layout, changed, dtype) if changed else (None, {})
    out_of, written = {v: k for k, v in changed.items()}, {}

    # the trimmed metadata must still describe this model to a reader (e.g. a Gemma pruned out of
    # its sliding/full alternation reads back with the wrong attention per layer): refuse otherwise
    check_read_back(model.config, arch, lambda w: copy_metadata(reader, w, arch, n_src, kept))

    def fill(writer):
        copy_metadata(reader, writer, arch, n_src, kept)
        for t, name in plan + [(None, n) for n in new.values()]:
            if name in out_of:
                w = state[out_of[name]]
                qt = GGUFLayout.storage_type(w, qtype)
                writer.add_tensor(name, layout.encode(w, name, qt), raw_dtype=qt)
                written[name] = qt.name
            else:
                writer.add_tensor(name, t.data, raw_dtype=t.tensor_type,
                                  tensor_endianess=reader.endianess)
    write_gguf(path, arch, fill, reader.alignment if "general.alignment" in reader.fields else None,
               overwrite=overwrite)
    return {"path": str(path), "bytes": path.stat().st_size, "source": str(source),
            "source_bytes": source.stat().st_size, "blocks": len(kept), "source_blocks": n_src,
            "copied": len(plan) - len(written), "dropped": len(reader.tensors) - len(plan),
            "changed": written, "added": sorted(new.values()), "changed_errors": errors}
