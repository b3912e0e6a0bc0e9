"""The package's shape: no import cycle (function-local imports count), no module over 600 lines.

The import graph is read from the source with ``ast``, as a newcomer reads it: every
``import``/``from ... import`` of a qlora_kit module is an edge, wherever it stands.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "qlora_kit"
MAX_LINES = 600
# The CLI imports each command's module when that command runs, so that `qlora-kit --help` does
# not load torch; the package's __init__ imports the Python API (qlora_kit/api.py) when it is first
# used, so that `import qlora_kit` does not either: the only function-local imports of qlora_kit modules.
LAZY_COMMAND_IMPORTS = {"qlora_kit.cli", "qlora_kit"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imported(module: str, node: ast.Import | ast.ImportFrom, known: set[str], is_package: bool) -> set[str]:
    """The qlora_kit modules an import statement loads (a name imported from a package may be a submodule)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            anchor = module.split(".") if is_package else module.split(".")[:-1]
            anchor = anchor[: len(anchor) - node.level + 1]
            base = ".".join(anchor + ([node.module] if node.module else []))
        names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
    found = set()
    for name in names:
        while name and name not in known:
            name = name.rpartition(".")[0]
        if name and name != module:
            found.add(name)
    return found


def import_graph() -> tuple[dict[str, set[str]], dict[str, list[str]]]:
    """(module -> modules it imports, module -> modules it imports inside functions)."""
    modules = _modules()
    known = set(modules)
    graph: dict[str, set[str]] = {m: set() for m in modules}
    local: dict[str, list[str]] = {}
    for module, path in modules.items():
        tree = ast.parse(path.read_text())
        for func in (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
            for node in ast.walk(func):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    local.setdefault(module, []).extend(_imported(module, node, known, path.name == "__init__.py"))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                graph[module] |= _imported(module, node, known, path.name == "__init__.py")
    return graph, local


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path that starts and ends at the same node, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)) is not None:
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)) is not None:
            return cycle
    return None


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The graph between packages (``qlora_kit.data``, ...; top-level modules stand for themselves)."""

    def package(module: str) -> str:
        parts = module.split(".")
        return ".".join(parts[:2])

    result: dict[str, set[str]] = {}
    for module, targets in graph.items():
        result.setdefault(package(module), set()).update(package(t) for t in targets if package(t) != package(module))
    return result


def test_no_import_cycle_between_modules() -> None:
    graph, _ = import_graph()
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_no_import_cycle_between_packages() -> None:
    graph, _ = import_graph()
    cycle = find_cycle(package_graph(graph))
    assert cycle is None, "import cycle between packages: " + " -> ".join(cycle or [])


def test_function_local_imports_are_for_third_party_modules_only() -> None:
    _, local = import_graph()
    offenders = {m: sorted(set(t)) for m, t in local.items() if t and m not in LAZY_COMMAND_IMPORTS}
    assert not offenders, f"qlora_kit modules imported inside functions (import them at the top): {offenders}"


def test_no_module_over_600_lines() -> None:
    long = {str(p.relative_to(PACKAGE.parent)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (split them along their jobs): {long}"


def test_the_checks_find_what_they_look_for() -> None:
    """The cycle finder is not vacuous: it finds a planted cycle, in modules and in packages."""
    graph = {"qlora_kit.a.x": {"qlora_kit.b.y"}, "qlora_kit.b.y": {"qlora_kit.a.z"}, "qlora_kit.a.z": set()}
    assert find_cycle(graph) is None
    assert find_cycle(package_graph(graph)) == ["qlora_kit.a", "qlora_kit.b", "qlora_kit.a"]
    graph["qlora_kit.a.z"] = {"qlora_kit.a.x"}
    assert find_cycle(graph) == ["qlora_kit.a.x", "qlora_kit.b.y", "qlora_kit.a.z", "qlora_kit.a.x"]
