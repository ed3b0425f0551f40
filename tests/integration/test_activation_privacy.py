"""Privacy requests in activation (issue #16) on a real JetStream, a real SQLite store and the
loopback platform stand-ins: the test plays identity and appends PrivacyRequested to
cdp.privacy.requests itself, then reads activation's acknowledgement, the removal batches on
CDP_DELIVERY, the stand-ins' record of removal and deletion requests, and the SQLite file."""

from __future__ import annotations

import csv
import sqlite3
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from cdp.activation.v1 import events_pb2 as ev
from cdp.privacy.v1 import privacy_pb2 as privacy
from cdp_activation import identifiers as ids
from cdp_activation.store import TABLES
from cdp_kit.envelope import Cause, deterministic_id, is_a, make_envelope, unpack
from cdp_kit.eventlog import EventLog, LogMessage
from cdp_kit.natsserver import NatsServer
from cdp_kit.store import canonical_dump
from cdp_kit.streams import ACTIVATION_DELIVERIES, PRIVACY, PRIVACY_REQUESTS, privacy_applied_log
from cdp_kit.telemetry import pii_hash
from cdp_kit.vault import PersonVault
from cdp_standins import Fault, LocalPlatforms
from tests.integration.test_activation_delivery import T0, Harness, Upstream, people, until

APPLIED = privacy_applied_log("activation")
EMAIL, PHONE, NAME = "Erin.Erased@Example.com", "+1 650 555 0199", "Erinquist"
ERASED = "p-erin"


@pytest.fixture
async def platforms() -> AsyncIterator[LocalPlatforms]:
    servers = LocalPlatforms()
    await servers.start()
    yield servers
    await servers.stop()


async def request(
    log: EventLog, request_id: str, profile_ids: list[str], mode: int = privacy.PRIVACY_MODE_DELETE
) -> None:
    """What identity appends: the request with the person's profile ids and keyed hashes only."""
    requested = privacy.PrivacyRequested(
        request_id=request_id,
        mode=mode,  # type: ignore[arg-type]
        identity_hashes=[pii_hash(f"email:{EMAIL.lower()}")],
        profile_ids=profile_ids,
        graph_identity_hashes=[pii_hash(f"email:{EMAIL.lower()}")],
        nothing_held=not profile_ids,
    )
    requested.at.FromDatetime(T0 + timedelta(days=1))
    event_id = deterministic_id("privacy-request", request_id)
    env = make_envelope(
        requested, event_id=event_id, subject_key=request_id, occurred_at=T0, cause=Cause(command_id=event_id)
    )
    await log.append(PRIVACY_REQUESTS.subject, [env], msg_id=event_id)


async def messages(log: EventLog, stream: str, subject: str) -> list[LogMessage]:
    return [msg async for msg in log.read(stream, subject)]


async def acks(log: EventLog, *, latest: bool = False) -> dict[str, tuple[privacy.PrivacyApplied, LogMessage]]:
    """Activation's PrivacyApplied by request: the first (the acknowledgement), or the latest (a
    later one reports the removals' outcomes)."""
    out: dict[str, tuple[privacy.PrivacyApplied, LogMessage]] = {}
    for msg in await messages(log, PRIVACY.name, APPLIED.subject):
        for env in msg.events():
            if is_a(env, privacy.PrivacyApplied):
                applied = unpack(env, privacy.PrivacyApplied)
                if latest or applied.request_id not in out:
                    out[applied.request_id] = (applied, msg)
    return out


async def ack_of(log: EventLog, request_id: str) -> tuple[privacy.PrivacyApplied, LogMessage]:
    async def found() -> tuple[privacy.PrivacyApplied, LogMessage] | None:
        return (await acks(log)).get(request_id)

    result: tuple[privacy.PrivacyApplied, LogMessage] = await until(found, what=f"PrivacyApplied {request_id}")
    return result


def sqlite_text(path: Path) -> dict[str, str]:
    """Every table of the SQLite file as text, queried through SQLite itself."""
    out: dict[str, str] = {}
    with sqlite3.connect(path) as db:
        names = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        for name in names:
            out[name] = "\n".join(repr(row) for row in db.execute(f'SELECT * FROM "{name}"'))
    return out


def destroyed_batches(path: Path) -> set[str]:
    """The removal batches whose vault key activation destroyed."""
    with sqlite3.connect(path) as db:
        return {r[0] for r in db.execute("SELECT id FROM act_batch WHERE action = 'erase' AND keys_destroyed")}


def stream_bytes(server: NatsServer, stream: str) -> bytes:
    """Every byte of one stream's directory in the nats-server store."""
    found = [p for p in server.store_dir.rglob("*") if p.is_dir() and p.name == stream]
    assert found, stream
    return b"".join(f.read_bytes() for d in found for f in sorted(d.rglob("*")) if f.is_file())


def count(path: Path, table: str, profile_id: str) -> int:
    with sqlite3.connect(path) as db:
        return int(db.execute(f'SELECT count(*) FROM "{table}" WHERE profile_id = ?', (profile_id,)).fetchone()[0])


async def destinations(harness: Harness, platforms: LocalPlatforms) -> None:
    await harness.destination(
        "meta",
        "meta_custom_audience",
        action="ad_targeting",
        base_url=platforms.url,
        audience_id="123",
        access_token=platforms.meta_token,
    )
    await harness.destination(
        "google",
        "google_customer_match",
        action="ad_targeting",
        base_url=platforms.url,
        customer_id="1234567890",
        user_list_id="42",
        developer_token=platforms.google_developer_token,
        access_token=platforms.google_token,
    )
    await harness.destination(
        "klaviyo", "klaviyo", base_url=platforms.url, api_key=platforms.klaviyo_key, list_id="L1", rate_per_s=1000
    )
    await harness.destination("braze", "braze", base_url=platforms.url, api_key=platforms.braze_key)
    await harness.destination("files", "file_export", folder="files", format="csv")
    await harness.activate("meta", ["email", "phone"], ["first_name"])
    await harness.activate("google", ["email", "phone"])
    await harness.activate("klaviyo", ["email", "phone"], ["first_name"])
    await harness.activate("braze", [], ["first_name"])
    await harness.activate("files", ["email", "phone"], ["first_name"])


NAMES = ("meta", "google", "klaviyo", "braze", "files")


def removes(platforms: LocalPlatforms) -> int:
    """Google jobs run with remove operations."""
    return sum(1 for job in platforms.accepted["google"] if any("remove" in op for op in job["ops"]))


async def test_activation_privacy_delete_removes_at_destinations_and_erases_everything_it_held(
    tmp_path: Path, nats_server: NatsServer, nats_url: str, eventlog: EventLog, platforms: LocalPlatforms
) -> None:
    harness = Harness(tmp_path, nats_url, eventlog)
    await harness.start()
    try:
        upstream = Upstream(eventlog)
        await upstream.segment()
        await destinations(harness, platforms)
        await people(upstream, 2)
        await upstream.profile(ERASED, {"email": EMAIL, "phone": PHONE}, {"first_name": NAME})
        await upstream.membership(ERASED)
        for name in NAMES:
            await harness.settled(name, 3)
        email_meta = ids.sha256_hex(EMAIL.lower())
        assert email_meta in platforms.members["meta:123"]
        assert "braze:p-erin" not in platforms.deleted
        db = tmp_path / "activation.db"
        assert EMAIL in "".join(sqlite_text(db).values())  # what is about to go

        platforms.fail("braze", Fault(status=500))  # the deletion is retried like any batch
        await request(eventlog, "req-1", [ERASED])
        applied, ack_msg = await ack_of(eventlog, "req-1")

        # The acknowledgement: counts, and each destination's removal (the full file export's is
        # its snapshot written again without them).
        removals = {r.destination: r for r in applied.removals}
        assert set(removals) == set(NAMES)
        for name in NAMES:
            removal = removals[name]
            assert removal.status == "prepared", name
            assert removal.batch_id == f"privacy:req-1:{removal.plan_id}"
            assert removal.profiles == 1
        assert applied.service == "activation"
        assert applied.counts["profiles"] == 1
        assert applied.counts["memberships"] == 1
        assert applied.counts["plan_members"] == 5
        assert applied.counts["fragments"] == 1

        # The removal batches were recorded on CDP_DELIVERY before the acknowledgement, holding only
        # what each platform's removal needs, hashed where the platform takes hashes.
        prepared: dict[str, tuple[Any, LogMessage, list[Any]]] = {}
        for msg in await messages(eventlog, ACTIVATION_DELIVERIES.stream.name, ACTIVATION_DELIVERIES.subject):
            for env in msg.events():
                if is_a(env, ev.BatchPrepared):
                    batch = unpack(env, ev.BatchPrepared).batch
                    if batch.id.startswith("privacy:"):
                        prepared[batch.id] = (batch, msg, list(env.sealed))
        assert set(prepared) == {removals[n].batch_id for n in NAMES}
        phone_digits = "16505550199"
        removal_refs: set[str] = set()
        for batch, msg, sealed in prepared.values():
            assert msg.stored_at is not None
            assert ack_msg.stored_at is not None
            assert msg.stored_at <= ack_msg.stored_at
            assert batch.action == "erase"
            assert [r.profile_id for r in batch.records] == [ERASED]
            assert NAME not in str(batch)
            # Sealed: on the log the record is its profile id; its identifiers are a part sealed
            # under one key of the removal batch (not the person's, which identity destroys).
            assert not batch.records[0].attributes.fields
            assert not batch.records[0].identities
            assert [p.path for p in sealed] == ["batch.records.0"]
            assert len(sealed[0].key_refs) == 1
            removal_refs.update(sealed[0].key_refs)
            assert EMAIL.lower().encode() not in msg.data
            assert phone_digits.encode() not in msg.data
        assert len(removal_refs) == len(NAMES)  # a key per removal batch

        # The stand-ins receive valid removal and deletion requests (they answer 400 to an invalid one).
        await until(lambda: "braze:p-erin" in platforms.deleted, what="Braze /users/delete")
        export_file = tmp_path / "exports" / "files" / "gold.csv"
        await until(lambda: EMAIL.lower() not in export_file.read_text(), what="the snapshot written without them")
        assert not platforms.faults["braze"]  # its first attempt met the 500
        await until(
            lambda: (
                {f"klaviyo:email:{EMAIL.lower()}", f"klaviyo:phone_number:+{phone_digits}"} <= set(platforms.deleted)
            ),
            what="Klaviyo deletion jobs",
        )
        await until(lambda: email_meta not in platforms.members["meta:123"], what="Meta removal")
        google_list = "google:customers/1234567890/userLists/42"
        await until(lambda: ids.sha256_hex(EMAIL.lower()) not in platforms.members[google_list], what="Google removal")
        assert not platforms.rejected
        assert len(platforms.members["meta:123"]) == 2
        for name in NAMES:
            await harness.settled(name, 2)

        # Each removal batch delivered, activation destroys its key (RemovalKeysDestroyed) and
        # reports the outcome: the request's removals say "delivered".
        await until(lambda: destroyed_batches(db) == set(prepared), what="removal keys destroyed")
        fresh = await PersonVault.bind(eventlog.js)
        await fresh.prefetch(sorted(removal_refs))
        assert not fresh.can_seal(sorted(removal_refs))  # gone from the bucket

        async def reported() -> bool:
            latest = (await acks(eventlog, latest=True))["req-1"][0]
            return {r.destination: r.status for r in latest.removals} == dict.fromkeys(NAMES, "delivered")

        await until(reported, what="removals reported delivered")

        # A late exit and a late fragment of the erased profile change nothing.
        await upstream.membership(ERASED, joined=False)
        await upstream.profile(ERASED, {"email": EMAIL}, {"first_name": NAME})
        # A later file export (a new member rewrites the full snapshot) does not contain them.
        await people(upstream, 1, start=7)
        for name in NAMES:
            await harness.settled(name, 3)
        rows = list(csv.reader((tmp_path / "exports" / "files" / "gold.csv").read_text().splitlines()))
        assert sorted(r[0] for r in rows[1:]) == ["p0000", "p0001", "p0007"]
        export = (tmp_path / "exports" / "files" / "gold.csv").read_text()
        assert EMAIL.lower() not in export
        assert NAME not in export
        assert ERASED not in export

        # The store holds nothing of them: no row about the profile (a tombstone keeps its id), no
        # identifier, hashed or not, and no attribute, in any table.
        for table in ("act_profile", "act_fragment", "act_member", "act_plan_member", "act_exclusion"):
            assert count(db, table, ERASED) == 0, table
        assert count(db, "act_erased", ERASED) == 1
        text = sqlite_text(db)
        secrets = (
            EMAIL.lower(),
            EMAIL,
            phone_digits,
            "650 555 0199",
            NAME,
            email_meta,
            ids.sha256_hex("+" + phone_digits),
        )
        for table, content in text.items():
            for value in secrets:
                assert value not in content, (table, value)

    except BaseException:
        await harness.stop()
        raise
    # A restart re-sends nothing, and a rebuild from the log restores nothing.
    sent = {k: len(v) for k, v in platforms.accepted.items()}
    deleted = list(platforms.deleted)
    duplicates = dict(platforms.duplicates)
    google_removes = removes(platforms)
    assert google_removes == 1
    await harness.stop()
    live = canonical_dump(harness.engine, TABLES)
    await harness.processor.rebuild()
    assert canonical_dump(harness.engine, TABLES) == live
    again = Harness(tmp_path, nats_url, eventlog)
    await again.start()
    try:
        await people(upstream, 1, start=8)
        for name in NAMES:
            await again.settled(name, 4)
    finally:
        await again.stop()
    assert platforms.deleted == deleted
    assert {k: n for k, n in sent.items() if "delete" in k} == {
        k: len(v) for k, v in platforms.accepted.items() if "delete" in k
    }
    assert dict(platforms.duplicates) == duplicates  # no removal sent again (Meta's session ids repeat)
    assert removes(platforms) == google_removes
    assert email_meta not in platforms.members["meta:123"]
    assert len(await acks(eventlog)) == 1  # acknowledged once
    for table in ("act_profile", "act_member", "act_plan_member"):
        assert count(db, table, ERASED) == 0, table

    # The raw bytes of CDP_DELIVERY hold the removal batches (their ids) but none of what Klaviyo's
    # deletion took in plain: the email and phone as its API takes them (normalised: only a removal
    # batch holds these forms; this test's upstream fragments and add batches are not sealed and
    # carry the values as given).
    raw = stream_bytes(nats_server, ACTIVATION_DELIVERIES.stream.name)
    assert b"privacy:req-1:" in raw
    assert EMAIL.encode() in raw  # the unsealed add batches: the bytes are searchable
    for plain in (EMAIL.lower(), "+16505550199"):
        assert plain.encode() not in raw, plain


async def test_activation_privacy_acknowledges_unknown_profiles_and_suppressions_with_nothing(
    tmp_path: Path, nats_url: str, eventlog: EventLog, platforms: LocalPlatforms
) -> None:
    harness = Harness(tmp_path, nats_url, eventlog)
    await harness.start()
    try:
        upstream = Upstream(eventlog)
        await upstream.segment()
        await destinations(harness, platforms)
        await people(upstream, 2)
        for name in NAMES:
            await harness.settled(name, 2)
        await request(eventlog, "never-seen", ["p-unknown"])
        await request(eventlog, "nothing-held", [])
        await request(eventlog, "suppress", ["p0000"], privacy.PRIVACY_MODE_SUPPRESS)
        await request(eventlog, "unsuppress", ["p0000"], privacy.PRIVACY_MODE_UNSUPPRESS)
        for request_id in ("never-seen", "nothing-held", "suppress", "unsuppress"):
            applied, _ = await ack_of(eventlog, request_id)
            assert applied.service == "activation"
            assert dict(applied.counts) == {}, request_id
            assert list(applied.removals) == [], request_id
        for name in NAMES:
            await harness.settled(name, 2)  # a suppression erases nothing
        assert not platforms.deleted
    finally:
        await harness.stop()


async def test_activation_privacy_removes_from_snap_tiktok_linkedin_and_deletes_from_mailchimp(
    tmp_path: Path,
    nats_server: NatsServer,
    nats_url: str,
    eventlog: EventLog,
    platforms: LocalPlatforms,
    store_url: str,
) -> None:
    """The audience platforms remove through their own removal call, fed SHA-256 digests (MAIDs
    as the platform takes them) that the connectors pass on; Mailchimp deletes the member
    permanently by subscriber hash (MD5 of the email), which leaves no trace on CDP_DELIVERY once
    the removal's key is destroyed. On SQLite and PostgreSQL, and a rebuild gives the same store."""
    harness = Harness(tmp_path, nats_url, eventlog, store_url=store_url)
    await harness.start()
    try:
        upstream = Upstream(eventlog)
        await upstream.segment()
        ads = {"action": "ad_targeting", "base_url": platforms.url}
        await harness.destination("snap", "snap_audience", segment_id="s", access_token=platforms.snap_token, **ads)
        await harness.destination(
            "tiktok",
            "tiktok_audience",
            advertiser_id="a",
            audience_id="t",
            access_token=platforms.tiktok_token,
            **ads,
        )
        await harness.destination(
            "linkedin", "linkedin_audience", segment_id="l", access_token=platforms.linkedin_token, **ads
        )
        await harness.destination(
            "mc", "mailchimp", base_url=platforms.url, api_key=platforms.mailchimp_key, list_id="m"
        )
        await harness.activate("snap", ["email", "phone", "gaid"])
        await harness.activate("tiktok", ["email", "phone", "gaid"])
        await harness.activate("linkedin", ["email", "gaid"])
        await harness.activate("mc", ["email"])
        gaid = "38400000-8cf0-11bd-b23e-10b96e40000d"
        await upstream.profile(ERASED, {"email": EMAIL, "phone": PHONE, "gaid": gaid}, {"first_name": NAME})
        await upstream.membership(ERASED)
        await upstream.profile(
            "p-kept", {"email": "kept@example.com", "phone": "+1 650 555 0100", "gaid": gaid[:-1] + "e"}
        )
        await upstream.membership("p-kept")
        audiences = ("snap:s", "tiktok:t", "linkedin:l", "mailchimp:gold")
        for name in ("snap", "tiktok", "linkedin", "mc"):
            await harness.settled(name, 2)
        held = {key: set(platforms.members[key]) for key in audiences}
        assert all(held.values())

        await request(eventlog, "req-ads", [ERASED])
        applied, _ = await ack_of(eventlog, "req-ads")
        assert {r.destination: r.status for r in applied.removals} == dict.fromkeys(
            ("snap", "tiktok", "linkedin", "mc"), "prepared"
        )
        subscriber = ids.md5_hex(EMAIL.lower())
        await until(lambda: f"mailchimp:{subscriber}" in platforms.deleted, what="Mailchimp permanent delete")
        for name in ("snap", "tiktok", "linkedin", "mc"):
            await harness.settled(name, 1)
        assert not platforms.rejected
        email_hash = ids.sha256_hex(EMAIL.lower())
        assert email_hash not in platforms.members["snap:s"]
        assert email_hash not in platforms.members["tiktok:t"]
        assert email_hash not in platforms.members["linkedin:l"]
        assert subscriber not in platforms.members["mailchimp:gold"]
        for key in audiences:
            assert platforms.members[key], key  # the other member stays
            assert platforms.members[key] < held[key], key

        def keys_destroyed() -> bool:
            with harness.engine.connect() as conn:
                rows = conn.execute(sa.text("SELECT keys_destroyed FROM act_batch WHERE action = 'erase'")).all()
            return len(rows) == 4 and all(r[0] for r in rows)

        await until(keys_destroyed, what="the removal batches' keys destroyed")
    finally:
        await harness.stop()
    live = canonical_dump(harness.engine, TABLES)
    assert live["act_erased"]
    await harness.processor.rebuild()
    assert canonical_dump(harness.engine, TABLES) == live
    raw = stream_bytes(nats_server, ACTIVATION_DELIVERIES.stream.name)
    assert b"privacy:req-ads:" in raw
    assert subscriber.encode() not in raw  # Mailchimp's MD5 of the email
