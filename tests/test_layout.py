"""The package's layout rules: no import cycles between modules, the engine's layers (api -> core,
transport) import only downwards, and the engine's modules from before the api/core/transport split
are still importable under their old names as the same module objects."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "k2sys"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PKG.rglob("*.py")}


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _top_level_imports(tree: ast.Module) -> list[ast.stmt]:
    """Imports that run when the module is imported: module level, inside try/if (not TYPE_CHECKING),
    never inside a function or class body (those run later, when called)."""
    out: list[ast.stmt] = []

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                out.append(node)
            elif isinstance(node, ast.If) and not _is_type_checking(node):
                visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                for part in (node.body, node.orelse, node.finalbody, *[h.body for h in node.handlers]):
                    visit(part)

    visit(tree.body)
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the k2sys modules it imports at import time (`from a.b import c` is a.b.c when c is
    a module, else a.b)."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        for node in _top_level_imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                if node.level or not node.module:
                    continue
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in mods else node.module
                           for a in node.names]
            graph[name].update(t for t in targets if t in mods and t != name)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                strong(w)
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
                out.append(sorted(comp))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10000))
    for v in graph:
        if v not in index:
            strong(v)
    return out


def test_cycle_finder_finds_a_planted_cycle():
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(g) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_between_modules():
    found = cycles(import_graph())
    assert not found, "import cycles (module-level imports): " + "; ".join(" <-> ".join(c) for c in found)


def test_engine_layers_import_downwards_only():
    graph = import_graph()
    bad = []
    for mod, deps in graph.items():
        for layer, forbidden in (("k2sys.engine.core.", ("k2sys.engine.api.server", "k2sys.engine.api.openai_api",
                                                         "k2sys.engine.api.client", "k2sys.engine.api.sglang_adapter")),
                                 ("k2sys.engine.transport.", ("k2sys.engine.core.",))):
            if mod.startswith(layer):
                bad += [f"{mod} -> {d}" for d in deps if d.startswith(forbidden)]
    assert not bad, bad


def test_engine_modules_keep_their_old_import_paths():
    # A fresh interpreter, so the old names are resolved by the package's alias finder, not by a cache.
    code = ("import importlib, k2sys.engine as E\n"
            "for leaf, pkg in E._MOVED.items():\n"
            "    old = importlib.import_module(f'k2sys.engine.{leaf}')\n"
            "    new = importlib.import_module(f'k2sys.engine.{pkg}.{leaf}')\n"
            "    assert old is new, leaf\n"
            "    assert old.__spec__.name == f'k2sys.engine.{pkg}.{leaf}', old.__spec__.name\n"
            "from k2sys.engine.server import build_app, main\n"
            "import k2sys.engine.protocol as P\n"
            "assert P.GenerateRequest.__module__ == 'k2sys.engine.api.protocol'\n"
            "print(len(E._MOVED))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert int(out.stdout.strip()) == 16
    with pytest.raises(ImportError):  # a name that never existed is still an ImportError
        importlib.import_module("k2sys.engine.no_such_module")
