"""Benchmarks of asgi_dbpool: ``python -m benchmarks`` (see README). Ratios are measured side by side."""

import os
import sys


def _shift_type_versions(count: int) -> None:
    """Use up ``count`` of CPython's type version tags before anything the benchmarks measure is imported.

    CPython's type-attribute cache is indexed by a type's version tag and the address of the attribute's name; tags
    are handed out in the order types are first looked up, so they follow the import order. Which lookups collide
    in the cache (and fall back to a walk of the class dictionaries) is then fixed by the code imported, and moves
    with any change to it. A memory layout shifts the tags too (see ``instructions.LAYOUTS``), so that its median
    is taken over collision patterns, not one.
    """
    for number in range(count):
        getattr(type(f"_Shift{number}", (), {}), "tag", None)  # a lookup gives the new type its tag


# ``--against``: an earlier revision's package, exported by the parent, is imported instead of this tree's.
if os.environ.get("BENCH_PACKAGE"):
    sys.path.insert(0, os.environ["BENCH_PACKAGE"])
_shift_type_versions(int(os.environ.get("BENCH_TYPE_SHIFT", "0")))
