"""Changed tensors of a GGUF export are re-quantised to their source tensor's type (issue 28).

Tiny Llama models written as quantised GGUF sources of each type the `gguf` package can write, plus
a Q4_K source it cannot write (random Q4_K blocks), loaded back, pruned and changed as compensation
changes weights, then exported.
"""
import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFWriter
from gguf.quants import quantize
from tiny import tiny_model
from tiny_tokenizer import byte_level_tokenizer
from transformers import AutoModelForCausalLM

from gradmap import export_gguf, load_model, remove_layers, save_pretrained
from gradmap.cli import checks
from gradmap.cli.app import main
from gradmap.core.errors import GradmapError
from gradmap.core.gguf_export import DTYPES, ROWS, copy_metadata
from gradmap.core.gguf_layout import WRITABLE, bits_per_weight, writable_type

Q = GGMLQuantizationType
REMOVED = [1]
# the export drops the removed block's tensor infos and writes the same metadata, so it is never
# larger than source - removed bytes (+ changed tensors' growth); 4 KiB covers alignment padding
HEADER_TOL = 4096
CHANGED = ("blk.0.ffn_down.weight", "blk.1.attn_output.weight")  # no Q/K row permutation: oracle is plain


@pytest.fixture(scope="module")
def tok():
    return byte_level_tokenizer()


def _random_q4_k(rows: int, cols: int, rng) -> np.ndarray:
    """Q4_K blocks (256 weights: f16 d, f16 dmin, 12 bytes of 6-bit scales/mins, 128 bytes of nibbles)
    with small d/dmin, so the weights stay near the tiny model's scale."""
    blocks = rng.integers(0, 256, size=(rows, cols // 256, 144), dtype=np.uint8)
    blocks[..., 0:2] = np.frombuffer(np.float16(2e-4).tobytes(), np.uint8)
    blocks[..., 2:4] = np.frombuffer(np.float16(4e-4).tobytes(), np.uint8)
    return blocks.reshape(rows, -1)


def _quantised_source(tok, tmp_path, qtype) -> str:
    """A 4-block Llama GGUF whose matrices are `qtype` (norms F32), written from a tiny random model."""
    dense = tiny_model("llama", 4, vocab_size=len(tok) + 3, hidden_size=256, intermediate_size=512)
    export_gguf(dense, tok, tmp_path / "f32.gguf", dtype="f32")
    reader, rng = GGUFReader(tmp_path / "f32.gguf"), np.random.default_rng(0)
    writer = GGUFWriter(tmp_path / "src.gguf", "llama")
    copy_metadata(reader, writer, "llama", 4, [0, 1, 2, 3])
    for t in reader.tensors:
        if len(t.shape) < 2:
            writer.add_tensor(t.name, t.data)
        elif qtype == Q.Q4_K:
            writer.add_tensor(t.name, _random_q4_k(*t.data.shape, rng), raw_dtype=qtype)
        else:
            writer.add_tensor(t.name, quantize(t.data, qtype), raw_dtype=qtype)
    for step in (writer.write_header_to_file, writer.write_kv_data_to_file, writer.write_tensors_to_file,
                 writer.close):
        step()
    return str(tmp_path / "src.gguf")


def _pruned_and_changed(src: str):
    """The source loaded, block 1 removed, and weights changed as compensation changes them: columns
    of one matrix scaled unevenly (not representable on the old grid), rows of another, a norm."""
    model, gtok = load_model(src)
    remove_layers(model, REMOVED)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        down = model.model.layers[0].mlp.down_proj.weight
        down.mul_(0.9 + 0.2 * torch.rand(down.shape[1], generator=g))
        model.model.layers[1].self_attn.o_proj.weight.mul_(1.05)
        model.model.norm.weight.mul_(1.01)
    return model, gtok


def _reload(path):
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


def _rows_kl(model, other, tok) -> float:
    x = tok(ROWS, return_tensors="pt", padding=True)
    with torch.no_grad():
        a = model(**x).logits.log_softmax(-1)[x.attention_mask.bool()]
        b = other(**x).logits.log_softmax(-1)[x.attention_mask.bool()]
    return (a.exp() * (a - b)).sum(-1).mean().item()


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q4_K], ids=lambda q: q.name)
def test_changed_tensors_keep_the_source_type_and_the_file_shrinks(qtype, tok, tmp_path):
    src = _quantised_source(tok, tmp_path, qtype)
    model, gtok = _pruned_and_changed(src)
    out = tmp_path / "pruned.gguf"
    info = export_gguf(model, gtok, out)
    want = Q.Q5_0 if qtype == Q.Q4_K else qtype  # Q4_K: gguf cannot write it; 4.5 + 1 bits -> Q5_0
    assert info["dtype"] == "source"
    assert info["changed"] == {**{n: want.name for n in CHANGED}, "output_norm.weight": "F32"}
    assert info["source_types"] == {**{n: qtype.name for n in CHANGED}, "output_norm.weight": "F32"}
    assert info["fallbacks"] == ({"Q4_K": "Q5_0"} if qtype == Q.Q4_K else {})
    # the written bytes are the gguf package's quantisation of the in-memory weights
    got = {t.name: t for t in GGUFReader(out).tensors}
    for name, w in zip(CHANGED, (model.model.layers[0].mlp.down_proj.weight,
                                 model.model.layers[1].self_attn.o_proj.weight)):
        assert got[name].tensor_type == want
        assert np.array_equal(got[name].data, quantize(w.detach().numpy(), want)), name
    # size: the removed block's bytes are gone; the changed tensors only grow by a fallback
    removed = sum(int(t.n_bytes) for t in GGUFReader(src).tensors if t.name.startswith("blk.1."))
    growth = info["changed_bytes"]["written"] - info["changed_bytes"]["source"]
    assert growth == pytest.approx(sum(int(got[n].n_bytes) for n in CHANGED)
                                   * (1 - bits_per_weight(qtype) / bits_per_weight(want)))
    assert info["bytes"] <= info["source_bytes"] - removed + growth + HEADER_TOL, (info, removed)
    # the error the report states is the error of the file as transformers reads it
    kl = _rows_kl(model, _reload(out), gtok)
    assert kl == pytest.approx(info["changed_errors"]["kl"], rel=1e-3, abs=1e-7)


def test_wide_types_are_kept_on_request_and_cost_size(tok, tmp_path):
    model, gtok = _pruned_and_changed(_quantised_source(tok, tmp_path, Q.Q4_1))
    small = export_gguf(model, gtok, tmp_path / "q4_1.gguf")
    wide = export_gguf(model, gtok, tmp_path / "f16.gguf", dtype="f16")
    assert set(wide["changed"].values()) == {"F16", "F32"} and wide["fallbacks"] == {}
    assert wide["bytes"] > small["bytes"] and wide["changed_errors"]["kl"] < small["changed_errors"]["kl"]
    auto = export_gguf(model, gtok, tmp_path / "auto.gguf", dtype="auto")
    pick = "Q8_0" if auto["changed_errors"]["kl_q8_0"] <= auto["changed_errors"]["tolerance"] else "F16"
    assert {auto["changed"][n] for n in CHANGED} == {pick}


def test_unwritable_types_fall_back_to_one_more_bit():
    assert {q.name: writable_type(q).name for q in (Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.IQ4_XS)} == {
        "Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q8_0", "Q6_K": "Q8_0", "IQ4_XS": "Q5_0"}
    x = np.random.default_rng(0).standard_normal((2, 256)).astype(np.float32)
    for q in Q:
        fallback = writable_type(q)
        if q in WRITABLE:
            assert fallback == q
        else:
            # F32 where nothing is wider (integer and F64 types, never a weight's)
            assert fallback in WRITABLE and bits_per_weight(fallback) >= min(bits_per_weight(q) + 1, 32)
        assert quantize(x, fallback).nbytes == 2 * 256 * GGML_QUANT_SIZES[fallback][1] // GGML_QUANT_SIZES[fallback][0]


def test_bad_gguf_types_are_refused_before_any_work(tok, tmp_path, capsys):
    assert checks.GGUF_TYPES == DTYPES
    model = tiny_model("llama", 2, vocab_size=len(tok) + 3)
    with pytest.raises(GradmapError, match="dtype 'q4_k' is not one of source, auto, q8_0"):
        export_gguf(model, tok, tmp_path / "x.gguf", dtype="q4_k")
    with pytest.raises(GradmapError, match="pass gguf='FILE.gguf' too"):
        save_pretrained(model, tok, tmp_path / "ck", gguf_dtype="f16")
    with pytest.raises(GradmapError, match="dtype 'Q4_1' is not one of"):
        save_pretrained(model, tok, tmp_path / "ck", gguf=tmp_path / "x.gguf", gguf_dtype="Q4_1")
    assert list(tmp_path.iterdir()) == []  # no checkpoint written before the refusal
    code = main(["prune", "--model", "smollm2-135m", "--n-prune", "1", "--out", str(tmp_path / "o"),
                 "--gguf-type", "f16"])
    assert code == 2 and "pass --gguf FILE.gguf too" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["prune", "--model", "smollm2-135m", "--n-prune", "1", "--out", str(tmp_path / "o"),
              "--gguf", str(tmp_path / "o.gguf"), "--gguf-type", "q4_k"])
    assert "invalid choice: 'q4_k'" in capsys.readouterr().err
    code = main(["compare", "--model", "smollm2-135m", "--n-prune", "1", "--out", str(tmp_path / "r"),
                 "--save", str(tmp_path / "ck"), "--gguf-type", "f16"])
    assert code == 2 and "pass --save-gguf FILE.gguf too" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
