"""Zero-shot task builders: each example as lm-evaluation-harness (v0.4 task YAMLs) builds it.

An `Example` is a list of `(context, continuation)` requests, one per choice, the gold index and,
for `acc_norm`, the character length of each choice text (without the added leading space).
The continuation carries lm-eval's `target_delimiter` `" "`.  WinoGrande is the exception
(partial scoring): the option is part of each context and the continuation is shared.

`TASK_NAMES` are the seven multiple-choice tasks of the usual average.  `PROBE_NAMES` are
scored apart from it: LAMBADA (`lambada_openai`, one request per text, right when the
continuation is the greedy prediction; `gradmap/evaluate/lambada.py`).  `"all"` names both.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from gradmap.core.calibration import DATA_ENV, data_dir, missing_data_message
from gradmap.core.errors import GradmapError

__all__ = ["Example", "TaskSpec", "TASKS", "TASK_NAMES", "PROBE_NAMES", "build_examples",
           "resolve_tasks", "check_task_files", "hellaswag_preprocess"]

DELIM = " "  # lm-eval's default target_delimiter between context and continuation


@dataclass(frozen=True)
class Example:
    """One multiple-choice item: `requests[i] = (context, continuation)` scores choice `i`."""

    requests: tuple[tuple[str, str], ...]
    gold: int
    choice_chars: tuple[int, ...]  # len(choice text) per choice, the acc_norm divisor


@dataclass(frozen=True)
class TaskSpec:
    """Where a task's data lives and how an example is built from one row."""

    name: str
    file: str                    # relative to the data dir
    build: Callable[[dict], Example]
    metrics: tuple[str, ...]     # metrics lm-eval reports for the task
    average_metric: str          # the metric the seven-task average uses
    hub: str                     # where a user with network access gets the raw data
    labels_file: str | None = None
    greedy: bool = False         # scored by greedy match and perplexity, outside the average


def _choices(context: str, choices: list[str], gold: int) -> Example:
    return Example(requests=tuple((context, DELIM + c) for c in choices), gold=gold,
                   choice_chars=tuple(len(c) for c in choices))


def _boolq(row: dict) -> Example:
    context = f"{row['passage']}\nQuestion: {row['question']}?\nAnswer:"
    return _choices(context, ["no", "yes"], int(row["label"]))


def _piqa(row: dict) -> Example:
    return _choices(f"Question: {row['goal']}\nAnswer:", [row["sol1"], row["sol2"]],
                    int(row["label"]))


def hellaswag_preprocess(text: str) -> str:
    """lm-eval's HellaSwag cleaner: strip, " [title]" -> ". ", drop [...] spans, "  " -> " "."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(row: dict) -> Example:
    # str.capitalize() also lower-cases the rest of ctx_b; lm-eval does the same
    ctx = row["ctx_a"] + " " + row["ctx_b"].capitalize()
    context = hellaswag_preprocess(row["activity_label"] + ": " + ctx)
    return _choices(context, [hellaswag_preprocess(e) for e in row["endings"]], int(row["label"]))


def _winogrande(row: dict) -> Example:
    sentence = row["sentence"]
    idx = sentence.index("_")
    continuation = DELIM + sentence[idx + 1:].strip()
    options = [row["option1"], row["option2"]]
    contexts = [sentence[:idx] + option for option in options]
    return Example(requests=tuple((c, continuation) for c in contexts),
                   gold={"1": 0, "2": 1}[str(row["answer"])],
                   choice_chars=tuple(len(c) for c in contexts))


def _arc(row: dict) -> Example:
    return _choices(f"Question: {row['question']}\nAnswer:", list(row["choices"]), int(row["gold"]))


def _openbookqa(row: dict) -> Example:
    return _choices(row["question_stem"], list(row["choices"]), int(row["gold"]))


def _lambada(row: dict) -> Example:
    # lm-eval lambada_openai: doc_to_text = all words but the last, doc_to_target = " " + last
    context, word = row["text"].rsplit(" ", 1)
    return Example(requests=((context, DELIM + word),), gold=0, choice_chars=(len(word),))


TASKS: dict[str, TaskSpec] = {
    "boolq": TaskSpec("boolq", "tasks/boolq_validation.jsonl", _boolq, ("acc",), "acc",
                      "super_glue/boolq (validation)"),
    "piqa": TaskSpec("piqa", "tasks/piqa_validation.jsonl", _piqa, ("acc", "acc_norm"), "acc",
                     "piqa (validation)", labels_file="tasks/piqa_validation_labels.lst"),
    "hellaswag": TaskSpec("hellaswag", "tasks/hellaswag_validation.jsonl", _hellaswag,
                          ("acc", "acc_norm"), "acc_norm", "hellaswag (validation)"),
    "winogrande": TaskSpec("winogrande", "tasks/winogrande_validation.jsonl", _winogrande,
                           ("acc",), "acc", "winogrande winogrande_xl (validation)"),
    "arc_easy": TaskSpec("arc_easy", "tasks/arc_easy_test.jsonl", _arc, ("acc", "acc_norm"), "acc",
                         "ai2_arc ARC-Easy (test)"),
    "arc_challenge": TaskSpec("arc_challenge", "tasks/arc_challenge_test.jsonl", _arc,
                              ("acc", "acc_norm"), "acc_norm", "ai2_arc ARC-Challenge (test)"),
    "openbookqa": TaskSpec("openbookqa", "tasks/openbookqa_test.jsonl", _openbookqa,
                           ("acc", "acc_norm"), "acc_norm", "openbookqa main (test)"),
    "lambada_openai": TaskSpec("lambada_openai", "tasks/lambada_openai_test.jsonl", _lambada,
                               ("acc", "ppl"), "acc", "EleutherAI/lambada_openai (test)",
                               greedy=True),
}
PROBE_NAMES = tuple(name for name, spec in TASKS.items() if spec.greedy)
TASK_NAMES = tuple(name for name in TASKS if name not in PROBE_NAMES)  # the average's seven


def resolve_tasks(tasks: str | list[str] | tuple[str, ...]) -> list[str]:
    """`"all"`, a comma-separated string or a list -> validated task names (order kept).

    `"all"` is the seven multiple-choice tasks and LAMBADA; it may appear inside a list too.
    """
    if isinstance(tasks, str):
        tasks = tasks.split(",")
    names = [n for t in tasks if t.strip()
             for n in ((*TASK_NAMES, *PROBE_NAMES) if t.strip() == "all" else (t.strip(),))]
    if not names:
        raise GradmapError(f"no zero-shot task given; pick from {', '.join(TASKS)} or 'all'")
    unknown = [t for t in names if t not in TASKS]
    if unknown:
        raise GradmapError(f"unknown zero-shot task(s) {', '.join(map(repr, unknown))}; valid tasks: "
                           f"{', '.join(TASKS)} (or 'all')")
    return list(dict.fromkeys(names))


def _task_file(spec: TaskSpec, rel: str, root: Path | None) -> Path:
    if root is None:  # the task files are only ever read locally: no hub fallback
        raise GradmapError(missing_data_message(rel, f"zero-shot task {spec.name!r}"))
    path = root / rel
    if not path.is_file():
        raise GradmapError(
            f"data file {str(path)!r} for task {spec.name!r} is missing; restore it in the shared "
            f"data dir or set ${DATA_ENV} to a folder holding {rel} (built from the Hugging Face "
            f"dataset {spec.hub}; layout: docs/data.md)")
    return path


def check_task_files(tasks: str | list[str] | tuple[str, ...], root: Path | None = None) -> list[str]:
    """Resolve `tasks` and check every file they read exists; the names, before any model loads."""
    names = resolve_tasks(tasks)
    root = data_dir() if root is None else Path(root)
    for name in names:
        spec = TASKS[name]
        for rel in (spec.file, spec.labels_file):
            if rel is not None:
                _task_file(spec, rel, root)
    return names


def _rows(path: Path, limit: int | None) -> Iterator[dict]:
    with path.open(encoding="utf-8") as f:
        n = 0
        for line in f:
            if limit is not None and n >= limit:
                return
            if line.strip():
                n += 1
                yield json.loads(line)


def build_examples(task: str, limit: int | None = None, root: Path | None = None) -> list[Example]:
    """The first `limit` examples (all when None) of `task`, built as lm-eval builds them."""
    spec = TASKS[resolve_tasks([task])[0]]
    root = data_dir() if root is None else Path(root)
    path = _task_file(spec, spec.file, root)
    rows = list(_rows(path, limit))
    if spec.labels_file is not None:
        labels_path = _task_file(spec, spec.labels_file, root)
        labels = [ln.strip() for ln in labels_path.read_text(encoding="utf-8").splitlines()
                  if ln.strip()]
        if len(labels) < len(rows):
            raise GradmapError(f"{labels_path} has {len(labels)} labels for {len(rows)} rows of "
                               f"{path}; restore both files from the same release")
        rows = [dict(row, label=int(lab)) for row, lab in zip(rows, labels)]
    return [spec.build(row) for row in rows]
