"""The package's layout holds: one way down, no import cycles inside faim_kernels/ (ops/__init__.py
names the order: dispatch -> backends -> contract -> transform)."""
from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1] / "faim_kernels"


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _is_package(name: str) -> bool:
    return (ROOT.parent / pathlib.Path(*name.split(".")) / "__init__.py").exists()


def _exists(name: str) -> bool:
    p = ROOT.parent / pathlib.Path(*name.split("."))
    return p.with_suffix(".py").exists() or (p / "__init__.py").exists()


def import_graph() -> dict[str, set[str]]:
    """Module -> the faim_kernels modules it imports at module level or inside functions
    (`from . import x` counts as importing the submodule x, not its package)."""
    graph: dict[str, set[str]] = {}
    for path in ROOT.rglob("*.py"):
        name = _module_name(path)
        package = name if _is_package(name) else name.rpartition(".")[0]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[:len(base) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if not target.startswith("faim_kernels"):
                    continue
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    deps.add(sub if _exists(sub) else target)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.startswith("faim_kernels"))
        deps.discard(name)
        graph[name] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if m == "faim_kernels" or m not in graph:  # the package's own namespace: not an edge down
                continue
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (cycle := visit(m)):
                return cycle
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (cycle := visit(n)):
            return cycle
    return None


def test_no_import_cycles():
    assert find_cycle(import_graph()) is None, f"import cycle: {' -> '.join(find_cycle(import_graph()))}"


def test_one_way_down():
    """The contract and transform import no backend and no dispatch layer; the backends import no
    dispatch layer; nothing below functional imports it."""
    graph = import_graph()
    below = {"faim_kernels.ops.contract": {"faim_kernels.ops.dispatch", "faim_kernels.ops.triton",
                                           "faim_kernels.functional"},
             "faim_kernels.transform": {"faim_kernels.ops", "faim_kernels.functional"}}
    for module, forbidden in below.items():
        bad = [d for d in graph[module] if any(d == f or d.startswith(f + ".") for f in forbidden)]
        assert not bad, f"{module} imports {bad}"
    for module, deps in graph.items():
        if module.startswith("faim_kernels.ops.triton"):
            assert "faim_kernels.ops.dispatch" not in deps and "faim_kernels.functional" not in deps, module


def test_the_check_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
