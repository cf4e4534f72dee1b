"""A small HTTP/1.1 keep-alive load generator (its own process): ``python -m benchmarks.loadgen PORT PATH
CONNECTIONS SECONDS``. Prints ``{"requests": n, "errors": n, "seconds": s, "latencies_ms": [...]}`` (a sample)."""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time


async def client(port: int, path: str, until: float, latencies: list[float], counts: list[int]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    request = f"GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n".encode()
    try:
        while time.perf_counter() < until:
            started = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            await reader.readexactly(length)
            ok = head.startswith(b"HTTP/1.1 200")
            if ok:  # latencies of successful requests only
                latencies.append(time.perf_counter() - started)
            counts[0 if ok else 1] += 1
    finally:
        writer.close()


async def main(port: int, path: str, connections: int, seconds: float) -> None:
    latencies: list[float] = []
    counts = [0, 0]
    started = time.perf_counter()
    until = started + seconds
    await asyncio.gather(*(client(port, path, until, latencies, counts) for _ in range(connections)))
    elapsed = time.perf_counter() - started
    sample = sorted(random.sample(latencies, min(len(latencies), 20000))) if latencies else []
    print(
        json.dumps(
            {"requests": counts[0], "errors": counts[1], "seconds": elapsed, "latencies_ms": [x * 1000 for x in sample]}
        )
    )


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), float(sys.argv[4])))
