"""The shape of src/ that issue 22 asks to keep: short functions and no import cycle between modules.

Module-level imports only: an import inside a function is how craken keeps `craken --help` fast, and runs
when the function does, after both modules have loaded.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src" / "craken_cli"
LONGEST_FUNCTION = 80


def modules() -> dict[str, ast.Module]:
    found = {}
    for path in sorted(SRC.rglob("*.py")):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = ast.parse(path.read_text(), filename=str(path))
    return found


def test_no_function_is_longer_than_80_lines():
    long = [f"{name}.{node.name}: {node.end_lineno - node.lineno + 1} lines"
            for name, tree in modules().items() for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > LONGEST_FUNCTION]
    assert not long, long


def imported_at_module_level(name: str, tree: ast.Module, known: set[str]) -> set[str]:
    package = name if any(k.startswith(name + ".") for k in known) else name.rpartition(".")[0]
    targets = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            targets |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets |= {f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names}
    return {t for t in targets if t in known and t != name}


def test_no_import_cycle_between_modules():
    trees = modules()
    graph = {name: imported_at_module_level(name, tree, set(trees)) for name, tree in trees.items()}
    cycles, state = [], {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, cycles


def test_the_cycle_finder_finds_a_cycle(tmp_path):
    """The check above can fail: two modules importing each other at module level are a cycle."""
    a = ast.parse("from . import b\n")
    b = ast.parse("from .a import thing\n")
    known = {"pkg", "pkg.a", "pkg.b"}
    assert imported_at_module_level("pkg.a", a, known) == {"pkg.b"}
    assert imported_at_module_level("pkg.b", b, known) == {"pkg.a"}


def test_the_builtin_names_are_written_once():
    """One fact, one place: the built-in model's and data set's names are one constant each (config/spec.py)."""
    for name in ("builtin:tiny", "builtin:counting"):
        where = [module for module, tree in modules().items()
                 for node in ast.walk(tree) if isinstance(node, ast.Constant) and node.value == name]
        assert where == ["craken_cli.config.spec"], (name, where)


def _checks(node, checking: set[str]) -> bool:
    """An assert, a `with pytest.raises/warns`, pytest.fail/skip, a call of an assert_* function or of a
    helper (by name) that checks."""
    for n in ast.walk(node):
        if isinstance(n, ast.Assert):
            return True
        if isinstance(n, ast.Call):
            name = getattr(n.func, "attr", getattr(n.func, "id", ""))
            if name in {"raises", "warns", "fail", "skip"} or name.startswith("assert") or name in checking:
                return True
    return False


def test_every_test_checks_something():
    """A test with nothing that can fail passes whatever the code does (issue 22)."""
    trees = [ast.parse(p.read_text()) for p in sorted(Path(__file__).parent.glob("*.py"))]
    functions = [n for t in trees for n in ast.walk(t) if isinstance(n, ast.FunctionDef)]
    checking: set[str] = set()
    for _ in range(3):  # helpers calling helpers
        checking |= {f.name for f in functions if not f.name.startswith("test_") and _checks(f, checking)}
    silent = [f.name for f in functions if f.name.startswith("test_") and not _checks(f, checking)]
    assert silent == []
