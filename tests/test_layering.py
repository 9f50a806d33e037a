"""The import graph of wsi_pipeline/: the library never imports the stages, and no import loops.

Every .py under wsi_pipeline/ is parsed with `ast` (nothing is imported), relative imports are
resolved against the module's package, and `from pkg import name` counts as importing pkg.name when
that is a module (else pkg itself: the name comes from pkg's own code). Two rules:
  - no module of the library imports `stages` (at module level or inside a function): the stages
    wire the library, never the reverse. The one exception is the wiring layer itself, cli.py, the
    `wsi-pipeline` command built from the list of stages (shared/ARCHITECTURE.md's top layer).
  - no cycle among wsi_pipeline modules through module-level imports (what runs at import time;
    a loop there works only by import order), and, stricter, none through imports inside functions
    either (a loop there is two modules that each need the other: one of them is in the wrong place).
    A package's __init__ counts as importing nothing but what its own code imports.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parents[1] / "wsi_pipeline"
WIRING = {"wsi_pipeline.cli"}


def module_name(path: Path, root: Path) -> tuple[str, bool]:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    is_package = parts[-1] == "__init__"
    return ".".join(parts[:-1] if is_package else parts), is_package


def _top_level_nodes(tree: ast.Module):
    """Statements that run at import: the module body, into if/try/with blocks, not into defs."""
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        if isinstance(node, ast.ClassDef):  # a class body runs at import
            stack.extend(node.body)
            continue
        yield node
        stack.extend(ast.iter_child_nodes(node))


def imports_of(tree: ast.Module, module: str, is_package: bool, known: set[str], top_level_only: bool) -> set[str]:
    """The modules `module` imports (absolute names); with `top_level_only`, those run at import."""
    package = module if is_package else module.rpartition(".")[0]
    nodes = _top_level_nodes(tree) if top_level_only else ast.walk(tree)
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            submodules = {f"{target}.{alias.name}" for alias in node.names} & known
            found.update(submodules)  # `from . import tissue`: the submodule itself
            if len(submodules) < len(node.names):  # a name defined in the package/module's own code
                found.add(target)
    return found


def import_graph(root: Path = PACKAGE_ROOT, top_level_only: bool = True) -> dict[str, set[str]]:
    trees = {}
    for path in sorted(root.rglob("*.py")):
        name, is_package = module_name(path, root)
        trees[name] = (ast.parse(path.read_text(encoding="utf-8"), filename=str(path)), is_package)
    known = set(trees)
    graph = {}
    for name, (tree, is_package) in trees.items():
        targets = imports_of(tree, name, is_package, known, top_level_only)
        # importing a.b.c runs a/__init__ and a/b/__init__ too; an edge to the deepest known module
        # is enough for a loop, and the parents' own imports are their own nodes.
        graph[name] = {t for t in targets if t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None (iterative DFS, white/grey/black colouring)."""
    colour = {node: 0 for node in graph}
    for start in sorted(graph):
        if colour[start]:
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        colour[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                colour[path.pop()] = 2
                stack.pop()
                continue
            if nxt not in colour:
                continue  # outside the graph (numpy, stages, ...)
            if colour[nxt] == 1:
                return path[path.index(nxt):] + [nxt]
            if colour[nxt] == 0:
                colour[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph[nxt])))
    return None


def test_cycle_finder_finds_a_planted_cycle():
    graph = {"p.a": {"p.b"}, "p.b": {"p.c", "numpy"}, "p.c": {"p.a"}, "p.d": {"p.a"}}
    cycle = find_cycle(graph)
    assert cycle is not None and cycle[0] == cycle[-1] and set(cycle) == {"p.a", "p.b", "p.c"}
    assert find_cycle({"p.a": {"p.b"}, "p.b": {"p.c"}, "p.c": set(), "p.d": {"p.a", "p.c"}}) is None


def test_graph_resolves_relative_and_submodule_imports(tmp_path):
    root = tmp_path / "lib"
    (root / "sub").mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / "sub" / "__init__.py").write_text("from . import leaf\n")
    (root / "sub" / "leaf.py").write_text("from ..base import x\n\ndef late():\n    import stages\n")
    (root / "base.py").write_text("from .sub.leaf import y\n")
    graph = import_graph(root)
    assert graph["lib.sub"] == {"lib.sub.leaf"}
    assert graph["lib.sub.leaf"] == {"lib.base"}
    assert find_cycle(graph) in (["lib.base", "lib.sub.leaf", "lib.base"], ["lib.sub.leaf", "lib.base", "lib.sub.leaf"])
    assert "stages" in import_graph(root, top_level_only=False)["lib.sub.leaf"]


def test_library_never_imports_the_stages():
    graph = import_graph(top_level_only=False)
    offenders = sorted(f"{module} imports {target}" for module, targets in graph.items() if module not in WIRING
                       for target in targets if target == "stages" or target.startswith("stages."))
    assert not offenders, "the library reaches up into the stages:\n" + "\n".join(offenders)


def test_no_import_cycles_at_module_level():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import loop: " + " -> ".join(cycle)


def test_no_import_cycles_counting_deferred_imports():
    """Stricter: no loop even through imports inside functions (the export targets' registry once
    imported its writers back inside `get_target`, while each writer imported the registry)."""
    cycle = find_cycle(import_graph(top_level_only=False))
    assert cycle is None, "import loop (through deferred imports): " + " -> ".join(cycle)
