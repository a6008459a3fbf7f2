"""Writing a pruned model back to GGUF for llama.cpp / ollama, from the GGUF it was loaded from.

Every tensor the pruning left untouched is copied byte for byte in its original quantisation; the
removed blocks' tensors are dropped and the kept `blk.N.*` renumbered densely; `<arch>.block_count`
and every per-layer metadata array are trimmed; all other metadata (tokenizer, chat template, RoPE)
is copied unchanged. Tensors that compensation changed are re-quantised to their source tensor's
own type (so the file shrinks by the removed blocks' share), or to the smallest wider type the
`gguf` package can write when it cannot write that one (`writable_type`); `dtype` keeps them wider.
A model with no GGUF source (loaded from an HF folder) is converted whole by gguf_convert.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import torch
from gguf import GGUFReader, GGUFValueType, GGUFWriter

from gradmap.core.output_paths import check_finite
from gradmap.core.errors import GradmapError
from gradmap.core.gguf_convert import check_read_back, convert_to_gguf
from gradmap.core.gguf_layout import QUANT_TYPES, GGUFLayout, writable_type
from gradmap.core.gguf_write import check_gguf_target, write_gguf
from gradmap.core.models import GGUF_SOURCE_ATTR
from gradmap.core.surgery import original_layer_ids

__all__ = ["export_gguf", "check_gguf_paths", "check_gguf_dtype", "copy_metadata", "Q8_KL_TOL", "DTYPES"]

# types of the tensors pruning changed: "source" each its source tensor's own type; "auto" Q8_0 or F16
# by the KL test below; or one type for all of them
DTYPES = ("source", "auto", "q8_0", "f16", "bf16", "f32")
# mean KL(in-memory || exported) per token, nats, over ROWS; "auto" uses Q8_0 below it, else F16
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


def check_gguf_dtype(dtype) -> None:
    """Refuse a `dtype` that is not one of DTYPES, before any work."""
    if dtype not in DTYPES:
        raise GradmapError(f"GGUF dtype {dtype!r} is not one of {', '.join(DTYPES)} (source: each "
                           "changed tensor in its source tensor's type; auto: Q8_0, or F16 when Q8_0 "
                           "moves the next-token distribution by more than Q8_KL_TOL)")


def _encode(layout: GGUFLayout, state: dict, types: dict[str, object]) -> dict[str, tuple]:
    """{GGUF name: (type written, data)} for the changed tensors, each asked for as `types[name]`."""
    out = {}
    for gguf_name, (hf_name, qtype) in types.items():
        qt = GGUFLayout.storage_type(state[hf_name], qtype)
        out[gguf_name] = (qt, layout.encode(state[hf_name], gguf_name, qt))
    return out


def _kl_if_written(model, layout: GGUFLayout, changed: dict[str, str], encoded: dict, ref, rows) -> float:
    """Mean KL(in-memory || model with the changed tensors as a reader of `encoded` sees them)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    saved = {}
    try:
        for hf_name, gguf_name in changed.items():
            p = params[hf_name]
            saved[hf_name] = p.data
            qt, data = encoded[gguf_name]
            p.data = layout.decode(data, qt, gguf_name, p.data).to(p.device)
        got = _logits(model, rows)
    finally:
        for hf_name, data in saved.items():
            params[hf_name].data = data
    return max(0.0, float((ref.exp() * (ref - got)).sum(-1).mean()))  # rounding can dip below 0


def _source_types(reader: GGUFReader, plan, changed: dict[str, str]) -> dict[str, object]:
    """The source type of each changed tensor (GGUF name -> type). A tensor the source lacks takes
    the type of the one it was tied to (output.weight: token_embd.weight), else the commonest
    matrix type of the source."""
    by_name = {name: t.tensor_type for t, name in plan}
    matrices = [t.tensor_type for t in reader.tensors if len(t.shape) > 1]
    if "token_embd.weight" in by_name:
        by_name.setdefault("output.weight", by_name["token_embd.weight"])
    common = max(set(matrices), key=matrices.count)
    return {name: by_name.get(name, common) for name in changed.values()}  # (F32 is 0: no `or`)


def _choose_types(model, tokenizer, layout, state, changed, dtype: str, source_types) -> tuple[dict, dict]:
    """({GGUF name: (type written, data)} for the changed tensors, the measured errors)."""
    rows = _rows(model, tokenizer)
    ref = _logits(model, rows)

    def written(qtype_of):
        enc = _encode(layout, state, {g: (hf, qtype_of(g)) for hf, g in changed.items()})
        return enc, _kl_if_written(model, layout, changed, enc, ref, rows)
    if dtype != "auto":
        enc, kl = written((lambda g: writable_type(source_types[g])) if dtype == "source"
                          else (lambda g: QUANT_TYPES[dtype]))
        return enc, {"kl": kl}
    (q8, kl_q8), (f16, kl_f16) = written(lambda g: QUANT_TYPES["q8_0"]), written(lambda g: QUANT_TYPES["f16"])
    errors = {"kl_q8_0": kl_q8, "kl_f16": kl_f16, "tolerance": Q8_KL_TOL}
    return (q8, {"kl": kl_q8, **errors}) if kl_q8 <= Q8_KL_TOL else (f16, {"kl": kl_f16, **errors})


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


def export_gguf(model, tokenizer, path, source=None, dtype: str = "source", overwrite: bool = False) -> dict:
    """Write `model` as a new GGUF file at `path`, atomically.

    From a GGUF source (`source`, default: the file `gradmap.load_model` loaded the model from;
    it is only read): untouched tensors keep their original type and bytes; `dtype` is the type
    of tensors the pruning changed: "source" (default: each in its source tensor's type, so the file
    is smaller than the source by about the removed blocks' share; a type the `gguf` package cannot
    write, e.g. Q4_K, becomes the smallest writable type with one more bit per weight, see
    `gguf_layout.writable_type`), "auto" (Q8_0 if its measured KL on a few rows is within
    Q8_KL_TOL, else F16), "q8_0", "f16", "bf16" or "f32". Returns a summary: path, bytes and source
    bytes, tensors copied/dropped/changed, each changed tensor's type written and source type, the
    source types written as another type (`fallbacks`), the changed tensors' bytes before and after,
    and the mean KL on ROWS of the file as written (`changed_errors`).
    Without a source (a model loaded from an HF folder) every tensor is converted: see
    `gradmap.core.gguf_convert.convert_to_gguf` ("source" and "auto" = f16 there).
    """
    check_gguf_dtype(dtype)
    source = source if source is not None else getattr(model, GGUF_SOURCE_ATTR, None)
    if source is None:  # loaded from an HF folder: nothing to copy from, every tensor is converted
        return convert_to_gguf(model, tokenizer, path, dtype="auto" if dtype == "source" else dtype,
                               overwrite=overwrite)
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
    source_types = _source_types(reader, plan, changed)
    encoded, errors = (_choose_types(model, tokenizer, layout, state, changed, dtype, source_types)
                       if changed else ({}, {}))

    # the trimmed metadata must still describe this model to a reader (e.g. a Gemma pruned out of
    # its sliding/full alternation reads back with the wrong attention per layer): refuse otherwise
    check_read_back(model.config, arch, lambda w: copy_metadata(reader, w, arch, n_src, kept))

    def fill(writer):
        copy_metadata(reader, writer, arch, n_src, kept)
        for t, name in plan + [(None, n) for n in new.values()]:
            if name in encoded:
                qt, data = encoded[name]
                writer.add_tensor(name, data, raw_dtype=qt)
            else:
                writer.add_tensor(name, t.data, raw_dtype=t.tensor_type,
                                  tensor_endianess=reader.endianess)
    write_gguf(path, arch, fill, reader.alignment if "general.alignment" in reader.fields else None,
               overwrite=overwrite)
    return {"path": str(path), "bytes": path.stat().st_size, "source": str(source),
            "source_bytes": source.stat().st_size, "blocks": len(kept), "source_blocks": n_src,
            "dtype": dtype, "copied": len(plan) - len(encoded), "dropped": len(reader.tensors) - len(plan),
            **_changed_summary(plan, encoded, source_types, new, dtype), "changed_errors": errors}


def _changed_summary(plan, encoded: dict, source_types: dict, new: dict, dtype: str) -> dict:
    """What the report says about the re-written tensors: types, fallbacks and bytes."""
    src_bytes = {name: int(t.n_bytes) for t, name in plan}
    fallbacks = {source_types[n].name: qt.name for n, (qt, _) in encoded.items()
                 if dtype == "source" and writable_type(source_types[n]) != source_types[n]}
    return {"changed": {n: qt.name for n, (qt, _) in encoded.items()},
            "source_types": {n: source_types[n].name for n in encoded},
            "fallbacks": fallbacks, "added": sorted(new.values()),
            "changed_bytes": {"source": sum(src_bytes.get(n, 0) for n in encoded),
                              "written": sum(int(d.nbytes) for _, d in encoded.values())}}
