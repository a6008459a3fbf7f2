"""The package's architecture, checked from source with `ast` (function-level imports included):
no import cycles, no private names imported across modules, every import points to the same or a
lower layer, and no module over 400 lines."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "gradmap"
# lower number = lower layer; a module may import only from its own layer or below
LAYERS = {"version": 0, "core": 0, "ops": 1, "runtime": 2, "prune": 3, "healing": 3, "sparsity": 3, "evaluate": 3,
          "api": 4, "cli": 5, "experiments": 5, "__main__": 5}
MAX_LINES = 400


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _is_extension(module: str) -> bool:
    """A compiled extension module of the package (e.g. gradmap._C built by setup.py)."""
    folder = PACKAGE.parent.joinpath(*module.split(".")[:-1])
    leaf = module.split(".")[-1]
    # gradmap._C is declared in setup.py; it may be absent where no compiler was found
    return module == "gradmap._C" or any(folder.glob(leaf + ".*.so")) or any(folder.glob(leaf + ".*.pyd"))


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for n in ast.walk(node))
    return skip


def _imports(name: str, path: Path, modules: dict[str, Path]):
    """(target module, imported name or None, line) for every gradmap import in the module."""
    tree = ast.parse(path.read_text())
    skip = _type_checking_nodes(tree)
    is_pkg = path.name == "__init__.py"
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "gradmap":
                    yield a.name, None, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = name.split(".") if is_pkg else name.split(".")[:-1]
                pkg = pkg[:len(pkg) - node.level + 1]
                base = ".".join(pkg + ([node.module] if node.module else []))
            if base.split(".")[0] != "gradmap":
                continue
            for a in node.names:
                sub = f"{base}.{a.name}"
                if sub in modules or _is_extension(sub):
                    yield sub, None, node.lineno
                else:
                    yield base, a.name, node.lineno


def _graph():
    modules = _modules()
    edges, private = {}, []
    for name, path in modules.items():
        edges[name] = set()
        for target, imported, line in _imports(name, path, modules):
            if target not in modules:
                continue
            if target != name:
                edges[name].add(target)
            if imported and imported.startswith("_") and not imported.startswith("__"):
                private.append(f"{name}:{line} imports {imported} from {target}")
    return modules, edges, private


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in edges:
        if v not in index:
            visit(v)
    return out


def _layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.get(parts[1]) if len(parts) > 1 else None


def test_no_import_cycles():
    _, edges, _ = _graph()
    assert _cycles(edges) == []


def test_no_private_names_imported_across_modules():
    _, _, private = _graph()
    assert private == []


def test_imports_point_down_the_layers():
    _, edges, _ = _graph()
    bad = [f"{src} -> {dst}" for src, targets in edges.items() for dst in targets
           if _layer(src) is not None and _layer(dst) is not None and _layer(dst) > _layer(src)]
    assert bad == []


def test_every_module_belongs_to_a_layer():
    modules, _, _ = _graph()
    assert [m for m in modules if m != "gradmap" and _layer(m) is None] == []


def test_no_module_over_400_lines():
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_the_checker_sees_cycles_and_private_imports():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_import_gradmap_is_light_and_submodules_load_on_use():
    import subprocess
    import sys
    code = ("import sys, gradmap\n"
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import'\n"
            "assert callable(gradmap.evaluate.perplexity) and callable(gradmap.fast_prune)\n"
            "from gradmap.api import GradMAP, Magnitude, Projection\n"
            "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
