"""What each server prints when the lifespan fails, now that the middleware raises after ``*.failed`` (as a bare
Starlette app does): uvicorn (``--lifespan auto`` and ``on``), hypercorn and granian print the one line, no
traceback, and exit as before (the figures in ``EXPECTED`` were read on the code before the change, which returned
quietly after ``*.failed``)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.servers import free_port

pytestmark = pytest.mark.servers

ONE_LINE = "asgi_dbpool: cannot reach database 'default' at postgresql+asyncpg://app:***@127.0.0.1:1/appdb"
SERVERS = ["uvicorn-auto", "uvicorn-on", "hypercorn", "granian"]


def command(server: str, target: str, port: int) -> list[str]:
    spec = f"tests.apps.lifespan_failures:{target}"
    if server.startswith("uvicorn"):
        mode = server.split("-")[1]
        return [sys.executable, "-m", "uvicorn", spec, "--port", str(port), "--lifespan", mode]
    if server == "hypercorn":
        return [sys.executable, "-m", "hypercorn", spec, "--bind", f"127.0.0.1:{port}"]
    return [sys.executable, "-m", "granian", "--interface", "asgi", "--port", str(port), spec]


def serve(server: str, target: str, database_url: str, stop_after: float | None) -> tuple[int, str]:
    """Run the server; SIGINT it after ``stop_after`` seconds (None: it must exit by itself); (exit code, output)."""
    env = {**os.environ, "ASGI_DBPOOL_TEST_DATABASE_URL": database_url, "PYTHONUNBUFFERED": "1"}
    port = free_port()
    proc = subprocess.Popen(command(server, target, port), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if stop_after is not None:  # once it listens, and the worker had the time to start
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and proc.poll() is None:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.1)
        time.sleep(stop_after)
        proc.send_signal(signal.SIGINT)
    try:
        out, _ = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:  # pragma: no cover - a hang is the failure
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"{server} did not exit: {out.decode(errors='replace')}")
    return proc.returncode, out.decode(errors="replace")


#: A path into one of the package's private subpackages (docs/architecture.md).
PRIVATE_FRAME = r"asgi_dbpool/(?:base|config|pool|observe|lifecycle|asgi)/"


def tracebacks(output: str) -> int:
    return output.count("Traceback (most recent call last)")


def figures(output: str, failure: str, code: int) -> tuple[int, int, int, int]:
    """(exit code, lines naming the failure, tracebacks, frames of asgi_dbpool's private modules in them)."""
    return code, output.count(failure), tracebacks(output), len(re.findall(PRIVATE_FRAME, output))


# Read on the code before the change (which returned quietly after *.failed), per server. hypercorn prints its own
# LifespanFailureError traceback (raised from its send()), passing through the middleware's two frames.
BEFORE_STARTUP = {
    "uvicorn-auto": (3, 1, 0, 0),
    "uvicorn-on": (3, 1, 0, 0),
    "hypercorn": (0, 1, 1, 2),
    "granian": (1, 1, 0, 0),
}
# The app's shutdown raises: the message (Starlette's, with its traceback as text) twice where the server echoes it.
BEFORE_SHUTDOWN = {
    "uvicorn-auto": (0, 2, 1, 0),
    "uvicorn-on": (0, 2, 1, 0),
    "hypercorn": (0, 2, 2, 2),
    "granian": (0, 2, 1, 0),
}


@pytest.mark.parametrize("server", SERVERS)
def test_a_failed_startup_prints_what_it_printed(server: str, database_url: str) -> None:
    code, output = serve(server, "unreachable", database_url, stop_after=None)
    assert figures(output, ONE_LINE, code) == BEFORE_STARTUP[server], output


@pytest.mark.parametrize("server", SERVERS)
def test_a_failed_app_shutdown_prints_what_it_printed(server: str, database_url: str) -> None:
    code, output = serve(server, "shutdown_raises", database_url, stop_after=1.5)
    assert figures(output, "flush failed", code) == BEFORE_SHUTDOWN[server], output


# The controls: the same apps without the middleware (tests.apps.lifespan_failures' bare_* twins).
# The app's shutdown raises: as wrapped, but hypercorn prints one traceback more (the message twice more).
BARE_SHUTDOWN = {
    "uvicorn-auto": (0, 2, 1, 0),
    "uvicorn-on": (0, 2, 1, 0),
    "hypercorn": (0, 4, 3, 0),
    "granian": (0, 2, 1, 0),
}
# The database is down: the driver's error as a traceback (wrapped: the one line instead), the same exit status.
BARE_STARTUP_TRACEBACKS = {"uvicorn-auto": 1, "uvicorn-on": 1, "hypercorn": 3, "granian": 2}


@pytest.mark.parametrize("server", SERVERS)
def test_the_control_a_bare_app_whose_shutdown_raises(server: str, database_url: str) -> None:
    code, output = serve(server, "bare_shutdown_raises", database_url, stop_after=1.5)
    assert figures(output, "flush failed", code) == BARE_SHUTDOWN[server], output


@pytest.mark.parametrize("server", SERVERS)
def test_the_control_a_bare_app_whose_database_is_down(server: str, database_url: str) -> None:
    code, output = serve(server, "bare_unreachable", database_url, stop_after=None)
    assert ONE_LINE not in output
    assert (code, tracebacks(output)) == (BEFORE_STARTUP[server][0], BARE_STARTUP_TRACEBACKS[server]), output
    assert "ConnectionRefusedError" in output, output
