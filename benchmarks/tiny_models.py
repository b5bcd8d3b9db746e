"""How long the tiny test stand-ins take to build (utils/models/stand_ins.py tiny_tokenizer, tiny_model): the test suite builds
them dozens of times, so each should stay well under a second or two. A benchmark, not a unit test: wall-clock limits
fail at random on a shared 2-core CI machine.

    python benchmarks/tiny_models.py                  # median of 5 builds each; exit 1 above --limit seconds
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.models import TINY_FAMILIES, tiny_model, tiny_tokenizer  # noqa: E402


def median_seconds(build, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        build()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--limit", type=float, default=2.0, help="seconds a build may take (median)")
    args = parser.parse_args(argv)
    tiny_tokenizer()  # first call pays the imports
    timings = {"tiny_tokenizer()": median_seconds(tiny_tokenizer, args.repeats)}
    for family in TINY_FAMILIES:
        timings[f"tiny_model({family!r})"] = median_seconds(lambda: tiny_model(family), args.repeats)
    slow = []
    for name, seconds in timings.items():
        print(f"{name:24s} {seconds * 1000:8.1f} ms")
        if seconds > args.limit:
            slow.append(name)
    if slow:
        sys.exit(f"slower than {args.limit} s: {', '.join(slow)}")


if __name__ == "__main__":
    main()
