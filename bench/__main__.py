"""``python -m bench [NAME ...]``: run the benchmarks (all by default)."""

from __future__ import annotations

import importlib
import sys

BENCHMARKS = ["activation", "eventlog", "identity", "identity_split", "ingest", "segmentation"]


def main(argv: list[str]) -> int:
    for name in argv or BENCHMARKS:
        module = importlib.import_module(f"bench.{name}")
        module.run()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
