"""Every import in README.md's Python blocks, every `gradmap.<name>` and every repository path it
mentions resolves: a move of a module cannot leave the README pointing nowhere."""
from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


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
    names = set(re.findall(r"`(gradmap(?:\.[A-Za-z_][A-Za-z0-9_]*)+)", README.read_text()))
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
    root = README.parent
    paths = set(re.findall(r"`((?:gradmap|tests|bench|kernels|csrc|\.ci)/[A-Za-z0-9_./-]*)`", README.read_text()))
    assert len(paths) > 10
    assert sorted(p for p in paths if not (root / p).exists()) == []
