"""The layers point one way (docs/architecture.md): every import of an optcc module, at
module level or inside a function, goes to the same layer or one below, the module-level
imports form no cycle, and ``passes/`` uses only optcc's public facades."""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parents[1]

# Lowest first. A module may import its own layer and those below it.
LAYERS: list[tuple[str, ...]] = [
    ("optcc.errors", "optcc.version", "optcc.progress"),
    ("optcc.ir",),
    ("optcc.runtime",),
    ("optcc.numerics",),
    ("optcc.infra",),
    ("optcc.rewrite",),
    ("optcc.quant", "optcc.fp16"),
    ("optcc.passes",),
    ("optcc.api", "optcc.inspect", "optcc.compare"),
    ("optcc.cli", "optcc.__main__"),
]
# What a pass may import: the facade and the subpackages' __init__ (their public API).
PUBLIC = {"optcc", "optcc.ir", "optcc.infra", "optcc.rewrite", "optcc.numerics", "optcc.runtime",
          "optcc.quant", "optcc.fp16", "optcc.errors", "optcc.progress"}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT)
    parts = list(rel.with_suffix("").parts)
    if parts[0] == "passes":
        parts[0:1] = ["optcc", "passes"]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _sources() -> dict[str, Path]:
    files = [*ROOT.joinpath("optcc").rglob("*.py"), *ROOT.joinpath("passes").rglob("*.py")]
    return {_module_name(f): f for f in files}


SOURCES = _sources()


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(imported optcc module, at module level) for every import in the file."""
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # "from optcc.x import y": y is a module of package optcc.x, or a name in optcc.x
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in SOURCES else node.module
                     for a in node.names]
        else:
            continue
        for name in names:
            if name == "optcc" or name.startswith("optcc."):
                found.append((name, id(node) in top))
    return found


def _layer(module: str) -> int | None:
    best = None
    for rank, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                if best is None or len(prefix) > best[1]:
                    best = (rank, len(prefix))
    return None if best is None else best[0]




@pytest.mark.parametrize("module", sorted(m for m in SOURCES if m != "optcc"))
def test_imports_point_down(module):
    mine = _layer(module)
    assert mine is not None, f"{module} is in no layer; add it to LAYERS"
    for imported, _ in _imports(SOURCES[module]):
        if imported not in SOURCES:
            continue  # a name imported from a package, not a module
        if module.startswith("optcc.passes"):
            ok = imported in PUBLIC or imported.startswith("optcc.passes")
            assert ok, f"pass module {module} imports {imported}, which is not optcc's public API"
            continue
        theirs = _layer(imported)
        assert theirs is not None and theirs <= mine, (
            f"{module} (layer {mine}) imports {imported} (layer {theirs}): imports point down only")


def test_no_import_cycle():
    graph = nx.DiGraph()
    for module, path in SOURCES.items():
        for imported, top_level in _imports(path):
            if top_level and imported in SOURCES and imported != module:
                # importing a package runs its __init__; the facade is the entry point only
                if imported != "optcc":
                    graph.add_edge(module, imported)
    cycles = list(nx.simple_cycles(graph))
    assert not cycles, f"import cycles: {cycles[:3]}"


def test_every_source_is_checked():
    assert len(SOURCES) > 40
    assert {"optcc.infra.manager", "optcc.numerics.verify", "optcc.passes.fold_constants"} <= set(SOURCES)
