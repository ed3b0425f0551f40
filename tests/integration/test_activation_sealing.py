"""Activation's prepared batches on a real nats-server: each record's identities and attributes
are sealed on CDP_DELIVERY under its identities' keys (learnt from sealed fragments), the webhook
still gets plain values, and once a person's keys are destroyed a rebuild holds nothing of them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import sqlalchemy as sa

from cdp.common.v1.envelope_pb2 import IdentityValue
from cdp.identity.v1 import events_pb2 as identity_ev
from cdp.privacy.v1 import privacy_pb2 as privacy
from cdp_activation.store import BatchRow, ProfileRow
from cdp_kit.envelope import Cause, deterministic_id, make_envelope
from cdp_kit.eventlog import EventLog
from cdp_kit.privacy import RevokedKeyRow
from cdp_kit.sealing import split_fields
from cdp_kit.streams import ACTIVATION_DELIVERIES, IDENTITY_FRAGMENTS, PRIVACY_REQUESTS
from cdp_kit.vault import PersonVault
from cdp_standins import LocalPlatforms
from tests.integration.test_activation_delivery import (  # the delivery suite's fixtures and harness
    T0,
    Harness,
    Upstream,
    harness,
    platforms,
    until,
    upstream,
)

__all__ = ["harness", "platforms", "upstream"]


async def sealed_profile(
    up: Upstream, vault: PersonVault, pid: str, email: str, name: str, refs: list[str] | None = None
) -> list[str]:
    """A fragment as identity writes it: identities, attributes and anchor sealed, refs first
    (under ``refs`` when given: a record sealed earlier with those keys)."""
    identities = [("email", email)]
    if refs is None:
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


async def test_a_revocation_survives_a_restart_before_the_keys_are_destroyed(
    harness: Harness, upstream: Upstream, eventlog: EventLog, tmp_path: Path, nats_url: str
) -> None:
    """A privacy request revokes the person's keys in the process that applies it; the keys are
    destroyed only at the request's completion. A service restarting in between revokes them again
    from its store (kit_revoked_key), so a fragment of the person sealed before the request and
    read after the restart folds as erased instead of opening."""
    vault = await PersonVault.bind(eventlog.js)
    await upstream.segment()
    ann = await sealed_profile(upstream, vault, "p-ann", "ann.secret@example.com", "Annabel")
    await upstream.membership("p-ann")
    await until(lambda: profile_rows(harness, "p-ann"), what="Ann's profile in activation")

    requested = privacy.PrivacyRequested(
        request_id="rv-1", mode=privacy.PRIVACY_MODE_DELETE, profile_ids=["p-other"], key_refs=ann
    )
    requested.at.FromDatetime(T0)
    env = make_envelope(requested, event_id="rv-1", subject_key="rv-1", occurred_at=T0, cause=Cause(command_id="rv-1"))
    await eventlog.append(PRIVACY_REQUESTS.subject, [env], msg_id="rv-1")
    assert harness.processor.vault is not None
    await until(lambda: not harness.processor.vault.can_seal(ann), what="the request applied")  # type: ignore[union-attr]
    # Revoked in memory as the request is folded; stopped before its transaction commits, the
    # request is read again at restart. The restart this test is about comes after the commit.
    await until(lambda: revoked_rows(harness) == sorted(set(ann)), what="the revocation committed")
    await harness.stop()

    again = Harness(tmp_path, nats_url, eventlog)
    assert again.processor.vault is not None
    await again.processor.vault.prefetch(ann)
    assert again.processor.vault.can_seal(ann)  # a fresh process: the keys still exist in the bucket
    await again.start()
    try:
        assert not again.processor.vault.can_seal(ann)  # revoked again from the store at start
        # Ann's fragment sealed before the request, read after the restart: erased, not opened.
        erased_before = again.processor.vault.erased
        await sealed_profile(upstream, vault, "p-ann2", "ann.secret@example.com", "Annabel", refs=ann)
        await until(lambda: again.processor.vault.erased > erased_before, what="the fragment folded as erased")  # type: ignore[union-attr]
        assert not profile_rows(again, "p-ann2")
    finally:
        await again.stop()


def revoked_rows(h: Harness) -> list[str]:
    with h.engine.connect() as conn:
        table = RevokedKeyRow.__table__  # type: ignore[attr-defined]
        return sorted(r[0] for r in conn.execute(sa.select(table.c.key_ref)))


def profile_rows(h: Harness, pid: str) -> list[Any]:
    with h.engine.connect() as conn:
        table = ProfileRow.__table__  # type: ignore[attr-defined]
        return list(conn.execute(sa.select(table.c.profile_id).where(table.c.profile_id == pid)))
