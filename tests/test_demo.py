"""End to end: ``python -m demo_app`` as the README says, over real HTTP and WebSocket, then SIGINT."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import websockets

ROOT = Path(__file__).resolve().parent.parent
NOISE = ("Traceback", "Event loop is closed", "was never awaited", "Exception terminating", "garbage collector")

pytestmark = [pytest.mark.anyio, pytest.mark.servers]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def wait_until_up(base: str, proc: subprocess.Popen[bytes]) -> None:
    async with httpx.AsyncClient(base_url=base) as client:
        for _ in range(600):
            if proc.poll() is not None:
                raise AssertionError(f"demo exited early with {proc.returncode}")
            try:
                if (await client.get("/api/system/database/pool")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.05)
    raise AssertionError("demo did not come up")


@pytest.mark.parametrize("server", ["uvicorn", "hypercorn"])
async def test_demo_runs_and_stops_cleanly(server: str, tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("ASYNC_DATABASE_URL", "DATABASE_URL")}
    log = tmp_path / "demo.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(  # noqa: ASYNC220 - a real process that gets a real signal
            [
                sys.executable,
                "-m",
                "demo_app",
                "--server",
                server,
                "--port",
                str(port),
                "--data-dir",
                str(tmp_path / "pg"),
            ],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        await wait_until_up(base, proc)
        async with httpx.AsyncClient(base_url=base) as client:
            ann = await client.post("/users", json={"name": "Ann", "email": "ann@example.org"})
            assert (ann.status_code, ann.json()) == (201, {"id": 1, "name": "Ann", "email": "ann@example.org"})
            dup = await client.post("/users", json={"name": "Ann2", "email": "ann@example.org"})
            assert dup.status_code == 409
            assert (await client.post("/users", content=b"{")).json() == {"detail": "the body must be JSON"}
            assert (await client.get("/users/1")).json()["name"] == "Ann"
            assert (await client.get("/users/99")).status_code == 404
            endpoints = (await client.get("/")).json()["endpoints"]
            assert {"POST /users", "PATCH /tasks/{task_id:int}", "WEBSOCKET /ws/tasks"} <= set(endpoints)
            assert "GET /api/system/database/pool/metrics" in endpoints
            invalid = await client.post("/tasks", json={})
            assert (invalid.status_code, invalid.json()) == (
                400,
                {"detail": "the body must be a JSON object with title (a non-empty string), user_id (a whole number)"},
            )

            async with websockets.connect(f"ws://127.0.0.1:{port}/ws/tasks") as ws:
                assert json.loads(await ws.recv()) == {"event": "snapshot", "tasks": []}
                task = (await client.post("/tasks", json={"user_id": 1, "title": "write docs"})).json()
                assert task == {"id": 1, "user_id": 1, "title": "write docs", "done": False}
                assert json.loads(await ws.recv()) == {"event": "created", "task": task}
                done = (await client.patch("/tasks/1", json={"done": True})).json()
                assert done["done"] is True
                assert json.loads(await ws.recv()) == {"event": "updated", "task": done}
                assert (await client.get("/tasks")).json() == [done]
                legacy = (await client.get("/legacy/users")).json()
                assert legacy == {"users": [ann.json()], "layer": "sync (deprecated)"}
                stats = (await client.get("/api/system/database/pool")).json()
                assert stats["status"] == "ok"
                assert stats["pool_size"] == 10  # development profile
                assert stats["checked_out"] == 1  # the open WebSocket holds its session
                proc.send_signal(signal.SIGINT)  # with the WebSocket still open
                code = await asyncio.to_thread(proc.wait, 30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    output = log.read_text()
    assert code == 0, output
    assert len(re.findall(r"[Rr]unning on http://", output)) == 1, output  # the server's line, once
    for marker in NOISE:
        assert marker not in output, output
    levels = re.findall(r"^\S+ \S+ (WARNING|ERROR|CRITICAL) +(\S+): (.*)$", output, flags=re.M)
    # the one WARNING is the legacy layer's DeprecationWarning
    assert [(name, message.split(":")[0]) for _, name, message in levels] == [
        ("py.warnings", f"{ROOT}/demo_app/app.py")
    ]
    assert "DeprecationWarning: The sync SessionLocal is deprecated" in levels[0][2]
    sequence = [
        "shutdown flag set (budget 10.0s)",
        "WebSocket(s) closed (",
        "in-flight request(s) drained",
        "monitor and 1 registered task(s) stopped",
        "2 engine(s) disposed; leaks: none",
        "demo_app: embedded PostgreSQL stopped",
        "demo_app: stopped cleanly",
    ]
    if server == "uvicorn":  # uvicorn closed the open WebSocket (1012) before lifespan.shutdown
        sequence[1] = "WebSocket(s) closed (0 were open, 0 already closed by the server; 1 closed by the server before"
    if server == "hypercorn":  # the demo runs hypercorn with the middleware's shutdown trigger
        sequence.insert(0, "the server is stopping: 1 WebSocket(s) closed with 1012")
    positions = [output.find(step) for step in sequence]
    assert -1 not in positions, output
    assert positions == sorted(positions), output
