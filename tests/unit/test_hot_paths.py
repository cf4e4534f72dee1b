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
import sys
import types
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from asgi_lifespan import LifespanManager
from sqlalchemy.ext.asyncio import create_async_engine

from asgi_dbpool import DBPoolMiddleware
from asgi_dbpool.asgi import late_commits, middleware, request
from asgi_dbpool.asgi.request import InFlight
from asgi_dbpool.base.types import Receive, Scope, Send
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
    names: set[str] = set()
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


#: Attribute loads the hot paths make that CPython cannot specialise: the frame walk's (C getset descriptors of
#: frames, code objects and greenlets) and the bound ``send`` handed to the app (a method loaded, not called).
UNSPECIALISABLE = {"parent", "gr_frame", "f_code", "co_filename", "f_lasti", "f_back", "send"}
#: The instructions of an attribute load, a method load and an attribute store left unspecialised (3.11 names them
#: ``*_ADAPTIVE`` once quickened; 3.12 and 3.13 by the generic name).
GENERIC = {
    "LOAD_ATTR",
    "LOAD_METHOD",
    "STORE_ATTR",
    "LOAD_ATTR_ADAPTIVE",
    "LOAD_METHOD_ADAPTIVE",
    "STORE_ATTR_ADAPTIVE",
}


class Traced:
    """The attribute names some code objects load or store through an unspecialised instruction while traced.

    The adaptive view (``dis(adaptive=True)``) is taken when tracing starts: what the runs before left in place."""

    def __init__(self, codes: set[types.CodeType]) -> None:
        self.codes = codes
        self.executed: set[tuple[types.CodeType, int]] = set()
        self.adaptive: dict[types.CodeType, dict[int, dis.Instruction]] = {}

    def __enter__(self) -> Traced:
        self.adaptive = {code: {i.offset: i for i in dis.get_instructions(code, adaptive=True)} for code in self.codes}
        sys._getframe(1).f_trace_opcodes = True  # 3.12 sends opcode events only once the caller's frame asks
        sys.settrace(self.trace)
        return self

    def __exit__(self, *exc: object) -> None:
        sys.settrace(None)

    def trace(self, frame: types.FrameType, event: str, arg: object) -> Any:
        if frame.f_code in self.codes:
            frame.f_trace_opcodes = True
            if event == "opcode":
                self.executed.add((frame.f_code, frame.f_lasti))
        return self.trace

    def generic(self) -> set[str]:
        found = set()
        for code, offset in self.executed:
            instruction = self.adaptive[code][offset]
            if instruction.opname in GENERIC:
                found.add(str(instruction.argval))
        return found


async def _http(app: Any, state: dict[str, Any]) -> None:
    scope = {"type": "http", "path": "/", "method": "GET", "headers": [], "query_string": b"", "root_path": ""}

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def discard(message: Any) -> None:
        return None

    await app({**scope, "state": dict(state)}, receive, discard)


@pytest.mark.anyio
async def test_the_hot_paths_attribute_loads_are_specialised(tmp_path: Path) -> None:
    """Per request and per checkout, every attribute load and store of the middleware and the pool is one CPython's
    adaptive interpreter specialises, but for those it cannot (:data:`UNSPECIALISABLE`). An unspecialised one is a
    full type lookup: on 3.11, a method called on an instance attribute, a class attribute read through an instance
    or a method called on a slot cost about 9 k instructions per request with a query (docs/benchmarks.md)."""
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'app.db'}")

    async def endpoint(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            return
        async with engine.connect():
            pass
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    app = DBPoolMiddleware(endpoint, engine)
    pool_class: Any = type(engine.sync_engine.pool)
    codes = {
        DBPoolMiddleware.__call__.__code__,
        InFlight.send.__code__,
        pool_class._do_get.__code__,
        pool_class._do_return_conn.__code__,
        checkout.checkout_frames.__code__,
        checkout._user_frames.__code__,
    }
    try:
        async with LifespanManager(app) as manager:
            for _ in range(200):  # past the interpreter's warm-up and its first attempts to specialise
                await _http(app, manager._state)
            with Traced(codes) as traced:
                await _http(app, manager._state)
    finally:
        await engine.dispose()
    assert {code.co_name for code, _ in traced.executed} == {code.co_name for code in codes}  # all of them ran
    assert traced.generic() <= UNSPECIALISABLE, sorted(traced.generic() - UNSPECIALISABLE)


@pytest.mark.anyio
async def test_the_check_finds_the_loads_the_middleware_made_before() -> None:
    """The control: a load the middleware or its request record made before is found unspecialised: the method
    called on an instance attribute (``self.app(...)``) on 3.11, the class attribute an instance shadows
    (``request.done``) on 3.12 and 3.13."""

    class Record:
        done = False

    class Wrapper:
        def __init__(self, app: Callable[[], Awaitable[None]]) -> None:
            self.app = app

        async def __call__(self) -> bool:
            record = Record()
            await self.app()
            if record.done:  # read from the class
                return False
            record.done = True  # shadows the class attribute
            return record.done

    async def app() -> None:
        return None

    wrapper = Wrapper(app)
    for _ in range(200):
        await wrapper()
    with Traced({Wrapper.__call__.__code__}) as traced:
        await wrapper()
    assert traced.generic() == ({"app"} if sys.version_info < (3, 12) else {"done"})
