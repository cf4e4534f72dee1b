"""The walk that finds a checkout's user frames: on stacks of every shape (user and library frames mixed, generated
code, greenlets nested in greenlets, an asyncio task), it returns exactly what the one-loop walk it replaced
returned (:func:`reference_walk`, kept here as the specification), for the site's and the stack's limits."""

from __future__ import annotations

import asyncio
import functools
import random
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from types import FrameType
from typing import Any

import pytest
from greenlet import getcurrent, greenlet

from asgi_dbpool.pool.checkout import (
    CALLER_REACH,
    SITE_FRAMES,
    STACK_FRAMES,
    STACK_REACH,
    TASK_STEP,
    Checkout,
    Frame,
    _is_internal,
    _user_frames,
)

LIMITS = [(SITE_FRAMES, CALLER_REACH), (STACK_FRAMES, STACK_REACH), (1, 0), (1, 3), (2, 0), (3, 1), (5, 4)]
#: One frame's file per letter: the user's code, a library's (SQLAlchemy), generated code.
FILES = {"U": "/srv/app/views_{n}.py", "L": "/venv/lib/python3/site-packages/sqlalchemy/part_{n}.py", "G": "<gen {n}>"}


_namespace: dict[str, Any] = {"greenlet": greenlet, "results": [], "done": threading.Semaphore(0)}
exec(
    compile(
        "def call_both(walk, reference, limits):\n"
        "    return [(walk(limit, reach), reference(limit, reach)) for limit, reach in limits]\n"
        "def switch(call):\n"
        "    return greenlet(call).switch()\n"
        "def run_in_thread(call):\n"
        "    try:\n"
        "        results.append(call())\n"
        "    finally:\n"
        "        done.release()\n"
        "async def task(call):\n"
        "    return call()\n",
        FILES["L"].format(n="helpers"),
        "exec",
    ),
    _namespace,
)
_CALL_BOTH, _SWITCH, _LIBRARY_TASK = _namespace["call_both"], _namespace["switch"], _namespace["task"]
_user_namespace: dict[str, Any] = {"greenlet": greenlet}
exec(
    compile("def switch(call):\n    return greenlet(call).switch()\n", FILES["U"].format(n="switch"), "exec"),
    _user_namespace,
)
_USER_SWITCH = _user_namespace["switch"]


def reference_walk(limit: int, reach: int) -> list[Frame]:
    """The walk as it was before it was split in two loops (asgi_dbpool 3cc487b..fd3a01a), verbatim but for names."""
    glet: Any = getcurrent()
    parent = glet.parent
    if parent is not None:
        glet = parent
        frame: FrameType | None = parent.gr_frame
    else:
        frame = sys._getframe(1)
    found: list[Frame] = []
    left = -1
    while True:
        while frame is not None:
            code = frame.f_code
            internal = _is_internal(code.co_filename)
            if not internal:
                found.append((code, frame.f_lasti))
                if len(found) == limit:
                    return found
                if left < 0:
                    left = reach
            elif code is TASK_STEP:
                return found
            if left == 0:
                return found
            left -= 1
            frame = frame.f_back
        glet = glet.parent
        if glet is None:
            return found
        frame = glet.gr_frame


def both_walks() -> list[tuple[list[Frame], list[Frame]]]:
    """Each limit's walk by the library and by the reference, called from the same library frame (the caller's
    offset differs between the two calls: it must be one the walks skip)."""
    results: list[tuple[list[Frame], list[Frame]]] = _CALL_BOTH(_user_frames, reference_walk, LIMITS)
    return results


def chain(shape: str, innermost: Callable[[], Any]) -> Callable[[], Any]:
    """Functions calling each other, the outermost first, one per letter of ``shape`` (see :data:`FILES`); the
    innermost calls ``innermost`` and every one returns what it returns."""
    call = innermost
    for n, letter in reversed(list(enumerate(shape))):
        namespace: dict[str, Any] = {"inner": call}
        exec(compile(f"def f{n}():\n    return inner()\n", FILES[letter].format(n=n), "exec"), namespace)
        call = namespace[f"f{n}"]
    return call


def library(call: Callable[[], Any]) -> Callable[[], Any]:
    """``call`` made from a library frame (as SQLAlchemy's code calls the pool)."""
    return chain("L", call)


def in_greenlet(call: Callable[[], Any], from_user: bool = False) -> Callable[[], Any]:
    """``call`` run in a child greenlet, switched to from a library frame (as SQLAlchemy's ``greenlet_spawn`` runs
    the sync code), or ``from_user`` code."""
    return functools.partial(_USER_SWITCH if from_user else _SWITCH, call)


def shapes(count: int) -> list[str]:
    rng = random.Random(20261207)
    return ["".join(rng.choice("UULLG") for _ in range(rng.randint(0, 14))) for _ in range(count)]


def assert_same(results: list[tuple[list[Frame], list[Frame]]]) -> None:
    for (limit, reach), (walked, reference) in zip(LIMITS, results, strict=True):
        assert walked == reference, (limit, reach)


@pytest.mark.parametrize("shape", shapes(60))
def test_the_walk_finds_what_the_reference_walk_finds(shape: str) -> None:
    """Plain calls (the stack goes on into pytest's frames, user frames too), then the same stack's innermost
    frames in a child greenlet (the walk starts in the parent), then two greenlets deep (switched to from library
    code and from user code), then in a thread."""
    assert_same(chain(shape, library(both_walks))())
    assert_same(chain(shape, in_greenlet(library(both_walks)))())
    assert_same(chain(shape, in_greenlet(chain(shape[::-1], in_greenlet(library(both_walks)))))())
    assert_same(chain(shape, in_greenlet(chain(shape[::-1], in_greenlet(library(both_walks))), from_user=True))())
    # In a thread of its own, the stack is short: the walks reach the end of every greenlet's frames.
    with ThreadPoolExecutor(1) as thread:
        assert_same(thread.submit(chain(shape, in_greenlet(library(both_walks)))).result())


@pytest.mark.parametrize("shape", ["", "L", "U", "LLL", "ULLL", "LLUL", "UUUUU", "LULULULUL", "GGU", "LLLLLLLLLLLU"])
def test_the_walk_stops_at_the_step_of_the_task(shape: str) -> None:
    """In an asyncio task, the walk ends at the task's step: the event loop's frames and what ran the loop (this
    test, pytest) are never the caller, even for the stack's reach of 64 frames."""

    async def main() -> list[tuple[list[Frame], list[Frame]]]:
        results: list[tuple[list[Frame], list[Frame]]] = chain(shape, in_greenlet(library(both_walks)))()
        return results

    results = asyncio.run(main())
    assert_same(results)
    # The user frames in the task, innermost first: the chain's, main(); then the task's step ends the walk.
    in_task = [*(f"f{n}" for n in reversed(range(len(shape))) if shape[n] == "U"), "main"]
    stack = results[LIMITS.index((STACK_FRAMES, STACK_REACH))][0]
    assert [code.co_name for code, _ in stack] == in_task


@pytest.mark.parametrize("shape", ["", "L", "LGL", "LLLLLLLLLLLLLLLLLLLL"])
def test_a_task_without_user_frames_has_no_site(shape: str) -> None:
    """A checkout in a task that runs only library code (a pool pre-filled by a library's task, say) has no site:
    the walk never takes the code that ran the event loop (this test) for its caller."""
    results = asyncio.run(_LIBRARY_TASK(chain(shape, in_greenlet(library(both_walks)))))
    assert_same(results)
    assert results[0][0] == []


@pytest.mark.parametrize("shape", ["", "L", "LGL"])
def test_a_thread_without_user_frames_has_no_site(shape: str) -> None:
    """A thread started on library code (``_thread``, no ``threading`` frames) that checks out from library code
    only: the walk goes to the end of every greenlet's frames and finds no site."""
    import _thread

    _thread.start_new_thread(_namespace["run_in_thread"], (chain(shape, in_greenlet(library(both_walks))),))
    assert _namespace["done"].acquire(timeout=10)
    results = _namespace["results"].pop()
    assert_same(results)
    assert [walked for walked, _ in results] == [[]] * len(LIMITS)


def test_the_report_says_how_the_holder_ended() -> None:
    """A leak report names the holder's task and how it ended: still running, finished, or cancelled (a forced exit
    cancels every task, SQLAlchemy's close tasks too: a session whose close was cancelled never checks in)."""

    async def main() -> list[str]:
        async def idle() -> None:
            await asyncio.sleep(3600)

        finished = asyncio.create_task(asyncio.sleep(0), name="finished")
        cancelled = asyncio.create_task(idle(), name="cancelled")
        running = asyncio.create_task(idle(), name="running")
        await asyncio.sleep(0.01)
        cancelled.cancel()
        await asyncio.gather(finished, cancelled, return_exceptions=True)
        try:
            return [
                Checkout((None, task, [], None, None, 0.0), reported=False).describe(0.0)  # type: ignore[arg-type]
                for task in (running, finished, cancelled, None)
            ]
        finally:
            running.cancel()

    assert asyncio.run(main()) == [
        "checked out at <unknown>:0 0.0s ago by task 'running'",
        "checked out at <unknown>:0 0.0s ago by task 'finished' (finished)",
        "checked out at <unknown>:0 0.0s ago by task 'cancelled' (cancelled)",
        "checked out at <unknown>:0 0.0s ago by no task",
    ]
