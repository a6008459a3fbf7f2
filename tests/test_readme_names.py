"""Every import in the README's and docs/'s Python blocks, every `gradmap.<name>` and every
repository path they mention resolves, and every link between them leads to a file: a move of a
module cannot leave the documentation pointing nowhere."""
from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]


def _text() -> str:
    return "\n".join(p.read_text() for p in DOCS)


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", _text(), re.S)


def test_readme_python_imports_resolve():
    seen = 0
    for block in _python_blocks():
        for node in ast.walk(ast.parse(block)):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("gradmap"):
                module = importlib.import_module(node.module)
                for alias in node.names:
                    assert hasattr(module, alias.name), f"README: from {node.module} import {alias.name}"
                    seen += 1
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    importlib.import_module(alias.name)
    assert seen >= 5


def test_readme_dotted_gradmap_names_resolve():
    names = set(re.findall(r"`(gradmap(?:\.[A-Za-z_][A-Za-z0-9_]*)+)", _text()))
    assert len(names) >= 5
    missing = []
    for name in sorted(names):
        parts = name.split(".")
        for cut in range(len(parts), 0, -1):  # the longest importable prefix, then attributes
            try:
                obj = importlib.import_module(".".join(parts[:cut]))
                break
            except ModuleNotFoundError:
                continue
        try:
            for attr in parts[cut:]:
                obj = getattr(obj, attr)
        except AttributeError:
            missing.append(name)
    assert missing == []


def test_readme_file_paths_exist():
    paths = set(re.findall(r"`((?:gradmap|tests|bench|kernels|csrc|\.ci|docs)/[A-Za-z0-9_./-]*)`", _text()))
    assert len(paths) > 10
    assert sorted(p for p in paths if not (ROOT / p).exists()) == []


def test_markdown_links_between_readme_and_docs_resolve():
    broken = []
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", doc.read_text()):
            if "://" not in target and not (doc.parent / target).exists():
                broken.append(f"{doc.name}: {target}")
    assert broken == []
    assert all(f"(docs/{p.name})" in README.read_text() for p in DOCS[1:]), "README links every doc"


def test_readme_is_short_and_says_no_internal_words():
    text = README.read_text()
    assert len(text.splitlines()) <= 250
    assert not re.search(r"\b(issue \d+|this stop|stop \d+)\b", text, re.I)
