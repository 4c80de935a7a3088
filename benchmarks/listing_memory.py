"""Driver memory of planning a folder corpus's units: the in-memory listing vs the streamed one.

    python benchmarks/listing_memory.py                  # 200,000 empty files in 200 folders
    python benchmarks/listing_memory.py --files 1000000

Writes ``--files`` empty files (names like an image corpus's: ``class_0042/img_00012345.jpeg``),
then, in the same run, measures the peak Python allocation (tracemalloc) of:

* old: ``core.storage.list_files`` (one sorted list of every path) and
  ``labeler.units.make_units`` (units holding the paths), what ``plan_units`` did before;
* new: ``labeler.sources.plan_units``, which streams the listing into a Parquet file
  (``labeler.listing``) and keeps one row group and a range per unit;

and prints both, their wall times and the ratio old/new. The new peak is bounded by one row group
(16,384 paths) and one folder's entries; the old one grows with the corpus.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import tracemalloc

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _measure(fn) -> tuple[float, float]:
    """(peak traced MB, seconds) of calling ``fn``; its result is dropped after the measurement."""
    tracemalloc.start()
    start = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1] / 1e6
    tracemalloc.stop()
    del result
    return peak, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=200_000)
    parser.add_argument("--folders", type=int, default=200)
    parser.add_argument("--files-per-unit", type=int, default=1000)
    args = parser.parse_args()

    from core.storage import list_files
    from labeler.sources import plan_units
    from labeler.units import make_units

    with tempfile.TemporaryDirectory() as tmp:
        root = os.path.join(tmp, "corpus")
        for d in range(args.folders):
            os.makedirs(os.path.join(root, f"class_{d:04d}"))
        for i in range(args.files):
            open(os.path.join(root, f"class_{i % args.folders:04d}", f"img_{i:08d}.jpeg"), "wb").close()
        per_unit = args.files_per_unit

        def old():
            return make_units(list_files(root)[1], per_unit)

        def new():
            return plan_units(root, "folder", files_per_unit=per_unit, listing=os.path.join(tmp, "listing.parquet"))

        old_mb, old_s = _measure(old)
        new_mb, new_s = _measure(new)
    print(f"files: {args.files:,} in {args.folders} folders, units of {per_unit}")
    print(f"old (list_files + make_units): peak {old_mb:8.1f} MB, {old_s:6.1f} s")
    print(f"new (streamed Parquet listing): peak {new_mb:8.1f} MB, {new_s:6.1f} s")
    print(f"peak ratio old/new: {old_mb / new_mb:.1f}x")


if __name__ == "__main__":
    main()
