"""kill -9 the ingest service in the middle of a 100k-row batch, while it reads and while it
appends: re-sent by the client, the batch completes and every row is on the log exactly once;
a batch above its threshold leaves no row on the log, killed or not."""

from __future__ import annotations

import asyncio
import csv
import io
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import json_format

from cdp.ingest.v1 import events_pb2 as ev
from cdp.ingest.v1 import ingest_pb2 as pb
from cdp_cli.client import Client
from cdp_cli.stack import Stack
from cdp_kit.envelope import is_a, unpack
from cdp_kit.streams import INGEST_RECORDS
from tests.e2e import natsconn

pytestmark = pytest.mark.e2e
ROWS = 100_000
SCHEMA = {
    "name": "crm_person",
    "schema_class": "SCHEMA_CLASS_PROFILE",
    "fields": [
        {"name": "crm_id", "type": "FIELD_TYPE_STRING", "identity_namespace": "crm_id", "required": True},
        {"name": "email", "type": "FIELD_TYPE_STRING", "identity_namespace": "email"},
        {"name": "lifetime_value", "type": "FIELD_TYPE_NUMBER", "minimum": 0},
    ],
}


def crm_csv(bad_every: int = 0) -> bytes:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["crm_id", "email", "lifetime_value"])
    for i in range(1, ROWS + 1):
        value = "oops" if bad_every and i % bad_every == 0 else f"{i % 5000}.25"
        writer.writerow([f"C{i:06d}", f"p{i}@example.com", value])
    return out.getvalue().encode()


def chunks(data: bytes, key: str, size: int = 128 * 1024) -> Iterator[pb.IngestFileChunk]:
    yield pb.IngestFileChunk(header=pb.IngestFileHeader(dataset="crm", batch_key=key, format=pb.FILE_FORMAT_CSV))
    for start in range(0, len(data), size):
        yield pb.IngestFileChunk(data=data[start : start + size])


async def record_messages(target: natsconn.NatsTarget) -> tuple[int, list[ev.RecordAccepted]]:
    log = await natsconn.eventlog(target, name="crash-test")
    messages, records = 0, []
    try:
        async for msg in log.read(INGEST_RECORDS.stream.name, INGEST_RECORDS.subject):
            messages += 1
            records += [unpack(e, ev.RecordAccepted) for e in msg.events() if is_a(e, ev.RecordAccepted)]
    finally:
        await log.close()
    return messages, records


async def last_sequence(target: natsconn.NatsTarget) -> int:
    log = await natsconn.eventlog(target, name="crash-watch")
    try:
        return await log.last_sequence(INGEST_RECORDS.stream.name, INGEST_RECORDS.subject)
    finally:
        await log.close()


def upload_until_killed(stack: Stack, client: Client, data: bytes, key: str, *, when_appending: bool) -> None:
    """Start the upload; SIGKILL ingest halfway through reading, or once chunks reach the log."""
    failure: list[BaseException] = []
    before = asyncio.run(last_sequence(stack))

    def send() -> None:
        try:
            for progress in client.ingest.IngestFileWithProgress(chunks(data, key), timeout=300):
                if not when_appending and progress.bytes_received >= len(data) // 2:
                    stack.kill("ingest")
        except grpc.RpcError as exc:
            failure.append(exc)

    sender = threading.Thread(target=send)
    sender.start()
    if when_appending:
        deadline = time.monotonic() + 240
        while asyncio.run(last_sequence(stack)) < before + 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        stack.kill("ingest")
    sender.join(300)
    assert failure, "the upload should have been cut by the kill"
    stack.wait_serving("ingest")


def resend(client: Client, data: bytes, key: str) -> pb.BatchReport:
    for _ in range(60):
        try:
            return client.ingest.IngestFile(chunks(data, key), timeout=300)
        except grpc.RpcError as exc:
            if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED):
                raise
            time.sleep(0.5)
    raise AssertionError("ingest never took the batch again")


def test_a_batch_killed_mid_read_and_mid_append_ends_on_the_log_exactly_once(tmp_path: Path) -> None:
    with Stack(tmp_path / "cdp", ["ingest"]) as stack, Client(stack.data_dir, addresses=stack.addresses) as client:
        client.ingest.CreateSchema(pb.CreateSchemaRequest(schema=json_format.ParseDict(SCHEMA, pb.Schema())))
        client.ingest.CreateDataset(pb.CreateDatasetRequest(dataset=pb.Dataset(name="crm", schema_name="crm_person")))
        data = crm_csv()

        upload_until_killed(stack, client, data, "big", when_appending=False)
        assert asyncio.run(record_messages(stack))[1] == []  # nothing before the verdict
        upload_until_killed(stack, client, data, "big", when_appending=True)
        partial = asyncio.run(record_messages(stack))[1]
        assert 0 < len(partial) < ROWS

        report = resend(client, data, "big")
        assert (report.status, report.rows_accepted) == (pb.BATCH_STATUS_COMPLETED, ROWS)
        records = asyncio.run(record_messages(stack))[1]
        assert len(records) == ROWS
        assert sorted(r.row for r in records) == list(range(1, ROWS + 1))
        assert resend(client, data, "big").duplicate

        failing = crm_csv(bad_every=10)  # 10% rejected, above the default 5%
        upload_until_killed(stack, client, failing, "failing", when_appending=False)
        failed = resend(client, failing, "failing")
        assert failed.status == pb.BATCH_STATUS_FAILED
        assert failed.rows_rejected == ROWS // 10
        after = asyncio.run(record_messages(stack))[1]
        assert len(after) == ROWS
        assert not [r for r in after if r.batch_id == failed.batch_id]
        assert stack.restarts["ingest"] == 3
