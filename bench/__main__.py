"""``python -m bench [NAME ...]``: run the benchmarks (all by default).

``python -m bench --list`` names them with what each measures; ``--help`` says how to run them.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import sys
from pathlib import Path

BENCHMARKS = [
    *("activation", "e2e", "eventlog", "identity", "identity_split"),
    *("ingest", "lookup", "privacy", "segmentation"),
]
HERE = Path(__file__).parent


def summary(name: str) -> str:
    """The first sentence of a benchmark's docstring, read without importing it (imports are heavy)."""
    doc = ast.get_docstring(ast.parse((HERE / f"{name}.py").read_text())) or ""
    first = " ".join(doc.split("\n\n", 1)[0].split())
    return first.split(". ", 1)[0].rstrip(".")


def listing() -> str:
    width = max(map(len, BENCHMARKS))
    return "\n".join(f"  {name:<{width}}  {summary(name)}" for name in BENCHMARKS)


def parser() -> argparse.ArgumentParser:
    return argparse.ArgumentParser(
        prog="python -m bench",
        description="Run the benchmarks: each prints its figures and their ratio to a baseline measured in the "
        "same run (these machines are noisy). Sizes are set by CDP_BENCH_* environment variables, "
        "documented at the top of each benchmark's file.",
        epilog="benchmarks:\n" + listing(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def main(argv: list[str]) -> int:
    cli = parser()
    cli.add_argument("names", nargs="*", metavar="NAME", help="benchmarks to run (default: all)")
    cli.add_argument("--list", action="store_true", help="list the benchmarks and what each measures")
    args = cli.parse_args(argv)
    if args.list:
        print(listing())
        return 0
    unknown = [name for name in args.names if name not in BENCHMARKS]
    if unknown:
        cli.error(f"unknown benchmark {', '.join(unknown)} (known: {', '.join(BENCHMARKS)})")
    for name in args.names or BENCHMARKS:
        module = importlib.import_module(f"bench.{name}")
        module.run()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
