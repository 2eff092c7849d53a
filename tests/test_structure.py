"""The shape of the house (docs/ARCHITECTURE.md), checked from the code itself.

Every import in hf_pruning/ (function-local ones included) is read with ``ast``: the package's module graph
has no circle, no module imports from a floor above its own, no module is over 400 lines and no function
over 80. Run as a script it prints what breaks the rules.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "hf_pruning"
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 80

#: floor of each part of the package, lowest first: a module may import from its own floor and those below.
#: The longest matching prefix wins ("hf_pruning.methods" covers every method folder).
FLOORS = {
    "hf_pruning.remote": 0,  # copied next to saved weights: torch, transformers and siblings only
    "hf_pruning.version": 1,
    "hf_pruning.plan": 1,
    "hf_pruning.saving": 1,
    "hf_pruning.config": 1,
    "hf_pruning.model_methods": 1,  # the table of methods bound to models (api and publish fill it)
    "hf_pruning.registry": 2,
    "hf_pruning.accounting": 2,
    "hf_pruning.engine": 2,  # the sequential, offload-aware engine (calibration reads through it)
    "hf_pruning.calibration": 2,
    "hf_pruning.model_checks": 2,
    "hf_pruning.evaluation": 3,
    "hf_pruning.methods": 4,
    "hf_pruning.api": 5,
    "hf_pruning.recovery": 6,
    "hf_pruning.publish": 7,
    "hf_pruning.cli_args": 8,  # the command line's argument types, built from configs
    "hf_pruning.export": 8,  # writers for serving engines: read layers through the engine, stock saves via publish
    # the public face: the package's __init__ imports everything; the CLI uses it the way a user does
    "hf_pruning.cli": 9,
    "hf_pruning": 9,
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(current: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = current.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The package modules ``name`` imports (a name that is a submodule counts as that submodule)."""
    out: set[str] = set()
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(name, path.name == "__init__.py", node)
            targets = [f"{target}.{a.name}" if f"{target}.{a.name}" in known else target for a in node.names]
        for target in targets:
            while target and target not in known:  # `import hf_pruning.x.y` -> the deepest known module
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def floor_of(name: str) -> int:
    best = max((p for p in FLOORS if name == p or name.startswith(p + ".")), key=len)
    return FLOORS[best]


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports_of(name, path, known) for name, path in known.items()}


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
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
                found.append(sorted(comp))

    sys.setrecursionlimit(10_000)
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def upward_arrows(edges: dict[str, set[str]]) -> list[str]:
    return sorted(f"{a} (floor {floor_of(a)}) -> {b} (floor {floor_of(b)})"
                  for a, targets in edges.items() for b in targets if floor_of(b) > floor_of(a))


def long_modules() -> list[str]:
    return sorted(f"{name}: {n} lines" for name, path in modules().items()
                  if (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES)


def long_functions() -> list[str]:
    out = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    out.append(f"{name}.{node.name}: {n} lines")
    return sorted(out)


def test_no_import_circle():
    assert circles(graph()) == []


def test_no_import_from_a_higher_floor():
    assert upward_arrows(graph()) == []


def unplaced_modules() -> list[str]:
    """Modules that only the package's own floor covers: a new top-level module must be given a floor."""
    return sorted(name for name in modules()
                  if name != "hf_pruning" and not any(name == p or name.startswith(p + ".") for p in FLOORS if p != "hf_pruning"))


def test_every_module_has_a_floor():
    assert unplaced_modules() == []


def test_no_module_over_400_lines():
    assert long_modules() == []


def test_no_function_over_80_lines():
    assert long_functions() == []


def test_the_checker_sees_a_circle_and_an_upward_arrow():
    edges = {"hf_pruning.api": {"hf_pruning.publish.card"}, "hf_pruning.publish.card": {"hf_pruning.api"}}
    assert circles(edges) == [["hf_pruning.api", "hf_pruning.publish.card"]]
    assert upward_arrows(edges) == ["hf_pruning.api (floor 5) -> hf_pruning.publish.card (floor 7)"]


def test_the_checker_reads_function_local_and_relative_imports():
    edges = graph()
    assert "hf_pruning.remote.hf_pruning_plan" in edges["hf_pruning.plan"]


if __name__ == "__main__":
    g = graph()
    for title, items in (("circles", circles(g)), ("upward arrows", upward_arrows(g)),
                         ("modules without a floor", unplaced_modules()),
                         ("modules over 400 lines", long_modules()), ("functions over 80 lines", long_functions())):
        print(f"== {title}: {len(items)}")  # noqa: T201
        for item in items:
            print("  ", item)  # noqa: T201
