"""The identity process tunes CPython's cyclic collector (see cdp_identity.main.GC_THRESHOLD and
cdp_kit.collector, paused by the working set)."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import pytest
from sqlmodel import Session

from cdp_identity.graph import WorkingSet
from cdp_identity.main import GC_THRESHOLD, build_processor, collect_less_often
from cdp_identity.settings import IdentitySettings
from cdp_identity.store import TABLES
from cdp_kit.eventlog import EventLog
from cdp_kit.store import create_tables, make_engine, sqlite_url, transaction


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
    gc.set_threshold(2_000_000, 5, 50)
    collect_less_often()
    assert gc.get_threshold() == (2_000_000, GC_THRESHOLD[1], 50)


@pytest.mark.usefixtures("gc_thresholds")
def test_building_the_processor_tunes_the_collector(tmp_path: Path) -> None:
    gc.set_threshold(700, 10, 10)
    engine = make_engine(sqlite_url(tmp_path / "identity.db"))
    try:
        build_processor(IdentitySettings(), engine, cast(EventLog, SimpleNamespace(js=None)))  # never connects
    finally:
        engine.dispose()
    assert gc.get_threshold() == GC_THRESHOLD


@pytest.fixture
def gc_enabled() -> Iterator[None]:
    was = gc.isenabled()
    gc.enable()
    try:
        yield
    finally:
        (gc.enable if was else gc.disable)()


@pytest.mark.usefixtures("gc_enabled")
def test_the_collector_is_off_while_a_working_set_lives_and_on_after_commit_or_rollback(tmp_path: Path) -> None:
    engine = make_engine(sqlite_url(tmp_path / "identity.db"))
    create_tables(engine, TABLES)
    rules = IdentitySettings().rules()
    try:
        with transaction(engine) as session:
            WorkingSet.of(session, rules)
            assert not gc.isenabled()
        assert gc.isenabled()

        def failing_batch() -> None:
            with transaction(engine) as session:
                WorkingSet.of(session, rules)
                assert not gc.isenabled()
                raise RuntimeError("the batch fails")

        with pytest.raises(RuntimeError):
            failing_batch()
        assert gc.isenabled()
        with Session(engine) as session:  # closed without commit or rollback
            WorkingSet.of(session, rules)
            assert not gc.isenabled()
        assert gc.isenabled()
        gc.disable()  # someone else's choice is left alone
        with transaction(engine) as session:
            WorkingSet.of(session, rules)
        assert not gc.isenabled()
    finally:
        engine.dispose()
