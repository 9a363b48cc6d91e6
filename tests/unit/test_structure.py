"""The shape of the code: no import circles, router/ never imports probes/, and everything outside router/ reaches
it through its public faces (``router``, ``router.scorer`` and ``router.learning``; ``probes``), never through
private modules."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FACES = {"router", "router.scorer", "router.learning", "probes"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


EXEMPT = "# private on purpose:"  # a research screen that patches a private module says so on the import's line


def _imports(path: Path, exempt: bool = False) -> list[tuple[str, list[str]]]:
    """Every import in the file (module level, in functions, under TYPE_CHECKING): (module, names imported);
    with ``exempt``, less the imports marked ``EXEMPT`` on their line."""
    out = []
    lines = path.read_text().splitlines()
    for node in ast.walk(ast.parse("\n".join(lines))):
        if exempt and isinstance(node, ast.Import | ast.ImportFrom) and EXEMPT in lines[node.lineno - 1]:
            continue
        if isinstance(node, ast.Import):
            out += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.module, [alias.name for alias in node.names]))
    return out


def _graph(packages: list[str]) -> dict[str, set[str]]:
    modules = {_module_name(p): p for pkg in packages for p in (ROOT / pkg).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges = set()
        for module, names in _imports(path):
            for target in [f"{module}.{n}" for n in names] + [module]:  # `from pkg import submodule` first
                if target in modules:
                    edges.add(target)
                    break
        graph[name] = edges - {name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt):], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


@pytest.mark.parametrize("package", ["router", "probes"])
def test_no_import_circles(package: str) -> None:
    assert _cycle(_graph([package])) is None


def test_router_never_imports_probes() -> None:
    for path in (ROOT / "router").rglob("*.py"):
        assert not any(m == "probes" or m.startswith("probes.") for m, _ in _imports(path)), path


@pytest.mark.parametrize("folder", ["probes", "loadtest", "research", "scripts"])
def test_code_outside_router_uses_only_its_public_faces(folder: str) -> None:
    private = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        if folder == "probes" and path.name == "__init__.py":
            continue
        for module, _ in _imports(path, exempt=True):
            if module.startswith("router") and module not in FACES:
                private.append(f"{path.relative_to(ROOT)}: {module}")
            if folder != "probes" and module.startswith("probes.") and module not in FACES:
                private.append(f"{path.relative_to(ROOT)}: {module}")
    assert not private, "\n".join(private)


@pytest.mark.parametrize("face", ["router", "router.scorer", "router.learning", "probes"])
def test_every_public_name_resolves(face: str) -> None:
    import importlib

    module = importlib.import_module(face)
    for name in module.__all__:
        assert getattr(module, name) is not None, name
