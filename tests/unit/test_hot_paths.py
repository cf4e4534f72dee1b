"""The code run per request and per checkout calls no method on an object imported by name.

CPython 3.11 compiles ``name.method(...)`` as an attribute load when ``name`` came from an import (it takes the name
for a module's), so a method called that way makes a bound method object at every call: ``current_request.set``
and ``.reset`` in the middleware cost about 1 k instructions per request that way (benchmarks/RESULTS.md). The hot
paths call such methods through names bound once (``set_request``, ``get_current_request``).
"""

from __future__ import annotations

import ast
import dis
import inspect
import itertools
import types
from collections.abc import Iterator

import pytest

from asgi_dbpool.asgi import late_commits, middleware, request
from asgi_dbpool.pool import checkout, tracked_pool

#: The functions run per request or per checkout, with the module whose globals they read.
HOT = [
    (middleware, middleware.DBPoolMiddleware.__call__.__code__),
    (request, request.InFlight.send.__code__),
    (late_commits, late_commits.on_session_commit.__code__),
    (checkout, checkout.checkout_frames.__code__),
    (tracked_pool, tracked_pool._tracking.__code__),  # with the _do_get and _do_return_conn it makes
]


def _codes(code: types.CodeType) -> Iterator[types.CodeType]:
    yield code
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _codes(const)


def imported_names(source: str) -> set[str]:
    """The names a module's imports bind."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
    return names


def attribute_loads_on_imported_objects(module: types.ModuleType, code: types.CodeType, source: str) -> list[str]:
    """``name.attribute`` in ``code`` (and the functions it defines) where ``name`` is bound by an import of
    ``module`` (its ``source``) to an object that is neither a module nor a class."""
    imported = imported_names(source)
    found = []
    for inner in _codes(code):
        instructions = list(dis.get_instructions(inner))
        for load, then in itertools.pairwise(instructions):
            if load.opname == "LOAD_GLOBAL" and then.opname == "LOAD_ATTR" and load.argval in imported:
                value = getattr(module, str(load.argval), None)
                if not isinstance(value, (types.ModuleType, type)):
                    found.append(f"{inner.co_name}: {load.argval}.{then.argval}")
    return found


@pytest.mark.parametrize(("module", "code"), HOT, ids=[code.co_qualname for _, code in HOT])
def test_the_hot_paths_call_no_method_on_an_imported_object(module: types.ModuleType, code: types.CodeType) -> None:
    assert attribute_loads_on_imported_objects(module, code, inspect.getsource(module)) == []


def test_the_check_finds_a_method_called_on_an_imported_context_variable() -> None:
    """The control: the call the middleware made before (``current_request.set(...)``) is found."""
    source = "from asgi_dbpool.asgi.request import current_request\ndef f(r):\n    return current_request.set(r)\n"
    namespace: dict[str, object] = {}
    compiled = compile(source, "<control>", "exec")
    exec(compiled, namespace)  # a fixed source: the control of the check
    module = types.ModuleType("control")
    module.__dict__.update(namespace)
    assert attribute_loads_on_imported_objects(module, compiled, source) == ["f: current_request.set"]
