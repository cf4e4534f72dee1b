"""The docs agree with the code: the configuration table, quoted figures, links."""

from __future__ import annotations

import ast
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


def reference_sections(text: str) -> dict[str, str]:
    """A reference page's ``###`` sections by heading."""
    parts = re.split(r"^### (.+)$", text, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def reference_problems(text: str, names: list[str]) -> list[str]:
    """Each public name's problem on the page: not exactly one heading, or no example; and examples that do not
    parse."""
    sections = reference_sections(text)
    problems = []
    for name in names:
        where = [heading for heading in sections if f"`{name}`" in heading]
        if len(where) != 1:
            problems.append(f"{name}: {len(where)} headings")
        elif "```python" not in sections[where[0]]:
            problems.append(f"{name}: no example")
    for heading, body in sections.items():
        for block in re.findall(r"```python\n(.*?)```", body, flags=re.S):
            try:
                ast.parse(block)
            except SyntaxError as error:
                problems.append(f"{heading}: {error.msg}")
    return problems


def test_every_public_name_is_documented_once_with_an_example() -> None:
    import asgi_dbpool
    import asgi_dbpool.litestar
    import asgi_dbpool.prometheus
    import asgi_dbpool.starlette

    modules = (asgi_dbpool, asgi_dbpool.starlette, asgi_dbpool.prometheus, asgi_dbpool.litestar)
    names = [name for module in modules for name in module.__all__]
    assert reference_problems((ROOT / "docs" / "reference.md").read_text(), names) == []


def test_the_reference_check_can_fail() -> None:
    page = "### `a`\n\ntext\n\n### `b` and `a`\n\n```python\nexcept:\n```\n"
    assert reference_problems(page, ["a", "b", "c"]) == [
        "a: 2 headings",
        "c: 0 headings",
        "`b` and `a`: invalid syntax",
    ]
