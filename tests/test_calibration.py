"""Calibration windows: shape, determinism, sources, errors, and SparseGPT-identical draws."""
import json
import random

import pytest
import torch

from gradmap.core import calibration as calib
from gradmap.core.calibration import DATA_ENV, calibration_data, load_documents
from gradmap.core.errors import GradmapError
from tiny_tokenizer import tiny_tokenizer

WORDS = "the cat sat on a mat then ran to the park and home again with every dog".split()


def _doc(n_words: int, seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture
def corpus(tmp_path):
    """A .jsonl of documents of mixed lengths (some far too short) and a .txt stream."""
    docs = [_doc(n, i) for i, n in enumerate([3, 80, 5, 120, 2, 60, 4, 200])]
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"text": d, "meta": i}) + "\n" for i, d in enumerate(docs)))
    txt = tmp_path / "stream.txt"
    txt.write_text("\n\n".join(docs))
    return docs, jsonl, txt


def _contains(haystack: list[int], needle: list[int]) -> bool:
    n = len(needle)
    return any(haystack[i:i + n] == needle for i in range(len(haystack) - n + 1))


def _sparsegpt_reference(tok, docs, n_samples, seq_len, seed):
    """SparseGPT `datautils.get_c4`, verbatim in logic (global RNG, as the original does)."""
    state = random.getstate()
    random.seed(seed)
    try:
        out = []
        for _ in range(n_samples):
            while True:
                i = random.randint(0, len(docs) - 1)
                enc = tok(docs[i], return_tensors="pt").input_ids
                if enc.shape[1] > seq_len:
                    break
            i = random.randint(0, enc.shape[1] - seq_len - 1)
            out.append(enc[:, i:i + seq_len])
        return torch.cat(out, dim=0)
    finally:
        random.setstate(state)


def test_shape_dtype_and_real_windows(tok, corpus):
    docs, jsonl, _ = corpus
    x = calibration_data(tok, str(jsonl), n_samples=6, seq_len=40, seed=0)
    assert x.shape == (6, 40) and x.dtype == torch.long
    encoded = [tok(d)["input_ids"] for d in docs]
    for row in x.tolist():
        # every window is a contiguous slice of one document long enough for it
        assert any(len(e) > 40 and _contains(e, row) for e in encoded)


def test_matches_sparsegpt_sampling_exactly(tok, corpus):
    docs, jsonl, _ = corpus
    got = calibration_data(tok, jsonl, n_samples=7, seq_len=50, seed=3)
    torch.testing.assert_close(got, _sparsegpt_reference(tok, docs, 7, 50, 3), rtol=0, atol=0)


def test_deterministic_per_seed_and_global_rng_untouched(tok, corpus):
    _, jsonl, _ = corpus
    torch.manual_seed(123)
    random.seed(123)
    before = (torch.get_rng_state(), random.getstate())
    a = calibration_data(tok, str(jsonl), n_samples=5, seq_len=30, seed=1)
    assert torch.equal(before[0], torch.get_rng_state()) and before[1] == random.getstate()
    b = calibration_data(tok, str(jsonl), n_samples=5, seq_len=30, seed=1)
    c = calibration_data(tok, str(jsonl), n_samples=5, seq_len=30, seed=2)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_txt_stream_windows(tok, corpus):
    docs, _, txt = corpus
    stream = tok("\n\n".join(docs))["input_ids"]
    x = calibration_data(tok, txt, n_samples=8, seq_len=64, seed=0)
    assert x.shape == (8, 64)
    rng = random.Random(0)  # SparseGPT get_wikitext2: offsets uniform in [0, n - L - 1]
    for row in x.tolist():
        start = rng.randint(0, len(stream) - 64 - 1)
        assert row == stream[start:start + 64]


def test_named_sources_use_data_dir_env(tok, corpus, tmp_path, monkeypatch):
    docs, jsonl, txt = corpus
    root = tmp_path / "data"
    (root / "c4").mkdir(parents=True)
    (root / "wikitext2").mkdir()
    (root / "c4" / "validation_2k.jsonl").write_text(jsonl.read_text())
    (root / "wikitext2" / "test.txt").write_text(txt.read_text())
    monkeypatch.setenv(DATA_ENV, str(root))
    assert calib.data_dir() == root
    assert torch.equal(calibration_data(tok, "c4", 4, 32, seed=5),
                       calibration_data(tok, jsonl, 4, 32, seed=5))
    assert torch.equal(calibration_data(tok, "wikitext2", 4, 32, seed=5),
                       calibration_data(tok, txt, 4, 32, seed=5))


def test_shared_c4_default(tok, data_dir, monkeypatch):
    monkeypatch.delenv(DATA_ENV, raising=False)
    assert str(calib.data_dir()) == data_dir
    docs, stream = load_documents("c4")
    assert len(docs) == 2000 and not stream
    x = calibration_data(tok, "c4", n_samples=3, seq_len=128, seed=0)
    assert x.shape == (3, 128)
    assert 1 <= int(x.min()) and int(x.max()) < len(tok)


def test_too_short_text_errors(tok, tmp_path):
    short = tmp_path / "short.jsonl"
    short.write_text("".join(json.dumps({"text": _doc(5, i)}) + "\n" for i in range(4)))
    with pytest.raises(GradmapError, match=r"no document .* longer than seq_len=64.*smaller seq_len"):
        calibration_data(tok, short, n_samples=2, seq_len=64)
    txt = tmp_path / "short.txt"
    txt.write_text("tiny text")
    with pytest.raises(GradmapError, match=r"too few for windows of seq_len=64"):
        calibration_data(tok, txt, n_samples=2, seq_len=64)


@pytest.mark.parametrize("kwargs, match", [
    (dict(source="nope.jsonl"), "neither a file nor one of the names"),
    (dict(source="c4", n_samples=0), "n_samples must be a positive integer"),
    (dict(source="c4", seq_len=-1), "seq_len must be a positive integer"),
])
def test_bad_arguments(tok, kwargs, match):
    with pytest.raises(GradmapError, match=match):
        calibration_data(tok, **kwargs)


def test_bad_files(tok, tmp_path, monkeypatch):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"body": "x"}\n')
    with pytest.raises(GradmapError, match="no string field 'text'"):
        calibration_data(tok, bad)
    csv = tmp_path / "x.csv"
    csv.write_text("a,b\n")
    with pytest.raises(GradmapError, match="suffix '.csv'"):
        calibration_data(tok, csv)
    monkeypatch.setenv(DATA_ENV, str(tmp_path / "missing"))
    with pytest.raises(GradmapError, match="not a directory"):
        calib.data_dir()
    monkeypatch.setenv(DATA_ENV, str(tmp_path))
    with pytest.raises(GradmapError, match=r"c4/validation_2k.jsonl.*missing"):
        calibration_data(tok, "c4")
