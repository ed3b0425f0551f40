"""Identity's dropped identities carry a keyed tag (``pii_hash``), never the value nor a plain hash
of it; a store built by the old code (unkeyed "h:" tags on the log) and rebuilt by this one holds
no unkeyed hash: tags are never stored (only counts by namespace and rule), and new decisions
carry keyed tags. Events already on the log keep what they were written with: the log is immutable."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import pytest

from cdp.identity.v1 import events_pb2 as ev
from cdp.identity.v1 import identity_pb2 as pb
from cdp_identity import engine
from cdp_identity.settings import IdentitySettings
from cdp_kit.eventlog import EventLog
from cdp_kit.store import sqlite_url
from cdp_kit.telemetry import pii_hash
from tests.integration.test_identity_graph import Harness, Ident

BAD_PHONE, BAD_EMAIL, JUNK_EMAIL = "+1 555 01", "ann.leak(at)example.com", "test@test.com"
RECORDS: list[Sequence[Ident]] = [
    [("crm_id", "C1"), ("phone", BAD_PHONE), ("email", "ann@example.com")],
    [("email", BAD_EMAIL), ("phone", "12")],  # links no one: a decision with its drops
    [("crm_id", "C2"), ("email", JUNK_EMAIL)],
]
DROPPED = [BAD_PHONE, BAD_EMAIL, "12", JUNK_EMAIL]


def unkeyed(value: str) -> str:
    """The tag the code before keyed hashing wrote: plain SHA-256 cut to 12 hex digits."""
    return "h:" + hashlib.sha256(value.encode()).hexdigest()[:12]


async def tags_on_the_log(h: Harness) -> list[str]:
    fragments = await h.events(ev.ProfileFragment)
    decisions = await h.events(ev.GraphDecision)
    return [d.value_hash for f in fragments for d in f.dropped] + [d.value_hash for x in decisions for d in x.dropped]


def counts(stats: pb.IdentityStats) -> dict[tuple[str, str], int]:
    return {(d.namespace, d.rule): d.count for d in stats.dropped}


async def test_dropped_identities_carry_keyed_tags_of_their_values(eventlog: EventLog, tmp_path: Path) -> None:
    h = Harness(eventlog, sqlite_url(tmp_path / "identity.db"), IdentitySettings())
    await h.send(*RECORDS)
    tags = await tags_on_the_log(h)
    assert sorted(tags) == sorted(pii_hash(v) for v in DROPPED)
    assert not set(tags) & {unkeyed(v) for v in DROPPED}
    h.engine.dispose()


async def test_a_store_built_by_the_unkeyed_code_and_rebuilt_holds_no_unkeyed_hash(
    eventlog: EventLog, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with monkeypatch.context() as old_code:
        old_code.setattr(engine, "pii_hash", unkeyed)  # the decisions the previous release made
        old = Harness(eventlog, sqlite_url(tmp_path / "old.db"), IdentitySettings())
        await old.send(*RECORDS)
    assert sorted(await tags_on_the_log(old)) == sorted(unkeyed(v) for v in DROPPED)

    rebuilt = Harness(eventlog, sqlite_url(tmp_path / "rebuilt.db"), IdentitySettings())
    await rebuilt.processor.rebuild()
    dump = repr(rebuilt.dump())
    for value in DROPPED:
        assert unkeyed(value) not in dump
        assert unkeyed(value)[2:] not in dump
        assert value not in dump
    assert rebuilt.dump() == old.dump()  # same decisions: the tag was never part of the state
    stats = await rebuilt.api.GetStats(pb.GetStatsRequest(), None)  # type: ignore[arg-type]
    assert counts(stats)[("phone", "invalid")] == 2

    # What the rebuilt service decides from now on carries keyed tags.
    rebuilt.sent = len(RECORDS)  # the next record is r4
    await rebuilt.send([("crm_id", "C3"), ("phone", "99")])
    [fresh] = [f for f in await rebuilt.events(ev.ProfileFragment) if f.record_id == "r4"]
    assert [d.value_hash for d in fresh.dropped] == [pii_hash("99")]
    old.engine.dispose()
    rebuilt.engine.dispose()
