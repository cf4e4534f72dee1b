"""The package's layers (docs/architecture.md): every import of one of the package's modules by another points to
the same layer or a lower one, the modules import each other without cycles, and ``import asgi_dbpool`` imports no
web framework."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import asgi_dbpool

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = Path(asgi_dbpool.__file__).resolve().parent

#: The layers, lowest first: a module may import modules of its own layer and of the layers before it. Each
#: subpackage is the layer of its name; the top-level modules are placed in TOP_LEVEL.
LAYERS = ("base", "pool", "config", "observe", "lifecycle", "asgi", "public")
#: The modules at the package's top level: the version is read by every layer; the rest is the public surface.
TOP_LEVEL = {
    "asgi_dbpool._version": "base",
    "asgi_dbpool": "public",
    "asgi_dbpool.__main__": "public",
    "asgi_dbpool.starlette": "public",
    "asgi_dbpool.prometheus": "public",
    "asgi_dbpool.litestar": "public",
}
FRAMEWORKS = ("starlette", "fastapi", "litestar")


def modules() -> dict[str, Path]:
    """Every module of the package, recursively, by dotted name (a package by its own name)."""
    found: dict[str, Path] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = ["asgi_dbpool", *path.relative_to(PACKAGE).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def layer_of(module: str) -> str:
    """The layer of a module: its subpackage's name, or its place in TOP_LEVEL (KeyError: place it there)."""
    parts = module.split(".")
    if len(parts) > 2 or (len(parts) == 2 and (PACKAGE / parts[1]).is_dir()):
        assert parts[1] in LAYERS, f"{module}: the subpackage {parts[1]!r} is no layer; add it to LAYERS"
        return parts[1]
    return TOP_LEVEL[module]


def internal_imports() -> dict[str, set[str]]:
    """Module -> the package modules it imports, at any place (module level, functions, TYPE_CHECKING)."""
    known = modules()
    graph: dict[str, set[str]] = {}
    for module, path in known.items():
        package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package[: len(package) - (node.level - 1)]
                elif (node.module or "").split(".")[0] == "asgi_dbpool":
                    base = []
                else:
                    continue
                target = ".".join([*base, *(node.module.split(".") if node.module else [])])
                for alias in node.names:  # a name imported from a package may be one of its modules
                    found.add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in known else target)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.split(".")[0] == "asgi_dbpool")
        unknown = found - set(known)
        assert not unknown, f"{module} imports {sorted(unknown)}, which the walk does not know"
        graph[module] = found - {module}
    return graph


def upward(graph: dict[str, set[str]]) -> list[str]:
    """Each import of a higher layer, as ``module (layer) imports module (layer)``."""
    rank = {layer: i for i, layer in enumerate(LAYERS)}
    return [
        f"{source} ({layer_of(source)}) imports {target} ({layer_of(target)})"
        for source, targets in sorted(graph.items())
        for target in sorted(targets)
        if rank[layer_of(target)] > rank[layer_of(source)]
    ]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found: list[list[str]] = []
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                found.append([*path[path.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = "done"

    for start in sorted(graph):
        if start not in state:
            visit(start, [start])
    return found


def test_every_module_has_a_layer() -> None:
    known = modules()
    layers = {module: layer_of(module) for module in known}
    assert set(layers.values()) == set(LAYERS)  # the walk sees every layer (and each has a module)
    assert layers["asgi_dbpool.pool.tracker"] == "pool"
    assert layers["asgi_dbpool.asgi.middleware"] == "asgi"
    for module, path in known.items():  # each subpackage says it is private
        if path.name == "__init__.py" and module != "asgi_dbpool":
            assert (ast.get_docstring(ast.parse(path.read_text())) or "").startswith("Private API"), module


def test_every_internal_import_points_to_the_same_layer_or_a_lower_one() -> None:
    graph = internal_imports()
    # The walk sees the imports: relative, from a parent package, of a module by name, and absolute.
    assert "asgi_dbpool.lifecycle.lifecycle" in graph["asgi_dbpool.asgi.middleware"]
    assert "asgi_dbpool.pool.acquire" in graph["asgi_dbpool.pool.tracker"]
    assert "asgi_dbpool.lifecycle.shutdown_flag" in graph["asgi_dbpool.lifecycle.lifecycle"]  # from . import x
    assert "asgi_dbpool.asgi.middleware" in graph["asgi_dbpool"]
    assert upward(graph) == []


def test_the_package_import_graph_has_no_cycles() -> None:
    assert cycles(internal_imports()) == []


def test_the_layer_check_can_fail() -> None:
    """The control: an import of a higher layer is reported; one of the same layer or a lower one is not."""
    graph = {
        "asgi_dbpool.pool.tracker": {"asgi_dbpool.asgi.request", "asgi_dbpool.pool.acquire", "asgi_dbpool.base.types"},
        "asgi_dbpool._version": {"asgi_dbpool"},
    }
    assert upward(graph) == [
        "asgi_dbpool._version (base) imports asgi_dbpool (public)",
        "asgi_dbpool.pool.tracker (pool) imports asgi_dbpool.asgi.request (asgi)",
    ]


def test_the_cycle_check_can_fail() -> None:
    """The control: a graph with a back-reference is reported."""
    assert cycles({"asgi_dbpool.pool.a": {"asgi_dbpool.pool.b"}, "asgi_dbpool.pool.b": {"asgi_dbpool.pool.a"}}) == [
        ["asgi_dbpool.pool.a", "asgi_dbpool.pool.b", "asgi_dbpool.pool.a"]
    ]


def frameworks_imported_by(statement: str) -> tuple[str, list[str]]:
    """Where the package came from, and the web frameworks in ``sys.modules`` after ``statement``, in a fresh
    interpreter."""
    code = (
        f"import sys; {statement}; import asgi_dbpool; print(asgi_dbpool.__file__); "
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & {set(FRAMEWORKS)!r}))"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    where, frameworks = result.stdout.splitlines()
    return where, ast.literal_eval(frameworks)


def test_import_asgi_dbpool_imports_no_web_framework() -> None:
    where, frameworks = frameworks_imported_by("import asgi_dbpool")
    assert Path(where).resolve().parent == PACKAGE  # the tree under test
    assert frameworks == []
    # The control: the framework helpers do import theirs.
    assert frameworks_imported_by("import asgi_dbpool.starlette")[1] == ["starlette"]
    assert frameworks_imported_by("import asgi_dbpool.litestar")[1] == ["litestar"]
