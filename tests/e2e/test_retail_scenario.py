"""Issue #14's scenario, end to end: a retailer's data as it really comes, through the real stack.

One stack (nats-server and the four services as subprocesses) takes the whole files of
``retail_data`` (a wide CRM CSV with several rows per person, loyalty JSON Lines, point-of-sale
orders in Parquet keyed by either id) through ``IngestFile``, then the web events published on
``cdp.collect.web`` as a website would. Once every consumer has applied its input to the end, the
profiles must be exactly the identity graphs ``retail_data.stitch`` computes, and every audience,
streaming and batch (the same definition with a schedule, evaluated on demand), must hold exactly
the people ``retail_data`` says, compared by each profile's strongest identity (its CRM id first).

Each audience names the part of issue #14 it needs (``retail_data.AUDIENCES``), and setup steps
that need an unmerged part record their refusal instead of stopping the scenario, so one missing
feature fails its own assertions, not every one.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import nats
import pytest
from google.protobuf import json_format

from cdp.common.v1.envelope_pb2 import IdentityValue
from cdp.ingest.v1 import ingest_pb2 as ing
from cdp.segmentation.v1 import segmentation_pb2 as seg
from cdp_cli.client import Client
from cdp_cli.inputs import file_chunks
from cdp_cli.skeleton import retrying
from cdp_cli.stack import Stack
from tests.e2e import retail_data as rd
from tests.e2e.chain import dead_letters, wait_drained

pytestmark = pytest.mark.e2e

BATCH = "_batch"  # the batch twin of each audience: the same definition with a schedule
SCHEDULE = "0 3 * * *"
EVERYONE = "everyone"  # lists every profile, to read the platform's partition of identities


# ----------------------------------------------------------------------------------- schemas
def field_(name: str, kind: str = "STRING", **extra: Any) -> dict[str, Any]:
    return {"name": name, "type": f"FIELD_TYPE_{kind}", **extra}


CRM_TYPES = {
    "updated_at": "TIMESTAMP",
    "created_at": "TIMESTAMP",
    "birth_date": "DATE",
    "credit_limit": "NUMBER",
    "vip_score": "INTEGER",
}


def crm_schema(consent_mapping: bool) -> dict[str, Any]:
    """44 columns; the record time is ``updated_at`` (rectime); ``email_consent`` (y/n/u) is the
    consent to the marketing action email_marketing (segtypes' consent mapping)."""
    fields = [field_("crm_id", required=True, identity_namespace="crm_id", primary_identity=True)]
    fields += [field_("email", identity_namespace="email"), field_("phone", identity_namespace="phone")]
    for name in rd.CRM_COLUMNS[3:]:
        fields.append(field_(name, CRM_TYPES.get(name, "STRING")))
    for f in fields:
        if f["name"] == "email_consent":
            f["enum_values"] = ["y", "n", "u"]
            if consent_mapping:
                f["consent_action"] = "email_marketing"
    return {
        "name": "crm_person",
        "schema_class": "SCHEMA_CLASS_PROFILE",
        "timestamp_field": "updated_at",
        "fields": fields,
    }


LOYALTY_SCHEMA = {
    "name": "loyalty_member",
    "schema_class": "SCHEMA_CLASS_PROFILE",
    "fields": [
        field_("loyalty_id", required=True, identity_namespace="loyalty_id", primary_identity=True),
        field_("email", identity_namespace="email"),
        field_("phone", identity_namespace="phone"),
        field_("tier", enum_values=list(rd.TIERS)),
        field_("points", "INTEGER", minimum=0),
        field_("member_since", "DATE"),
    ],
}
# Several identity fields, none primary, none required (ids): a row needs one of them.
ORDER_SCHEMA = {
    "name": "pos_order",
    "schema_class": "SCHEMA_CLASS_EVENT",
    "event_id_field": "order_id",
    "timestamp_field": "ts",
    "event_type_field": "type",
    "fields": [
        field_("order_id", required=True),
        field_("ts", "TIMESTAMP", required=True),
        field_("type", enum_values=["order"]),
        field_("loyalty_id", identity_namespace="loyalty_id"),
        field_("crm_id", identity_namespace="crm_id"),
        field_("channel", enum_values=["store", "online_pickup"]),
        field_("store"),
        field_("amount", "NUMBER", minimum=0),
    ],
}
# The site sends amounts as strings; the event types it carries are the enum of its type field.
WEB_SCHEMA = {
    "name": "web_event",
    "schema_class": "SCHEMA_CLASS_EVENT",
    "event_id_field": "event_id",
    "timestamp_field": "ts",
    "event_type_field": "type",
    "fields": [
        field_("event_id", required=True),
        field_("ts", "TIMESTAMP", required=True),
        field_("type", enum_values=["page_view", "login", "add_to_cart", "purchase"]),
        field_("cookie_id", required=True, identity_namespace="cookie", primary_identity=True),
        field_("email", identity_namespace="email"),
        field_("page"),
        field_("category"),
        field_("product_id"),
        field_("amount"),
        field_("currency"),
    ],
}


# ----------------------------------------------------------------------------------- the run
@dataclass
class Outcome:
    data: rd.RetailData
    problems: dict[str, str] = field(default_factory=dict)  # setup step -> why it was refused
    reports: dict[str, ing.BatchReport] = field(default_factory=dict)
    partition: dict[str, frozenset[str]] = field(default_factory=dict)  # profile id -> identity keys
    members: dict[str, set[str]] = field(default_factory=dict)  # segment -> profile ids
    profile_count: int = 0
    collect_rejects: int = 0
    lookups: dict[tuple[str, str, str], str] = field(default_factory=dict)  # (ns, raw, canonical) -> label

    def label(self, profile_id: str) -> str:
        keys = self.partition.get(profile_id)
        if not keys:
            return f"?{profile_id}"
        return min(keys, key=lambda k: (rd.PRIORITY.get(k.split(":", 1)[0], 999), k))

    def labels(self, segment: str) -> set[str]:
        return {self.label(p) for p in self.members.get(segment, set())}


def refused(err: Exception) -> str:
    if isinstance(err, grpc.Call):
        return f"{err.code().name}: {err.details()}"
    return f"{type(err).__name__}: {err}"


def create_dataset(client: Client, outcome: Outcome, name: str, schema: dict[str, Any]) -> bool:
    try:
        message = json_format.ParseDict(schema, ing.Schema())
        retrying(partial(client.ingest.CreateSchema, ing.CreateSchemaRequest(schema=message)))
        dataset = ing.Dataset(name=name, schema_name=message.name, profile_enabled=True)
        retrying(partial(client.ingest.CreateDataset, ing.CreateDatasetRequest(dataset=dataset)))
    except (grpc.RpcError, json_format.ParseError) as err:
        outcome.problems[f"dataset {name}"] = refused(err)
        return False
    return True


def create_datasets(client: Client, outcome: Outcome) -> None:
    if not create_dataset(client, outcome, "crm", crm_schema(consent_mapping=True)):
        # Without the consent mapping the rest of the CRM data can still be checked.
        outcome.problems["consent mapping"] = outcome.problems.pop("dataset crm")
        create_dataset(client, outcome, "crm", crm_schema(consent_mapping=False))
    create_dataset(client, outcome, "loyalty", LOYALTY_SCHEMA)
    create_dataset(client, outcome, "orders", ORDER_SCHEMA)
    create_dataset(client, outcome, "web", WEB_SCHEMA)


def batch_query(query: str) -> str:
    return re.sub(r"in segment (\w+)", lambda m: f"in segment {m.group(1)}{BATCH}", query)


def create_segments(client: Client, outcome: Outcome) -> None:
    everyone = "has crm_id or has loyalty_id or has email or has phone or has cookie"
    retrying(partial(client.segmentation.CreateSegment, seg.CreateSegmentRequest(name=EVERYONE, query=everyone)))
    for audience in rd.AUDIENCES:
        for name, query, schedule in (
            (audience.name, audience.query, ""),
            (audience.name + BATCH, batch_query(audience.query), SCHEDULE),
        ):
            request = seg.CreateSegmentRequest(name=name, query=query, schedule=schedule)
            try:
                retrying(partial(client.segmentation.CreateSegment, request))
            except grpc.RpcError as err:
                outcome.problems[f"segment {name}"] = refused(err)


def ingest(client: Client, outcome: Outcome, folder: Path, dataset: str, name: str, data: bytes) -> None:
    """The whole file in one IngestFile call, as `cdp ingest` sends it."""
    if f"dataset {dataset}" in outcome.problems:
        return
    path = folder / name
    path.write_bytes(data)
    fmt = rd_format(name)
    header = ing.IngestFileHeader(dataset=dataset, batch_key=name, format=fmt, file_name=name)
    try:
        outcome.reports[dataset] = client.ingest.IngestFile(file_chunks(path, header), timeout=120.0)
    except grpc.RpcError as err:
        outcome.problems[f"ingest {name}"] = refused(err)


def rd_format(name: str) -> ing.FileFormat.ValueType:
    suffix = name.rsplit(".", 1)[1]
    return {"csv": ing.FILE_FORMAT_CSV, "jsonl": ing.FILE_FORMAT_JSONL, "parquet": ing.FILE_FORMAT_PARQUET}[suffix]


async def publish(nats_url: str, payloads: list[bytes]) -> None:
    """What a website does: one JSON event per message on cdp.collect.web, acknowledged by JetStream."""
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        for payload in payloads:
            await js.publish("cdp.collect.web", payload, timeout=10.0)
    finally:
        await nc.drain()


def evaluate_batch(client: Client, outcome: Outcome) -> None:
    """Each batch twin evaluated on demand, inner segments first (AUDIENCES lists them first)."""
    for audience in rd.AUDIENCES:
        name = audience.name + BATCH
        if f"segment {name}" in outcome.problems:
            continue
        try:
            for progress in client.segmentation.EvaluateSegment(seg.EvaluateSegmentRequest(segment=name)):
                if progress.done:
                    break
        except grpc.RpcError as err:
            outcome.problems[f"evaluate {name}"] = refused(err)


def read_outcome(client: Client, outcome: Outcome) -> None:
    listed = retrying(lambda: client.segmentation.ListSegments(seg.ListSegmentsRequest()))
    for segment in listed.segments:
        got = retrying(
            partial(client.segmentation.ListMembers, seg.ListMembersRequest(segment=segment.name, limit=1_000_000))
        )
        outcome.members[segment.name] = set(got.profile_ids)
    for profile_id in outcome.members.get(EVERYONE, set()):
        profile = retrying(partial(client.segmentation.GetProfile, seg.GetProfileRequest(profile_id=profile_id)))
        outcome.partition[profile_id] = frozenset(f"{i.namespace}:{i.value}" for i in profile.identities)
    outcome.profile_count = retrying(lambda: client.segmentation.GetStats(seg.GetStatsRequest())).profiles
    for namespace, raw, canonical in lookups(outcome.data):
        try:
            found = client.segmentation.GetProfile(
                seg.GetProfileRequest(identity=IdentityValue(namespace=namespace, value=raw))
            )
            outcome.lookups[(namespace, raw, canonical)] = outcome.label(found.profile_id)
        except grpc.RpcError as err:
            outcome.lookups[(namespace, raw, canonical)] = refused(err)
    outcome.collect_rejects = sum(1 for d in dead_letters(client, "ingest") if d.consumer == "ingest-collect")


def lookups(data: rd.RetailData) -> list[tuple[str, str, str]]:
    """Identities of a few people written as people write them: `cdp profile get phone:(201) 555-0142`."""
    out: list[tuple[str, str, str]] = []
    for person in data.people[:40:4]:
        if person.phone is not None:
            d = person.phone[2:]
            out += [
                ("phone", f"({d[:3]}) {d[3:6]}-{d[6:]}", person.phone),
                ("phone", f"{d[:3]}.{d[3:6]}.{d[6:]}", person.phone),
            ]
        out += [("email", f" {person.email.upper()} ", person.email)]
    return out


def run(folder: Path, now: datetime) -> Outcome:
    data = rd.generate(now)
    outcome = Outcome(data)
    with (
        Stack(folder / "cdp", ready_timeout_s=120.0) as stack,
        Client(addresses=stack.addresses, timeout=120.0) as client,
    ):
        create_datasets(client, outcome)
        wait_drained(client, stack.nats_url, timeout_s=60.0)  # segmentation knows the schemas
        create_segments(client, outcome)
        ingest(client, outcome, folder, "crm", "crm_export.csv", data.crm_csv)
        ingest(client, outcome, folder, "loyalty", "loyalty_members.jsonl", data.loyalty_jsonl)
        ingest(client, outcome, folder, "orders", "pos_orders.parquet", data.orders_parquet)
        asyncio.run(publish(stack.nats_url, data.web_events))
        wait_drained(client, stack.nats_url, timeout_s=180.0)
        evaluate_batch(client, outcome)
        wait_drained(client, stack.nats_url, timeout_s=60.0)
        read_outcome(client, outcome)
    return outcome


@pytest.fixture(scope="module")
def outcome(tmp_path_factory: pytest.TempPathFactory) -> Outcome:
    return run(tmp_path_factory.mktemp("retail"), datetime.now(UTC))


def ingested(outcome: Outcome) -> list[rd.Record]:
    """The records of the inputs the platform accepted, in log order: a refused file is reported by
    test_every_file_is_ingested_whole; the rest is still checked against what did go in."""
    data = outcome.data
    out: list[rd.Record] = []
    for dataset, records in (("crm", data.crm), ("loyalty", data.loyalty), ("orders", data.orders)):
        report = outcome.reports.get(dataset)
        if report is not None and report.status == ing.BATCH_STATUS_COMPLETED:
            out += records
    if "dataset web" not in outcome.problems:
        out += data.web
    return out


@pytest.fixture(scope="module")
def expected(outcome: Outcome) -> tuple[list[rd.Profile], dict[str, set[str]]]:
    return rd.expect(ingested(outcome), outcome.data.now)


# ----------------------------------------------------------------------------------- the checks
def test_the_generated_data_holds_every_case_of_the_issue() -> None:
    data = rd.generate(datetime.now(UTC))
    by_person: dict[str, list[int]] = {}
    for pos, record in enumerate(data.crm):
        by_person.setdefault(str(record.identities[0][1]), []).append(pos)
    newer_first = [
        rows for rows in by_person.values() if len(rows) > 1 and data.crm[rows[0]].at > data.crm[rows[-1]].at
    ]
    ties = [rows for rows in by_person.values() if len({data.crm[k].at for k in rows}) < len(rows)]
    assert newer_first, "a person's newer CRM row before the older one in the file"
    assert ties, "two CRM rows of a person with the same update time"
    assert len(data.crm_csv.splitlines()[0].split(b",")) >= 40
    assert data.guest_orders > 0
    assert data.shared_cookies
    both = sum(1 for r in data.orders if all(v for _, v in r.identities) and len(r.identities) == 2)
    assert 0 < both < len(data.orders)
    assert any(b"test@test.com" in e.lower() for e in data.web_events)
    profiles, members = rd.expect(data.crm + data.loyalty + data.orders + data.web, data.now)
    # The issue's case: an old abandoned cart and a recent completed one is no abandoner.
    old_and_completed = [
        p
        for p in profiles
        if len(p.events("add_to_cart")) >= 2 and not rd.cart_abandoners(p, data.now) and p.events("purchase")
    ]
    assert old_and_completed
    for audience in rd.AUDIENCES:
        assert 0 < len(members[audience.name]) < len(profiles), audience.name


def test_every_file_is_ingested_whole(outcome: Outcome) -> None:
    data = outcome.data
    assert {k: v for k, v in outcome.problems.items() if k.startswith(("dataset", "ingest"))} == {}
    got = {d: (r.status, r.rows_read, r.rows_accepted, r.rows_rejected) for d, r in outcome.reports.items()}
    completed = ing.BATCH_STATUS_COMPLETED
    assert got == {
        "crm": (completed, data.crm_rows, data.crm_rows, 0),
        "loyalty": (completed, data.loyalty_rows, data.loyalty_rows, 0),
        "orders": (completed, data.order_rows, data.order_rows - data.guest_orders, data.guest_orders),
    }
    rejects = [(g.field, g.rule, g.count) for g in outcome.reports["orders"].rejects]
    assert [(rule, count) for _, rule, count in rejects] == [("identity", data.guest_orders)]
    assert outcome.collect_rejects == 0


def test_profiles_are_the_identity_graphs_the_documented_rules_give(
    outcome: Outcome, expected: tuple[list[rd.Profile], dict[str, set[str]]]
) -> None:
    profiles, _ = expected
    want = {frozenset(p.identities) for p in profiles}
    got = set(outcome.partition.values())
    assert (sorted(map(sorted, got - want))[:5], sorted(map(sorted, want - got))[:5]) == ([], [])
    assert outcome.profile_count == len(profiles)
    # The shared device stays with the person who logged in on it first.
    for cookie, first, second in outcome.data.shared_cookies:
        holder = next(keys for keys in outcome.partition.values() if f"cookie:{cookie}" in keys)
        assert f"crm_id:{first}" in holder
        assert f"crm_id:{second}" not in holder


def describe(audience: rd.Audience) -> str:
    return f"{audience.name} ({audience.feature or 'on main'})"


def assert_members(outcome: Outcome, expected: dict[str, set[str]], audience: rd.Audience, segment: str) -> None:
    for step in (f"segment {segment}", f"evaluate {segment}"):
        problem = outcome.problems.get(step)
        assert problem is None, f"{describe(audience)}: {step} refused: {problem}"
    want, got = expected[audience.name], outcome.labels(segment)
    assert want, f"{describe(audience)}: nothing expected: an input it reads was not ingested"
    assert (sorted(got - want), sorted(want - got)) == ([], []), f"{describe(audience)}: (unexpected, missing)"


@pytest.mark.parametrize("audience", rd.AUDIENCES, ids=describe)
def test_streaming_audience_holds_exactly_the_expected_people(
    outcome: Outcome, expected: tuple[list[rd.Profile], dict[str, set[str]]], audience: rd.Audience
) -> None:
    assert_members(outcome, expected[1], audience, audience.name)


@pytest.mark.parametrize("audience", rd.AUDIENCES, ids=describe)
def test_batch_audience_holds_exactly_the_expected_people(
    outcome: Outcome, expected: tuple[list[rd.Profile], dict[str, set[str]]], audience: rd.Audience
) -> None:
    assert_members(outcome, expected[1], audience, audience.name + BATCH)


def test_a_person_is_found_by_any_format_of_an_identity(
    outcome: Outcome, expected: tuple[list[rd.Profile], dict[str, set[str]]]
) -> None:
    """One normaliser for identity and every lookup (ids): GetProfile by a phone or an email as typed."""
    holder = {key: p.label for p in expected[0] for key in p.identities}
    want = {k: holder.get(f"{k[0]}:{k[2]}", "NOT_FOUND") for k in outcome.lookups}
    assert outcome.lookups == want
