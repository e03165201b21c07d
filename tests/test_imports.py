"""The package's rooms and who may import whom, checked from the source (``ast``), without importing it.

- algorithms never import the data layer or the callbacks (they meet the data through
  :mod:`aa_lightning.batch`), at module level or inside functions;
- the data layer never imports the algorithms;
- the callbacks never import the algorithms (they see a module through Lightning's hooks and documented
  methods; shared helpers such as ``unwrap`` live in :mod:`aa_lightning.models`);
- module-level imports inside the package form no cycle.
"""

from __future__ import annotations

import ast
import os
from collections.abc import Iterator

import pytest

PACKAGE = "aa_lightning"
ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), PACKAGE)

# Function-level imports that break the rules today, each with the issue that removes it. Nothing else may
# be added here: a new algorithm reaches media or data through the batch contract or a hook.
ALLOWED: set[tuple[str, str]] = set()  # no exceptions: media logging is a callback fed by a hook

FORBIDDEN = {
    "aa_lightning.algorithms": ("aa_lightning.data", "aa_lightning.callbacks"),
    "aa_lightning.data": ("aa_lightning.algorithms",),
    "aa_lightning.callbacks": ("aa_lightning.algorithms",),
    # environments answer policy turns; they render them with the data layer's chat renderer, never training
    "aa_lightning.environments": ("aa_lightning.algorithms", "aa_lightning.callbacks"),
}


def module_files() -> dict[str, str]:
    """Dotted module name -> file, for every ``.py`` file of the package."""
    out: dict[str, str] = {}
    for folder, _, files in os.walk(ROOT):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            parts = os.path.relpath(path, os.path.dirname(ROOT))[: -len(".py")].split(os.sep)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


MODULES = module_files()


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _walk(nodes: list[ast.stmt], top_level: bool) -> Iterator[tuple[ast.stmt, bool]]:
    """Every import statement with whether it runs at import time (not in a function, not TYPE_CHECKING)."""
    for node in nodes:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node, top_level
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield from _walk(node.body, False)
        elif isinstance(node, ast.If) and _is_type_checking(node):
            yield from _walk(node.body, False)
            yield from _walk(node.orelse, top_level)
        else:
            for field in ("body", "orelse", "finalbody", "handlers"):
                children = getattr(node, field, None)
                if isinstance(children, list):
                    yield from _walk([c for c in children if isinstance(c, ast.AST)], top_level)  # type: ignore[misc]


def _resolve(module: str, node: ast.stmt) -> list[str]:
    """The package modules an import statement of ``module`` loads (the most specific existing ones)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        assert isinstance(node, ast.ImportFrom)
        base = node.module or ""
        if node.level:
            is_package = MODULES.get(module, "").endswith("__init__.py")
            parent = module.split(".")
            parent = parent if is_package else parent[:-1]
            parent = parent[: len(parent) - (node.level - 1)]
            base = ".".join(parent + ([base] if base else []))
        names = [
            f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names
        ]
    out = []
    for name in names:
        while name and name not in MODULES:
            name = name.rpartition(".")[0]
        if name.startswith(PACKAGE) and name != module:
            out.append(name)
    return sorted(set(out))


def imports(module: str) -> list[tuple[str, bool, int]]:
    """(imported package module, at import time?, line) for every import of ``module``."""
    with open(MODULES[module]) as f:
        tree = ast.parse(f.read(), MODULES[module])
    return [
        (target, top_level, node.lineno)
        for node, top_level in _walk(tree.body, True)
        for target in _resolve(module, node)
    ]


def _inside(name: str, room: str) -> bool:
    return name == room or name.startswith(room + ".")


def test_the_scan_sees_the_package():
    assert "aa_lightning.batch" in MODULES and "aa_lightning.algorithms.dpo" in MODULES
    assert ("aa_lightning.batch", True) in {(t, top) for t, top, _ in imports("aa_lightning.algorithms.dpo")}


@pytest.mark.parametrize("room", sorted(FORBIDDEN))
def test_rooms_do_not_import_forbidden_rooms(room):
    """Checked at module level AND inside functions: a lazy import is still a dependency."""
    bad = []
    for module in sorted(MODULES):
        if not _inside(module, room):
            continue
        for target, _, line in imports(module):
            if any(_inside(target, other) for other in FORBIDDEN[room]) and (module, target) not in ALLOWED:
                bad.append(f"{MODULES[module]}:{line} imports {target}")
    assert not bad, "\n".join(bad)


def test_allow_list_holds_only_live_exceptions():
    """An allowed import that is gone must leave the list too (so the list only shrinks)."""
    stale = [
        pair for pair in ALLOWED if pair[0] in MODULES and pair[1] not in {t for t, _, _ in imports(pair[0])}
    ]
    stale += [pair for pair in ALLOWED if pair[0] not in MODULES]
    assert not stale, f"remove from ALLOWED: {stale}"


def test_no_import_cycle_at_module_level():
    graph = {m: sorted({t for t, top, _ in imports(m) if top}) for m in MODULES}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        state[node] = 2
        path.pop()
        return None

    for module in sorted(graph):
        if module not in state:
            cycle = visit(module)
            assert cycle is None, "import cycle: " + " -> ".join(cycle)
