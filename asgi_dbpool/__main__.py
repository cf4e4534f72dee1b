"""``python -m asgi_dbpool advise URL [--token TOKEN]``: print a running app's pool tuning advice.

URL is the app's pool endpoint (e.g. ``http://127.0.0.1:8000/api/system/database/pool``).
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request
from typing import Any


def fetch_advice(url: str, token: str | None = None, timeout: float = 10.0) -> dict[str, Any]:
    request = urllib.request.Request(url.rstrip("/") + "/advice")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        data: dict[str, Any] = json.load(response)
    return data


def format_advice(data: dict[str, Any]) -> str:
    lines = []
    for name, report in data.get("engines", {}).items():
        observed = ", ".join(f"{k}={v}" for k, v in report["observed"].items() if v is not None)
        lines.append(f"engine {name!r}: {observed}")
        if not report["advice"]:
            lines.append("  nothing to change")
        for item in report["advice"]:
            lines.append(f"  {item['setting']}: {item['current']} -> {item['suggested']}  ({item['why']})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m asgi_dbpool", description="asgi_dbpool tools")
    commands = parser.add_subparsers(dest="command", required=True)
    advise = commands.add_parser("advise", help="print a running app's pool tuning advice")
    advise.add_argument("url", help="the app's pool endpoint, e.g. http://127.0.0.1:8000/api/system/database/pool")
    advise.add_argument("--token", help="the stats_token, if the endpoint needs one")
    args = parser.parse_args(argv)
    try:
        data = fetch_advice(args.url, args.token)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        print(f"asgi_dbpool: could not read {args.url.rstrip('/')}/advice: {exc}", file=sys.stderr)
        return 1
    print(format_advice(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
