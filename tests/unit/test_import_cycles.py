"""No import cycles inside the CLI or a service's package, lazy imports (inside functions)
included: a module that imports its own importer (app <-> a command group, a connector base <->
its connectors) is a knot the code has to be read around. `from pkg import mod` counts as an
import of the module; a submodule's implicit import of its parent package does not."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {
    "cdp_cli": ROOT / "cli" / "src" / "cdp_cli",
    "cdp_kit": ROOT / "libs" / "cdp-kit" / "src" / "cdp_kit",
    "cdp_ingest": ROOT / "services" / "ingest" / "src" / "cdp_ingest",
    "cdp_identity": ROOT / "services" / "identity" / "src" / "cdp_identity",
    "cdp_segmentation": ROOT / "services" / "segmentation" / "src" / "cdp_segmentation",
    "cdp_standins": ROOT / "libs" / "cdp-standins" / "src" / "cdp_standins",
    "cdp_activation": ROOT / "services" / "activation" / "src" / "cdp_activation",
}


def modules(package: str, root: Path) -> dict[str, Path]:
    out = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join((package, *parts))] = path
    return out


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The package's own modules ``name`` imports, anywhere in it."""
    is_package = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name in known)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                if sub in known:
                    out.add(sub)
                elif target in known:
                    out.add(target)
    out.discard(name)
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_a_package_has_no_import_cycle(package: str) -> None:
    known = modules(package, PACKAGES[package])
    graph = {name: imports(name, path, known) for name, path in known.items()}
    assert cycles(graph) == []


def test_the_check_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize("package", ["cdp_kit", "cdp_ingest", "cdp_identity", "cdp_segmentation", "cdp_activation"])
def test_no_service_depends_on_the_platform_stand_ins(package: str) -> None:
    """The stand-ins are for the demo, tests and benchmarks: no service imports them, so no image
    ships them."""
    for path in PACKAGES[package].rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            assert not any(n.split(".")[0] == "cdp_standins" for n in names), path
    pyproject = (PACKAGES[package].parents[1] / "pyproject.toml").read_text()
    assert "cdp-standins" not in pyproject
