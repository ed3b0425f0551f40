"""The identity process tunes CPython's cyclic collector (see cdp_identity.main.GC_THRESHOLD)."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import pytest

from cdp_identity.main import GC_THRESHOLD, build_processor, collect_less_often
from cdp_identity.settings import IdentitySettings
from cdp_kit.eventlog import EventLog
from cdp_kit.store import make_engine, sqlite_url


@pytest.fixture
def gc_thresholds() -> Iterator[None]:
    saved = gc.get_threshold()
    try:
        yield
    finally:
        gc.set_threshold(*saved)


@pytest.mark.usefixtures("gc_thresholds")
def test_collect_less_often_raises_the_thresholds_and_never_lowers_them() -> None:
    gc.set_threshold(700, 10, 10)
    collect_less_often()
    assert gc.get_threshold() == GC_THRESHOLD
    gc.set_threshold(500_000, 5, 50)
    collect_less_often()
    assert gc.get_threshold() == (500_000, GC_THRESHOLD[1], 50)


@pytest.mark.usefixtures("gc_thresholds")
def test_building_the_processor_tunes_the_collector(tmp_path: Path) -> None:
    gc.set_threshold(700, 10, 10)
    engine = make_engine(sqlite_url(tmp_path / "identity.db"))
    try:
        build_processor(IdentitySettings(), engine, cast(EventLog, None))
    finally:
        engine.dispose()
    assert gc.get_threshold() == GC_THRESHOLD
