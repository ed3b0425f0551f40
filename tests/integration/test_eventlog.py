"""The event-log contract, on a real nats-server with JetStream."""

from __future__ import annotations

import os
import signal
from datetime import UTC, datetime
from typing import Any

import pytest

from cdp.common.v1.envelope_pb2 import IdentityValue
from cdp_kit import eventlog as eventlog_module
from cdp_kit.envelope import Cause, Envelope, make_envelope, unpack
from cdp_kit.errors import Unavailable
from cdp_kit.eventlog import FETCH_BUDGET_BYTES, READ_FETCH_MESSAGES, AppendConflict, EventLog
from cdp_kit.natsserver import NatsServer
from cdp_kit.streams import INGEST, ConsumerSpec

SUBJECT = "cdp.ingest.0.records"
T0 = datetime(2026, 1, 1, tzinfo=UTC)


def event(n: int) -> Envelope:
    return make_envelope(
        IdentityValue(namespace="crm_id", value=f"c{n}"),
        event_id=f"e{n}",
        subject_key="crm",
        occurred_at=T0,
        cause=Cause(command_id=f"cmd{n}"),
    )


async def test_append_returns_increasing_sequences(eventlog: EventLog) -> None:
    first = await eventlog.append(SUBJECT, [event(1)], msg_id="m1")
    second = await eventlog.append(SUBJECT, [event(2), event(3)], msg_id="m2")
    assert (first.sequence, second.sequence) == (1, 2)
    assert not first.duplicate
    assert not second.duplicate


async def test_same_msg_id_is_deduplicated(eventlog: EventLog) -> None:
    first = await eventlog.append(SUBJECT, [event(1)], msg_id="same")
    again = await eventlog.append(SUBJECT, [event(1)], msg_id="same")
    assert again.duplicate
    assert again.sequence == first.sequence
    assert await eventlog.last_sequence(INGEST.name) == 1


async def test_expected_subject_sequence_guards_the_writer(eventlog: EventLog) -> None:
    await eventlog.append(SUBJECT, [event(1)], msg_id="a", expected_last_subject_sequence=0)
    await eventlog.append(SUBJECT, [event(2)], msg_id="b", expected_last_subject_sequence=1)
    with pytest.raises(AppendConflict):
        await eventlog.append(SUBJECT, [event(3)], msg_id="c", expected_last_subject_sequence=1)
    assert await eventlog.last_sequence(INGEST.name, SUBJECT) == 2


async def test_guard_is_per_subject(eventlog: EventLog) -> None:
    await eventlog.append("cdp.ingest.1.records", [event(1)], msg_id="other")
    appended = await eventlog.append(SUBJECT, [event(2)], msg_id="mine", expected_last_subject_sequence=0)
    assert appended.sequence == 2


async def test_expected_stream_sequence_conflict(eventlog: EventLog) -> None:
    await eventlog.append(SUBJECT, [event(1)], msg_id="a", expected_last_sequence=0)
    with pytest.raises(AppendConflict):
        await eventlog.append(SUBJECT, [event(2)], msg_id="b", expected_last_sequence=0)


async def test_read_from_a_sequence(eventlog: EventLog) -> None:
    for n in range(1, 11):
        await eventlog.append(SUBJECT, [event(n)], msg_id=f"m{n}")
    got = [m async for m in eventlog.read(INGEST.name, SUBJECT, 4, batch=3)]
    assert [m.sequence for m in got] == list(range(4, 11))
    values = [unpack(m.events()[0], IdentityValue).value for m in got]
    assert values == [f"c{n}" for n in range(4, 11)]


async def test_read_of_an_empty_subject_ends(eventlog: EventLog) -> None:
    assert [m async for m in eventlog.read(INGEST.name, SUBJECT, 1)] == []


async def test_read_stops_at_the_end_as_of_the_call(eventlog: EventLog) -> None:
    await eventlog.append(SUBJECT, [event(1)], msg_id="m1")
    seen = []
    async for msg in eventlog.read(INGEST.name, SUBJECT, 1):
        seen.append(msg.sequence)
    assert seen == [1]


async def test_headers_and_recorded_at_travel(eventlog: EventLog) -> None:
    await eventlog.append(SUBJECT, [event(1)], msg_id="m1", headers={"Cdp-Cause": "x:1"}, recorded_at=T0)
    [msg] = [m async for m in eventlog.read(INGEST.name, SUBJECT, 1)]
    assert msg.headers["Cdp-Cause"] == "x:1"
    assert msg.events()[0].recorded_at.ToDatetime(tzinfo=UTC) == T0


async def test_unreachable_nats_is_unavailable() -> None:
    from cdp_kit.errors import Unavailable
    from cdp_kit.natsserver import free_port

    with pytest.raises(Unavailable):
        await EventLog.connect(f"nats://127.0.0.1:{free_port()}", "t", connect_timeout=0.5)


async def test_a_read_leaves_no_consumer_behind(eventlog: EventLog) -> None:
    for n in range(1, 4):
        await eventlog.append(SUBJECT, [event(n)], msg_id=f"m{n}")
    got = [m.sequence async for m in eventlog.read(INGEST.name, SUBJECT, 1, batch=2)]
    assert got == [1, 2, 3]
    info = await eventlog.js.stream_info(INGEST.name)
    assert info.state.consumer_count == 0


async def consumer_names(eventlog: EventLog) -> list[str]:
    return [str(c.name) for c in await eventlog.js.consumers_info(INGEST.name)]


async def test_a_read_that_misses_a_delivery_fails_as_unavailable(eventlog: EventLog) -> None:
    """A delivery that never reaches the reader (here another subscriber takes it from the read's
    own consumer) must fail the read, not skip the message silently."""
    total = READ_FETCH_MESSAGES * 3
    for n in range(1, total + 1):
        await eventlog.append(SUBJECT, [event(n)], msg_id=f"m{n}")
    seen: list[int] = []

    async def read_all() -> None:
        async for msg in eventlog.read(INGEST.name, SUBJECT, 1):
            seen.append(msg.sequence)
            if len(seen) == 1:  # the read holds its first fetch; take the next delivery from under it
                [consumer] = await consumer_names(eventlog)
                thief = await eventlog.js.pull_subscribe_bind(durable=consumer, stream=INGEST.name)
                [stolen] = await thief.fetch(1, timeout=5)
                assert stolen.metadata.sequence.consumer == READ_FETCH_MESSAGES + 1
                await thief.unsubscribe()

    with pytest.raises(Unavailable, match="lost messages after delivery"):
        await read_all()
    assert seen == list(range(1, READ_FETCH_MESSAGES + 1))  # everything before the gap, nothing after
    assert await consumer_names(eventlog) == []  # and the read's consumer is gone


async def test_a_read_whose_server_stops_delivering_fails_as_unavailable(
    eventlog: EventLog, nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Messages pending but none delivered for READ_STALLS fetches in a row (the server is frozen
    with SIGSTOP) fail the read instead of waiting for ever; the read cleans up once it is back."""
    monkeypatch.setattr(eventlog_module, "READ_FETCH_TIMEOUT_S", 0.2)
    for n in range(1, READ_FETCH_MESSAGES + 6):
        await eventlog.append(SUBJECT, [event(n)], msg_id=f"m{n}")
    assert nats_server.process is not None
    pid = nats_server.process.pid
    seen: list[int] = []

    class ThawingUnavailable(Unavailable):
        """The read gives up: thaw the server at that moment, so that the read's clean-up (its
        consumer delete) reaches it. A timer could thaw it too early on a loaded machine (the
        stalled fetches took longer, the read went on: 1 run in 9, and in CI twice)."""

        def __init__(self, *args: Any) -> None:
            os.kill(pid, signal.SIGCONT)
            super().__init__(*args)

    monkeypatch.setattr(eventlog_module, "Unavailable", ThawingUnavailable)

    async def read_all() -> None:
        async for msg in eventlog.read(INGEST.name, SUBJECT, 1):
            seen.append(msg.sequence)
            if len(seen) == READ_FETCH_MESSAGES:  # the first fetch is used up: freeze the server
                os.kill(pid, signal.SIGSTOP)

    try:
        with pytest.raises(Unavailable, match=f"5 messages pending, none delivered in {eventlog_module.READ_STALLS} "):
            await read_all()
    finally:
        os.kill(pid, signal.SIGCONT)
    assert seen == list(range(1, READ_FETCH_MESSAGES + 1))
    assert await consumer_names(eventlog) == []


async def test_a_durable_reader_asks_for_no_more_bytes_than_its_budget(eventlog: EventLog) -> None:
    """Wide messages: a pull of 256 of them would make the server buffer far more than its per-client
    limit and drop the connection. Each fetch stays within the byte budget, and all arrive in order."""
    payload = b"w" * 600_000
    for n in range(1, 41):
        await eventlog.append_raw(SUBJECT, payload, msg_id=f"wide-{n}")
    reader = await eventlog.durable(ConsumerSpec("test-wide", INGEST, SUBJECT), 1)
    got: list[int] = []
    try:
        while len(got) < 40:
            items = await reader.fetch(256, timeout=5.0)
            assert sum(len(m.data) for m, _ in items) <= FETCH_BUDGET_BYTES
            got += [m.sequence for m, _ in items]
    finally:
        await reader.close()
    assert got == list(range(1, 41))
