"""`python -m bench --help` and `--list` say what each benchmark measures, without running any."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"


def bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bench", *args],
        cwd=BENCH.parent,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def runnable() -> set[str]:
    """Every module of bench/ with a top-level ``def run(``: a benchmark `python -m bench` runs."""
    return {p.stem for p in BENCH.glob("*.py") if re.search(r"^def run\(", p.read_text(), re.MULTILINE)}


def test_list_names_every_benchmark_with_what_it_measures() -> None:
    done = bench("--list")
    assert done.returncode == 0, done.stderr
    listed = {line.split()[0]: line for line in done.stdout.splitlines()}
    assert set(listed) == runnable()
    for name, line in listed.items():
        assert len(line.split(maxsplit=1)[1]) > 20, name


def test_help_is_help_and_an_unknown_name_is_refused() -> None:
    done = bench("--help")
    assert done.returncode == 0, done.stderr
    assert "CDP_BENCH_" in done.stdout
    assert "segmentation" in done.stdout
    wrong = bench("nope")
    assert wrong.returncode == 2
    assert "unknown benchmark nope" in wrong.stderr
