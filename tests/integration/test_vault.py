"""The person vault on a real nats-server: keys made, fetched, revoked and destroyed, and a
destroy leaves none of the key's bytes in the JetStream store directory."""

from __future__ import annotations

from pathlib import Path

import nats.js.errors
import pytest

from cdp_kit.envelope import Envelope
from cdp_kit.eventlog import EventLog
from cdp_kit.natsserver import NatsServer
from cdp_kit.vault import PersonVault

PEOPLE = [("email", "ann@example.com"), ("phone", "+15550001111")]


def store_bytes(store_dir: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(store_dir.rglob("*")) if p.is_file())


def sealed_event(vault: PersonVault, refs: list[str], secret: bytes) -> Envelope:
    env = Envelope(id="e-1", type="cdp.test.Thing")
    env.payload.type_url = "type.googleapis.com/cdp.test.Thing"
    env.sealed.append(vault.seal(refs, secret, event_id=env.id, event_type=env.type))
    return env


async def test_keys_are_made_committed_and_fetched_by_another_process(eventlog: EventLog) -> None:
    producer = await PersonVault.bind(eventlog.js)
    refs = producer.refs_for(PEOPLE)
    assert len(set(refs)) == 2
    assert producer.refs_for(PEOPLE) == refs  # one generation per identity in a process
    assert await producer.commit() == 2
    assert await producer.commit() == 0

    consumer = await PersonVault.bind(eventlog.js)
    env = sealed_event(producer, refs, b"\x0a\x03ann")
    await consumer.prefetch(refs)
    assert consumer.open_envelope(env)
    assert env.payload.value == b"\x0a\x03ann"
    assert consumer.erased == 0


async def test_revoke_then_destroy_erases_and_a_new_generation_follows(eventlog: EventLog) -> None:
    vault = await PersonVault.bind(eventlog.js)
    refs = vault.refs_for(PEOPLE)
    await vault.commit()
    env = sealed_event(vault, refs, b"\x0a\x03ann")

    other = await PersonVault.bind(eventlog.js)
    await other.prefetch(refs)
    other.revoke(refs[:1])  # the privacy request applied in that process: erased from now on
    assert not other.open_envelope(env)
    assert other.erased == 1

    assert await vault.destroy(refs[:1]) == 1
    assert await vault.destroy(refs[:1]) == 0
    with pytest.raises(nats.js.errors.KeyNotFoundError):
        await vault.kv.get(refs[0])
    # A fresh process: the key is gone from the bucket, the record (naming two people) is erased.
    fresh = await PersonVault.bind(eventlog.js)
    await fresh.prefetch(refs)
    assert not fresh.open_envelope(sealed_event_copy(env))
    # The same person comes back: a new generation, never the destroyed ref.
    again = vault.refs_for(PEOPLE)
    assert again[0] != refs[0]
    assert again[1] == refs[1]


class OneMessage:
    """A log message holding one event (what ``PersonVault.open_messages`` reads)."""

    def __init__(self, sequence: int, env: Envelope) -> None:
        self.sequence = sequence
        self.env = env

    def events(self) -> list[Envelope]:
        return [sealed_event_copy(self.env)]


async def test_a_key_destroyed_elsewhere_erases_a_v2_part_whose_set_key_this_process_cached(
    eventlog: EventLog,
) -> None:
    """Set keys are cached by refs (cdp_kit.sealing.SetKeys): once a fetch finds one of the refs
    destroyed, the cached set key must not open the part any more."""
    producer = await PersonVault.bind(eventlog.js)
    refs = producer.refs_for(PEOPLE)
    await producer.commit()
    env = sealed_event(producer, refs, b"\x0a\x03ann")

    reader = await PersonVault.bind(eventlog.js, cache_size=2)
    assert [len(envs) for envs in (await reader.open_messages([OneMessage(1, env)])).values()] == [1]

    assert await producer.destroy(refs[:1]) == 1
    others = producer.refs_for([("email", "bob@example.com"), ("email", "cy@example.com")])
    await producer.commit()
    other = sealed_event(producer, others, b"\x0a\x03bob")
    opened = await reader.open_messages([OneMessage(2, other)])  # its key cache (2 keys) lets go of ann's
    assert [len(envs) for envs in opened.values()] == [1]
    assert await reader.open_messages([OneMessage(3, env)]) == {3: []}  # fetched again: erased
    assert reader.erased == 1


def sealed_event_copy(env: Envelope) -> Envelope:
    copy = Envelope()
    copy.CopyFrom(env)
    return copy


async def committed_keys(eventlog: EventLog) -> tuple[PersonVault, list[str], list[bytes]]:
    """The streams and the bucket, and a key per person of ``PEOPLE`` made and written to it."""
    await eventlog.ensure_streams()
    vault = await PersonVault.bind(eventlog.js)
    refs = vault.refs_for(PEOPLE)
    keys = [vault._keys[ref] for ref in refs]
    await vault.commit()
    return vault, refs, keys


async def test_destroy_leaves_no_key_bytes_in_the_store_dir(nats_server: NatsServer) -> None:
    eventlog = await EventLog.connect(nats_server.url, "cdp-test")
    try:
        vault, refs, keys = await committed_keys(eventlog)
        await eventlog.nc.flush()
        before = store_bytes(nats_server.store_dir)
        assert all(before.count(key) == 1 for key in keys)

        assert await vault.destroy(refs[:1]) == 1
    finally:
        await eventlog.close()
    nats_server.stop()  # flushed and closed: what is on disk is all there is
    after = store_bytes(nats_server.store_dir)
    assert after.count(keys[0]) == 0
    assert after.count(keys[1]) == 1  # the other person's key is still there
