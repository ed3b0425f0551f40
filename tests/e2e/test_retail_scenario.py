"""Issue #14's scenario, end to end: a retailer's data as it really comes, through the real stack.

One stack (nats-server and the four services as subprocesses) takes the whole files of
``retail_data`` (a wide CRM CSV with several rows per person, loyalty JSON Lines, point-of-sale
orders in Parquet keyed by either id) through ``IngestFile``, then the web events published on
``cdp.collect.web`` as a website would. Once every consumer has applied its input to the end, the
profiles must be exactly the identity graphs ``retail_data.stitch`` computes, and every audience,
streaming and batch (the same definition with a schedule, evaluated on demand), must hold exactly
the people ``retail_data`` says, compared by each profile's strongest identity (its CRM id first).

The schemas use issue #14's forms as docs/ingest.md states them: identity fields without a
primary (a row needs one usable identity value, else rule ``identity``), the CRM's record time
from ``updated_at``, its flat ``email_consent`` column marked ``consent_for: email_marketing``, and
event schemas listing the ``event_types`` they carry (web amounts are strings, store amounts
numbers). Segments are created right after the schemas, without waiting for segmentation to read
them (it waits for ingest's config position itself). Every setup step must succeed: a refusal
fails the module's fixture, and so every test, with the service's own error.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import phonenumbers
import pytest
from google.protobuf import json_format

from cdp.common.v1.envelope_pb2 import IdentityValue
from cdp.identity.v1 import identity_pb2 as idn
from cdp.ingest.v1 import ingest_pb2 as ing
from cdp.segmentation.v1 import segmentation_pb2 as seg
from cdp_cli.client import Client
from cdp_cli.inputs import file_chunks
from cdp_cli.skeleton import retrying
from cdp_cli.stack import Stack
from cdp_kit.natsauth import PUBLISHER
from tests.e2e import natsconn
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


def crm_schema() -> dict[str, Any]:
    """44 columns; the record time is ``updated_at``; ``email_consent`` (y/n/u) is the consent to
    the marketing action email_marketing (ingest writes it to ``consent_email_marketing``)."""
    fields = [field_("crm_id", required=True, identity_namespace="crm_id")]
    fields += [field_("email", identity_namespace="email"), field_("phone", identity_namespace="phone")]
    for name in rd.CRM_COLUMNS[3:]:
        fields.append(field_(name, CRM_TYPES.get(name, "STRING")))
    for f in fields:
        if f["name"] == "email_consent":
            f["consent_for"] = "email_marketing"
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
        field_("loyalty_id", required=True, identity_namespace="loyalty_id"),
        field_("email", identity_namespace="email"),
        field_("phone", identity_namespace="phone"),
        field_("tier", enum_values=list(rd.TIERS)),
        field_("points", "INTEGER", minimum=0),
        field_("member_since", "DATE"),
    ],
}
# Several identity fields, none required: a row needs a usable value in one of them.
ORDER_SCHEMA = {
    "name": "pos_order",
    "schema_class": "SCHEMA_CLASS_EVENT",
    "event_id_field": "order_id",
    "timestamp_field": "ts",
    "event_type_field": "type",
    "event_types": ["order"],
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
# The site sends amounts as strings: typed so for its own event types only, not for store orders.
WEB_TYPES = ("page_view", "login", "add_to_cart", "purchase")
WEB_SCHEMA = {
    "name": "web_event",
    "schema_class": "SCHEMA_CLASS_EVENT",
    "event_id_field": "event_id",
    "timestamp_field": "ts",
    "event_type_field": "type",
    "event_types": list(WEB_TYPES),
    "fields": [
        field_("event_id", required=True),
        field_("ts", "TIMESTAMP", required=True),
        field_("type", enum_values=list(WEB_TYPES)),
        field_("cookie_id", required=True, identity_namespace="cookie"),
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
    reports: dict[str, ing.BatchReport] = field(default_factory=dict)
    partition: dict[str, frozenset[str]] = field(default_factory=dict)  # profile id -> identity keys
    members: dict[str, set[str]] = field(default_factory=dict)  # segment -> profile ids
    profile_count: int = 0
    collect_rejects: int = 0
    drops: dict[tuple[str, str], int] = field(default_factory=dict)  # identity's stats: (namespace, rule) -> count
    lookups: dict[Lookup, str] = field(default_factory=dict)  # -> the holder's label, or the error

    def label(self, profile_id: str) -> str:
        keys = self.partition.get(profile_id)
        if not keys:
            return f"?{profile_id}"
        return min(keys, key=lambda k: (rd.PRIORITY.get(k.split(":", 1)[0], 999), k))

    def labels(self, segment: str) -> set[str]:
        return {self.label(p) for p in self.members[segment]}


@dataclass(frozen=True)
class Lookup:
    """`cdp profile get NAMESPACE:RAW`: an identity as a person types it, and what identity keeps
    of it (None: nothing, so no profile holds it)."""

    namespace: str
    raw: str
    canonical: str | None


def create_dataset(client: Client, name: str, schema: dict[str, Any]) -> None:
    message = json_format.ParseDict(schema, ing.Schema())
    retrying(partial(client.ingest.CreateSchema, ing.CreateSchemaRequest(schema=message)))
    dataset = ing.Dataset(name=name, schema_name=message.name, profile_enabled=True)
    retrying(partial(client.ingest.CreateDataset, ing.CreateDatasetRequest(dataset=dataset)))


def create_datasets(client: Client) -> None:
    create_dataset(client, "crm", crm_schema())
    create_dataset(client, "loyalty", LOYALTY_SCHEMA)
    create_dataset(client, "orders", ORDER_SCHEMA)
    create_dataset(client, "web", WEB_SCHEMA)


def batch_query(query: str) -> str:
    return re.sub(r"in segment (\w+)", lambda m: f"in segment {m.group(1)}{BATCH}", query)


def create_segments(client: Client) -> None:
    """Right after the schemas: segmentation type-checks each definition against all of them
    (``big_store_spenders`` is refused if it types ``order.amount`` by the web events' string)."""
    everyone = "has crm_id or has loyalty_id or has email or has phone or has cookie"
    retrying(partial(client.segmentation.CreateSegment, seg.CreateSegmentRequest(name=EVERYONE, query=everyone)))
    for audience in rd.AUDIENCES:
        for name, query, schedule in (
            (audience.name, audience.query, ""),
            (audience.name + BATCH, batch_query(audience.query), SCHEDULE),
        ):
            request = seg.CreateSegmentRequest(name=name, query=query, schedule=schedule)
            retrying(partial(client.segmentation.CreateSegment, request))


def ingest(client: Client, outcome: Outcome, folder: Path, dataset: str, name: str, data: bytes) -> None:
    """The whole file in one IngestFile call, as `cdp ingest` sends it."""
    path = folder / name
    path.write_bytes(data)
    header = ing.IngestFileHeader(dataset=dataset, batch_key=name, format=file_format(name), file_name=name)
    outcome.reports[dataset] = client.ingest.IngestFile(file_chunks(path, header), timeout=120.0)


def file_format(name: str) -> ing.FileFormat.ValueType:
    suffix = name.rsplit(".", 1)[1]
    return {"csv": ing.FILE_FORMAT_CSV, "jsonl": ing.FILE_FORMAT_JSONL, "parquet": ing.FILE_FORMAT_PARQUET}[suffix]


async def publish(target: natsconn.NatsTarget, payloads: list[bytes]) -> None:
    """What a website does: one JSON event per message on cdp.collect.web, acknowledged by
    JetStream, with the message id docs/ingest.md recommends, as the ``publisher`` user."""
    nc = await natsconn.connect(target, PUBLISHER)
    try:
        js = nc.jetstream()
        for payload in payloads:
            headers = {"Nats-Msg-Id": f"web:{json.loads(payload)['event_id']}"}
            await js.publish("cdp.collect.web", payload, headers=headers, timeout=10.0)
    finally:
        await nc.drain()


def evaluate_batch(client: Client) -> None:
    """Each batch twin evaluated on demand, inner segments first (AUDIENCES lists them first)."""
    for audience in rd.AUDIENCES:
        request = seg.EvaluateSegmentRequest(segment=audience.name + BATCH)
        for progress in client.segmentation.EvaluateSegment(request):
            if progress.done:
                break


def read_outcome(client: Client, outcome: Outcome) -> None:
    listed = retrying(lambda: client.segmentation.ListSegments(seg.ListSegmentsRequest()))
    for segment in listed.segments:
        got = retrying(
            partial(client.segmentation.ListMembers, seg.ListMembersRequest(segment=segment.name, limit=1_000_000))
        )
        outcome.members[segment.name] = set(got.profile_ids)
    for profile_id in outcome.members[EVERYONE]:
        profile = retrying(partial(client.segmentation.GetProfile, seg.GetProfileRequest(profile_id=profile_id)))
        outcome.partition[profile_id] = frozenset(f"{i.namespace}:{i.value}" for i in profile.identities)
    outcome.profile_count = retrying(lambda: client.segmentation.GetStats(seg.GetStatsRequest())).profiles
    stats = retrying(lambda: client.identity.GetStats(idn.GetStatsRequest()))
    outcome.drops = {(d.namespace, d.rule): d.count for d in stats.dropped}
    for lookup in lookups(outcome.data):
        request = seg.GetProfileRequest(identity=IdentityValue(namespace=lookup.namespace, value=lookup.raw))
        try:
            outcome.lookups[lookup] = outcome.label(client.segmentation.GetProfile(request).profile_id)
        except grpc.RpcError as err:
            outcome.lookups[lookup] = f"{err.code().name}: {err.details()}"
    outcome.collect_rejects = sum(1 for d in dead_letters(client, "ingest") if d.consumer == "ingest-collect")


def lookups(data: rd.RetailData) -> list[Lookup]:
    """Identities of a few people written as people write them (`cdp profile get phone:(201)
    555-0142`), and values no profile holds: unknown, invalid, a placeholder."""
    out: list[Lookup] = []
    for person in data.people[:40:4]:
        if person.phone is not None:
            d = person.phone[2:]
            out += [
                Lookup("phone", f"({d[:3]}) {d[3:6]}-{d[6:]}", person.phone),
                Lookup("phone", f"{d[:3]}.{d[3:6]}.{d[6:]}", person.phone),
            ]
        out.append(Lookup("email", f" {person.email.upper()} ", person.email))
    out += [
        Lookup("email", "Nobody.Here@Example.com", "nobody.here@example.com"),
        Lookup("email", "TEST@TEST.COM", None),
        Lookup("phone", rd.INVALID_PHONE, None),
        Lookup("crm_id", "C99999", "C99999"),
    ]
    return out


def run(folder: Path, now: datetime) -> Outcome:
    data = rd.generate(now)
    outcome = Outcome(data)
    with (
        Stack(folder / "cdp", ready_timeout_s=120.0) as stack,
        Client(stack.data_dir, addresses=stack.addresses, timeout=120.0) as client,
    ):
        create_datasets(client)
        create_segments(client)
        ingest(client, outcome, folder, "crm", "crm_export.csv", data.crm_csv)
        ingest(client, outcome, folder, "loyalty", "loyalty_members.jsonl", data.loyalty_jsonl)
        ingest(client, outcome, folder, "orders", "pos_orders.parquet", data.orders_parquet)
        asyncio.run(publish(stack, data.web_events))
        wait_drained(client, stack, timeout_s=180.0)
        evaluate_batch(client)
        wait_drained(client, stack, timeout_s=60.0)
        read_outcome(client, outcome)
    return outcome


@pytest.fixture(scope="module")
def outcome(tmp_path_factory: pytest.TempPathFactory) -> Outcome:
    return run(tmp_path_factory.mktemp("retail"), datetime.now(UTC))


@pytest.fixture(scope="module")
def expected(outcome: Outcome) -> tuple[list[rd.Profile], dict[str, set[str]]]:
    """Every record of every input, in log order (the files as ingested, then the web events)."""
    data = outcome.data
    return rd.expect(data.crm + data.loyalty + data.orders + data.web, data.now)


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
    consents = [{data.crm[k].values["consent_email_marketing"] for k in rows} for rows in by_person.values()]
    assert any(len(c) > 1 for c in consents), "a person's CRM rows disagree on consent"
    assert len(data.crm_csv.splitlines()[0].split(b",")) >= 40
    assert data.guest_orders > 0
    assert data.shared_cookies
    both = sum(1 for r in data.orders if all(v for _, v in r.identities) and len(r.identities) == 2)
    assert 0 < both < len(data.orders)
    assert any(b"test@test.com" in e.lower() for e in data.web_events)
    # Every phone the expectation links is one phonenumbers holds valid; the invalid one is possible.
    phones = {value for r in data.crm + data.loyalty for ns, value in r.identities if ns == "phone" and value}
    assert phones
    assert [p for p in phones if not phonenumbers.is_valid_number(phonenumbers.parse(p))] == []
    invalid = phonenumbers.parse(rd.INVALID_PHONE, "US")
    assert phonenumbers.is_possible_number(invalid)
    assert not phonenumbers.is_valid_number(invalid)
    assert rd.INVALID_PHONE.encode() in data.crm_csv
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
    # Record time matters: were every CRM row to take its batch's time (file order wins), the
    # newest city and consent would differ for some people.
    batch_time = [dataclasses.replace(r, at=data.now) for r in data.crm]
    _, by_file_order = rd.expect(batch_time + data.loyalty + data.orders + data.web, data.now)
    assert by_file_order["boston_newest"] != members["boston_newest"]
    assert by_file_order["email_reachable"] != members["email_reachable"]


def test_every_file_is_ingested_whole(outcome: Outcome) -> None:
    """Each file in one batch; only the guest checkouts are rejected, with rule identity, once per
    identity field; the junk ids and invalid phones pass ingest (identity drops them)."""
    data = outcome.data
    got = {d: (r.status, r.rows_read, r.rows_accepted, r.rows_rejected) for d, r in outcome.reports.items()}
    completed = ing.BATCH_STATUS_COMPLETED
    assert got == {
        "crm": (completed, data.crm_rows, data.crm_rows, 0),
        "loyalty": (completed, data.loyalty_rows, data.loyalty_rows, 0),
        "orders": (completed, data.order_rows, data.order_rows - data.guest_orders, data.guest_orders),
    }
    rejects = sorted((g.field, g.rule, g.count) for g in outcome.reports["orders"].rejects)
    assert rejects == [("crm_id", "identity", data.guest_orders), ("loyalty_id", "identity", data.guest_orders)]
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


def test_identity_drops_and_counts_the_junk_ingest_let_through(outcome: Outcome) -> None:
    """Placeholders (blocklist) and an invalid phone pass ingest beside a usable identity, or alone
    (orders whose only id is ``N/A``); identity drops each and counts it, and the orders left with
    no identity link no one."""
    data = outcome.data
    want = rd.drops(data.crm + data.loyalty + data.orders + data.web)
    assert want[("*", "no_identities")] == len(rd.JUNK_IDS)
    assert outcome.drops == want


def assert_members(outcome: Outcome, expected: dict[str, set[str]], audience: rd.Audience, segment: str) -> None:
    want, got = expected[audience.name], outcome.labels(segment)
    assert (sorted(got - want), sorted(want - got)) == ([], []), f"{audience.name}: (unexpected, missing)"


@pytest.mark.parametrize("audience", rd.AUDIENCES, ids=lambda a: a.name)
def test_streaming_audience_holds_exactly_the_expected_people(
    outcome: Outcome, expected: tuple[list[rd.Profile], dict[str, set[str]]], audience: rd.Audience
) -> None:
    assert_members(outcome, expected[1], audience, audience.name)


@pytest.mark.parametrize("audience", rd.AUDIENCES, ids=lambda a: a.name)
def test_batch_audience_holds_exactly_the_expected_people(
    outcome: Outcome, expected: tuple[list[rd.Profile], dict[str, set[str]]], audience: rd.Audience
) -> None:
    assert_members(outcome, expected[1], audience, audience.name + BATCH)


def test_a_person_is_found_by_any_format_of_an_identity(
    outcome: Outcome, expected: tuple[list[rd.Profile], dict[str, set[str]]]
) -> None:
    """One normaliser for identity and every lookup: GetProfile by a phone or an email as typed.
    What no profile holds is NOT_FOUND naming the namespace only."""
    holder = {key: p.label for p in expected[0] for key in p.identities}
    found = {k for k in outcome.lookups if k.canonical is not None and f"{k.namespace}:{k.canonical}" in holder}
    want = {
        k: holder[f"{k.namespace}:{k.canonical}"] if k in found else f"NOT_FOUND: {k.namespace} not found"
        for k in outcome.lookups
    }
    assert outcome.lookups == want
    assert len(found) > len(outcome.lookups) // 2


def test_not_found_says_neither_the_value_nor_its_hash(outcome: Outcome) -> None:
    missing = {k: answer for k, answer in outcome.lookups.items() if answer.startswith("NOT_FOUND")}
    assert {k.namespace for k in missing} == {"email", "phone", "crm_id"}
    for lookup, answer in missing.items():
        forms = {lookup.raw, lookup.raw.strip(), lookup.raw.strip().lower(), lookup.canonical or lookup.raw}
        forms |= {hashlib.sha256(f.encode()).hexdigest() for f in set(forms)}
        assert answer == f"NOT_FOUND: {lookup.namespace} not found"
        assert not [f for f in forms if f.lower() in answer.lower()]
