"""Bytecodes per operation, traced: what the middleware's own functions execute, exactly.

Instruction counts move with the memory layout (see ``instructions.LAYOUTS``) by more than some of the parts
they are asked to resolve; the bytecodes the interpreter executes do not. Each (workload, variant) runs in a
child process (natively, with the instruction benchmark's apps): after the warm-up, ``sys.settrace`` with
opcode events counts, for ``OPERATIONS`` operations, every bytecode executed and every frame entered (a call,
or a coroutine resumed), and which of them ran in ``asgi_dbpool``'s functions. In Python 3.11 a bytecode costs
some tens of instructions, a frame entered some hundreds, more where it calls into C.

``python -m benchmarks.bytecodes child WORKLOAD VARIANT`` is the child; it prints its counts as JSON.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path
from types import FrameType
from typing import Any

from .instructions import ROOT, WARMUP, WORKLOADS, child_env, workload_operation
from .processes import free_port

OPERATIONS = 50
#: workload -> its variants, the baseline first: the instruction benchmark's in-process workloads, without the
#: floors and the forwarding wrapper (they run none of the middleware's functions, or not its own way).
VARIANTS = {
    workload: tuple(v for v in WORKLOADS[workload][0] if not v.startswith("floor:") and v != "forwarding wrapper")
    for workload in ("trivial", "checkout", "query", "served")
}
_OWN = str(ROOT / "asgi_dbpool")


class _Tally:
    """A trace function counting bytecodes and frames entered, in all and per ``asgi_dbpool`` function."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.bytecodes = 0
        self.frames = 0
        self.own: Counter[str] = Counter()

    def trace(self, frame: FrameType, event: str, arg: object) -> Any:
        frame.f_trace_opcodes = True  # 3.11 and 3.13 take it here; 3.12 only from sys._getframe() (see _child)
        self.frames += 1
        code = frame.f_code
        name = f"{Path(code.co_filename).stem}.{code.co_name}" if code.co_filename.startswith(_OWN) else None

        def opcode(frame: FrameType, event: str, arg: object) -> Any:
            if event == "opcode":
                self.bytecodes += 1
                if name is not None:
                    self.own[name] += 1
            return opcode

        return opcode


async def _child(workload: str, variant: str) -> dict[str, Any]:
    async with workload_operation(workload, variant) as (operation, _):
        for _ in range(WARMUP):
            await operation()
        tally = _Tally()
        # Opcode events on: Python 3.12 sends them only when the frame calling settrace asks for them first.
        sys._getframe().f_trace_opcodes = True
        sys.settrace(tally.trace)
        try:
            # One traced operation first: frames entered before settrace (this one, the event loop's) are traced
            # only once resumed, so the first operation would count differently from the rest.
            await operation()
            tally.reset()
            for _ in range(OPERATIONS):
                await operation()
        finally:
            sys.settrace(None)
    return {
        "bytecodes": tally.bytecodes / OPERATIONS,
        "frames": tally.frames / OPERATIONS,
        "own": {name: count / OPERATIONS for name, count in tally.own.most_common()},
    }


def _served_child(variant: str) -> dict[str, Any]:
    """The served workload's count: the instruction benchmark's served app under a real uvicorn in this process,
    ``GET /q`` over one keep-alive connection from a thread; the event loop's thread is traced. (The bytecodes of
    the event loop's turns move by a few tens between runs: how many turns a request takes depends on timing.)"""
    import http.client
    import threading
    import time

    import uvicorn
    from starlette.applications import Starlette

    from . import apps
    from .instructions import _wrap

    app = _wrap(variant, Starlette(routes=apps.routes), apps.engine)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    loop = asyncio.new_event_loop()
    tally = _Tally()
    counted: dict[str, Any] = {}
    failed: list[BaseException] = []

    def start_tracing() -> None:
        sys._getframe().f_trace_opcodes = True  # (see _child)
        sys.settrace(tally.trace)

    def drive() -> None:
        try:
            while not server.started:
                time.sleep(0.01)
            connection = http.client.HTTPConnection("127.0.0.1", server.config.port, timeout=30)

            def get() -> None:
                connection.request("GET", "/q")
                response = connection.getresponse()
                if (response.status, response.read()) != (200, b"1"):
                    raise RuntimeError(f"GET /q answered {response.status}")

            for _ in range(WARMUP):
                get()
            loop.call_soon_threadsafe(start_tracing)
            for _ in range(5):  # the frames running when tracing began are traced once resumed (see _child)
                get()
            tally.reset()
            for _ in range(OPERATIONS):
                get()
            counted.update(bytecodes=tally.bytecodes, frames=tally.frames, own=dict(tally.own))
            loop.call_soon_threadsafe(sys.settrace, None)
            connection.close()
        except BaseException as exc:  # the server stops either way; the parent sees the error
            failed.append(exc)
        finally:
            server.should_exit = True

    threading.Thread(target=drive, daemon=True).start()
    loop.run_until_complete(server.serve())
    loop.close()
    if failed:
        raise failed[0]
    return {
        "bytecodes": counted["bytecodes"] / OPERATIONS,
        "frames": counted["frames"] / OPERATIONS,
        "own": {name: count / OPERATIONS for name, count in Counter(counted["own"]).most_common()},
    }


def bench_bytecodes(url: str, smoke: bool = False) -> str:
    """A table: bytecodes and frames entered per operation, beside the baseline's, and the middleware's own
    functions with the bytecodes each executes per operation."""
    from .stats import table

    env = child_env(url, 0)
    rows = []
    for workload, variants in VARIANTS.items():
        counted = {}
        for variant in variants:
            command = [sys.executable, "-m", "benchmarks.bytecodes", "child", workload, variant]
            done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise RuntimeError(f"bytecode count {workload}/{variant} failed:\n{done.stderr[-3000:]}")
            counted[variant] = json.loads(done.stdout)
        base = counted[variants[0]]
        for variant in variants:
            figures = counted[variant]
            own = ", ".join(f"`{name}` {count:,.0f}" for name, count in figures["own"].items())
            rows.append(
                [
                    workload,
                    variant,
                    f"{figures['bytecodes']:,.0f}",
                    f"{figures['bytecodes'] - base['bytecodes']:+,.0f}",
                    f"{figures['frames']:,.0f}",
                    f"{figures['frames'] - base['frames']:+,.0f}",
                    own or "-",
                ]
            )
    header = ["workload", "variant", "bytecodes", "vs baseline", "frames entered", "vs baseline", "in asgi_dbpool"]
    text = table(header, rows)
    if smoke:
        return "Smoke run (the counts are exact whatever the run):\n\n" + text
    return text


def main(argv: list[str]) -> int:
    if len(argv) == 3 and argv[0] == "child":
        counts = _served_child(argv[2]) if argv[1] == "served" else asyncio.run(_child(argv[1], argv[2]))
        print(json.dumps(counts))
        return 0
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
