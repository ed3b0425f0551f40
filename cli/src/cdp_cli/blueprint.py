"""The whole blueprint on generated data: offline CRM (CSV), loyalty (JSON Lines) and
in-store orders (Parquet) files, online web events published to NATS (``cdp.collect.web``),
on top of the walking skeleton's schemas, segments and file drop."""

from __future__ import annotations

import asyncio
import io
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

import nats
import pyarrow as pa  # type: ignore[import-untyped]
import pyarrow.parquet as pq  # type: ignore[import-untyped]

from cdp.common.v1 import deadletter_pb2 as dl
from cdp.common.v1.deadletter_pb2_grpc import DeadLetterServiceStub
from cdp.ingest.v1 import ingest_pb2 as ing
from cdp_cli.client import Client, nats_auth
from cdp_cli.cmd_deadletters import FETCH_LIMIT, Letter, kit_letter
from cdp_cli.documents import example_dict
from cdp_cli.skeleton import EXISTS, DemoData, ensure, ensure_datasets, generate, ingest_crm, retrying, setup
from cdp_kit.natsauth import PUBLISHER, NatsAuth
from cdp_kit.natsserver import cluster_urls

LOYALTY_SCHEMA = example_dict("schema", "loyalty_member")
ORDER_SCHEMA = example_dict("schema", "store_order")


@dataclass(frozen=True)
class BlueprintData:
    skeleton: DemoData
    loyalty_jsonl: bytes
    orders_parquet: bytes
    nats_events: list[bytes]
    members: int
    orders: int
    invalid_nats_events: int


def generate_blueprint(people: int = 200, seed: int = 11, now: datetime | None = None) -> BlueprintData:
    skeleton = generate(people=people, anonymous=max(1, people // 10))
    rng = random.Random(seed)
    moment = now or datetime.now(UTC)
    loyalty = io.StringIO()
    members = 0
    for i in range(1, people + 1):
        if rng.random() < 0.6:
            members += 1
            record = {
                "loyalty_id": f"L{i:05d}",
                "email": f"PERSON.{i}@example.com",
                "points": rng.randint(0, 20_000),
                "loyalty": {"tier": rng.choice(["gold", "silver", "bronze"]), "since": "2024-03-01"},
                "consents": {"email_marketing": rng.choice("yyn"), "ad_targeting": rng.choice("yn")},
            }
            loyalty.write(json.dumps(record) + "\n")
    loyalty.write('{"loyalty_id": "L99999", "points": -5}\n')  # rejected: below the minimum
    rows: dict[str, list[Any]] = {k: [] for k in ("order_id", "ts", "type", "crm_id", "store", "amount")}
    for i in range(1, people + 1):
        for n in range(rng.choice([0, 0, 1, 2, 3])):
            rows["order_id"].append(f"O{i:05d}-{n}")
            rows["ts"].append((moment - timedelta(days=rng.randint(1, 200))).isoformat().replace("+00:00", "Z"))
            rows["type"].append("store_order")
            rows["crm_id"].append(f"C{i:05d}")
            rows["store"].append(rng.choice(["Paris-Opera", "Lyon-Bellecour", "Berlin-Mitte"]))
            rows["amount"].append(round(rng.uniform(5, 400), 2))
    sink = io.BytesIO()
    pq.write_table(pa.table(rows), sink)
    events = [json.dumps(e).encode() for e in skeleton.events]
    invalid = [b'{"event_id": "broken-1", "type": "page_view"}', b"not json at all"]
    return BlueprintData(
        skeleton,
        loyalty.getvalue().encode(),
        sink.getvalue(),
        events + invalid,
        members,
        len(rows["order_id"]),
        len(invalid),
    )


@dataclass
class BlueprintReport:
    batches: dict[str, ing.BatchReport] = field(default_factory=dict)
    nats_published: int = 0
    dead_letters: int = 0


def _file_chunks(header: ing.IngestFileHeader, data: bytes, chunk: int = 256 * 1024) -> Iterator[ing.IngestFileChunk]:
    yield ing.IngestFileChunk(header=header)
    for start in range(0, len(data), chunk):
        yield ing.IngestFileChunk(data=data[start : start + chunk])


def ingest_file(client: Client, dataset: str, name: str, fmt: int, data: bytes) -> ing.BatchReport:
    header = ing.IngestFileHeader(dataset=dataset, batch_key=f"{name}-demo", format=fmt, file_name=name)  # type: ignore[arg-type]
    report: ing.BatchReport = retrying(lambda: client.ingest.IngestFile(_file_chunks(header, data)))
    return report


def setup_blueprint(client: Client) -> None:
    ensure_datasets(client, {"loyalty": LOYALTY_SCHEMA, "orders": ORDER_SCHEMA})


async def publish_to_nats(nats_url: str, subject: str, payloads: list[bytes], auth: NatsAuth | None = None) -> int:
    """What an event publisher does: plain JSON on cdp.collect.<dataset>, JetStream-acknowledged
    (as the ``publisher`` user, which may publish ``cdp.collect.>`` and nothing else)."""
    nc = await nats.connect(cluster_urls(nats_url), **(auth.connect_options() if auth is not None else {}))
    try:
        js = nc.jetstream()
        for payload in payloads:
            await js.publish(subject, payload)
    finally:
        await nc.drain()
    return len(payloads)


def run_blueprint(client: Client, nats_url: str, data: BlueprintData) -> BlueprintReport:
    report = BlueprintReport()
    setup(client)
    setup_blueprint(client)
    report.batches["crm.csv"] = ingest_crm(client, data.skeleton)
    report.batches["loyalty.jsonl"] = ingest_file(
        client, "loyalty", "loyalty.jsonl", ing.FILE_FORMAT_JSONL, data.loyalty_jsonl
    )
    report.batches["orders.parquet"] = ingest_file(
        client, "orders", "orders.parquet", ing.FILE_FORMAT_PARQUET, data.orders_parquet
    )
    auth = nats_auth(client.data_dir, PUBLISHER)
    report.nats_published = asyncio.run(publish_to_nats(nats_url, "cdp.collect.web", data.nats_events, auth))
    return report


def dead_letters(client: Client, dataset: str) -> list[Letter]:
    """Collect rejects of ``dataset``, as `cdp deadletters --dataset` lists them (reasons masked)."""
    stub = DeadLetterServiceStub(client.channel("ingest"))
    reply = retrying(lambda: stub.ListDeadLetters(dl.ListDeadLettersRequest(limit=FETCH_LIMIT)))
    letters = [kit_letter("ingest", x) for x in reply.dead_letters]
    return [x for x in letters if x.kind == "collect-reject" and x.dataset == dataset]


# name: (definition, cron schedule or "" for streaming), from the shipped examples
BLUEPRINT_SEGMENTS: dict[str, tuple[str, str]] = {
    name: (segment["query"], segment.get("schedule", ""))
    for name in (
        "store_regulars",
        "big_spenders_year",
        "lapsed_shoppers",
        "shoe_browsers",
        "reachable_gold",
        "nightly_vip_review",
    )
    for segment in [example_dict("segment", name)]
}


def create_blueprint_segments(client: Client) -> None:
    from cdp.segmentation.v1 import segmentation_pb2 as seg

    for name, (query, schedule) in BLUEPRINT_SEGMENTS.items():
        request = seg.CreateSegmentRequest(name=name, query=query, schedule=schedule)
        ensure(partial(client.segmentation.CreateSegment, request), done=EXISTS)


@dataclass(frozen=True)
class Activation:
    destination: str
    connector: str
    action: str
    segment: str
    identities: tuple[str, ...]
    attributes: tuple[str, ...]


ACTIVATIONS = (
    Activation("audience_webhook", "webhook", "data_sharing", "store_regulars", ("email",), ("first_name",)),
    Activation("meta_ads", "meta_custom_audience", "ad_targeting", "big_spenders_year", ("email",), ()),
    Activation("klaviyo_newsletter", "klaviyo", "email_marketing", "reachable_gold", ("email",), ("first_name",)),
)
QUICK = {"batch_age_s": 0.2, "backoff_s": 0.05, "backoff_max_s": 1.0, "timeout_s": 5.0, "rate_per_s": 200}


def platform_config(activation: Activation, platforms: Any) -> dict[str, Any]:
    if activation.connector == "webhook":
        return {"base_url": platforms.url + "/webhook", "secret": platforms.webhook_secret}
    if activation.connector == "meta_custom_audience":
        return {"base_url": platforms.url, "audience_id": "120210000000001", "access_token": platforms.meta_token}
    return {"base_url": platforms.url, "api_key": platforms.klaviyo_key, "list_id": "NEWSLETTER"}


def activate_blueprint(client: Client, platforms: Any) -> None:
    from google.protobuf import struct_pb2

    from cdp.activation.v1 import activation_pb2 as act

    for item in ACTIVATIONS:
        config = struct_pb2.Struct()
        config.update({**QUICK, **platform_config(item, platforms)})
        destination = act.Destination(
            name=item.destination, connector=item.connector, config=config, marketing_action=item.action
        )
        ensure(
            partial(client.activation.CreateDestination, act.CreateDestinationRequest(destination=destination)),
            done=EXISTS,
        )
        request = act.ActivateRequest(
            destination=item.destination,
            segment=item.segment,
            identities=list(item.identities),
            attributes=list(item.attributes),
            schedule="streaming",
        )
        ensure(partial(client.activation.Activate, request), done=EXISTS)
