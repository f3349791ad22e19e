"""docs/reliability.md names, for each promise, the tests that hold it: each must exist (a test
function of that file, or a case of a parametrized catalogue), so the doc cannot point at a test
that was renamed or never written."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "reliability.md"
REFERENCE = re.compile(r"tests/(test_\w+\.py)::(\w+)(?:\[([\w.-]+)\])?")


def named_tests() -> list[tuple[str, str, str | None]]:
    return [(file, name, case or None) for file, name, case in REFERENCE.findall(DOC.read_text())]


def defined_tests(file: str) -> set[str]:
    tree = ast.parse((REPO / "tests" / file).read_text())
    return {node.name for node in tree.body if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")}


def catalogue_cases(file: str) -> set[str]:
    return set(importlib.import_module(file[:-3]).CASES)


def test_every_test_the_reliability_doc_names_exists():
    named = named_tests()
    assert len(named) >= 60  # the promises table, each promise with its tests
    missing = []
    for file, name, case in named:
        if not (REPO / "tests" / file).is_file() or name not in defined_tests(file):
            missing.append(f"tests/{file}::{name}")
        elif case is not None and case not in catalogue_cases(file):
            missing.append(f"tests/{file}::{name}[{case}]")
    assert not missing, missing


def test_every_promise_row_names_a_test():
    rows = [line for line in DOC.read_text().splitlines() if line.startswith("| ") and not line.startswith("| ---")]
    promises = rows[1:]  # after the header
    assert len(promises) >= 20
    assert all(REFERENCE.search(row.split(" | ")[-1]) for row in promises), [r for r in promises
                                                                             if not REFERENCE.search(r)]
