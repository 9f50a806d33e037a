"""RELIABILITY.md's table is only worth what its tests check: every test it names must exist."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent


def _test_names(module: Path) -> set[str]:
    tree = ast.parse(module.read_text(encoding="utf-8"))
    return {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")}


def _cited_tests(doc: str) -> list[tuple[str, str]]:
    """(file, test-name prefix) for every `file.py::name` and following `, ::name` in the table."""
    cited = []
    for row in doc.splitlines():
        if not row.startswith("| ") or "::" not in row:
            continue
        cell = row.rstrip(" |").rsplit("|", 1)[-1]
        module = None
        for part in (p.strip() for p in cell.split(",")):
            m = re.match(r"(?:(test_\w+\.py))?::(test_\w+)", part)
            if not m:
                continue
            module = m.group(1) or module
            cited.append((module, m.group(2)))
    return cited


def test_every_test_named_in_reliability_md_exists():
    cited = _cited_tests((ROOT / "RELIABILITY.md").read_text(encoding="utf-8"))
    assert len(cited) >= 30
    missing = []
    for module, name in cited:
        path = HERE / module
        names = _test_names(path) if path.is_file() else set()
        if not any(n == name or n.startswith(name) for n in names):
            missing.append(f"{module}::{name}")
    assert not missing, f"RELIABILITY.md names tests that do not exist: {missing}"
