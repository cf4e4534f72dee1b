"""The public API type-checks in typical user code under ``mypy --strict`` (``tests/typing/user_code.py``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def mypy(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "mypy", "--strict", "--no-incremental", "--python-version", "3.11", *args]
    return subprocess.run(command, capture_output=True, text=True, cwd=ROOT, check=False, timeout=300)


def test_user_code_type_checks() -> None:
    result = mypy(str(ROOT / "tests" / "typing" / "user_code.py"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_type_check_can_fail(tmp_path: Path) -> None:
    """The control: a wrong expectation about ``shutdown_tolerant`` is an error."""
    wrong = tmp_path / "wrong.py"
    wrong.write_text(
        "from typing import assert_type\n"
        "from asgi_dbpool import shutdown_tolerant\n"
        "@shutdown_tolerant()\n"
        "async def f() -> int:\n"
        "    return 1\n"
        "async def g() -> None:\n"
        "    assert_type(await f(), int)\n"
    )
    result = mypy(str(wrong))
    assert result.returncode == 1
    assert 'Expression is of type "int | None", not "int"' in result.stdout
