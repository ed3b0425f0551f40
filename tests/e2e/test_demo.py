"""`make demo` runs the whole blueprint; this drives the same code on a small data set and
checks that what the platforms hold agrees with the audiences."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cdp_cli.blueprint import ACTIVATIONS
from cdp_cli.demo import run_demo

pytestmark = pytest.mark.e2e


def test_the_demo_activates_every_audience_to_its_destination(tmp_path: Path) -> None:
    settled = run_demo(tmp_path / "demo", people=60)

    names = {a.destination for a in ACTIVATIONS} | {"crm_file_drop"}
    assert names <= set(settled.stats)
    for name in names:
        stats = settled.stats[name]
        assert stats.received > 0, name
        assert stats.failed == 0, name
        assert stats.batches_pending == 0, name
        # everyone handed over is either activated or excluded with a reason
        assert stats.activated >= stats.received - sum(stats.excluded.values()), name
    assert settled.file_rows == settled.stats["crm_file_drop"].received - sum(
        settled.stats["crm_file_drop"].excluded.values()
    )


def test_the_demo_summary_piped_to_a_file_is_whole_and_says_why(tmp_path: Path) -> None:
    """`make demo > log`: nothing cut to 80 columns, dead letters with their reasons, only accepted
    web events counted, and why a consented audience is smaller than its segment."""
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    cdp = Path(sys.executable).with_name("cdp")
    done = subprocess.run(
        [str(cdp), "demo", "--people", "60", "--data-dir", str(tmp_path / "demo")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        text=True,
        timeout=300,
        check=False,
    )
    log = done.stdout
    assert done.returncode == 0, log[-3000:]
    assert "…" not in log
    for name in ("klaviyo_newsletter", "audience_webhook", "big_spenders_year", "web events on NATS cdp.collect.web"):
        assert name in log
    assert "Dead letters" in log
    assert "not valid JSON" in log
    [line] = [x for x in log.splitlines() if "unified profiles" in x]
    published, accepted = re.search(r"web events on NATS cdp.collect.web \(online\)\D+(\d+)\D+(\d+)", log).groups()  # type: ignore[union-attr]
    assert int(accepted) < int(published)
    assert line.endswith(f"and {accepted} web events")
    assert "unknown consent counts as yes (CDP_UNKNOWN_CONSENT=y)" in log
