"""Activation delivery on a real JetStream, a real SQLite store and loopback HTTP servers
that validate requests as each platform documents them (cdp_standins).

Upstream facts (segments, memberships, profiles) are appended to the upstream subjects
exactly as segmentation and identity write them."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import gzip
import json
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq  # type: ignore[import-untyped]
import pytest
from google.protobuf import struct_pb2

from cdp.activation.v1 import activation_pb2 as pb
from cdp.common.v1.envelope_pb2 import IdentityValue
from cdp.identity.v1 import events_pb2 as identity_ev
from cdp.segmentation.v1 import events_pb2 as seg_ev
from cdp.segmentation.v1 import segmentation_pb2 as seg_pb
from cdp_activation import identifiers as ids
from cdp_activation.api import ActivationServicer
from cdp_activation.handlers import ActivationHandlers
from cdp_activation.main import build, master_keys
from cdp_activation.settings import ActivationSettings
from cdp_activation.store import TABLES
from cdp_kit.envelope import Cause, deterministic_id, make_envelope
from cdp_kit.errors import FailedPrecondition, InvalidInput
from cdp_kit.eventlog import EventLog
from cdp_kit.store import canonical_dump, make_engine
from cdp_kit.streams import IDENTITY_FRAGMENTS, SEGMENTATION_CONFIG, SEGMENTATION_MEMBERSHIPS
from cdp_standins import Fault, LocalPlatforms

T0 = datetime(2026, 1, 1, tzinfo=UTC)
SEG = "seg-gold"
FAST = {"batch_age_s": 0.05, "backoff_s": 0.01, "backoff_max_s": 0.5, "timeout_s": 2.0, "rate_per_s": 1000}


async def until(check: Callable[[], Any], timeout_s: float = 30.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = check()
        if asyncio.iscoroutine(got):
            got = await got
        if got:
            return got
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


class Upstream:
    """Appends facts to the subjects segmentation and identity own."""

    def __init__(self, log: EventLog) -> None:
        self.log = log
        self.n = 0

    async def _publish(self, subject: str, payload: Any, key: str) -> None:
        self.n += 1
        event_id = deterministic_id("upstream", subject, self.n)
        env = make_envelope(
            payload,
            event_id=event_id,
            subject_key=key,
            occurred_at=T0 + timedelta(seconds=self.n),
            cause=Cause(command_id=event_id),
        )
        await self.log.append(subject, [env], msg_id=event_id)

    async def segment(self, seg_id: str = SEG, name: str = "gold") -> None:
        await self._publish(
            SEGMENTATION_CONFIG.subject, seg_ev.SegmentDefined(segment=seg_pb.Segment(id=seg_id, name=name)), seg_id
        )

    async def profile(
        self,
        pid: str,
        identities: dict[str, str],
        attributes: dict[str, Any] | None = None,
        dataset: str = "crm",
        fragment: str = "",
    ) -> None:
        frag = identity_ev.ProfileFragment(
            profile_id=pid,
            source_event_id=fragment or f"f-{pid}-{self.n}",
            dataset=dataset,
            kind="record",
            identities=[IdentityValue(namespace=k, value=v) for k, v in identities.items()],
        )
        frag.attributes.update(attributes or {})
        frag.occurred_at.FromDatetime(T0 + timedelta(seconds=self.n))
        await self._publish(IDENTITY_FRAGMENTS.subject, frag, pid)

    async def membership(self, pid: str, joined: bool = True, seg_id: str = SEG) -> None:
        status = seg_ev.MEMBERSHIP_STATUS_REALIZED if joined else seg_ev.MEMBERSHIP_STATUS_EXITED
        change = seg_ev.MembershipChanged(segment_id=seg_id, profile_id=pid, status=status)
        change.at.FromDatetime(T0 + timedelta(seconds=self.n))
        await self._publish(SEGMENTATION_MEMBERSHIPS.subject, change, pid)

    async def merge(self, survivor: str, absorbed: list[str]) -> None:
        await self._publish(
            IDENTITY_FRAGMENTS.subject, identity_ev.ProfilesMerged(survivor=survivor, absorbed=absorbed), survivor
        )

    async def split(self, pid: str, parts: list[tuple[str, dict[str, str], list[str]]]) -> None:
        split = identity_ev.ProfileSplit(profile_id=pid, reason="test")
        for part_id, identities, fragments in parts:
            split.parts.add(
                profile_id=part_id,
                fragment_ids=fragments,
                identities=[IdentityValue(namespace=k, value=v) for k, v in identities.items()],
            )
        await self._publish(IDENTITY_FRAGMENTS.subject, split, pid)


class Harness:
    def __init__(self, tmp: Path, nats_url: str, log: EventLog, store_url: str = "", **settings: Any) -> None:
        self.tmp = tmp
        self.settings = ActivationSettings(nats_url=nats_url, data_dir=tmp, delivery_interval_s=0.05, **settings)
        self.engine = make_engine(store_url or f"sqlite:///{tmp / 'activation.db'}")
        self.keys = master_keys(self.settings)
        self.service = build(self.settings, self.engine, log, self.keys)
        self.processor = self.service.processor
        self.handlers = ActivationHandlers(self.processor, self.settings, self.keys)
        self.api = ActivationServicer(self.handlers)
        self.tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        self.processor.create_store()
        self.tasks = [asyncio.create_task(self.processor.run())]
        self.tasks += [asyncio.create_task(job()) for job in self.service.background]
        await asyncio.wait_for(self.processor.ready.wait(), 30)

    async def stop(self) -> None:
        self.processor.stop()
        for task in self.tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(task, 30)

    async def destination(
        self, name: str, connector: str, action: str = "email_marketing", **config: Any
    ) -> pb.Destination:
        struct = struct_pb2.Struct()
        struct.update({**FAST, **config})
        return await self.handlers.create_destination(
            pb.Destination(name=name, connector=connector, config=struct, marketing_action=action)
        )

    async def activate(
        self, destination: str, identities: list[str], attributes: list[str] | None = None, segment: str = "gold"
    ) -> pb.ActivationPlan:
        async def attempt() -> pb.ActivationPlan | None:
            try:
                return await self.handlers.activate(
                    pb.ActivateRequest(
                        destination=destination, segment=segment, identities=identities, attributes=attributes or []
                    )
                )
            except Exception as exc:  # the segment may not be folded yet
                if "not known" in str(exc):
                    return None
                raise

        plan: pb.ActivationPlan = await until(attempt, what="segment known")
        return plan

    async def stats(self, destination: str) -> pb.DeliveryStats:
        reply = await self.api.ListDeliveries(pb.ListDeliveriesRequest(destination=destination), None)  # type: ignore[arg-type]
        return reply.stats[0]

    async def dead(self) -> list[pb.DeadLetter]:
        reply = await self.api.ListDeadLetters(pb.ListDeadLettersRequest(), None)  # type: ignore[arg-type]
        return list(reply.dead_letters)

    async def settled(self, destination: str, members: int, timeout_s: float = 30.0) -> pb.DeliveryStats:
        async def ok() -> pb.DeliveryStats | None:
            s = await self.stats(destination)
            return s if s.members == members and s.batches_pending == 0 else None

        result: pb.DeliveryStats = await until(ok, timeout_s, f"{destination} holding {members}")
        return result


@pytest.fixture
async def platforms() -> AsyncIterator[LocalPlatforms]:
    servers = LocalPlatforms()
    await servers.start()
    yield servers
    await servers.stop()


@pytest.fixture
async def harness(tmp_path: Path, nats_url: str, eventlog: EventLog) -> AsyncIterator[Harness]:
    h = Harness(tmp_path, nats_url, eventlog)
    await h.start()
    yield h
    await h.stop()


@pytest.fixture
def upstream(eventlog: EventLog) -> Upstream:
    return Upstream(eventlog)


async def people(up: Upstream, n: int, *, start: int = 0, **extra: Any) -> list[str]:
    pids = []
    for i in range(start, start + n):
        pid = f"p{i:04d}"
        await up.profile(
            pid,
            {"email": f"Person.{i}@Example.com", "phone": f"+1 650 555 {i:04d}"},
            {"first_name": f"N{i}", "loyalty_tier": "gold", **extra},
        )
        await up.membership(pid)
        pids.append(pid)
    return pids


# ------------------------------------------------------------------------------ tests


async def test_activation_streams_adds_and_removes_to_webhook_and_meta(
    harness: Harness, upstream: Upstream, platforms: LocalPlatforms
) -> None:
    await upstream.segment()
    await harness.destination("hook", "webhook", base_url=platforms.url + "/webhook", secret=platforms.webhook_secret)
    await harness.destination(
        "meta",
        "meta_custom_audience",
        action="ad_targeting",
        base_url=platforms.url,
        audience_id="123",
        access_token=platforms.meta_token,
        batch_size=4,
    )
    await harness.activate("hook", ["email"], ["first_name"])
    await harness.activate("meta", ["email", "phone"], ["first_name"])
    pids = await people(upstream, 10)
    await harness.settled("hook", 10)
    meta = await harness.settled("meta", 10)
    assert platforms.members["webhook:gold"] == set(pids)
    expected = {ids.sha256_hex(f"person.{i}@example.com") for i in range(10)}
    assert platforms.members["meta:123"] == expected
    assert not platforms.rejected
    assert meta.activated == 20
    assert meta.received == 10
    assert any("below the meta_custom_audience minimum of 100" in w for w in meta.warnings)
    # batches of at most 4 rows (size), the remainder cut by age
    assert all(len(req["payload"]["data"]) <= 4 for req in platforms.accepted["meta"])

    for pid in pids[:3]:
        await upstream.membership(pid, joined=False)
    await harness.settled("hook", 7)
    await harness.settled("meta", 7)
    assert platforms.members["webhook:gold"] == set(pids[3:])
    assert platforms.members["meta:123"] == expected - {ids.sha256_hex(f"person.{i}@example.com") for i in range(3)}


async def test_activation_credentials_are_masked_and_config_validated(
    harness: Harness, platforms: LocalPlatforms
) -> None:
    dest = await harness.destination(
        "meta",
        "meta_custom_audience",
        action="ad_targeting",
        base_url=platforms.url,
        audience_id="123",
        access_token="s3cr3t-token",
    )
    assert dest.config["access_token"] == "****"
    listed = await harness.api.ListDestinations(pb.ListDestinationsRequest(), None)  # type: ignore[arg-type]
    assert "s3cr3t-token" not in str(listed)
    with pytest.raises(InvalidInput) as err:
        await harness.destination("bad", "meta_custom_audience", action="ad_targeting", audience_id="abc", bogus=1)
    fields = {v.field for v in err.value.violations}
    assert {"config.audience_id", "config.access_token", "config.bogus"} <= fields
    with pytest.raises(InvalidInput):
        await harness.destination("bad2", "webhook", base_url="ftp://x", secret="short")
    with pytest.raises(InvalidInput):
        await harness.destination("bad3", "no_such_connector")


async def test_activation_consent_and_missing_identities_are_excluded_and_counted(
    harness: Harness, upstream: Upstream, platforms: LocalPlatforms
) -> None:
    await upstream.segment()
    await harness.destination("hook", "webhook", base_url=platforms.url + "/webhook", secret=platforms.webhook_secret)
    await harness.activate("hook", ["email", "phone"])
    await upstream.profile(
        "ok", {"email": "a@example.com", "phone": "+16505550001"}, {"consents": {"email_marketing": "y"}}
    )
    await upstream.profile(
        "no", {"email": "b@example.com", "phone": "+16505550002"}, {"consents": {"email_marketing": "n"}}
    )
    await upstream.profile("nophone", {"email": "c@example.com"}, {"consent_email_marketing": "y"})
    await upstream.profile("unknown", {"email": "d@example.com", "phone": "+16505550004"})
    for pid in ("ok", "no", "nophone", "unknown"):
        await upstream.membership(pid)
    stats = await harness.settled("hook", 2)  # unknown consent defaults to "y"
    assert platforms.members["webhook:gold"] == {"ok", "unknown"}
    assert dict(stats.excluded) == {"consent email_marketing=n": 1, "missing identity phone": 1}
    assert stats.received == 4

    # a profile that gains the identity it lacked is sent
    await upstream.profile("nophone", {"phone": "+16505550003"})
    await harness.settled("hook", 3)
    assert "nophone" in platforms.members["webhook:gold"]
    stats = await harness.stats("hook")
    assert dict(stats.excluded) == {"consent email_marketing=n": 1}


async def test_activation_unknown_consent_default_is_a_setting(
    tmp_path: Path, nats_url: str, eventlog: EventLog, upstream: Upstream, platforms: LocalPlatforms
) -> None:
    h = Harness(tmp_path, nats_url, eventlog, unknown_consent="n")
    await h.start()
    try:
        await upstream.segment()
        await h.destination("hook", "webhook", base_url=platforms.url + "/webhook", secret=platforms.webhook_secret)
        await h.activate("hook", ["email"])
        await people(upstream, 2)
        await upstream.profile("yes", {"email": "y@example.com"}, {"consents": {"email_marketing": "y"}})
        await upstream.membership("yes")
        stats = await h.settled("hook", 1)
        assert dict(stats.excluded) == {"consent email_marketing=unknown": 2}
    finally:
        await h.stop()


async def test_activation_merge_removes_absorbed_and_split_sends_parts(
    harness: Harness, upstream: Upstream, platforms: LocalPlatforms
) -> None:
    await upstream.segment()
    await harness.destination("hook", "webhook", base_url=platforms.url + "/webhook", secret=platforms.webhook_secret)
    await harness.activate("hook", ["email"], ["loyalty_tier"])
    await upstream.profile("a", {"email": "a@example.com"}, {"loyalty_tier": "gold"}, fragment="fa")
    await upstream.profile("b", {"email": "b@example.com"}, {"loyalty_tier": "silver"}, fragment="fb")
    await upstream.membership("a")
    await upstream.membership("b")
    await harness.settled("hook", 2)
    await upstream.merge("a", ["b"])
    await harness.settled("hook", 1)
    assert platforms.members["webhook:gold"] == {"a"}
    # split: b comes back with its own identities and attributes
    await upstream.split("a", [("a", {"email": "a@example.com"}, ["fa"]), ("b", {"email": "b@example.com"}, ["fb"])])
    await upstream.membership("b")
    await harness.settled("hook", 2)
    last = [r for req in platforms.accepted["webhook"] for r in req["records"] if r["profile_id"] == "b"][-1]
    assert last["attributes"] == {"loyalty_tier": "silver"}
    assert last["identities"] == {"email": ["b@example.com"]}


async def test_activation_retries_429_and_500_then_dead_letters_and_redrives(
    harness: Harness, upstream: Upstream, platforms: LocalPlatforms, capfd: pytest.CaptureFixture[str]
) -> None:
    await upstream.segment()
    await harness.destination(
        "hook", "webhook", base_url=platforms.url + "/webhook", secret=platforms.webhook_secret, max_attempts=3
    )
    await harness.activate("hook", ["email"])
    platforms.fail("webhook", Fault(429, retry_after=0.05), Fault(500))
    await people(upstream, 2)
    stats = await harness.settled("hook", 2)
    assert stats.retried == 2
    assert platforms.seen["webhook"] == 3

    # transient errors past max_attempts: dead letter; permanent 400: dead letter at once
    platforms.fail("webhook", Fault(500), Fault(503), Fault(502))
    await people(upstream, 1, start=10)
    letters = await until(harness.dead, what="dead letter")
    assert letters[0].attempts == 3
    assert not letters[0].permanent
    assert "HTTP 502" in letters[0].reason
    platforms.fail("webhook", Fault(400, body={"error": "bad"}))
    await people(upstream, 1, start=20)
    letters = await until(lambda: _n_dead(harness, 2), what="second dead letter")
    permanent = [d for d in letters if d.permanent]
    assert permanent
    assert permanent[0].attempts == 1
    stats = await harness.stats("hook")
    assert stats.failed == 2
    assert stats.batches_dead == 2

    redriven = await harness.handlers.redrive(pb.RedriveRequest())
    assert len(redriven.batch_ids) == 2
    await harness.settled("hook", 4)
    assert await harness.dead() == []
    assert platforms.members["webhook:gold"] == {"p0000", "p0001", "p0010", "p0020"}
    logged = capfd.readouterr()
    assert "delivery_retry" in logged.out + logged.err
    assert "delivery_dead_lettered" in logged.out + logged.err
    assert platforms.webhook_secret not in logged.out + logged.err  # credentials never logged
    assert "person.0@example.com" not in (logged.out + logged.err).lower()  # nor raw identities


async def _n_dead(h: Harness, n: int) -> list[pb.DeadLetter] | None:
    letters = await h.dead()
    return letters if len(letters) >= n else None


async def test_activation_one_hanging_destination_delays_no_other(
    harness: Harness, upstream: Upstream, platforms: LocalPlatforms
) -> None:
    await upstream.segment()
    await harness.destination(
        "stuck",
        "snap_audience",
        action="ad_targeting",
        base_url=platforms.url,
        segment_id="s1",
        access_token=platforms.snap_token,
        timeout_s=600,
        max_attempts=1,
    )
    await harness.destination("hook", "webhook", base_url=platforms.url + "/webhook", secret=platforms.webhook_secret)
    await harness.activate("stuck", ["email"])
    await harness.activate("hook", ["email"])
    platforms.fail("snap", Fault(hang=True))
    await people(upstream, 3)
    await until(lambda: platforms.seen["snap"] >= 1, what="snap request in flight")
    await harness.settled("hook", 3)  # while snap still hangs
    stuck = await harness.stats("stuck")
    assert stuck.batches_pending == 1
    assert stuck.members == 0
    # more changes keep flowing to the healthy destination
    await people(upstream, 2, start=50)
    await harness.settled("hook", 5)


async def test_activation_timeout_is_transient(harness: Harness, upstream: Upstream, platforms: LocalPlatforms) -> None:
    await upstream.segment()
    await harness.destination(
        "snap",
        "snap_audience",
        action="ad_targeting",
        base_url=platforms.url,
        segment_id="s1",
        access_token=platforms.snap_token,
        timeout_s=0.3,
    )
    await harness.activate("snap", ["email", "phone"])
    platforms.fail("snap", Fault(hang=True))
    await people(upstream, 2)
    stats = await harness.settled("snap", 2)
    assert stats.retried >= 1
    assert platforms.members["snap:s1"] == {ids.sha256_hex(f"person.{i}@example.com") for i in range(2)} | {
        ids.sha256_hex(ids.phone_digits(ids.canonical_phone(f"+1 650 555 {i:04d}")) or "") for i in range(2)
    }


async def test_activation_policy_refuses_plan_with_chain_and_rechecks_at_run_time(
    harness: Harness, upstream: Upstream, platforms: LocalPlatforms
) -> None:
    await upstream.segment()
    await people(upstream, 2)
    await harness.destination(
        "meta",
        "meta_custom_audience",
        action="ad_targeting",
        base_url=platforms.url,
        audience_id="9",
        access_token=platforms.meta_token,
    )
    await harness.destination(
        "hook",
        "webhook",
        action="email_marketing",
        base_url=platforms.url + "/webhook",
        secret=platforms.webhook_secret,
    )
    await harness.handlers.label_data(pb.DataLabel(kind="dataset", name="crm", label="C5"))
    await harness.handlers.create_policy(pb.Policy(name="no_crm_ads", label="C5", action="ad_targeting"))
    await until(lambda: _known(harness, "p0001"), what="profiles folded")
    with pytest.raises(FailedPrecondition) as err:
        await harness.activate("meta", ["email"])
    assert "field email <- dataset crm (label C5) -> policy no_crm_ads denies C5 for ad_targeting" in err.value.message
    # not denied for email marketing
    await harness.activate("hook", ["email"], ["first_name"])
    await harness.settled("hook", 2)
    # a label added later is enforced at run time: members are removed and counted
    await harness.handlers.label_data(pb.DataLabel(kind="field", name="first_name", label="S1"))
    await harness.handlers.create_policy(pb.Policy(name="no_s1_email", label="S1", action="email_marketing"))
    stats = await harness.settled("hook", 0)
    assert list(stats.excluded) == [
        "policy: field first_name (label S1) -> policy no_s1_email denies S1 for email_marketing"
    ]
    assert platforms.members["webhook:gold"] == set()


def _known(h: Harness, pid: str) -> bool:
    from cdp_activation.store import ProfileRow

    with h.processor.read() as session:
        return session.get(ProfileRow, pid) is not None


async def test_activation_file_export_formats_split_gzip_manifest_incremental(
    harness: Harness, upstream: Upstream, tmp_path: Path
) -> None:
    await upstream.segment()
    await harness.destination("full", "file_export", folder="full", format="csv", split_rows=3, gzip=True)
    await harness.destination(
        "inc", "file_export", folder="inc", format="jsonl", mode="incremental", hash_identities=True
    )
    await harness.destination("pq", "file_export", folder="pq", format="parquet")
    for name in ("full", "inc", "pq"):
        await harness.activate(name, ["email"], ["first_name"])
    await people(upstream, 7)
    for name in ("full", "inc", "pq"):
        await harness.settled(name, 7)
    root = tmp_path / "exports"
    manifest = json.loads((root / "full" / "gold.manifest.json").read_text())
    assert manifest["rows"] == 7
    assert [f["rows"] for f in manifest["files"]] == [3, 3, 1]
    rows = []
    for f in manifest["files"]:
        rows += list(csv.reader(gzip.decompress((root / "full" / f["name"]).read_bytes()).decode().splitlines()))[1:]
    assert sorted(r[0] for r in rows) == [f"p{i:04d}" for i in range(7)]
    assert rows[0][1] == rows[0][1].lower()
    table = pq.read_table(root / "pq" / "gold.parquet")
    assert table.num_rows == 7
    assert table.column_names == ["profile_id", "email", "first_name"]
    lines = [
        json.loads(line) for p in sorted((root / "inc").glob("gold-*-add.jsonl")) for line in p.read_text().splitlines()
    ]
    assert len(lines) == 7
    assert all(line["change"] == "add" for line in lines)
    assert {line["email"] for line in lines} == {ids.sha256_hex(f"person.{i}@example.com") for i in range(7)}
    await upstream.membership("p0000", joined=False)
    await harness.settled("inc", 6)
    removed = [json.loads(x) for p in (root / "inc").glob("gold-*-remove.jsonl") for x in p.read_text().splitlines()]
    assert [r["profile_id"] for r in removed] == ["p0000"]
    await harness.settled("full", 6)
    manifest = json.loads((root / "full" / "gold.manifest.json").read_text())
    assert [f["rows"] for f in manifest["files"]] == [3, 3]
    assert not (root / "full" / "gold-00003.csv.gz").exists()


async def test_activation_rebuild_from_the_log_equals_the_live_store(
    tmp_path: Path, nats_url: str, eventlog: EventLog, store_url: str, upstream: Upstream, platforms: LocalPlatforms
) -> None:
    harness = Harness(tmp_path, nats_url, eventlog, store_url=store_url)
    await harness.start()
    await upstream.segment()
    await harness.destination("hook", "webhook", base_url=platforms.url + "/webhook", secret=platforms.webhook_secret)
    await harness.activate("hook", ["email", "phone"])
    await people(upstream, 5)
    await upstream.profile("x", {"email": "x@example.com"})
    await upstream.membership("x")
    await harness.settled("hook", 5)  # x has no phone: excluded
    platforms.fail("webhook", Fault(400))
    await upstream.membership("p0000", joined=False)
    await until(harness.dead, what="dead letter")
    await harness.settled("hook", 5)  # the removal is dead-lettered
    await harness.stop()
    live = canonical_dump(harness.engine, TABLES)
    assert live["act_batch"]
    await harness.processor.rebuild()
    assert canonical_dump(harness.engine, TABLES) == live


async def test_activation_cli_monitoring_dead_letters_redrive_and_governance(
    harness: Harness, upstream: Upstream, platforms: LocalPlatforms
) -> None:
    import grpc
    from typer.testing import CliRunner

    from cdp.activation.v1 import activation_pb2_grpc as pb_grpc
    from cdp_cli.app import app

    server = grpc.aio.server()
    pb_grpc.add_ActivationServiceServicer_to_server(harness.api, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    runner = CliRunner()

    async def cdp(*args: str) -> Any:
        result = await asyncio.to_thread(
            runner.invoke, app, ["--addr", f"activation=127.0.0.1:{port}", *args], env={"COLUMNS": "250"}
        )
        assert result.exit_code == 0, result.output
        return json.loads(result.output) if "--json" in args else result.output

    try:
        await upstream.segment()
        await harness.destination(
            "hook", "webhook", base_url=platforms.url + "/webhook", secret=platforms.webhook_secret, max_attempts=2
        )
        listed = await cdp("destination", "list", "--json")
        assert listed["destinations"][0]["config"]["secret"] == "****"
        await harness.activate("hook", ["email"])
        platforms.fail("webhook", Fault(500), Fault(500))
        await people(upstream, 2)
        await until(harness.dead, what="dead letter")
        letters = await cdp("deliveries", "dead-letters", "--json")
        assert letters["dead_letters"][0]["reason"].startswith("HTTP 500")
        assert letters["dead_letters"][0]["attempts"] == 2
        assert "HTTP 500" in await cdp("deliveries", "dead-letters")
        assert "1 batch(es) queued again" in await cdp("deliveries", "redrive")
        await harness.settled("hook", 2)
        report = await cdp("deliveries", "--json")
        total = report["stats"][0]
        assert total["destination_name"] == "hook"
        assert total["members"] == "2"
        assert total["activated"] == "2"
        assert total["retried"] == "1"
        assert "received" in total
        assert len(report["deliveries"]) == 1
        run = report["deliveries"][0]
        assert run["attempts"] == 1
        assert run["action"] == "add"
        assert run["activated"] == "2"
        assert run["latency_ms"] > 0
        assert "latency ms" in await cdp("deliveries")
        await cdp("governance", "label", "email", "--label", "C9")
        await cdp("governance", "policy", "no_c9", "--deny", "C9", "--action", "email_marketing")
        shown = await cdp("governance", "show", "--json")
        assert shown["policies"][0]["name"] == "no_c9"
        assert shown["labels"] == [{"kind": "field", "name": "email", "label": "C9"}]
    finally:
        await server.stop(None)


async def test_activation_cron_schedules_export_only_on_their_runs(harness: Harness, upstream: Upstream) -> None:
    await upstream.segment()
    await harness.destination("yearly", "file_export", folder="yearly")
    await harness.destination("often", "file_export", folder="often", mode="incremental")
    await harness.destination("live", "file_export", folder="live")
    with pytest.raises(InvalidInput):
        await harness.handlers.activate(pb.ActivateRequest(destination="live", segment="gold", schedule="every day"))
    for name, schedule in (("yearly", "0 0 1 1 *"), ("often", "* * * * * */1"), ("live", "streaming")):
        await until(lambda n=name, s=schedule: _try_activate(harness, n, s), what="plan")  # type: ignore[misc]
    await people(upstream, 4)
    await harness.settled("live", 4)
    await harness.settled("often", 4)
    yearly = await harness.stats("yearly")
    assert yearly.members == 0
    assert yearly.batches_pending == 0
    assert yearly.batches_delivered == 0


async def _try_activate(h: Harness, destination: str, schedule: str) -> bool:
    try:
        await h.handlers.activate(
            pb.ActivateRequest(destination=destination, segment="gold", identities=["email"], schedule=schedule)
        )
    except Exception as exc:
        if "not known" in str(exc):
            return False
        raise
    return True


async def test_activation_tiktok_gets_the_profiles_maids_through_the_whole_service(
    harness: Harness, upstream: Upstream, platforms: LocalPlatforms
) -> None:
    # A profile's idfa / gaid identities (the identity graph's device namespaces) reach TikTok.
    idfa, gaid = "AECE52E7-03EE-455A-B3C4-E57283966239", "38400000-8cf0-11bd-b23e-10b96e40000d"
    await upstream.segment()
    await harness.destination(
        "tt",
        "tiktok_audience",
        action="ad_targeting",
        base_url=platforms.url,
        advertiser_id="a",
        audience_id="t1",
        access_token=platforms.tiktok_token,
    )
    await harness.activate("tt", ["email", "phone", "idfa", "gaid"])
    await upstream.profile("m1", {"idfa": idfa, "phone": "911 234 0375"}, {"loyalty_tier": "gold"})
    await upstream.membership("m1")
    await upstream.profile("m2", {"gaid": gaid, "email": "Jo.Ann+x@Example.com"}, {"loyalty_tier": "gold"})
    await upstream.membership("m2")
    await harness.settled("tt", 2)
    assert platforms.members["tiktok:t1"] == {
        ids.sha256_hex(idfa.lower()),
        ids.sha256_hex(gaid),
        ids.sha256_hex("joann@example.com"),
    }
    assert not platforms.rejected, platforms.rejected


async def test_activation_sends_nothing_while_its_lease_is_stale_and_everything_once_it_is_fresh(
    harness: Harness, upstream: Upstream, platforms: LocalPlatforms
) -> None:
    """Under a lease (cdp_kit.lease) a frozen active must not deliver after a standby could have
    taken over: while ``may_act`` says no, a prepared batch waits (its retry after a failed send
    too); it goes once it says yes."""
    fresh = True
    harness.processor.may_act = lambda: fresh
    await upstream.segment()
    await harness.destination("hook", "webhook", base_url=platforms.url + "/webhook", secret=platforms.webhook_secret)
    await harness.activate("hook", ["email"])
    # The first send is told to come back in 2 s: the batch is prepared, pending and due again.
    platforms.fail("webhook", Fault(429, retry_after=2.0))

    def first_send_failed() -> bool:
        return not platforms.faults["webhook"]

    pids = await people(upstream, 5)
    await until(lambda: True if first_send_failed() else None, what="the first send to fail")
    fresh = False  # the lease goes stale before the retry is due
    await asyncio.sleep(3.0)  # past the retry's time, many delivery rounds (delivery_interval_s is 0.05)
    assert not platforms.accepted["webhook"], "a batch went out while the lease was stale"
    fresh = True
    await harness.settled("hook", 5)
    assert platforms.members["webhook:gold"] == set(pids)
