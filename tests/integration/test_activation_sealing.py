"""Activation's prepared batches on a real nats-server: each record's identities and attributes
are sealed on CDP_DELIVERY under its identities' keys (learnt from sealed fragments), the webhook
still gets plain values, and once a person's keys are destroyed a rebuild holds nothing of them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import sqlalchemy as sa

from cdp.common.v1.envelope_pb2 import IdentityValue
from cdp.identity.v1 import events_pb2 as identity_ev
from cdp_activation.store import BatchRow
from cdp_kit.envelope import Cause, deterministic_id, make_envelope
from cdp_kit.eventlog import EventLog
from cdp_kit.sealing import split_fields
from cdp_kit.streams import ACTIVATION_DELIVERIES, IDENTITY_FRAGMENTS
from cdp_kit.vault import PersonVault
from cdp_standins import LocalPlatforms
from tests.integration.test_activation_delivery import (  # the delivery suite's fixtures and harness
    T0,
    Harness,
    Upstream,
    harness,
    platforms,
    upstream,
)

__all__ = ["harness", "platforms", "upstream"]


async def sealed_profile(up: Upstream, vault: PersonVault, pid: str, email: str, name: str) -> list[str]:
    """A fragment as identity writes it: identities, attributes and anchor sealed, refs first."""
    identities = [("email", email)]
    refs = vault.refs_for(identities)
    await vault.commit()
    frag = identity_ev.ProfileFragment(
        profile_id=pid,
        source_event_id=f"f-{pid}",
        dataset="crm",
        kind="record",
        identities=[IdentityValue(namespace=ns, value=v) for ns, v in identities],
    )
    frag.attributes.update({"first_name": name})
    frag.anchor.CopyFrom(frag.identities[0])
    frag.occurred_at.FromDatetime(T0)
    up.n += 1
    event_id = deterministic_id("sealed", pid)
    stripped, personal = split_fields(frag, ("identities", "attributes", "anchor"))
    env = make_envelope(stripped, event_id=event_id, subject_key=pid, occurred_at=T0, cause=Cause(command_id=event_id))
    env.sealed.append(vault.seal(refs, personal, event_id=event_id, event_type=frag.DESCRIPTOR.full_name))
    await up.log.append(IDENTITY_FRAGMENTS.subject, [env], msg_id=event_id)
    return refs


async def delivery_bytes(log: EventLog) -> bytes:
    stream, subject = ACTIVATION_DELIVERIES.stream.name, ACTIVATION_DELIVERIES.subject
    return b"".join([m.data async for m in log.read(stream, subject)])


async def test_prepared_batches_are_sealed_and_erased_with_the_person(
    harness: Harness, upstream: Upstream, platforms: LocalPlatforms, eventlog: EventLog, tmp_path: Path, nats_url: str
) -> None:
    vault = await PersonVault.bind(eventlog.js)
    await upstream.segment()
    await harness.destination("hook", "webhook", base_url=platforms.url + "/webhook", secret=platforms.webhook_secret)
    await harness.activate("hook", ["email"], ["first_name"])
    ann = await sealed_profile(upstream, vault, "p-ann", "ann.secret@example.com", "Annabel")
    await sealed_profile(upstream, vault, "p-bob", "bob.other@example.com", "Robert")
    for pid in ("p-ann", "p-bob"):
        await upstream.membership(pid)
    await harness.settled("hook", 2)
    assert platforms.members["webhook:gold"] == {"p-ann", "p-bob"}  # delivered from opened records

    raw = await delivery_bytes(eventlog)
    assert b"BatchPrepared" in raw
    for plain in (b"ann.secret@example.com", b"Annabel", b"bob.other@example.com"):
        assert plain not in raw

    await vault.destroy(ann)
    await harness.stop()
    rebuilt = Harness(tmp_path / "rebuilt", nats_url, eventlog)
    await rebuilt.processor.rebuild()
    stored = records(rebuilt)
    assert stored, "the rebuilt store holds the prepared batches"
    text = repr(stored)
    assert "ann.secret@example.com" not in text
    assert "Annabel" not in text
    assert "bob.other@example.com" in text
    assert rebuilt.processor.vault is not None
    assert rebuilt.processor.vault.erased_fields >= 1
    rebuilt.engine.dispose()


def records(h: Harness) -> list[Any]:
    with h.engine.connect() as conn:
        return [row[0] for row in conn.execute(sa.select(BatchRow.__table__.c.records))]  # type: ignore[attr-defined]
