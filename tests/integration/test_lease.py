"""Active/standby (``cdp_kit.lease``) on a real JetStream: the lease's compare-and-set, its expiry
by the standby's own clock, a frozen active that wakes up deposed, the fence that stops its next
append, and a hot standby that follows the log and takes over with the same store as the active's.

The processor is ``test_processor``'s echo service: one own event per input event, and counters
that make a double application visible in the store."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.engine import Engine

from cdp_kit.eventlog import AppendConflict, EventLog
from cdp_kit.lease import Lease, LeaseLost
from cdp_kit.processor import FENCE_HEADER, Deposed, LeaseStale, Processor, emitted_checkpoint, in_checkpoint
from cdp_kit.store import make_engine, sqlite_url
from tests.integration.test_processor import (
    IN,
    INPUT_LAYOUT,
    OUT,
    append_inputs,
    checkpoints,
    counters,
    dump,
    make_processor,
    output_ids,
    outputs,
)

TTL = 1.0


def state(engine: Engine) -> dict[str, object]:
    """The store without where it stands on its own logs (a fence is one more message there)."""
    dumped = dump(engine)
    dumped["cdp_checkpoint"] = [row for row in dumped["cdp_checkpoint"] if not str(row[0]).startswith("own:")]
    return dict(dumped)


@pytest.fixture
def engines(tmp_path: Path) -> Iterator[tuple[Engine, Engine]]:
    """Two instances' stores: each instance of a service has its own."""
    a = make_engine(sqlite_url(tmp_path / "a.db"))
    b = make_engine(sqlite_url(tmp_path / "b.db"))
    try:
        yield a, b
    finally:
        a.dispose()
        b.dispose()


async def test_one_holder_a_standby_takes_over_only_once_the_lease_stops_being_renewed(eventlog: EventLog) -> None:
    a = Lease(eventlog, "test", "a", TTL)
    b = Lease(eventlog, "test", "b", TTL)
    assert await asyncio.wait_for(a.acquire(poll_s=0.05), 5) == a.epoch > 0
    assert a.valid()
    keeping = asyncio.create_task(a.keep())
    taking = asyncio.create_task(b.acquire(poll_s=0.05))
    await asyncio.sleep(3 * TTL)  # a renews every TTL/3: b must still wait
    assert not taking.done(), "a standby took over a lease that was being renewed"
    assert b.holder is not None
    assert b.holder.instance == "a"
    keeping.cancel()  # a freezes: no more renewals
    await asyncio.gather(keeping, return_exceptions=True)
    frozen_at = asyncio.get_running_loop().time()
    epoch_b = await asyncio.wait_for(taking, 5 * TTL)
    waited = asyncio.get_running_loop().time() - frozen_at
    assert epoch_b > a.epoch
    assert waited >= TTL * 0.6, f"taken over {waited:.2f} s after the last renewal, before the TTL"
    assert not a.valid(), "the frozen holder still thinks it may act after a standby could take over"
    # a wakes up: its next renewal is refused, and it says it lost the lease.
    with pytest.raises(LeaseLost):
        await asyncio.wait_for(a.keep(), 3 * TTL)
    assert a.lost.is_set()
    assert not a.valid()
    holder = await b.read()
    assert holder is not None
    assert (holder.instance, holder.epoch) == ("b", epoch_b)


async def test_two_standbys_racing_for_an_expired_lease_one_wins(eventlog: EventLog) -> None:
    a = Lease(eventlog, "test", "a", TTL)
    await a.acquire(poll_s=0.05)
    b = Lease(eventlog, "test", "b", TTL)
    c = Lease(eventlog, "test", "c", TTL)
    tasks = [asyncio.create_task(x.acquire(poll_s=0.01)) for x in (b, c)]
    done, pending = await asyncio.wait(tasks, timeout=5 * TTL, return_when=asyncio.FIRST_COMPLETED)
    assert len(done) == 1
    # The loser watched the same revision and tried the same compare-and-set: refused, it waits on.
    await asyncio.sleep(0.3 * TTL)
    assert len(pending) == 1
    assert not next(iter(pending)).done()
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    winner, loser = (b, c) if b.epoch else (c, b)
    assert winner.epoch > a.epoch
    assert loser.epoch == 0
    holder = await a.read()
    assert holder is not None
    assert (holder.instance, holder.epoch) == (winner.instance, winner.epoch)


async def test_a_deposed_active_cannot_append_after_the_fence_and_steps_down(
    eventlog: EventLog, engines: tuple[Engine, Engine]
) -> None:
    engine_a, engine_b = engines
    await append_inputs(eventlog, INPUT_LAYOUT[:3])
    a = make_processor(engine_a, eventlog)
    await a.fence("a@1")
    await a.catch_up()
    assert a.fenced_at[OUT.name] > 0
    # b takes over (its store is empty: it follows from the start of the log), fences, recovers.
    b = make_processor(engine_b, eventlog)
    await b.fence("b@2")
    await b.catch_up()
    assert state(engine_b) == state(engine_a)
    # a wakes up with a decision in hand: its append is refused by the guard...
    await append_inputs(eventlog, INPUT_LAYOUT[3:4], first=4)
    fourth = [(m, None) async for m in eventlog.read(IN.stream.name, IN.filter_subject, 4)]
    with pytest.raises(AppendConflict):
        await a.apply_input_batch(a.inputs[0], fourth)
    # ...and recovering, it meets b's fence and stops, never retrying.
    with pytest.raises(Deposed):
        await a.recover()
    assert a.deposed.is_set()
    # b decides the message once.
    await b.catch_up()
    out = await outputs(eventlog)
    ids = [i for _, events in out for i in events]
    assert ids == output_ids(layout=INPUT_LAYOUT[:4])
    markers = [m.headers.get(FENCE_HEADER) async for m in eventlog.read(OUT.stream.name, OUT.subject)]
    assert [m for m in markers if m] == ["a@1", "b@2"]
    assert counters(engine_b)["observed"] == sum(INPUT_LAYOUT[:4])


async def test_a_hot_standby_follows_the_active_and_takes_over_with_the_same_store(
    eventlog: EventLog, engines: tuple[Engine, Engine]
) -> None:
    engine_a, engine_b = engines
    a = make_processor(engine_a, eventlog)
    await a.fence("a@1")
    b = make_processor(engine_b, eventlog)
    await append_inputs(eventlog, INPUT_LAYOUT[:4])
    # The standby follows before the active decided anything: it stops where it would have to append.
    assert await b.follow() is False
    assert not [i for _, events in await outputs(eventlog) for i in events]
    await a.catch_up()
    assert await b.follow() is True
    assert dump(engine_b) == dump(engine_a)
    # The active goes on alone; the standby follows again, then takes over and finishes.
    await append_inputs(eventlog, INPUT_LAYOUT[4:], first=5)
    await a.catch_up()
    assert await b.follow() is True
    assert dump(engine_b) == dump(engine_a)
    await append_inputs(eventlog, [1, 1], first=len(INPUT_LAYOUT) + 1)
    await b.fence("b@2")
    await b.catch_up()
    layout = [*INPUT_LAYOUT, 1, 1]
    ids = [i for _, events in await outputs(eventlog) for i in events]
    assert ids == output_ids(layout=layout), "an output is missing or doubled across the takeover"
    assert counters(engine_b)["observed"] == sum(layout)
    assert checkpoints(engine_b)[emitted_checkpoint(IN)] > 0
    # The follower's readers are its own: the active's reader names were never used by it.
    infos = [c.name async for c in _consumers(eventlog, OUT.stream.name)]
    assert not [n for n in infos if n.endswith("-sby")], "a standby left a reader behind"


async def _consumers(eventlog: EventLog, stream: str):  # type: ignore[no-untyped-def]
    for info in await eventlog.js.consumers_info(stream):
        yield info


async def test_a_running_consumer_fenced_mid_flight_stops_instead_of_retrying(
    eventlog: EventLog, engines: tuple[Engine, Engine]
) -> None:
    """run_input retries on every error it knows (an append conflict: recover, go on); a fence met
    while recovering ends it instead, through every ``except Exception`` on the way."""
    engine_a, engine_b = engines
    a: Processor = make_processor(engine_a, eventlog)
    await a.fence("a@1")
    task = asyncio.create_task(a.run())
    await asyncio.wait_for(a.ready.wait(), 10)
    b = make_processor(engine_b, eventlog)
    await b.fence("b@2")
    await append_inputs(eventlog, INPUT_LAYOUT[:2])
    try:
        with pytest.raises(Deposed):
            await asyncio.wait_for(task, 15)
    finally:
        a.stop()
        if not task.done():
            task.cancel()
        with contextlib.suppress(BaseException):
            await task
    assert a.deposed.is_set()
    assert not [i for _, events in await outputs(eventlog) for i in events], "the deposed instance appended"


async def test_an_instance_whose_lease_is_stale_neither_commits_nor_acknowledges_what_it_read(
    eventlog: EventLog, engines: tuple[Engine, Engine]
) -> None:
    """A frozen active wakes up with a fetched batch: if it committed and acknowledged messages that
    decide nothing (no append to be fenced), the new active would never see them."""
    engine_a, _ = engines
    a = make_processor(engine_a, eventlog)
    fresh = False
    a.may_act = lambda: fresh
    await append_inputs(eventlog, INPUT_LAYOUT[:2])
    batch = [(m, None) async for m in eventlog.read(IN.stream.name, IN.filter_subject)]
    with pytest.raises(LeaseStale):
        await a.apply_input_batch(a.inputs[0], batch)
    assert "observed" not in counters(engine_a)
    assert checkpoints(engine_a).get(in_checkpoint(IN), 0) == 0
    fresh = True
    await a.apply_input_batch(a.inputs[0], batch)
    assert counters(engine_a)["observed"] == sum(INPUT_LAYOUT[:2])


async def test_a_released_lease_is_taken_at_once_not_after_the_ttl(eventlog: EventLog) -> None:
    """A graceful stop (a rolling update) hands over without waiting for the TTL."""
    ttl = 30.0
    a = Lease(eventlog, "test", "a", ttl)
    await a.acquire(poll_s=0.05)
    b = Lease(eventlog, "test", "b", ttl)
    taking = asyncio.create_task(b.acquire(poll_s=0.05))
    await asyncio.sleep(0.3)
    assert not taking.done()
    assert await a.release()
    assert not a.valid()
    epoch = await asyncio.wait_for(taking, 5.0)  # far below the 30 s TTL
    assert epoch > a.revision
    assert not await a.release()  # not held any more: nothing to give up


async def test_a_late_fence_of_an_older_epoch_never_deposes_the_newer_holder(
    eventlog: EventLog, engines: tuple[Engine, Engine]
) -> None:
    """A holder whose lease lapsed while it fenced may append its marker after the new holder's:
    epochs decide, not positions."""
    engine_a, engine_b = engines
    newer = make_processor(engine_b, eventlog)
    await newer.fence("b@5")
    older = make_processor(engine_a, eventlog)
    await older.fence("a@3")  # appended after b's marker
    await newer.recover()  # meets a@3: older, so it goes on
    assert not newer.deposed.is_set()
    with pytest.raises(Deposed):
        await older.recover()  # meets b@5
    assert older.deposed.is_set()


async def test_a_release_after_a_renewal_whose_answer_was_lost_still_releases(eventlog: EventLog) -> None:
    """A stop cancels a renewal after it was sent: it went through, but this instance never saw its
    revision. The release finds the key still its own and releases it at its true revision."""
    a = Lease(eventlog, "test", "a", 30.0)
    await a.acquire(poll_s=0.05)
    before = a.revision
    await a._write(a.revision, a.epoch)  # the renewal lands...
    a.revision = before  # ...and its answer is lost
    assert await a.release()
    holder = await a.read()
    assert holder is not None
    assert holder.instance == ""  # released
