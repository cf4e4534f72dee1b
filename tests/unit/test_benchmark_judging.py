"""How the benchmarks judge their targets (no run needed)."""

from __future__ import annotations

import pytest


def test_a_missed_target_is_judged_by_its_floor() -> None:
    """The verdict under the instruction table: a floor below the target proves it out of reach with the features
    kept; a floor above it says how many instructions the target leaves the rest of the middleware, beside what
    that rest takes and the features it carries."""
    from benchmarks.instructions import BOOKKEEPING, _missed

    floor = "floor: request record + send hook"
    base = [100.0e3]
    by_layout = {"bare": base, floor: [110.0e3], "DBPoolMiddleware": [112.0e3]}
    out_of_reach = _missed("w", "DBPoolMiddleware", 0.97, floor, base, by_layout)
    assert out_of_reach == (
        "- w, DBPoolMiddleware: 0.893 (target 0.97). The floor, the request's record in a context variable (a "
        "checkout in a task the request spawned finds it) and the send hook (the 503 in place of the app's 500, the "
        "end of the response for the commit-after-response warning), is 0.909 by itself: the target cannot be met "
        f"while these features stay. The rest, 2.0 k, is the bookkeeping of the other features: {BOOKKEEPING[floor]} "
        "(docs/benchmarks.md measures each part)."
    )
    within_reach = _missed("w", "DBPoolMiddleware", 0.90, floor, base, by_layout)
    # 100 k / 0.90 = 111.1 k in all: 1.1 k above the floor's 110 k, where the middleware takes 2.0 k.
    assert "is 0.909 by itself: the target leaves 1.1 k instructions for the rest of the middleware. " in within_reach
    assert "The rest, 2.0 k, is the bookkeeping of the other features: per request, " in within_reach


def test_the_instruction_table_takes_each_ratio_within_a_layout_and_judges_each_target_by_its_floor() -> None:
    """Made-up counts in three layouts: the medians, the ranges, the ratios taken within each layout, and the
    leak-detection target judged by the floor that keeps the stack (not by the checkout site's)."""
    from benchmarks.instructions import report

    base = [200.0e3, 202.0e3, 198.0e3]
    extra = {
        "plain engine": [0.0] * 3,
        "floor: checkout site": [10.0e3] * 3,
        "DBPoolMiddleware": [30.0e3, 12.0e3, 12.0e3],  # one layout far off: the median of ratios ignores it
        "floor: checkout stack": [12.0e3] * 3,
        "DBPoolMiddleware, leak detection on": [25.0e3] * 3,
    }
    counts = {
        ("checkout", variant, layout): base[layout] + more[layout]
        for variant, more in extra.items()
        for layout in range(3)
    }
    text = report(["checkout"], counts)
    what = "`engine.connect()` + close, no query"
    # 200/230, 202/214, 198/210 = 0.870, 0.944, 0.943: their median, not 200/214 (0.935, the medians' ratio)
    assert f"| {what} | DBPoolMiddleware | 214.0 k | 210.0-230.0 k | 0.943 | 0.870-0.944 | >= 0.95: missed |" in text
    assert f"| {what} | plain engine | 200.0 k | 198.0-202.0 k | 1.000 | 1.000-1.000 |  |" in text
    verdicts = text.split("run alone):\n\n")[1].splitlines()
    assert len(verdicts) == 2
    # The site floor: 0.952 (200/210); the target leaves 200/0.95 - 210 = 0.5 k (the median of the layouts').
    assert verdicts[0].startswith(f"- {what}, DBPoolMiddleware: 0.943 (target 0.95). The floor, the walk that ")
    assert "is 0.952 by itself: the target leaves 0.5 k instructions for the rest of the middleware. " in verdicts[0]
    assert "The rest, 2.0 k, is the bookkeeping" in verdicts[0]  # the median of 20, 2 and 2 k
    # Leak detection: 200/225 = 0.889, judged by the stack floor (200/212 = 0.943; 200/0.9 - 212 = 10.2 k).
    assert verdicts[1].startswith(
        f"- {what}, DBPoolMiddleware, leak detection on: 0.889 (target 0.9). The floor, the same walk going on"
    )
    assert "is 0.943 by itself: the target leaves 10.2 k instructions for the rest of the middleware. " in verdicts[1]
    assert "The rest, 13.0 k, is the bookkeeping" in verdicts[1]


def test_the_comparison_with_an_earlier_revision_is_taken_within_each_layout() -> None:
    """``--against``: made-up counts in three layouts for the revision's package and this tree's. Each ratio is taken
    within its layout, the change too (this tree's ratio minus the revision's, in the same layout); the baseline
    gets no row; a layout where this tree's ratio is lower is counted as worse."""
    from benchmarks.against import compared, report

    pairs = compared(["query"])
    assert pairs == [("query", "bare"), ("query", "DBPoolMiddleware")]  # the floor is this tree's own: not compared
    bare = [1000.0e3, 1010.0e3, 990.0e3]
    before = [1040.0e3, 1050.0e3, 1030.0e3]  # the middleware's 40 k in each layout
    after = [1030.0e3, 1052.0e3, 1020.0e3]  # 30 k, 42 k (worse than before in this layout) and 30 k
    counts = {}
    for layout in range(3):
        counts["query", "bare", layout, False] = counts["query", "bare", layout, True] = bare[layout]
        counts["query", "DBPoolMiddleware", layout, False] = before[layout]
        counts["query", "DBPoolMiddleware", layout, True] = after[layout]
    lines = report(pairs, "abc1234", counts).splitlines()
    assert lines[0] == (
        "| workload | variant | ratio, abc1234's package (median of 3 layouts) | ratio, this tree's "
        "| change (median of the layouts' own) | range of the changes | layouts not worse "
        "| instructions over the baseline (median) |"
    )
    # before: 0.9615, 0.9619, 0.9612; after: 0.9709, 0.9601, 0.9706; changes +0.0093, -0.0018, +0.0094
    assert lines[2:] == [
        "| request with one `SELECT 1` through an `AsyncSession` | DBPoolMiddleware | 0.962 | 0.971 | +0.009 "
        "| -0.002 to +0.009 | 2 of 3 | 40.0 k -> 30.0 k |"
    ]


def test_the_number_of_layouts_is_a_whole_number_of_one_or_more(capsys: pytest.CaptureFixture[str]) -> None:
    """``--layouts N`` (instructions and ``--against``): more layouts narrow the medians' spread; a value that is not
    a count of layouts stops the run before anything starts, naming the value."""
    from benchmarks.__main__ import layout_count, main

    assert layout_count("12") == 12
    for value in ("0", "-3", "five", "2.5"):
        with pytest.raises(SystemExit) as stopped:
            main(["--only", "--layouts", value])
        assert stopped.value.code == 2
        error = capsys.readouterr().err.splitlines()[-1]
        assert error == (
            f"python -m benchmarks: error: argument --layouts: {value!r} is not a number of memory layouts; "
            "give a whole number, 1 or more"
        )
