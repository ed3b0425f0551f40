"""The walking skeleton: offline CRM rows and online events in, one profile per person,
a streaming segment, a file drop out. ``make demo`` and the e2e tests both drive it."""

from __future__ import annotations

import csv
import io
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import grpc
from google.protobuf import json_format

from cdp.activation.v1 import activation_pb2 as act
from cdp.common.v1 import admin_pb2
from cdp.ingest.v1 import ingest_pb2 as ing
from cdp.segmentation.v1 import segmentation_pb2 as seg
from cdp_cli.client import Client
from cdp_cli.documents import example_dict, example_of

T = TypeVar("T")
TIERS = ("gold", "silver", "bronze")
COUNTRIES = ("FR", "DE", "US", "GB")
SERVICES = ("ingest", "identity", "segmentation", "activation")

# The definitions come from the shipped examples (examples/ in the repository): one source.
CRM_SCHEMA = example_dict("schema", "crm_person")
WEB_SCHEMA = example_dict("schema", "web_event")
SEGMENTS = {name: example_dict("segment", name)["query"] for name in ("gold_members", "high_value_fr")}
ACTIVATED_SEGMENT = "gold_members"
DESTINATION = "crm_file_drop"


@dataclass(frozen=True)
class DemoData:
    crm_csv: bytes
    events: list[dict[str, Any]]
    people: int
    bad_rows: int
    anonymous_cookies: int
    expected_sizes: dict[str, int]

    @property
    def expected_profiles(self) -> int:
        return self.people + self.anonymous_cookies


def generate(people: int = 120, seed: int = 7, bad_rows: int = 3, anonymous: int = 10) -> DemoData:
    """A small, deterministic data set: CRM rows (a few bad), page views by cookie, logins that link them."""
    rng = random.Random(seed)
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["crm_id", "email", "first_name", "loyalty_tier", "lifetime_value", "country"])
    rows: list[tuple[str, str, str, str, float, str]] = []
    for i in range(1, people + 1):
        tier, country = rng.choice(TIERS), rng.choice(COUNTRIES)
        value = round(rng.uniform(0, 2500), 2)
        rows.append((f"C{i:05d}", f"Person.{i}@Example.com ", f"Name{i}", tier, value, country))
        writer.writerow(rows[-1])
    for j in range(bad_rows):
        writer.writerow([f"X{j:05d}", f"bad{j}@example.com", "Bad", "gold", "not-a-number", "FR"])
    events: list[dict[str, Any]] = []
    minute = 0
    for i in range(1, people + 1, 2):  # every other person browses, then logs in
        cookie = f"ck-{i:05d}"
        for page in ("/", "/shoes"):
            minute += 1
            events.append(_event(f"pv-{i}-{page}", minute, "page_view", cookie, page=page))
        minute += 1
        events.append(_event(f"login-{i}", minute, "login", cookie, email=f"person.{i}@example.com"))
    for k in range(anonymous):
        minute += 1
        events.append(_event(f"anon-{k}", minute, "page_view", f"anon-{k:04d}", page="/"))
    sizes = {
        "gold_members": sum(1 for r in rows if r[3] == "gold"),
        "high_value_fr": sum(1 for r in rows if r[5] == "FR" and r[4] >= 1000),
    }
    return DemoData(out.getvalue().encode(), events, people, bad_rows, anonymous, sizes)


def _event(event_id: str, minute: int, kind: str, cookie: str, **extra: str) -> dict[str, Any]:
    ts = f"2026-11-01T{9 + minute // 60:02d}:{minute % 60:02d}:00Z"
    return {"event_id": event_id, "ts": ts, "type": kind, "cookie_id": cookie, **extra}


RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.ABORTED)


def _code(err: grpc.RpcError) -> grpc.StatusCode | None:
    return err.code() if isinstance(err, grpc.Call) else None


def retrying(call: Callable[[], T], *, attempts: int = 120) -> T:
    """Call, retrying while a service restarts (UNAVAILABLE, a refused guard)."""
    for attempt in range(attempts):
        try:
            return call()
        except grpc.RpcError as err:
            if _code(err) not in RETRYABLE:
                raise
            time.sleep(min(0.1 * (attempt + 1), 1.0))
    raise TimeoutError("service did not come back")


def ensure(call: Callable[[], object], *, done: tuple[grpc.StatusCode, ...] = ()) -> bool:
    """Retrying call where some codes mean "already so" (e.g. ALREADY_EXISTS). True when the call did it."""
    try:
        retrying(call)
    except grpc.RpcError as err:
        if _code(err) in done:
            return False
        raise
    return True


EXISTS = (grpc.StatusCode.ALREADY_EXISTS,)


@dataclass
class FlowReport:
    batch: ing.BatchReport | None = None
    events_accepted: int = 0
    events_duplicate: int = 0
    events_rejected: int = 0
    steps: list[str] = field(default_factory=list)


def ensure_datasets(client: Client, datasets: dict[str, dict[str, Any]]) -> None:
    """Each dataset and its schema (given in protobuf JSON form), created unless they exist."""
    for name, schema in datasets.items():
        request = ing.CreateSchemaRequest(schema=json_format.ParseDict(schema, ing.Schema()))
        missing = not ensure(
            partial(client.ingest.GetSchema, ing.GetSchemaRequest(name=request.schema.name)),
            done=(grpc.StatusCode.NOT_FOUND,),
        )
        if missing:
            ensure(partial(client.ingest.CreateSchema, request), done=EXISTS)
        dataset = ing.Dataset(name=name, schema_name=request.schema.name, profile_enabled=True)
        ensure(partial(client.ingest.CreateDataset, ing.CreateDatasetRequest(dataset=dataset)), done=EXISTS)


def setup(client: Client, export_folder: str = DESTINATION) -> list[str]:
    """Schemas, datasets, segments, a file destination and the activation plan."""
    steps: list[str] = []
    ensure_datasets(client, {"crm": CRM_SCHEMA, "web": WEB_SCHEMA})
    steps += ["schema crm_person", "schema web_event", "dataset crm", "dataset web"]
    for name, query in SEGMENTS.items():
        create = seg.CreateSegmentRequest(name=name, query=query)
        ensure(partial(client.segmentation.CreateSegment, create), done=EXISTS)
        steps.append(f"segment {name}")
    # The file drop and its plan are the shipped example's (examples/40-file-drop.yaml); only the
    # folder may be another one.
    destination = example_of("destination", DESTINATION, act.Destination)
    destination.config.update({"folder": export_folder})
    ensure(
        lambda: client.activation.CreateDestination(act.CreateDestinationRequest(destination=destination)),
        done=EXISTS,
    )
    activate = example_of("activation", ACTIVATED_SEGMENT, act.ActivateRequest)
    ensure(partial(client.activation.Activate, activate), done=EXISTS)
    steps.append(f"activate {ACTIVATED_SEGMENT} -> {DESTINATION}")
    return steps


def ingest_crm(client: Client, data: DemoData, chunk: int = 64 * 1024) -> ing.BatchReport:
    header = ing.IngestFileHeader(
        dataset="crm", batch_key="crm-export-2026-11-01", format=ing.FILE_FORMAT_CSV, file_name="crm.csv"
    )

    def chunks() -> Iterator[ing.IngestFileChunk]:
        yield ing.IngestFileChunk(header=header)
        for start in range(0, len(data.crm_csv), chunk):
            yield ing.IngestFileChunk(data=data.crm_csv[start : start + chunk])

    report: ing.BatchReport = retrying(lambda: client.ingest.IngestFile(chunks()))
    return report


def publish_events(client: Client, data: DemoData, batch: int = 50) -> tuple[int, int, int]:
    accepted = duplicate = rejected = 0
    for start in range(0, len(data.events), batch):
        request = ing.PublishEventsRequest(dataset="web")
        for event in data.events[start : start + batch]:
            item = request.events.add()
            item.update(event)
        response = retrying(partial(client.ingest.PublishEvents, request))
        for result in response.results:
            accepted += result.status == ing.EVENT_STATUS_ACCEPTED
            duplicate += result.status == ing.EVENT_STATUS_DUPLICATE
            rejected += result.status == ing.EVENT_STATUS_REJECTED
    return accepted, duplicate, rejected


def run_flow(client: Client, data: DemoData, export_folder: str = DESTINATION) -> FlowReport:
    report = FlowReport()
    report.steps = setup(client, export_folder)
    report.batch = ingest_crm(client, data)
    report.events_accepted, report.events_duplicate, report.events_rejected = publish_events(client, data)
    return report


def lag(client: Client) -> int:
    total = 0
    for service in SERVICES:
        status = retrying(partial(client.admin(service).GetStatus, admin_pb2.GetStatusRequest()))
        if not status.ready:
            return -1
        total += sum(c.lag for c in status.consumers)
    return total


@dataclass(frozen=True)
class Outcome:
    """What the platform holds at the end: compared between runs with and without crashes."""

    profiles: int
    segment_sizes: dict[str, int]
    members: dict[str, list[str]]
    file_rows: list[list[str]]
    file_path: str
    deliveries: int


def outcome(client: Client, export_dir: Path) -> Outcome:
    stats = retrying(lambda: client.segmentation.GetStats(seg.GetStatsRequest()))
    listed = retrying(lambda: client.segmentation.ListSegments(seg.ListSegmentsRequest()))
    members: dict[str, list[str]] = {}
    for segment in listed.segments:
        got = retrying(partial(client.segmentation.ListMembers, seg.ListMembersRequest(segment=segment.name)))
        members[segment.name] = list(got.profile_ids)
    path = export_dir / DESTINATION / f"{ACTIVATED_SEGMENT}.csv"
    rows = list(csv.reader(path.open(newline=""))) if path.exists() else []
    deliveries = retrying(lambda: client.activation.ListDeliveries(act.ListDeliveriesRequest()))
    return Outcome(
        profiles=stats.profiles,
        segment_sizes={s.name: s.size for s in listed.segments},
        members=members,
        file_rows=rows,
        file_path=str(path),
        deliveries=len(deliveries.deliveries),
    )


def wait_settled(client: Client, export_dir: Path, data: DemoData, timeout_s: float = 120.0) -> Outcome:
    """Until every consumer has caught up and the file holds the activated segment's members."""
    deadline = time.monotonic() + timeout_s
    last: Outcome | None = None
    while time.monotonic() < deadline:
        if lag(client) == 0:
            current = outcome(client, export_dir)
            expected = len(current.members.get(ACTIVATED_SEGMENT, []))
            if current.profiles and len(current.file_rows) == expected + 1 and current == last:
                return current
            last = current
        time.sleep(0.3)
    raise TimeoutError(f"the platform did not settle in {timeout_s}s (last seen: {last})")
