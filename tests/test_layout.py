"""The house (docs/architecture.md): which package may import which, and no import circles.

Read from the source with :mod:`ast` (every import, those inside functions too: a circle
hidden in a function is still a circle), so the test needs nothing imported and names the
offending file and line.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import ROOT

#: Each package of ours and the packages of ours it may import (the arrows of
#: docs/architecture.md). Everything else is a third-party or standard module.
ALLOWED: dict[str, set[str]] = {
    "dcp_protocol": set(),
    "dcp_keys": {"dcp_protocol"},
    "evaluator": {"dcp_protocol", "dcp_keys"},
    "dcp_worker": {"dcp_protocol", "dcp_keys", "evaluator"},
    "scheduler": {"dcp_protocol", "dcp_keys", "evaluator"},
}


def _modules() -> dict[str, Path]:
    found = {}
    for package in ALLOWED:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path) -> Iterator[tuple[str, int]]:
    """The modules of ours that ``name`` (at ``path``) imports, with the line of each."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            yield target, node.lineno
            for alias in node.names:  # ``from . import config``: the module config
                if f"{target}.{alias.name}" in MODULES:
                    yield f"{target}.{alias.name}", node.lineno


def _ours(target: str) -> str | None:
    """The module of ours ``target`` names (or lies in), else None."""
    while target:
        if target in MODULES:
            return target
        target = target.rpartition(".")[0]
    return None


GRAPH: dict[str, dict[str, int]] = {
    name: {
        mod: line
        for target, line in _imports(name, path)
        if (mod := _ours(target)) is not None and mod != name
    }
    for name, path in MODULES.items()
}


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_a_package_imports_only_the_packages_below_it(package: str) -> None:
    wrong = [
        f"{MODULES[name].relative_to(ROOT)}:{line} imports {target}"
        for name, targets in GRAPH.items()
        if name.split(".")[0] == package
        for target, line in targets.items()
        if (top := target.split(".")[0]) != package and top not in ALLOWED[package]
    ]
    assert not wrong, "\n".join(wrong)


def test_no_module_of_ours_takes_part_in_an_import_circle() -> None:
    # Tarjan's strongly connected components over the module graph.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in GRAPH[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for node in sorted(GRAPH):
        if node not in index:
            visit(node)
    assert not circles, circles


#: What a package offers the packages above it, where that is less than all of it: the evaluator
#: is driven through its handle (``client``: the worker's sandboxes, the scheduler's verifiers)
#: and its interpreters installed and checked through ``interpreters``; its runtimes, process,
#: launcher and manager are its own.
PUBLIC: dict[str, set[str]] = {
    "evaluator": {"evaluator.client", "evaluator.interpreters"},
}


@pytest.mark.parametrize("package", sorted(PUBLIC))
def test_other_packages_use_only_a_packages_public_faces(package: str) -> None:
    wrong = [
        f"{MODULES[name].relative_to(ROOT)}:{line} imports {target}"
        for name, targets in GRAPH.items()
        if name.split(".")[0] != package
        for target, line in targets.items()
        if target.split(".")[0] == package and target not in PUBLIC[package]
    ]
    assert not wrong, "\n".join(wrong)


def test_the_graph_sees_the_imports_it_checks() -> None:
    """The checks above would pass on an empty graph: the parser must see these arrows."""
    assert "dcp_protocol.errors" in GRAPH["dcp_protocol.codec"]
    assert "dcp_worker.config" in GRAPH["dcp_worker.cli"]  # ``from . import config``
    assert "evaluator.client" in GRAPH["scheduler.verifier"]


def test_every_exception_of_ours_derives_from_dcp_error() -> None:
    """One exception tree (dcp_protocol.errors): a program's edge catches DcpError to report a
    refusal by its reason, and anything else is a bug. Private control-flow exceptions
    (a leading underscore, never raised out of their module) are exempt."""
    import importlib

    from dcp_protocol import DcpError

    loose = []
    for name in MODULES:
        if name.endswith("__main__"):
            continue
        module = importlib.import_module(name)
        for attr, value in vars(module).items():
            if (
                isinstance(value, type)
                and issubclass(value, BaseException)
                and value.__module__ == name
                and not attr.startswith("_")
                and not issubclass(value, DcpError)
            ):
                loose.append(f"{name}.{attr}")
    assert not loose, loose
