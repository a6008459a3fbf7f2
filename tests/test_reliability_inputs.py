"""Inputs that used to give a silent wrong result: layer indices, eval data names, config lists."""
import numpy as np
import pytest
import torch

from gradmap import GradmapError, original_layer_ids, remove_layers
from gradmap.core.surgery import per_layer_config
from gradmap.evaluate.perplexity import load_text
from tiny import tiny_model


@pytest.mark.parametrize("bad", [[1.7], [1.0], [True], [False], ["1"], "12", b"12", 3, [None],
                                 [torch.tensor(1.5)]])
def test_remove_layers_refuses_non_integer_indices_and_keeps_the_model(bad):
    model = tiny_model("llama", 4)
    with pytest.raises(GradmapError, match="must be (a list of )?integers"):
        remove_layers(model, bad)
    assert original_layer_ids(model) == [0, 1, 2, 3] and model.config.num_hidden_layers == 4


@pytest.mark.parametrize("index", [np.int64(2), torch.tensor(2), 2])
def test_remove_layers_accepts_integer_types(index):
    model = tiny_model("llama", 4)
    assert remove_layers(model, [index]) == [0, 1, 3]


def test_list_that_merely_has_one_entry_per_layer_is_not_trimmed():
    model = tiny_model("gemma2", 4)
    model.config.eos_token_id = [2, 3, 4, 5]
    model.config.my_custom_list = ["a", "b", "c", "d"]
    remove_layers(model, [1])
    assert model.config.eos_token_id == [2, 3, 4, 5]
    assert model.config.my_custom_list == ["a", "b", "c", "d"]
    assert len(model.config.layer_types) == 3  # the real per-layer field is trimmed
    assert set(per_layer_config(model.config, 3)) == {"layer_types"}


def test_generic_per_layer_names_are_trimmed():
    model = tiny_model("llama", 4)
    model.config.no_rope_layers = [1, 0, 1, 0]
    remove_layers(model, [0])
    assert model.config.no_rope_layers == [0, 1, 0]


@pytest.mark.parametrize("typo", ["wikitxt2", "c5", "data/missing.txt", "some words here"])
def test_perplexity_data_that_is_no_name_and_no_file_is_an_error(typo):
    with pytest.raises(GradmapError, match="neither one of .* nor an existing"):
        load_text(typo)


def test_literal_text_must_be_asked_for(tmp_path):
    assert load_text("text:wikitxt2") == ("wikitxt2", "<text: 8 chars>")
    assert load_text("line one\nline two")[0] == "line one\nline two"
    with pytest.raises(GradmapError, match="empty"):
        load_text("text:")
    f = tmp_path / "t.txt"
    f.write_text("hello")
    assert load_text(str(f)) == ("hello", str(f))


def test_non_utf8_calibration_text_is_one_clear_error(tmp_path):
    from gradmap.core.calibration import calibration_data
    from tiny_tokenizer import tiny_tokenizer
    f = tmp_path / "latin1.txt"
    f.write_bytes("caf\xe9 au lait ".encode("latin-1") * 50)
    with pytest.raises(GradmapError, match="is not UTF-8 text"):
        calibration_data(tiny_tokenizer(), str(f), 2, 8)
