"""Volume through the real chain: outputs bigger than one NATS message, applied whole everywhere.

* A wide, messy CRM export (10,000 rows, 60 text columns of 40-200 characters with commas, quotes,
  line breaks and accents) ingested as a profile dataset: identity's fragments for one ingest
  message exceed one NATS message, so they travel as numbered parts (``Cdp-Part``). Every row must
  reach segmentation as a profile with its attributes, and nothing may be stuck or dead-lettered.
* One profile entering 1,000 streaming segments at once: 1,000 memberships, each realized once,
  and activation applies them (a file export of one of the segments delivers the person).
"""

from __future__ import annotations

import csv
import os
import random
import string
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import json_format, struct_pb2

from cdp.activation.v1 import activation_pb2 as act
from cdp.common.v1.envelope_pb2 import IdentityValue
from cdp.ingest.v1 import ingest_pb2 as ing
from cdp.segmentation.v1 import events_pb2 as sev
from cdp.segmentation.v1 import segmentation_pb2 as seg
from cdp_cli.client import SERVICES, Client
from cdp_cli.inputs import file_chunks
from cdp_cli.skeleton import ensure_datasets, retrying
from cdp_cli.stack import Stack
from cdp_kit.envelope import is_a, unpack
from cdp_kit.parts import PART_HEADER
from cdp_kit.streams import AUDIENCE, IDENTITY_FRAGMENTS, SEGMENTATION_MEMBERSHIPS
from tests.e2e.chain import dead_letters, read_log, wait_drained, wait_for

pytestmark = pytest.mark.e2e

# CDP_VOLUME_ROWS=100000 runs the full size by hand (about 10x longer than CI's).
ROWS = int(os.environ.get("CDP_VOLUME_ROWS", "10000"))
WIDE_COLUMNS = 60
SEED = 20261202
# Letters, digits, and what makes a CSV messy: separators, quotes, a line break, accents.
ALPHABET = string.ascii_letters + string.digits + "      ,;\"'éüßø-_/"


def wide_schema() -> dict[str, Any]:
    fields: list[dict[str, Any]] = [
        {
            "name": "crm_id",
            "type": "FIELD_TYPE_STRING",
            "required": True,
            "identity_namespace": "crm_id",
        },
        {"name": "email", "type": "FIELD_TYPE_STRING", "identity_namespace": "email"},
    ]
    fields += [{"name": f"w{k:02d}", "type": "FIELD_TYPE_STRING"} for k in range(WIDE_COLUMNS)]
    return {"name": "wide_person", "schema_class": "SCHEMA_CLASS_PROFILE", "fields": fields}


NARROW_ROWS = 1_800
NARROW_COLUMNS = ["crm_id", "email", "phone", "first_name", "last_name", "city", "consent", "updated_at"]


def narrow_schema() -> dict[str, Any]:
    """The ordinary 8-column CRM export that wedged identity before causes could travel in parts."""
    fields: list[dict[str, Any]] = [
        {
            "name": "crm_id",
            "type": "FIELD_TYPE_STRING",
            "required": True,
            "identity_namespace": "crm_id",
        },
        {"name": "email", "type": "FIELD_TYPE_STRING", "identity_namespace": "email"},
    ]
    fields += [{"name": name, "type": "FIELD_TYPE_STRING"} for name in NARROW_COLUMNS[2:]]
    return {"name": "crm_export", "schema_class": "SCHEMA_CLASS_PROFILE", "fields": fields}


def write_narrow_csv(path: Path) -> None:
    rng = random.Random(SEED + 1)
    cities = ["Lyon", "Paris", "Nantes", "Lille", "Bordeaux", "Marseille", "Toulouse", "Strasbourg"]
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(NARROW_COLUMNS)
        for i in range(NARROW_ROWS):
            first = "".join(rng.choices(string.ascii_lowercase, k=rng.randint(4, 9))).title()
            last = "".join(rng.choices(string.ascii_lowercase, k=rng.randint(5, 11))).title()
            email = f"{first.lower()}.{last.lower()}{i}@example.com"
            phone = f"+3361{rng.randint(0, 9_999_999):07d}"
            consent = rng.choice(["yes", "no"])
            writer.writerow(
                [f"N{i:06d}", email, phone, first, last, rng.choice(cities), consent, "2026-11-01T10:00:00Z"]
            )


def wide_value(rng: random.Random) -> str:
    """40-200 characters; the first is an upper-case letter (segments test it), a line break now and then."""
    length = rng.randint(40, 200)
    body = "".join(rng.choices(ALPHABET, k=length - 2))
    if rng.random() < 0.02:
        cut = rng.randint(0, len(body))
        body = body[:cut] + "\n" + body[cut:]
    return rng.choice(string.ascii_uppercase) + body + rng.choice(string.ascii_letters)


def write_wide_csv(path: Path) -> dict[str, int]:
    """The file, and how many rows' ``w07`` starts with each letter."""
    rng = random.Random(SEED)
    first_letters: dict[str, int] = {}
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["crm_id", "email", *(f"w{k:02d}" for k in range(WIDE_COLUMNS))])
        for i in range(ROWS):
            values = [wide_value(rng) for _ in range(WIDE_COLUMNS)]
            first_letters[values[7][0]] = first_letters.get(values[7][0], 0) + 1
            writer.writerow([f"W{i:06d}", f"wide.{i}@example.com", *values])
    return first_letters


@pytest.fixture
def big_stack(tmp_path: Path) -> Iterator[Stack]:
    with Stack(tmp_path / "cdp", ready_timeout_s=120.0) as running:
        yield running


@pytest.fixture
def big_client(big_stack: Stack) -> Iterator[Client]:
    with Client(big_stack.data_dir, addresses=big_stack.addresses, timeout=120.0) as connected:
        yield connected


def assert_no_dead_letters(client: Client) -> None:
    for service in SERVICES:
        assert dead_letters(client, service) == [], service
    assert retrying(lambda: client.ingest.ListDeadLetters(ing.ListDeadLettersRequest())).dead_letters == []


@pytest.mark.timeout(600 * max(1, ROWS // 10_000))
def test_a_wide_messy_csv_reaches_segmentation_whole_through_multi_part_fragments(
    big_stack: Stack, big_client: Client, tmp_path: Path
) -> None:
    client = big_client
    path = tmp_path / "wide.csv"
    first_letters = write_wide_csv(path)
    assert path.stat().st_size > 50 * 1024 * 1024
    ensure_datasets(client, {"wide": wide_schema()})
    query = 'w07 starts_with "Q"'
    retrying(partial(client.segmentation.CreateSegment, seg.CreateSegmentRequest(name="wide_q", query=query)))

    header = ing.IngestFileHeader(dataset="wide", batch_key="wide-1", format=ing.FILE_FORMAT_CSV, file_name=path.name)
    report: ing.BatchReport = client.ingest.IngestFile(file_chunks(path, header), timeout=300.0)
    assert (report.failure, report.rows_read, report.rows_accepted, report.rows_rejected) == ("", ROWS, ROWS, 0)
    # And the ordinary export that wedged identity: narrow rows pack ~1,500 a message, and identity's
    # fragments of them are larger than ingest's records, so its answer to one message needs parts.
    narrow = tmp_path / "crm_export.csv"
    write_narrow_csv(narrow)
    ensure_datasets(client, {"crm_export": narrow_schema()})
    header = ing.IngestFileHeader(
        dataset="crm_export", batch_key="crm-1", format=ing.FILE_FORMAT_CSV, file_name=narrow.name
    )
    report = client.ingest.IngestFile(file_chunks(narrow, header), timeout=300.0)
    assert (report.failure, report.rows_accepted, report.rows_rejected) == ("", NARROW_ROWS, 0)

    def all_profiles() -> int | None:
        stats = retrying(lambda: client.segmentation.GetStats(seg.GetStatsRequest()))
        return stats.profiles if stats.profiles == ROWS + NARROW_ROWS else None

    wait_for("every row a profile in segmentation", all_profiles, timeout_s=240.0, interval_s=1.0)
    # Activation keeps every profile's 60 attributes too, and is the slowest stage (its speed is
    # another issue's): the drain is waited for, not timed.
    wait_drained(client, big_stack, timeout_s=400.0)

    members = retrying(lambda: client.segmentation.ListMembers(seg.ListMembersRequest(segment="wide_q", limit=ROWS)))
    assert len(members.profile_ids) == first_letters["Q"]
    rng = random.Random(SEED)
    first_row = [wide_value(rng) for _ in range(WIDE_COLUMNS)]
    profile = retrying(
        lambda: client.segmentation.GetProfile(seg.GetProfileRequest(identity=_identity("crm_id", "W000000")))
    )
    attributes = {a.name: json_format.MessageToDict(a)["value"] for a in profile.attributes}
    assert {f"w{k:02d}": attributes.get(f"w{k:02d}") for k in range(WIDE_COLUMNS)} == {
        f"w{k:02d}": value for k, value in enumerate(first_row)
    }

    # The path under test: identity's answer to one ingest message did not fit one NATS message.
    fragments = read_log(big_stack, IDENTITY_FRAGMENTS.stream.name, IDENTITY_FRAGMENTS.subject)
    parts = [m.headers[PART_HEADER] for m in fragments if PART_HEADER in m.headers]
    assert parts, "no fragments message carried a Cdp-Part header: the multi-part path was not exercised"
    assert any(p.startswith("2/") for p in parts)
    assert_no_dead_letters(client)


def _identity(namespace: str, value: str) -> IdentityValue:
    return IdentityValue(namespace=namespace, value=value)


SEGMENTS = 1_000
SCORE_SCHEMA = {
    "name": "scored_person",
    "schema_class": "SCHEMA_CLASS_PROFILE",
    "fields": [
        {
            "name": "crm_id",
            "type": "FIELD_TYPE_STRING",
            "required": True,
            "identity_namespace": "crm_id",
        },
        {"name": "email", "type": "FIELD_TYPE_STRING", "identity_namespace": "email"},
        {"name": "score", "type": "FIELD_TYPE_INTEGER"},
    ],
}


def ingest_rows(client: Client, tmp_path: Path, key: str, rows: list[tuple[str, str, int]]) -> None:
    path = tmp_path / f"{key}.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["crm_id", "email", "score"])
        writer.writerows(rows)
    header = ing.IngestFileHeader(dataset="scored", batch_key=key, format=ing.FILE_FORMAT_CSV, file_name=path.name)
    report = retrying(lambda: client.ingest.IngestFile(file_chunks(path, header)))
    assert (report.failure, report.rows_accepted) == ("", len(rows))


@pytest.mark.timeout(600)  # creating 1,000 segments one by one costs minutes (see SEGMENTS)
def test_one_profile_enters_a_thousand_segments_at_once(stack: Stack, client: Client, tmp_path: Path) -> None:
    ensure_datasets(client, {"scored": SCORE_SCHEMA})
    # The person exists first, in none of the segments (score 0; segment k wants score >= k).
    ingest_rows(client, tmp_path, "before", [("P1", "one@example.com", 0), ("P2", "two@example.com", 0)])
    for k in range(1, SEGMENTS + 1):
        request = seg.CreateSegmentRequest(name=f"s{k:04d}", query=f"score >= {k}")
        created = retrying(partial(client.segmentation.CreateSegment, request))
        assert created.evaluation == seg.EVALUATION_STREAMING
    config = struct_pb2.Struct()
    config.update({"folder": "thousand", "format": "csv"})
    destination = act.Destination(
        name="drop", connector="file_export", config=config, marketing_action="email_marketing"
    )
    retrying(lambda: client.activation.CreateDestination(act.CreateDestinationRequest(destination=destination)))
    activate = act.ActivateRequest(
        destination="drop", segment=f"s{SEGMENTS:04d}", identities=["email"], schedule="streaming"
    )
    wait_for("activation to know the last segment", partial(_activated, client, activate), timeout_s=60.0)
    wait_drained(client, stack, timeout_s=60.0)
    memberships_before = read_log(stack, AUDIENCE.name, SEGMENTATION_MEMBERSHIPS.subject)

    ingest_rows(client, tmp_path, "after", [("P1", "one@example.com", SEGMENTS)])

    profile_id = retrying(
        lambda: client.segmentation.GetProfile(seg.GetProfileRequest(identity=_identity("crm_id", "P1")))
    ).profile_id

    def in_all() -> int | None:
        listed = retrying(lambda: client.segmentation.ListSegments(seg.ListSegmentsRequest()))
        sizes = {s.name: s.size for s in listed.segments}
        return len(sizes) if all(size == 1 for size in sizes.values()) and len(sizes) == SEGMENTS else None

    wait_for("the person in all 1,000 segments", in_all, timeout_s=120.0, interval_s=0.5)
    wait_drained(client, stack, timeout_s=60.0)

    names = {
        s.id: s.name for s in retrying(lambda: client.segmentation.ListSegments(seg.ListSegmentsRequest())).segments
    }
    after = read_log(stack, AUDIENCE.name, SEGMENTATION_MEMBERSHIPS.subject)[len(memberships_before) :]
    changes = [unpack(e, sev.MembershipChanged) for m in after for e in m.events() if is_a(e, sev.MembershipChanged)]
    entered = [names[c.segment_id] for c in changes if c.profile_id == profile_id]
    assert all(c.status == sev.MEMBERSHIP_STATUS_REALIZED for c in changes)
    assert sorted(entered) == sorted(names.values())  # each of the 1,000 once, and nothing else
    for k in (1, 500, SEGMENTS):
        members = retrying(partial(client.segmentation.ListMembers, seg.ListMembersRequest(segment=f"s{k:04d}")))
        assert list(members.profile_ids) == [profile_id]

    exported = stack.data_dir / "exports" / "thousand" / f"s{SEGMENTS:04d}.csv"

    def delivered() -> list[list[str]] | None:
        if not exported.exists():
            return None
        rows = list(csv.reader(exported.open(newline="")))
        return rows if len(rows) == 2 else None

    rows = wait_for("the file export to hold the person", delivered, timeout_s=60.0)
    assert "one@example.com" in rows[1]
    assert_no_dead_letters(client)


def _activated(client: Client, request: act.ActivateRequest) -> bool | None:
    try:
        client.activation.Activate(request)
    except grpc.RpcError as err:
        if isinstance(err, grpc.Call) and err.code() == grpc.StatusCode.NOT_FOUND:
            return None
        raise
    return True
