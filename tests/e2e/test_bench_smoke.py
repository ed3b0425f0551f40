"""``python -m bench e2e``, ``lookup`` and ``privacy`` at tiny sizes: each starts its stack,
finishes, prints its figures, and the end-to-end one's exactly-once audit passes. No timings
are asserted (the figures are for people to read)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]


def bench(name: str, **sizes: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "bench", name],
        cwd=ROOT,
        env={**os.environ, **sizes},
        capture_output=True,
        text=True,
        timeout=420,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


@pytest.mark.timeout(450)
def test_bench_e2e_finishes_prints_its_figures_and_delivers_every_event_once() -> None:
    out = bench("e2e", CDP_BENCH_E2E_BURST="200", CDP_BENCH_E2E_SECONDS="2", CDP_BENCH_E2E_TIMEOUT_S="360")
    assert "== e2e: sustained throughput" in out
    assert "raw JetStream publish -> pull-consume (events)" in out
    for load in ("10%", "50%", "80%"):
        assert f"== e2e: latency at {load} of max" in out
    assert out.count("p50         p95         p99") == 4
    assert "== e2e: per service, CPU seconds" in out
    for service in ("ingest", "identity", "segmentation", "activation"):
        assert f"{service}:" in out  # its consumers' lag
    assert "bottleneck at maximum (burst):" in out
    assert "bottleneck at 80% of max:" in out
    assert "exactly-once audit of" in out
    assert ": PASSES" in out


@pytest.mark.timeout(450)
def test_bench_lookup_finishes_and_prints_each_load_with_its_baseline() -> None:
    out = bench(
        "lookup",
        CDP_BENCH_LOOKUP_PROFILES="500",
        CDP_BENCH_LOOKUP_SECONDS="1",
        CDP_BENCH_LOOKUP_RATE="100",
        CDP_BENCH_LOOKUP_TIMEOUT_S="360",
    )
    assert "== lookup: GetProfile by cookie, 500 profiles" in out
    for label in ("open loop 100/s", "closed loop, 8 callers", "closed loop, 16 callers", "closed loop, 32 callers"):
        assert f"{label}: health (baseline)" in out
        assert f"{label}: GetProfile" in out
    assert out.count("ratio p99") == 4
    assert "; 0 failed lookups)" in out  # not "10 failed lookups"


@pytest.mark.timeout(450)
def test_bench_privacy_finishes_and_checks_the_people_are_gone() -> None:
    out = bench(
        "privacy",
        CDP_BENCH_PRIVACY_PROFILES="400",
        CDP_BENCH_PRIVACY_DELETES="40",
        CDP_BENCH_PRIVACY_TIMEOUT_S="360",
    )
    assert "== privacy: delete 40 people of 400 profiles" in out
    assert "40 unknown emails (baseline, nothing held)" in out
    assert "40 people erased everywhere" in out
    assert "keys destroyed 80" in out  # an email and a crm_id each
    assert "check: 0 of 40 sampled emails still resolve; segmentation holds 360" in out
