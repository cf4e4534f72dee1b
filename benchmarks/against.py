"""``--against REV``: the instruction ratios of this tree's package beside an earlier revision's, like for like.

A ratio in RESULTS.md is one draw over :data:`~benchmarks.instructions.LAYOUTS` memory layouts, and the harness
changes too: the served ratio of the same code moves by about 0.01 between runs. Whether a change made a ratio
worse is answered by measuring both packages with this harness, in the same layouts, in one run. The revision's
``asgi_dbpool`` folder is exported (``git archive``), this tree's is copied beside it, and each child imports one of
the two (``BENCH_PACKAGE``): both from paths of the same length, so that the two packages' children have the same
environment and file names of the same lengths (both move the memory layout). Every variant but the floors runs for
both: the floors use this tree's own modules.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .instructions import LAYOUTS, ROOT, WORKLOADS, _ratios, per_operation, smoke_run
from .stats import table


def export(rev: str, into: Path) -> str:
    """Write ``rev``'s ``asgi_dbpool`` folder under ``into``; its short commit hash. A revision this repository
    does not have raises ``ValueError`` with git's own line."""
    archive = subprocess.run(["git", "archive", rev, "asgi_dbpool"], cwd=ROOT, capture_output=True, check=False)
    if archive.returncode != 0:
        raise ValueError(f"--against {rev!r}: {archive.stderr.decode().strip()}; give a commit of this repository.")
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    done = subprocess.run(["git", "rev-parse", "--short", rev], cwd=ROOT, capture_output=True, text=True, check=True)
    return done.stdout.strip()


def compared(workloads: list[str] | None = None) -> list[tuple[str, str]]:
    """The (workload, variant) pairs measured for both packages: every variant but the floors."""
    return [
        (workload, variant)
        for workload in workloads or list(WORKLOADS)
        for variant in WORKLOADS[workload][0]
        if not variant.startswith("floor:")
    ]


def bench_against(
    url: str, rev: str, workloads: list[str] | None = None, smoke: bool = False, layouts: int = LAYOUTS
) -> str:
    """A table of the ratios of ``rev``'s package and of this tree's, per (workload, variant), in the same
    ``layouts`` layouts (0 to ``layouts - 1``).

    ``smoke`` runs each child once natively, for both packages (the plumbing works; nothing counted)."""
    pairs = compared(workloads)
    with tempfile.TemporaryDirectory(prefix="bench-against-") as tmp:
        before, now = Path(tmp) / "0", Path(tmp) / "1"
        before.mkdir()
        commit = export(rev, before)
        shutil.copytree(ROOT / "asgi_dbpool", now / "asgi_dbpool", ignore=shutil.ignore_patterns("__pycache__"))
        packages = (str(before), str(now))
        if smoke:
            for workload, variant in pairs:
                for package in packages:
                    smoke_run(workload, variant, url, package)
            return f"Smoke run: every workload ran natively on {commit}'s package and on this tree's; nothing counted."
        jobs = [
            (workload, variant, layout, package)
            for layout in range(layouts)
            for workload, variant in pairs
            for package in packages
        ]

        def run(job: tuple[str, str, int, str]) -> float:
            workload, variant, layout, package = job
            return per_operation(workload, variant, url, layout, package=package)

        with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
            counts = dict(zip(jobs, pool.map(run, jobs), strict=True))
    return report(pairs, commit, {(w, v, layout, p == str(now)): n for (w, v, layout, p), n in counts.items()})


def report(pairs: list[tuple[str, str]], commit: str, counts: dict[tuple[str, str, int, bool], float]) -> str:
    """The table from ``counts``: instructions per operation by (workload, variant, layout, this tree's package)."""
    layouts = sorted({layout for _, _, layout, _ in counts})
    rows = []
    for workload, variant in pairs:
        base = WORKLOADS[workload][0][0]
        if variant == base:
            continue
        ratios = {}
        for now in (False, True):
            ratios[now] = _ratios(
                [counts[workload, base, layout, now] for layout in layouts],
                [counts[workload, variant, layout, now] for layout in layouts],
            )
        change = [after - before for before, after in zip(ratios[False], ratios[True], strict=True)]
        own = {
            now: statistics.median(
                counts[workload, variant, layout, now] - counts[workload, base, layout, now] for layout in layouts
            )
            for now in (False, True)
        }
        rows.append(
            [
                WORKLOADS[workload][1],
                variant,
                f"{statistics.median(ratios[False]):.3f}",
                f"{statistics.median(ratios[True]):.3f}",
                f"{statistics.median(change):+.3f}",
                f"{min(change):+.3f} to {max(change):+.3f}",
                f"{sum(c >= 0 for c in change)} of {len(change)}",
                f"{own[False] / 1000:,.1f} k -> {own[True] / 1000:,.1f} k",
            ]
        )
    header = [
        "workload",
        "variant",
        f"ratio, {commit}'s package (median of {len(layouts)} layouts)",
        "ratio, this tree's",
        "change (median of the layouts' own)",
        "range of the changes",
        "layouts not worse",
        "instructions over the baseline (median)",
    ]
    return table(header, rows)
