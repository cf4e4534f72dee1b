"""SIGTERM where nothing handles it, with two apps in the process: the middleware holds it until every app that
holds it closed its connections and answered its server, then the process ends by SIGTERM as its default would.

Before: only the first app held it (the second found a handler installed), and the first app's end re-raised it:
the process died with the second app's connections open, or before the first app's ``shutdown.complete``."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid

import pytest

from tests.conftest import backends, unclean_disconnects

pytestmark = pytest.mark.servers


def run_two_apps(database_url: str, name: str, mode: str) -> tuple[int, list[str]]:
    proc = subprocess.run(
        [sys.executable, "-m", "tests.apps.two_apps", database_url, name, mode],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    return proc.returncode, proc.stdout.splitlines()


@pytest.mark.parametrize("mode", ["running", "answering"])
def test_sigterm_ends_the_process_after_every_holder_answered(mode: str, database_url: str) -> None:
    name = f"sig{uuid.uuid4().hex[:8]}"
    code, lines = run_two_apps(database_url, name, mode)
    assert code == -15, lines  # ended by SIGTERM, as its default action would
    assert "the process outlived the signal" not in lines
    finished = [line for line in lines if "shutdown finished" in line]
    assert len(finished) == 2, lines  # both apps ran their whole shutdown
    answers = [line for line in lines if " answered " in line]
    expected = ["a answered lifespan.startup.complete", "b answered lifespan.startup.complete"]
    if mode == "answering":  # the first app was asked: its answer went out before the process ended
        expected.append("a answered lifespan.shutdown.complete")
    assert sorted(answers) == sorted(expected), lines
    left = asyncio.run(backends(database_url, f"{name}_a")) + asyncio.run(backends(database_url, f"{name}_b"))
    assert left == 0
    assert unclean_disconnects([f"{name}_a", f"{name}_b"]) == []
