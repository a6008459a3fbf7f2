"""Missing evaluation data is one line before any work (issue 29): which file, where it was looked
for, how to point at it; no hub retry storm when the hub cannot be reached, no traceback."""
import re
import socket
from pathlib import Path

import pytest

import gradmap.cli.eval as cli_eval
import gradmap.core.calibration as calibration
import gradmap.core.models as models
from gradmap.cli.app import main
from gradmap.core.errors import GradmapError

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def no_data(tmp_path, monkeypatch):
    """No $GRADMAP_DATA_DIR, no ../shared/data, and a hub that refuses every connection."""
    monkeypatch.delenv(calibration.DATA_ENV, raising=False)
    monkeypatch.setattr(calibration, "DEFAULT_DATA_DIR", tmp_path / "no-shared-data")
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(calibration, "_hub_answers", {})
    connects = []

    def refuse(address, timeout=None, *args, **kwargs):
        connects.append((address, timeout))
        raise OSError("network is unreachable")

    monkeypatch.setattr(socket, "create_connection", refuse)

    def no_hub(*args, **kwargs):
        raise AssertionError("the hub was asked although it is unreachable")

    monkeypatch.setattr(calibration, "_load_from_hub", no_hub)
    return connects


@pytest.fixture
def no_model_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr(models, "load_model", refuse)
    monkeypatch.setattr(cli_eval, "load_model", refuse)


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def test_compare_without_data_or_hub_is_one_line_before_loading(no_data, no_model_load, tmp_path, capsys):
    rc = main(["compare", "--model", "smollm2-135m", "--n-prune", "2", "--out", str(tmp_path / "o")])
    err = _one_line_error(capsys)
    assert rc == 2 and "c4/validation_2k.jsonl" in err and "GRADMAP_DATA_DIR=" in err
    assert "hub is unreachable" in err
    assert len(no_data) == 1 and no_data[0][1] <= 5  # one short connect, no retries


def test_eval_names_the_missing_task_file_before_loading(no_model_load, tmp_path, monkeypatch, capsys):
    (tmp_path / "wikitext2").mkdir()
    (tmp_path / "wikitext2" / "test.txt").write_text("some text\n")
    monkeypatch.setenv(calibration.DATA_ENV, str(tmp_path))
    assert main(["eval", "--model", "tiny", "--tasks", "piqa"]) == 2
    err = _one_line_error(capsys)
    assert "tasks/piqa_validation.jsonl" in err and "GRADMAP_DATA_DIR" in err


def test_tasks_without_any_data_folder_say_how_to_point_at_one(no_data, no_model_load, capsys):
    assert main(["eval", "--model", "tiny", "--ppl", "text:hello there", "--tasks", "boolq"]) == 2
    err = _one_line_error(capsys)
    assert "tasks/boolq_validation.jsonl" in err and "GRADMAP_DATA_DIR=" in err


def test_calibration_without_data_or_hub_never_calls_the_hub(no_data):
    from tiny_tokenizer import tiny_tokenizer

    with pytest.raises(GradmapError, match=r"c4/validation_2k.jsonl.*unreachable.*GRADMAP_DATA_DIR="):
        calibration.calibration_data(tiny_tokenizer(), "c4", n_samples=1, seq_len=8)


def test_offline_variable_answers_without_a_connection(no_data, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert calibration.hub_reachable() is False
    assert no_data == []


def test_a_failing_hub_download_is_one_line(no_data, monkeypatch):
    monkeypatch.setattr(calibration, "hub_reachable", lambda timeout=0: True)

    def fail(name, split):
        raise ConnectionError("Couldn't reach 'allenai/c4' on the Hub (LocalEntryNotFoundError)\nsecond line")

    monkeypatch.setattr(calibration, "_load_from_hub", fail)
    with pytest.raises(GradmapError) as info:
        calibration.load_documents("c4")
    assert "\n" not in str(info.value) and "Couldn't reach" in str(info.value)
    assert "GRADMAP_DATA_DIR" in str(info.value)


def test_demo_checks_every_file_it_reads_before_setup():
    """.ci/demo checks the data before `.ci/setup`, and its list is the files gradmap reads."""
    from gradmap.evaluate.tasks import TASKS

    demo = (ROOT / ".ci" / "demo").read_text()
    assert demo.index("GRADMAP_DATA_DIR") < demo.index("bash .ci/setup")
    listed = set(re.findall(r"^\s+((?:c4|wikitext2|tasks)/\S+)", demo, re.M))
    wanted = {calibration.NAMED_SOURCES["c4"], calibration.NAMED_SOURCES["wikitext2"]}
    wanted |= {f for spec in TASKS.values() for f in (spec.file, spec.labels_file) if f}
    assert listed == wanted
