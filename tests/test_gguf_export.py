"""gradmap.export_gguf: a pruned GGUF-loaded model written back to GGUF (issue 17)."""
import copy
import hashlib
import json
import os
import re

import numpy as np
import pytest
import torch
from gguf import GGUFReader
from transformers import AutoModelForCausalLM

from gradmap import export_gguf, remove_layers
from gradmap.cli.app import main
from gradmap.core.errors import GradmapError
from gradmap.core.gguf_export import Q8_KL_TOL, ROWS
from gradmap.core.models import GGUF_SOURCE_ATTR, resolve_model_path
from tiny import tiny_model

REMOVED = [20, 23, 25, 27]
# a source-type export is at most the source less the removed blocks' bytes; 0.1% of the source
# (98 KB for SmolLM2) is room for the header and alignment padding (measured: 0, the header shrinks)
SIZE_TOL = 1e-3
PROMPTS = ["The capital of France is", "Layer pruning removes whole layers because"]


def _smollm2_gguf() -> str:
    folder, name = resolve_model_path("smollm2-135m")
    return os.path.join(folder, name)


def _sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def _reload(path):
    return AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                dtype=torch.float32).eval()


def _log_probs(model, tok, prompts=PROMPTS):
    x = tok(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**x).logits.log_softmax(-1), x.attention_mask.bool()


def _fields(reader):
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


# --- argument checks (fast: only the GGUF header is read) ---

def test_model_without_gguf_source_is_converted_and_needs_its_tokenizer(tmp_path):
    # no source to copy the vocabulary from: the converter (tests/test_gguf_convert.py) needs it
    with pytest.raises(GradmapError, match="needs its tokenizer"):
        export_gguf(tiny_model("llama", 2), None, tmp_path / "x.gguf")
    assert list(tmp_path.iterdir()) == []


def test_refuses_bad_dtype_and_paths(tmp_path):
    model, src = tiny_model("llama", 2), _smollm2_gguf()
    with pytest.raises(GradmapError, match="dtype 'q4' is not one of"):
        export_gguf(model, None, tmp_path / "x.gguf", source=src, dtype="q4")
    with pytest.raises(GradmapError, match="is the source file"):
        export_gguf(model, None, src, source=src, overwrite=True)
    with pytest.raises(GradmapError, match="must end in .gguf"):
        export_gguf(model, None, tmp_path / "x.bin", source=src)
    (tmp_path / "x.gguf").write_bytes(b"keep")
    with pytest.raises(GradmapError, match="exists; choose a new file or pass overwrite=True"):
        export_gguf(model, None, tmp_path / "x.gguf", source=src)
    assert (tmp_path / "x.gguf").read_bytes() == b"keep"
    with pytest.raises(GradmapError, match="does not come from GGUF"):  # width 32 vs 576
        export_gguf(model, None, tmp_path / "y.gguf", source=src)
    assert not (tmp_path / "y.gguf").exists()


# --- SmolLM2 (Q4_1 GGUF) ---

@pytest.fixture(scope="module")
def pruned(smollm2):
    model, tok = smollm2
    model = copy.deepcopy(model)
    remove_layers(model, REMOVED)
    return model, tok


@pytest.mark.slow
def test_pruned_export_copies_bytes_and_reloads_with_identical_logits(pruned, tmp_path):
    model, tok = pruned
    src = getattr(model, GGUF_SOURCE_ATTR)
    before = _sha(src)
    out = tmp_path / "pruned.gguf"
    info = export_gguf(model, tok, out)
    assert _sha(src) == before, "the source GGUF was modified"
    assert info["changed"] == {} and info["blocks"] == 26 and info["dropped"] == 4 * 9
    assert [p.name for p in tmp_path.iterdir()] == ["pruned.gguf"]  # no temp file left behind
    r_src, r_out = GGUFReader(src), GGUFReader(out)
    f_src, f_out = _fields(r_src), _fields(r_out)
    assert f_out.pop("llama.block_count") == 26 and f_src.pop("llama.block_count") == 30
    assert f_out == f_src  # tokenizer, chat template, rope settings: all unchanged
    kept = [i for i in range(30) if i not in REMOVED]
    src_t = {t.name: t for t in r_src.tensors}
    for t in r_out.tensors:
        m = re.fullmatch(r"blk\.(\d+)\.(.+)", t.name)
        name = f"blk.{kept[int(m[1])]}.{m[2]}" if m else t.name
        s = src_t[name]
        assert t.tensor_type == s.tensor_type and np.array_equal(t.data, s.data), t.name
    assert {int(m[1]) for t in r_out.tensors if (m := re.match(r"blk\.(\d+)\.", t.name))} == set(range(26))
    a, mask = _log_probs(model, tok)
    b, _ = _log_probs(_reload(out), tok)
    assert torch.equal(a[mask], b[mask])  # same bytes, dequantised the same way: exactly equal
    print(f"\nsizes: dense GGUF {os.path.getsize(src)} B, pruned GGUF {info['bytes']} B")


@pytest.mark.slow
def test_changed_tensors_requantised_within_tolerance(pruned, tmp_path):
    model, tok = pruned
    model = copy.deepcopy(model)
    with torch.no_grad():  # as compensation would: a folded correction changes a few weights
        model.model.layers[3].mlp.down_proj.weight.mul_(1.05)
        model.model.layers[5].self_attn.q_proj.weight.mul_(0.97)  # llama.cpp's permuted Q layout
        model.model.norm.weight.mul_(1.01)  # 1-D: written F32
        # an LM head no longer tied to the embedding: the source has no output.weight, so it is added
        model.lm_head.weight = torch.nn.Parameter(model.model.embed_tokens.weight * 1.02)
        model.config.tie_word_embeddings = False
    out = tmp_path / "changed.gguf"
    # default: each in its source tensor's type; the added LM head takes the tied embedding's Q8_0
    info = export_gguf(model, tok, out)
    assert info["changed"] == {"blk.3.ffn_down.weight": "Q4_1", "blk.5.attn_q.weight": "Q4_1",
                               "output_norm.weight": "F32", "output.weight": "Q8_0"}
    assert info["source_types"] == info["changed"] and info["fallbacks"] == {}
    assert info["added"] == ["output.weight"]
    a, mask = _log_probs(model, tok)
    b, _ = _log_probs(_reload(out), tok)
    kl_source = (a.exp() * (a - b)).sum(-1)[mask].mean().item()
    assert 0 < kl_source <= Q8_KL_TOL, kl_source  # a uniformly scaled Q4_1 tensor fits its grid again
    info = export_gguf(model, tok, out, dtype="auto", overwrite=True)
    assert info["changed"] == {"blk.3.ffn_down.weight": "Q8_0", "blk.5.attn_q.weight": "Q8_0",
                               "output_norm.weight": "F32", "output.weight": "Q8_0"}
    assert info["changed_errors"]["kl_q8_0"] <= Q8_KL_TOL
    b, _ = _log_probs(_reload(out), tok)
    kl = (a.exp() * (a - b)).sum(-1)[mask].mean().item()
    assert 0 < kl <= Q8_KL_TOL, kl  # re-quantised: not exact, within the stated tolerance
    info = export_gguf(model, tok, out, dtype="f16", overwrite=True)
    assert sorted(info["changed"].values()) == ["F16", "F16", "F16", "F32"]
    b16, _ = _log_probs(_reload(out), tok)
    kl16 = (a.exp() * (a - b16)).sum(-1)[mask].mean().item()
    assert kl16 <= kl, (kl16, kl)


@pytest.mark.slow
def test_failed_write_leaves_nothing_and_keeps_existing_output(pruned, tmp_path, monkeypatch):
    import gguf
    model, tok = pruned
    out = tmp_path / "pruned.gguf"
    out.write_bytes(b"previous export")

    def boom(self, **_):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", boom)
    with pytest.raises(GradmapError, match="nothing was written"):
        export_gguf(model, tok, out, overwrite=True)
    assert out.read_bytes() == b"previous export"
    assert [p.name for p in tmp_path.iterdir()] == ["pruned.gguf"]


@pytest.mark.slow
def test_llama_cpp_greedy_matches_transformers(pruned, tmp_path):
    llama_cpp = pytest.importorskip(
        "llama_cpp", reason="llama-cpp-python is not installed (optional extra: pip install "
                            "'gradmap[gguf-runtime]'; it compiles llama.cpp, several minutes)")
    model, tok = pruned
    out = tmp_path / "pruned.gguf"
    export_gguf(model, tok, out)
    hf = _reload(out)
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=256, n_threads=1, verbose=False,
                          logits_all=False, seed=0)
    agree = []
    for text in PROMPTS:
        ids = tok(text).input_ids
        with torch.no_grad():
            want = hf.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=16,
                               min_new_tokens=16)[0, len(ids):].tolist()
        llm.reset()
        got = []
        for t in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0,
                              reset=True):
            got.append(t)
            if len(got) == 16:
                break
        agree.append(next((i for i, (x, y) in enumerate(zip(want, got)) if x != y), 16))
    # llama.cpp and torch sum in different orders; on a Q4_1 model a near-tie can flip a token
    # late in the sequence, so the first 8 tokens must match and the agreement is printed
    print(f"\nllama.cpp vs transformers: first differing position per prompt {agree} (16 = none)")
    assert min(agree) >= 8, agree


# --- gradmap prune --gguf ---

def test_prune_cli_gguf_output_checked_before_loading(tmp_path, capsys):
    code = main(["prune", "--model", "smollm2-135m", "--n-prune", "1", "--compensation", "none",
                 "--out", str(tmp_path / "o"), "--gguf", str(tmp_path / "o.bin")])
    assert code == 2
    assert "must end in .gguf" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_prune_cli_writes_gguf_with_compensated_tensors(tmp_path, data_dir):
    """The real flow: magnitude compensation rescales the residual writes, which the GGUF carries."""
    out, gguf_out = tmp_path / "ck", tmp_path / "pruned.gguf"
    code = main(["prune", "--model", "smollm2-135m", "--n-prune", "4", "--metric", "block-influence",
                 "--schedule", "one-shot", "--compensation", "magnitude", "--calib", "c4",
                 "--n-calib", "4", "--seq-len", "64", "--out", str(out), "--gguf", str(gguf_out),
                 "--no-progress"])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    g = report["gguf"]
    assert g["blocks"] == 26 and g["changed"], g  # compensation changed some tensors
    # every changed tensor in its source type (matrices Q4_1, norms F32): the file is smaller than
    # the source by the removed blocks' share of its bytes, less SIZE_TOL (header and alignment)
    assert g["changed"] == g["source_types"] and set(g["changed"].values()) <= {"Q4_1", "Q8_0", "F32"}, g
    removed = set(report["removed_layers"])
    src = GGUFReader(g["source"])
    share = sum(int(t.n_bytes) for t in src.tensors
                if (m := re.match(r"blk\.(\d+)\.", t.name)) and int(m[1]) in removed) / g["source_bytes"]
    assert g["bytes"] <= g["source_bytes"] * (1 - share + SIZE_TOL), (g["bytes"], g["source_bytes"], share)
    # the GGUF holds the same model as the safetensors checkpoint, up to the re-quantised tensors
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(out)
    # on the rows the report measured, the file as transformers reads it has the reported KL
    dense, gguf_model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval(), _reload(gguf_out)
    kls = []
    for prompts in (ROWS, PROMPTS):
        a, mask = _log_probs(dense, tok, prompts)
        b, _ = _log_probs(gguf_model, tok, prompts)
        kls.append((a.exp() * (a - b)).sum(-1)[mask].mean().item())
    assert kls[0] == pytest.approx(g["changed_errors"]["kl"], rel=1e-3, abs=1e-7), (kls, g["changed_errors"])
    kl = kls[1]
    sizes = {"safetensors": (out / "model.safetensors").stat().st_size, "gguf": g["bytes"],
             "dense_gguf": g["source_bytes"]}
    print(f"\nCLI --gguf: changed {g['changed']}, errors {g['changed_errors']}, KL {kl:.2e}, sizes {sizes}")


def test_compare_cli_save_gguf_checked_before_loading(tmp_path, capsys):
    code = main(["compare", "--model", "smollm2-135m", "--n-prune", "2", "--out", str(tmp_path / "r"),
                 "--save-gguf", str(tmp_path / "m.gguf")])
    assert code == 2
    assert "--save-gguf needs --save DIR" in capsys.readouterr().err
    code = main(["compare", "--model", str(tmp_path / "nothing"), "--n-prune", "2", "--out",
                 str(tmp_path / "r"), "--save", str(tmp_path / "ck"), "--save-gguf", str(tmp_path / "m.gguf")])
    assert code == 2
    assert "does not exist" in capsys.readouterr().err


def test_copy_metadata_trims_block_count_and_per_layer_arrays_only(tmp_path):
    """Per-layer arrays (as in OpenELM-style GGUFs) are cut to the kept blocks; nothing else changes."""
    from gguf import GGUFWriter

    from gradmap.core.gguf_export import copy_metadata
    src = tmp_path / "src.gguf"
    w = GGUFWriter(src, "llama")
    w.add_block_count(4)
    w.add_array("llama.attention.head_count", [1, 2, 3, 4])  # one per block
    w.add_array("llama.rope.dimension_sections", [8, 8])    # not per block
    w.add_array("tokenizer.ggml.tokens", ["a", "b", "c", "d"])  # 4 entries, but not a llama.* key
    w.add_string("tokenizer.chat_template", "{{ x }}")
    w.add_float32("llama.rope.freq_base", 1e5)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    for f in (w.write_header_to_file, w.write_kv_data_to_file, w.write_tensors_to_file, w.close):
        f()
    out = tmp_path / "out.gguf"
    w = GGUFWriter(out, "llama")
    copy_metadata(GGUFReader(src), w, "llama", 4, [0, 2, 3])
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    for f in (w.write_header_to_file, w.write_kv_data_to_file, w.write_tensors_to_file, w.close):
        f()
    a, b = _fields(GGUFReader(src)), _fields(GGUFReader(out))
    assert b.pop("llama.block_count") == 3 and a.pop("llama.block_count") == 4
    assert b.pop("llama.attention.head_count") == [1, 3, 4]
    a.pop("llama.attention.head_count")
    assert a == b


@pytest.mark.slow
def test_save_pretrained_with_gguf_writes_both(pruned, tmp_path):
    """compare --save-gguf goes through save_pretrained(gguf=...)."""
    from gradmap import save_pretrained
    model, tok = pruned
    out = save_pretrained(model, tok, tmp_path / "ck", gguf=tmp_path / "ck.gguf")
    assert (out / "model.safetensors").is_file()
    assert GGUFReader(tmp_path / "ck.gguf").fields["llama.block_count"].contents() == 26
