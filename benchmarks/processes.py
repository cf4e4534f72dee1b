"""What the benchmarks that run servers share: a free port, waiting for a server to listen, and wrk."""

from __future__ import annotations

import contextlib
import re
import socket
import subprocess
import time


def free_port() -> int:
    """A TCP port on the loopback that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, seconds: float, server: subprocess.Popen[bytes]) -> None:
    """Return once ``server`` listens on ``port``; raise with the end of its stderr if it exits first or
    ``seconds`` pass."""
    deadline = time.monotonic() + seconds
    while server.poll() is None and time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        time.sleep(0.025)
    timed_out = server.poll() is None
    if timed_out:
        server.kill()
    _, stderr = server.communicate()
    state = f"did not listen within {seconds:g} s" if timed_out else f"exited with {server.returncode}"
    raise RuntimeError(f"the server on port {port} {state}:\n{(stderr or b'').decode(errors='replace')[-3000:]}")


def wrk(port: int, path: str, connections: int, seconds: float, timeout: int = 2) -> dict[str, float]:
    """One wrk run (one thread: the server under test keeps the other core): requests/s, p99 in ms, errors
    (non-2xx answers and socket errors). wrk takes whole seconds: ``seconds`` is rounded, at least 1."""
    url = f"http://127.0.0.1:{port}{path}"
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{max(round(seconds), 1)}s", f"--timeout={timeout}s", "--latency", url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rate = re.search(r"^Requests/sec:\s+([\d.]+)", out, re.M)
    p99 = re.search(r"^\s+99%\s+([\d.]+)(us|ms|s)\b", out, re.M)
    if rate is None or p99 is None:
        raise RuntimeError(f"unexpected wrk output:\n{out}")
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    failed = int(errors.group(1)) if errors else 0
    failed += sum(int(n) for n in socket_errors.groups()) if socket_errors else 0
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[p99.group(2)]
    return {"rate": float(rate.group(1)), "p99": float(p99.group(1)) * scale, "errors": failed}
