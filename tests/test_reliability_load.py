"""Model loading fails in one clear line, fast, and without a hub request for local paths."""
import time
from pathlib import Path

import pytest
import torch

from gradmap import GradmapError, load_model
from gradmap.core.model_checks import check_device, check_dtype, gguf_metadata
from gradmap.core.models import model_layer_ids, resolve_model_path
from tiny import tiny_model
from tiny_tokenizer import tiny_tokenizer


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    d = tmp_path_factory.mktemp("load") / "m"
    tiny_model("llama", 4).save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    return d


@pytest.fixture
def no_hub(monkeypatch):
    import huggingface_hub

    def refuse(*a, **k):
        raise AssertionError("a hub request was made for a local path")
    monkeypatch.setattr(huggingface_hub, "model_info", refuse)


@pytest.mark.parametrize("name", ["./missing-model", "/nonexistent/model", "~/nope/m", "a/b/c",
                                  "runs\\x", "missing.safetensors", "model dir"])
def test_missing_local_path_is_one_line_without_the_hub(name, no_hub):
    with pytest.raises(GradmapError, match="does not exist"):
        load_model(name)


def test_hub_like_typo_fails_fast(monkeypatch):
    """With no network this used to take ~56 s of retries; it is one request now."""
    start = time.perf_counter()
    with pytest.raises(GradmapError, match="not a model on the Hugging Face hub|cannot be reached"):
        load_model("gradmap-tests/no-such-model-xyz")
    assert time.perf_counter() - start < 15


def test_hub_id_in_offline_mode_says_so(monkeypatch, no_hub):
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(GradmapError, match="HF_HUB_OFFLINE is set"):
        load_model("gradmap-tests/no-such-model-xyz")


def test_truncated_safetensors(saved, tmp_path, no_hub):
    import shutil
    d = tmp_path / "m"
    shutil.copytree(saved, d)
    w = d / "model.safetensors"
    w.write_bytes(w.read_bytes()[:-1000])
    with pytest.raises(GradmapError, match="truncated"):
        load_model(str(d))
    w.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......")
    with pytest.raises(GradmapError, match="corrupt header"):
        load_model(str(d))


def test_folder_with_config_but_no_weights(saved, tmp_path, no_hub):
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text((saved / "config.json").read_text())
    with pytest.raises(GradmapError, match="no weights"):
        load_model(str(d))


def test_random_and_truncated_gguf(tmp_path, no_hub):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(GradmapError, match="not a GGUF file"):
        load_model(str(junk))
    src, name = resolve_model_path("smollm2-135m")
    cut = tmp_path / "cut.gguf"
    with open(f"{src}/{name}", "rb") as f:
        cut.write_bytes(f.read(5000))  # ends inside the key/value header
    start = time.perf_counter()
    with pytest.raises(GradmapError, match="truncated"):
        load_model(str(cut))
    assert time.perf_counter() - start < 5
    corrupt = tmp_path / "corrupt.gguf"  # a key length of 2**62: refused, not a MemoryError
    corrupt.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + bytes(8) + (1).to_bytes(8, "little")
                        + (2 ** 62).to_bytes(8, "little") + bytes(64))
    with pytest.raises(GradmapError, match="truncated or corrupt"):
        load_model(str(corrupt))


def test_gguf_truncated_in_the_weights_is_one_clear_error(tmp_path):
    src, name = resolve_model_path("smollm2-135m")
    cut = tmp_path / "half.gguf"
    with open(f"{src}/{name}", "rb") as f:
        cut.write_bytes(f.read(40_000_000))
    with pytest.raises(GradmapError, match="cannot load model .*download them again"):
        load_model(str(cut))


def test_layer_count_is_read_without_loading(saved):
    assert model_layer_ids(str(saved)) == [0, 1, 2, 3]
    assert model_layer_ids("smollm2-135m") == list(range(30))
    src, name = resolve_model_path("smollm2-135m")
    assert gguf_metadata(f"{src}/{name}", stop_at="general.architecture")["general.architecture"] == "llama"


@pytest.mark.parametrize("dtype", ["foo", "float8", "int8", torch.int64, 3])
def test_bad_dtype_is_refused_before_loading(dtype, saved):
    with pytest.raises(GradmapError, match="dtype .* is not supported"):
        load_model(str(saved), dtype=dtype)


def test_good_dtypes():
    assert check_dtype("bfloat16") is torch.bfloat16 and check_dtype(None) is None
    assert check_dtype(torch.float16) is torch.float16


@pytest.mark.parametrize("device,match", [("tpu", "not a device|not supported"),
                                          ("meta", "not supported"), ("cuda:x", "not a device")])
def test_bad_device_names(device, match):
    with pytest.raises(GradmapError, match=match):
        check_device(device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_cuda_without_a_gpu_is_refused_before_loading(saved):
    with pytest.raises(GradmapError, match="no CUDA GPU is available"):
        load_model(str(saved), device="cuda")


def test_cuda_index_beyond_the_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(GradmapError, match="has 1 CUDA GPU"):
        check_device("cuda:7")
    assert check_device("cuda:0") == "cuda:0"


@pytest.mark.slow
def test_gguf_name_is_not_saved_as_model_name(smollm2):
    model, _ = smollm2
    assert "_model_name_or_path" not in model.config.to_json_string()


def test_checkpoint_missing_a_tensor_is_refused(saved, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file
    d = tmp_path / "m"
    shutil.copytree(saved, d)
    weights = load_file(d / "model.safetensors")
    del weights["model.layers.0.self_attn.q_proj.weight"]  # used to load with a random tensor
    save_file(weights, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(GradmapError, match=r"lack tensors \(1, e.g. model.layers.0.self_attn.q_proj"):
        load_model(str(d))


@pytest.mark.parametrize("config,match", [("[]", "holds a JSON list"),
                                          ('{"model_type": "llama", "num_hidden_layers": 1e12}',
                                           "num_hidden_layers is 1000000000000.0, not an integer"),
                                          ("{not json", "is not valid JSON")])
def test_malformed_config_is_one_line_before_any_weights(saved, tmp_path, config, match):
    import shutil
    d = tmp_path / "m"
    shutil.copytree(saved, d)
    (d / "config.json").write_text(config)
    with pytest.raises(GradmapError, match=match):
        model_layer_ids(str(d))


def test_gguf_through_a_symlink_resolves_to_its_target(tmp_path):
    from gguf import GGUFWriter
    blob = tmp_path / "blobs" / "abc123"  # as in the HF cache: a content-named file
    blob.parent.mkdir()
    w = GGUFWriter(blob, "llama")
    w.add_block_count(2)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    link = tmp_path / "snap" / "model.gguf"
    link.parent.mkdir()
    link.symlink_to(blob)
    folder, name = resolve_model_path(str(link))
    assert Path(folder, name) == blob  # was the link's name in the target's folder: a missing file


class _RunsCodeWhenUnpickled:
    """Unpickling this calls open(marker, "w"): the file exists afterwards iff code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_bin_weights_are_one_line_and_never_run(saved, tmp_path, capsys, no_hub):
    from gradmap.cli.app import main
    d = tmp_path / "m"
    d.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (d / name).write_bytes((saved / name).read_bytes())
    marker = tmp_path / "code-ran"
    weights = {"model.embed_tokens.weight": _RunsCodeWhenUnpickled(marker)}
    torch.save(weights, d / "pytorch_model.bin")  # a pickle .bin, no safetensors
    with pytest.raises(GradmapError, match="hold objects other than tensors") as info:
        load_model(str(d))
    assert "\n" not in str(info.value)
    assert main(["eval", "--model", str(d), "--ppl", "text:" + "a b c " * 50]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert not marker.exists()
