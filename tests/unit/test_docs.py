"""The docs agree with the code: the configuration table, quoted figures, links."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest

from asgi_dbpool.config.settings import ENV_READERS

ROOT = Path(__file__).resolve().parents[2]

README = ROOT / "README.md"

DOCS = sorted((ROOT / "docs").glob("*.md"))

RESULTS = ROOT / "benchmarks" / "RESULTS.md"


def test_the_configuration_table_lists_exactly_what_pool_settings_reads() -> None:
    text = (ROOT / "docs" / "configuration.md").read_text()
    documented = set(re.findall(r"^\| `([A-Z_]+)` \|", text, flags=re.M))
    assert documented == {"ENVIRONMENT", *ENV_READERS}


def numbers(text: str) -> set[str]:
    return set(re.findall(r"(?<![\w.])\d+(?:\.\d+)?(?![\w.])", text))


def test_every_benchmark_figure_quoted_is_in_results() -> None:
    results = numbers(RESULTS.read_text())
    table = [line for line in (ROOT / "docs" / "benchmarks.md").read_text().splitlines() if line.startswith("| ")]
    lines = README.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("- **Cost**"))
    headline = [lines[start], *itertools.takewhile(lambda line: line.startswith("  "), lines[start + 1 :])]
    quoted = numbers("\n".join(table + headline)) - {"1", "2", "0.1"}  # counts and SELECT 1, not figures
    assert len(quoted) > 20
    assert sorted(quoted - results) == []


def test_the_figure_check_can_fail() -> None:
    """The control: a figure that is not in RESULTS.md is reported."""
    assert "0.9876" not in numbers(RESULTS.read_text())
    assert numbers("| wrapped | 0.9876 of bare |") - numbers(RESULTS.read_text()) == {"0.9876"}


def anchor(heading: str) -> str:
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("page", [README, *DOCS], ids=lambda p: p.name)
def test_relative_links_resolve(page: Path) -> None:
    for target in re.findall(r"\]\(([^)]+)\)", page.read_text()):
        if target.startswith(("http://", "https://")):
            continue
        path, _, fragment = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        assert file.exists(), f"{page.name}: {target} does not exist"
        if fragment:
            headings = re.findall(r"^#+ (.+)$", file.read_text(), flags=re.M)
            assert fragment in {anchor(h) for h in headings}, f"{page.name}: no heading #{fragment} in {file.name}"
