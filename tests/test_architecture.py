"""The layout is the architecture: the import graph is acyclic and every layer imports only
what it may (docs/architecture.md has the rules and why).

Imports are read from the source with ``ast`` (function-level imports included, since a lazy
import is still a dependency), so a violation fails here before anything is run.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PKG = "seedswarm"


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([PKG, *parts])


def _modules() -> dict[str, Path]:
    out: dict[str, Path] = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in ("tests", ".venv", "venv", "build", "runs", "docs") or rel.parts[0].startswith("."):
            continue
        out[_module_name(path)] = path
    return out


def _imports(path: Path, known: set[str]) -> set[str]:
    """Project modules imported by ``path`` (``from a.b import c`` counts a.b.c when c is a module)."""
    tree = ast.parse(path.read_text(), str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for n in names:
            if not n.startswith(PKG):
                continue
            while n and n not in known:
                n = n.rpartition(".")[0]
            if n and n != PKG:
                found.add(n)
    return found


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    return {m: _imports(p, known) - {m} for m, p in mods.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
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
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_import_graph_is_acyclic() -> None:
    cycles = _cycles(_graph())
    assert not cycles, f"import cycles: {cycles}"


# layer -> prefixes it may import (besides itself)
ALLOWED: dict[str, tuple[str, ...]] = {
    "seedswarm.crypto.hashing": (),
    "seedswarm.crypto.keys": (),
    "seedswarm.sampling": (),
    "seedswarm.gossip.schema": ("seedswarm.crypto.hashing", "seedswarm.crypto.keys"),
    "seedswarm.gossip.wire": ("seedswarm.crypto.hashing", "seedswarm.crypto.keys", "seedswarm.gossip.schema"),
    "seedswarm.node.files": (),
    "seedswarm.node.core": ("seedswarm.crypto.hashing", "seedswarm.crypto.keys", "seedswarm.gossip.wire",
                            "seedswarm.sampling", "seedswarm.node.files"),
    "seedswarm.node.learn": ("seedswarm.crypto", "seedswarm.gossip.wire", "seedswarm.sampling",
                             "seedswarm.node.core", "seedswarm.node.files"),
}


def _allowed(mod: str, dep: str) -> bool | None:
    for layer, ok in ALLOWED.items():
        if mod == layer or mod.startswith(layer + "."):
            return dep in (layer, PKG) or any(dep == p or dep.startswith(p + ".") for p in (layer, *ok))
    return None


def test_lower_layers_import_only_what_they_may() -> None:
    bad = []
    for mod, deps in _graph().items():
        for dep in deps:
            if _allowed(mod, dep) is False:
                bad.append(f"{mod} -> {dep}")
    assert not bad, "layer violations:\n" + "\n".join(sorted(bad))


def test_node_never_imports_the_simulator_or_benchmarks() -> None:
    bad = [f"{m} -> {d}" for m, deps in _graph().items() if m.startswith("seedswarm.node")
           for d in deps if d.startswith(("seedswarm.sim", "seedswarm.bench"))]
    assert not bad, bad


def test_drivers_do_not_import_each_others_internals() -> None:
    """The daemon and the simulator are two drivers of one core: neither reaches into the other."""
    g = _graph()
    bad = [f"{m} -> {d}" for m, deps in g.items() for d in deps
           if (m.startswith("seedswarm.node.daemon") and d.startswith("seedswarm.sim"))
           or (m.startswith("seedswarm.sim") and d.startswith("seedswarm.node.daemon"))]
    assert not bad, bad


def test_core_imports_without_torch() -> None:
    code = (
        "import sys, importlib, pkgutil\n"
        "import seedswarm.node.core as core\n"
        "for m in pkgutil.iter_modules(core.__path__):\n"
        "    importlib.import_module('seedswarm.node.core.' + m.name)\n"
        "import seedswarm.gossip.wire, seedswarm.sampling.committee\n"
        "bad = [m for m in ('torch', 'libp2p', 'trio', 'asyncio') if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "", f"importing the core pulled in: {out.stdout.strip()}"


# "no file over about 500 lines": a module that needs more than this has two jobs and should be
# two modules (the few between 500 and this limit are one state machine or one schema each).
MAX_MODULE_LINES = 560


def test_no_module_is_too_long() -> None:
    long = {m: n for m, p in _modules().items() if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not long, f"modules over {MAX_MODULE_LINES} lines (split them by what they do): {long}"
