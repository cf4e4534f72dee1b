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
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from types import FrameType
from typing import Any

from .instructions import WARMUP, workload_operation

ROOT = Path(__file__).resolve().parent.parent
OPERATIONS = 50
#: workload -> its variants, the baseline first (the instruction benchmark's workloads and names).
VARIANTS = {
    "trivial": ("bare", "DBPoolMiddleware"),
    "checkout": ("plain engine", "DBPoolMiddleware", "DBPoolMiddleware, leak detection on"),
    "query": ("bare", "DBPoolMiddleware"),
}
_OWN = str(ROOT / "asgi_dbpool")


class _Tally:
    """A trace function counting bytecodes and frames entered, in all and per ``asgi_dbpool`` function."""

    def __init__(self) -> None:
        self.bytecodes = 0
        self.frames = 0
        self.own: Counter[str] = Counter()

    def trace(self, frame: FrameType, event: str, arg: object) -> Any:
        frame.f_trace_opcodes = True
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
        sys.settrace(tally.trace)
        try:
            for _ in range(OPERATIONS):
                await operation()
        finally:
            sys.settrace(None)
    return {
        "bytecodes": tally.bytecodes / OPERATIONS,
        "frames": tally.frames / OPERATIONS,
        "own": {name: count / OPERATIONS for name, count in tally.own.most_common()},
    }


def bench_bytecodes(url: str, smoke: bool = False) -> str:
    """A table: bytecodes and frames entered per operation, beside the baseline's, and the middleware's own
    functions with the bytecodes each executes per operation."""
    from .stats import table

    env = {**os.environ, "BENCH_DATABASE_URL": url, "PYTHONPATH": str(ROOT)}
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
        print(json.dumps(asyncio.run(_child(argv[1], argv[2]))))
        return 0
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
