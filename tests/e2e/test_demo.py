"""`make demo` runs the whole blueprint; this drives the same code on a small data set and
checks that what the platforms hold agrees with the audiences."""

from __future__ import annotations

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
