"""The ingest service in-process over real gRPC, a real nats-server and SQLite: schemas,
datasets, batches of every format and every bad input, streaming by gRPC and NATS,
dead letters, and a rebuild that equals the live store."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import gzip
import io
import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pyarrow as pa  # type: ignore[import-untyped]
import pyarrow.parquet as pq  # type: ignore[import-untyped]
import pytest
from google.protobuf import json_format
from sqlalchemy.engine import Engine
from typer.testing import CliRunner

from cdp.common.v1 import admin_pb2
from cdp.common.v1 import deadletter_pb2 as dl
from cdp.common.v1 import deadletter_pb2_grpc as dl_grpc
from cdp.ingest.v1 import events_pb2 as ev
from cdp.ingest.v1 import ingest_pb2 as pb
from cdp.ingest.v1 import ingest_pb2_grpc as pb_grpc
from cdp_cli.app import app as cli_app
from cdp_ingest.main import build
from cdp_ingest.settings import IngestSettings
from cdp_ingest.store import TABLES
from cdp_kit import deadletter_api, deadletters
from cdp_kit.deadletters import DEADLETTER_TABLES
from cdp_kit.envelope import is_a, unpack
from cdp_kit.eventlog import EventLog
from cdp_kit.grpc_server import GrpcServer
from cdp_kit.processor import Processor, in_checkpoint
from cdp_kit.store import canonical_dump, get_checkpoint, make_engine, sqlite_url, with_checkpoint
from cdp_kit.streams import COLLECT, INGEST_CONFIG, INGEST_READS_COLLECT, INGEST_RECORDS, collect_subject
from cdp_kit.telemetry import pii_hash
from cdp_kit.vault import PersonVault

CRM = {
    "name": "crm_person",
    "schema_class": "SCHEMA_CLASS_PROFILE",
    "fields": [
        {"name": "crm_id", "type": "FIELD_TYPE_STRING", "identity_namespace": "crm_id", "required": True},
        {"name": "email", "type": "FIELD_TYPE_STRING", "identity_namespace": "email"},
        {"name": "first_name", "type": "FIELD_TYPE_STRING", "max_length": 20},
        {"name": "tier", "type": "FIELD_TYPE_STRING", "enum_values": ["gold", "silver"]},
        {"name": "visits", "type": "FIELD_TYPE_INTEGER", "minimum": 0},
        {"name": "value", "type": "FIELD_TYPE_NUMBER"},
        {"name": "vip", "type": "FIELD_TYPE_BOOLEAN"},
        {"name": "born", "type": "FIELD_TYPE_DATE"},
    ],
}
WEB = {
    "name": "web_event",
    "schema_class": "SCHEMA_CLASS_EVENT",
    "event_id_field": "event_id",
    "timestamp_field": "ts",
    "event_type_field": "type",
    "fields": [
        {"name": "event_id", "type": "FIELD_TYPE_STRING", "required": True},
        {"name": "ts", "type": "FIELD_TYPE_TIMESTAMP", "required": True},
        {"name": "type", "type": "FIELD_TYPE_STRING"},
        {
            "name": "cookie_id",
            "type": "FIELD_TYPE_STRING",
            "identity_namespace": "cookie",
            "required": True,
        },
        {"name": "amount", "type": "FIELD_TYPE_NUMBER"},
    ],
}
HEADER = ["crm_id", "email", "first_name", "tier", "visits", "value", "vip", "born"]


def good_row(i: int) -> list[str]:
    return [f"C{i:05d}", f"p{i}@example.com", f"Name{i}", "gold", str(i), f"{i}.5", "yes", "1990-01-02"]


def csv_bytes(rows: list[list[str]], header: list[str] = HEADER) -> bytes:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return out.getvalue().encode()


@dataclass
class Ingest:
    stub: Any  # the grpc.aio stub (the generated stubs type the sync one)
    eventlog: EventLog
    processor: Processor
    engine: Engine
    nats_url: str
    address: str

    async def upload(
        self,
        data: bytes,
        key: str,
        *,
        dataset: str = "crm",
        fmt: pb.FileFormat.ValueType = pb.FILE_FORMAT_CSV,
        threshold: float | None = None,
        chunk: int = 4096,
    ) -> pb.BatchReport:
        report: pb.BatchReport = await self.stub.IngestFile(
            chunks(data, key, dataset=dataset, fmt=fmt, threshold=threshold, chunk=chunk)
        )
        return report

    async def records(self, batch_id: str | None = None) -> list[ev.RecordAccepted]:
        """The records on the log, opened as a reader's decode boundary opens them."""
        found = []
        msgs = [msg async for msg in self.eventlog.read(INGEST_RECORDS.stream.name, INGEST_RECORDS.subject)]
        opened = await PersonVault.of(self.eventlog.js).open_messages(msgs)
        for msg in msgs:
            for env in opened[msg.sequence]:
                if is_a(env, ev.RecordAccepted):
                    rec = unpack(env, ev.RecordAccepted)
                    if batch_id is None or rec.batch_id == batch_id:
                        found.append(rec)
        return found


def chunks(
    data: bytes,
    key: str,
    *,
    dataset: str,
    fmt: pb.FileFormat.ValueType,
    threshold: float | None,
    chunk: int,
) -> Iterator[pb.IngestFileChunk]:
    header = pb.IngestFileHeader(dataset=dataset, batch_key=key, format=fmt, file_name=f"{key}.file")
    if threshold is not None:
        header.error_threshold = threshold
    yield pb.IngestFileChunk(header=header)
    for start in range(0, len(data), chunk):
        yield pb.IngestFileChunk(data=data[start : start + chunk])


async def start_ingest(nats_url: str, store_url: str, data_dir: Path, **more: Any) -> tuple[Any, ...]:
    settings = IngestSettings(nats_url=nats_url, data_dir=data_dir, store_url=store_url, **more)
    engine = make_engine(settings.store_url)
    eventlog = await EventLog.connect(nats_url, "ingest-test")
    await eventlog.ensure_streams()
    service = build(settings, engine, eventlog)
    service.processor.create_store()
    task = asyncio.create_task(service.processor.run())
    await asyncio.wait_for(service.processor.ready.wait(), 30)

    async def status() -> admin_pb2.ServiceStatus:
        return admin_pb2.ServiceStatus(service="ingest")

    registrations = [*service.registrations, deadletter_api.registration(service.processor)]
    server = GrpcServer("127.0.0.1", 0, registrations, status)
    port = await server.start()
    return settings, engine, eventlog, service, task, server, port


@contextlib.asynccontextmanager
async def running_ingest(nats_url: str, store_url: str, data_dir: Path, **settings: Any) -> AsyncIterator[Ingest]:
    started = await start_ingest(nats_url, store_url, data_dir, **settings)
    _settings, engine, eventlog, service, task, server, port = started
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    stub = pb_grpc.IngestServiceStub(channel)
    harness = Ingest(stub, eventlog, service.processor, engine, nats_url, f"127.0.0.1:{port}")
    await stub.CreateSchema(pb.CreateSchemaRequest(schema=json_format.ParseDict(CRM, pb.Schema())))
    await stub.CreateSchema(pb.CreateSchemaRequest(schema=json_format.ParseDict(WEB, pb.Schema())))
    await stub.CreateDataset(pb.CreateDatasetRequest(dataset=pb.Dataset(name="crm", schema_name="crm_person")))
    await stub.CreateDataset(
        pb.CreateDatasetRequest(
            dataset=pb.Dataset(
                name="crm_loose", schema_name="crm_person", unknown_fields=pb.UNKNOWN_FIELDS_DROP, profile_enabled=True
            )
        )
    )
    await stub.CreateDataset(
        pb.CreateDatasetRequest(dataset=pb.Dataset(name="web", schema_name="web_event", retention_seconds=86_400))
    )
    try:
        yield harness
    finally:
        await channel.close(None)
        service.processor.stop()
        await server.stop(0)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await eventlog.close()
        engine.dispose()


@pytest.fixture
async def ingest(nats_url: str, tmp_path: Path) -> AsyncIterator[Ingest]:
    async with running_ingest(nats_url, sqlite_url(tmp_path / "ingest.db"), tmp_path / "data") as harness:
        yield harness


@pytest.fixture
async def ingest_on(nats_url: str, store_url: str, tmp_path: Path) -> AsyncIterator[Ingest]:
    """The service on SQLite and on PostgreSQL (tests using it run on both)."""
    async with running_ingest(nats_url, store_url, tmp_path / "data") as harness:
        yield harness


def groups(report: pb.BatchReport) -> dict[tuple[str, str], tuple[int, list[int]]]:
    return {(g.field, g.rule): (g.count, list(g.first_rows)) for g in report.rejects}


async def rpc_error(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


# ============================================================================ schemas and datasets


async def test_a_compatible_version_is_accepted_and_an_incompatible_one_lists_each_problem(ingest: Ingest) -> None:
    v2 = json_format.ParseDict(CRM, pb.Schema())
    v2.fields.add(name="nickname", type=pb.FIELD_TYPE_STRING)
    assert (await ingest.stub.CreateSchema(pb.CreateSchemaRequest(schema=v2))).version == 2

    bad = json_format.ParseDict(CRM, pb.Schema())
    del bad.fields[1]  # email removed
    bad.fields[4].type = pb.FIELD_TYPE_STRING  # value: number -> string
    bad.fields.add(name="must", type=pb.FIELD_TYPE_STRING, required=True)
    err = await rpc_error(ingest.stub.CreateSchema(pb.CreateSchemaRequest(schema=bad)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = err.details() or ""
    assert "not compatible" in details
    assert "email: compatible: a field cannot be removed" in details
    assert "value: compatible: type cannot change (number to string)" in details
    assert "must: compatible: an added field must be optional" in details
    assert "nickname: compatible: a field cannot be removed" in details


async def config_events(ingest: Ingest) -> list[str]:
    """The ids of every event on ingest's config log."""
    ids = []
    async for msg in ingest.eventlog.read(INGEST_CONFIG.stream.name, INGEST_CONFIG.subject):
        ids += [env.id for env in msg.events()]
    return ids


async def test_an_identical_schema_or_dataset_registered_again_changes_nothing(ingest: Ingest) -> None:
    before = await config_events(ingest)
    same = json_format.ParseDict(CRM, pb.Schema())
    reordered = list(reversed(same.fields))  # field order and enum order are presentation
    del same.fields[:]
    same.fields.extend(reordered)
    tier = next(f for f in same.fields if f.name == "tier")
    tier.enum_values[:] = ["silver", "gold"]
    reply = await ingest.stub.CreateSchema(pb.CreateSchemaRequest(schema=same))
    assert reply.version == 1
    stored = json_format.ParseDict(CRM, pb.Schema())
    assert [f.name for f in reply.fields] == [f.name for f in stored.fields]  # the stored one, as it was
    again = await ingest.stub.CreateDataset(
        pb.CreateDatasetRequest(dataset=pb.Dataset(name="crm", schema_name="crm_person"))
    )
    assert again.unknown_fields == pb.UNKNOWN_FIELDS_REJECT
    assert await config_events(ingest) == before  # nothing appended

    other = await rpc_error(
        ingest.stub.CreateDataset(
            pb.CreateDatasetRequest(
                dataset=pb.Dataset(name="crm", schema_name="crm_person", unknown_fields=pb.UNKNOWN_FIELDS_DROP)
            )
        )
    )
    assert other.code() == grpc.StatusCode.ALREADY_EXISTS

    changed = json_format.ParseDict(CRM, pb.Schema())
    changed.fields.add(name="nickname", type=pb.FIELD_TYPE_STRING)
    stale = pb.Schema()
    stale.CopyFrom(changed)
    stale.version = 1  # written against v1: this change would make v2
    err = await rpc_error(ingest.stub.CreateSchema(pb.CreateSchemaRequest(schema=stale)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "version: version: this request registers v2" in (err.details() or "")
    assert (await ingest.stub.CreateSchema(pb.CreateSchemaRequest(schema=changed))).version == 2
    assert (await ingest.stub.CreateSchema(pb.CreateSchemaRequest(schema=changed))).version == 2
    assert len(await config_events(ingest)) == len(before) + 1


async def test_an_invalid_schema_names_each_field_and_rule(ingest: Ingest) -> None:
    schema = pb.Schema(name="Bad Name", schema_class=pb.SCHEMA_CLASS_EVENT)
    schema.fields.add(name="id", type=pb.FIELD_TYPE_INTEGER, identity_namespace="crm_id")
    schema.fields.add(name="id", type=pb.FIELD_TYPE_STRING, pattern="([")
    err = await rpc_error(ingest.stub.CreateSchema(pb.CreateSchemaRequest(schema=schema)))
    details = err.details() or ""
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    for expected in (
        "name: pattern",
        "id: unique",
        "id: identity: identity fields are strings",
        "id: pattern: invalid regular expression",
        "event_id_field: required",
        "timestamp_field: required",
    ):
        assert expected in details


async def test_datasets_keep_profile_flag_and_retention_and_refuse_bad_ones(ingest: Ingest) -> None:
    listed = {d.name: d for d in (await ingest.stub.ListDatasets(pb.ListDatasetsRequest())).datasets}
    assert listed["web"].retention_seconds == 86_400
    assert listed["crm_loose"].profile_enabled
    assert listed["crm_loose"].unknown_fields == pb.UNKNOWN_FIELDS_DROP
    err = await rpc_error(
        ingest.stub.CreateDataset(
            pb.CreateDatasetRequest(dataset=pb.Dataset(name="crm_ttl", schema_name="crm_person", retention_seconds=60))
        )
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "retention applies to event datasets" in (err.details() or "")
    err = await rpc_error(
        ingest.stub.CreateDataset(pb.CreateDatasetRequest(dataset=pb.Dataset(name="x", schema_name="nope")))
    )
    assert err.code() == grpc.StatusCode.NOT_FOUND


# ============================================================================ batches


async def test_records_on_the_log_hold_no_plain_identity_or_attribute(ingest: Ingest) -> None:
    report = await ingest.upload(csv_bytes([good_row(i) for i in range(1, 3)]), "sealed")
    assert report.rows_accepted == 2
    raw = b"".join([msg.data async for msg in ingest.eventlog.read(INGEST_RECORDS.stream.name, INGEST_RECORDS.subject)])
    for plain in (b"p1@example.com", b"Name1", b"C00001", b"first_name"):
        assert plain not in raw
    records = await ingest.records(report.batch_id)
    assert {r.identities[0].value for r in records if r.identities} >= {"C00001"}
    assert "first_name" in records[0].attributes.fields


async def test_a_csv_batch_is_converted_to_the_schema_types_and_appended(ingest: Ingest) -> None:
    report = await ingest.upload(csv_bytes([good_row(i) for i in range(1, 1201)]), "typed")
    assert report.status == pb.BATCH_STATUS_COMPLETED
    assert (report.rows_read, report.rows_accepted, report.rows_rejected) == (1200, 1200, 0)
    records = await ingest.records(report.batch_id)
    assert len(records) == 1200
    assert len({r.record_id for r in records}) == 1200
    first = json_format.MessageToDict(records[0].attributes)
    assert first == {
        "crm_id": "C00001",
        "email": "p1@example.com",
        "first_name": "Name1",
        "tier": "gold",
        "visits": 1,
        "value": 1.5,
        "vip": True,
        "born": "1990-01-02",
    }
    assert {(i.namespace, i.value) for i in records[0].identities} == {
        ("crm_id", "C00001"),
        ("email", "p1@example.com"),
    }


async def test_bad_rows_are_grouped_by_field_and_rule_with_first_rows_and_masked_identities(ingest: Ingest) -> None:
    rows = [good_row(i) for i in range(1, 201)]
    rows[4][4] = "many"  # row 5: visits not an integer
    rows[9][4] = "-3"  # row 10: below the minimum
    rows[14][0] = ""  # row 15: primary identity missing
    rows[19][3] = "bronze"  # row 20: not in the enum
    rows[24][2] = "x" * 30  # row 25: longer than max_length
    rows[29][1] = "Secret.Person@Example.com"
    rows[29][7] = "1990-13-45"  # row 30: not a date (its email must not show)
    data = csv_bytes(rows) + b'C9,"ragged\n'
    lines = data.split(b"\n")
    lines.insert(40, b"C8,e8@example.com,only-three")  # a ragged row (row 40)
    report = await ingest.upload(b"\n".join(lines), "bad-rows", threshold=0.5)
    assert report.status == pb.BATCH_STATUS_COMPLETED
    found = groups(report)
    assert found[("visits", "type")] == (1, [5])
    assert found[("visits", "minimum")] == (1, [10])
    assert found[("crm_id", "required")] == (1, [15])
    assert found[("tier", "enum")] == (1, [20])
    assert found[("first_name", "max_length")] == (1, [25])
    assert found[("born", "type")] == (1, [30])
    assert found[("*", "ragged_row")] == (1, [40])
    assert found[("*", "csv")][0] == 1  # the unbalanced quote at the end
    assert (report.rows_read, report.rows_rejected, report.rows_accepted) == (202, 8, 200 - 6)
    assert b"Secret" not in report.SerializeToString()
    samples = {(g.field, g.rule): list(g.samples) for g in report.rejects}
    assert samples[("visits", "type")] == ["xxxx"]  # its shape: a name or an address shows no more
    assert samples[("tier", "enum")] == ["xxxxxx"]
    assert len(await ingest.records(report.batch_id)) == report.rows_accepted

    errors = await ingest.stub.ListBatchErrors(pb.ListBatchErrorsRequest(batch_id=report.batch_id))
    assert [e.row for e in errors.errors] == [5, 10, 15, 20, 25, 30, 40, 202]
    by_row = {e.row: e for e in errors.errors}
    # Kept raw in ingest only; shown masked: an identity value as its keyed hash, others by shape.
    assert by_row[30].values["email"] == pii_hash("Secret.Person@Example.com")
    assert by_row[30].values["first_name"] == "xxxx99"  # "Name30"
    assert by_row[30].values["born"] == "9999-99-99"
    assert b"Secret" not in errors.SerializeToString()
    assert [(x.field, x.rule) for x in by_row[30].errors] == [("born", "type")]
    assert set(errors.identity_fields) == {"crm_id", "email"}
    refused = await rpc_error(
        ingest.stub.ListBatchErrors(pb.ListBatchErrorsRequest(batch_id=report.batch_id, raw=True))
    )
    assert refused.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "operator" in (refused.details() or "")


async def test_invalid_utf8_rejects_only_the_rows_that_hold_it(ingest: Ingest) -> None:
    data = csv_bytes([good_row(1), good_row(2), good_row(3)]).replace(b"Name2", b"Na\xffme2")
    report = await ingest.upload(data, "utf8", threshold=0.5)
    assert groups(report)[("first_name", "encoding")] == (1, [2])
    assert report.rows_accepted == 2


async def test_unknown_columns_are_rejected_or_dropped_per_dataset(ingest: Ingest) -> None:
    data = csv_bytes([[*good_row(i), "x"] for i in range(1, 4)], [*HEADER, "shoe_size"])
    strict = await ingest.upload(data, "unknown")
    assert strict.status == pb.BATCH_STATUS_FAILED
    assert groups(strict)[("shoe_size", "unknown_field")] == (3, [1, 2, 3])
    assert await ingest.records(strict.batch_id) == []
    loose = await ingest.upload(data, "unknown", dataset="crm_loose")
    assert loose.status == pb.BATCH_STATUS_COMPLETED
    assert loose.rows_accepted == 3
    assert "shoe_size" not in (await ingest.records(loose.batch_id))[0].attributes


async def test_a_record_over_the_size_limit_is_rejected(ingest: Ingest) -> None:
    big = good_row(2)
    big[2] = ""
    big[5] = "1" * 120_000
    report = await ingest.upload(csv_bytes([good_row(1), big]), "size", threshold=0.5)
    assert groups(report)[("*", "max_size")] == (1, [2])


async def test_empty_files_unknown_datasets_and_bad_headers_are_clear_errors(ingest: Ingest) -> None:
    for data in (b"", b"crm_id,email\n", b"\n\n"):
        err = await rpc_error(ingest.upload(data, f"empty-{len(data)}"))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "empty file" in (err.details() or "")
    err = await rpc_error(ingest.upload(csv_bytes([good_row(1)]), "nowhere", dataset="nope"))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert "dataset 'nope' not found" in (err.details() or "")
    err = await rpc_error(ingest.upload(b"crm_id,,crm_id\nC1,x,y\n", "header"))
    assert "column 2: required: empty column name" in (err.details() or "")
    assert "crm_id: unique" in (err.details() or "")


async def test_an_unbalanced_quote_that_swallows_the_file_fails_it_whole(ingest: Ingest) -> None:
    rows = [good_row(i) for i in range(1, 90_000)]
    data = csv_bytes(rows[:10]) + b'C11,"never closed,x,gold,1,1,yes,1990-01-01\n' + csv_bytes(rows[10:])
    err = await rpc_error(ingest.upload(data, "quote", chunk=256 * 1024))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "row 11: *: csv: unbalanced quote" in (err.details() or "")
    assert await ingest.records() == []


async def test_gzip_jsonl_and_parquet_batches(ingest: Ingest) -> None:
    gz = await ingest.upload(gzip.compress(csv_bytes([good_row(i) for i in range(1, 301)])), "gz")
    assert (gz.status, gz.rows_accepted) == (pb.BATCH_STATUS_COMPLETED, 300)

    lines = [json.dumps({"crm_id": f"J{i}", "visits": i, "vip": False, "value": 2}) for i in range(1, 11)]
    lines[3] = '{"crm_id": "J4", "visits": "four"}'
    lines[5] = "{not json"
    lines[7] = "[1, 2]"
    jsonl = await ingest.upload(("\n".join(lines) + "\n").encode(), "jsonl", fmt=pb.FILE_FORMAT_JSONL, threshold=0.5)
    assert groups(jsonl) == {("visits", "type"): (1, [4]), ("*", "json"): (2, [6, 8])}
    assert jsonl.rows_accepted == 7

    table = pa.table(
        {
            "crm_id": ["P1", "P2", None],
            "visits": pa.array([1, 2, 3], pa.int64()),
            "value": [1.5, 2.5, 3.5],
            "born": pa.array([__import__("datetime").date(1990, 1, 2)] * 3, pa.date32()),
        }
    )
    sink = io.BytesIO()
    pq.write_table(table, sink)
    parquet = await ingest.upload(sink.getvalue(), "parquet", fmt=pb.FILE_FORMAT_PARQUET, threshold=0.5)
    assert (parquet.rows_accepted, groups(parquet)) == (2, {("crm_id", "required"): (1, [3])})
    first = json_format.MessageToDict((await ingest.records(parquet.batch_id))[0].attributes)
    assert first == {"crm_id": "P1", "visits": 1, "value": 1.5, "born": "1990-01-02"}


async def test_a_parquet_file_that_does_not_fit_the_schema_is_refused_naming_each_column(ingest: Ingest) -> None:
    table = pa.table({"crm_id": [1, 2], "visits": ["a", "b"], "colour": ["r", "g"]})
    sink = io.BytesIO()
    pq.write_table(table, sink)
    err = await rpc_error(ingest.upload(sink.getvalue(), "misfit", fmt=pb.FILE_FORMAT_PARQUET))
    details = err.details() or ""
    assert "columns do not fit the schema" in details
    assert "crm_id: type: column of type int64 cannot hold string" in details
    assert "visits: type: column of type string cannot hold integer" in details
    assert "colour: unknown_field" in details
    err = await rpc_error(ingest.upload(b"PAR1 not really", "garbage", fmt=pb.FILE_FORMAT_PARQUET))
    assert "not a Parquet file" in (err.details() or "")


async def test_a_batch_above_its_threshold_leaves_nothing_and_a_lenient_threshold_lets_it_through(
    ingest: Ingest,
) -> None:
    rows = [good_row(i) for i in range(1, 101)]
    for i in range(0, 100, 10):
        rows[i][4] = "NaN"  # 10% bad
    data = csv_bytes(rows)
    failed = await ingest.upload(data, "ten-percent")
    assert failed.status == pb.BATCH_STATUS_FAILED
    assert failed.error_threshold == pytest.approx(0.05)
    assert "10 of 100 rows rejected, above the 5.0% threshold" in failed.failure
    assert await ingest.records() == []
    kept = await ingest.stub.ListBatchErrors(pb.ListBatchErrorsRequest(batch_id=failed.batch_id, limit=4))
    assert [e.row for e in kept.errors] == [1, 11, 21, 31]
    assert kept.next_after_row == 31

    passed = await ingest.upload(data, "ten-percent", threshold=0.2)
    assert passed.status == pb.BATCH_STATUS_COMPLETED
    assert passed.rows_accepted == 90
    again = await ingest.upload(data, "ten-percent", threshold=0.2)
    assert again.duplicate
    assert again.rows_accepted == 90
    assert len(await ingest.records()) == 90
    fetched = await ingest.stub.GetBatch(pb.GetBatchRequest(batch_id=passed.batch_id))
    assert fetched.rows_accepted == 90
    assert list(fetched.rejects[0].samples) == ["xxx", "xxx", "xxx"]  # "NaN", masked by shape


async def test_progress_arrives_while_the_file_streams_in(ingest: Ingest) -> None:
    data = csv_bytes([good_row(i) for i in range(1, 20_001)])
    seen: list[pb.IngestProgress] = []
    call = ingest.stub.IngestFileWithProgress(
        chunks(data, "progress", dataset="crm", fmt=pb.FILE_FORMAT_CSV, threshold=None, chunk=64 * 1024)
    )
    async for progress in call:
        seen.append(progress)
    assert seen[-1].report.rows_accepted == 20_000
    partial = [p.rows_read for p in seen[:-1]]
    assert 0 < partial[0] < 20_000
    assert partial == sorted(partial)


async def test_the_cli_lists_and_exports_batch_errors_masked_and_raw_only_when_allowed(
    ingest: Ingest, tmp_path: Path
) -> None:
    rows = [good_row(i) for i in range(1, 11)]
    rows[2][4] = "x"
    rows[6][0] = ""
    report = await ingest.upload(csv_bytes(rows), "cli", threshold=0.5)
    runner = CliRunner()
    out = tmp_path / "errors.csv"
    args = ["--addr", f"ingest={ingest.address}", "batch", "errors", report.batch_id]
    listed = await asyncio.to_thread(runner.invoke, cli_app, args, env={"COLUMNS": "400"})
    assert listed.exit_code == 0, listed.output
    assert "visits" in listed.output
    assert "p3@example.com" not in listed.output
    assert pii_hash("p3@example.com") in listed.output  # the service's tag: the CLI holds no key
    exported = await asyncio.to_thread(runner.invoke, cli_app, [*args, "--csv", str(out)])
    assert exported.exit_code == 0, exported.output
    assert "masked" in exported.output
    table = list(csv.DictReader(out.open()))
    assert [r["row"] for r in table] == ["3", "7"]
    assert table[0]["visits"] == "x"
    assert table[0]["email"] == pii_hash("p3@example.com")
    assert table[0]["first_name"] == "xxxx9"
    assert "p3@example.com" not in out.read_text()
    refused = await asyncio.to_thread(runner.invoke, cli_app, [*args, "--raw"])
    assert refused.exit_code != 0
    assert "operator role" in refused.output
    assert "CDP_ALLOW_RAW_REJECTS" in refused.output


@pytest.fixture
async def ingest_raw(nats_url: str, tmp_path: Path) -> AsyncIterator[Ingest]:
    """The service of a deployment that lets callers read raw rejected values (CDP_ALLOW_RAW_REJECTS)."""
    url = sqlite_url(tmp_path / "ingest.db")
    async with running_ingest(nats_url, url, tmp_path / "data", allow_raw_rejects=True) as harness:
        yield harness


async def test_raw_rejected_values_are_given_only_where_allowed_and_exported_to_fix(
    ingest_raw: Ingest, tmp_path: Path
) -> None:
    rows = [good_row(i) for i in range(1, 11)]
    rows[2][4] = "x"
    rows[6][0] = ""
    report = await ingest_raw.upload(csv_bytes(rows), "cli", threshold=0.5)
    masked = await ingest_raw.stub.ListBatchErrors(pb.ListBatchErrorsRequest(batch_id=report.batch_id))
    assert masked.errors[0].values["email"] == pii_hash("p3@example.com")  # raw only when asked for
    raw = await ingest_raw.stub.ListBatchErrors(pb.ListBatchErrorsRequest(batch_id=report.batch_id, raw=True))
    assert raw.errors[0].values["email"] == "p3@example.com"
    out = tmp_path / "errors.csv"
    args = ["--addr", f"ingest={ingest_raw.address}", "batch", "errors", report.batch_id, "--raw"]
    exported = await asyncio.to_thread(CliRunner().invoke, cli_app, [*args, "--csv", str(out)])
    assert exported.exit_code == 0, exported.output
    table = list(csv.DictReader(out.open()))
    assert [r["row"] for r in table] == ["3", "7"]
    assert table[0]["visits"] == "x"
    assert table[0]["email"] == "p3@example.com"
    assert table[0]["errors"] == "visits: type: expected an integer"


# ============================================================================ streaming


def event(i: int, **extra: Any) -> dict[str, Any]:
    return {"event_id": f"e{i}", "ts": "2026-01-01T10:00:00Z", "type": "view", "cookie_id": f"ck{i}", **extra}


async def publish(ingest: Ingest, events: list[dict[str, Any]]) -> list[pb.EventResult]:
    request = pb.PublishEventsRequest(dataset="web")
    for item in events:
        request.events.add().update(item)
    return list((await ingest.stub.PublishEvents(request)).results)


async def test_grpc_and_nats_events_are_validated_alike_and_deduplicated_for_all_time(ingest: Ingest) -> None:
    results = await publish(ingest, [event(1), event(2, amount="lots"), event(1), {"ts": "2026-01-01T00:00:00Z"}])
    assert [r.status for r in results] == [
        pb.EVENT_STATUS_ACCEPTED,
        pb.EVENT_STATUS_REJECTED,
        pb.EVENT_STATUS_DUPLICATE,
        pb.EVENT_STATUS_REJECTED,
    ]
    assert [(e.field, e.rule) for e in results[1].errors] == [("amount", "type")]
    assert {(e.field, e.rule) for e in results[3].errors} == {("event_id", "required"), ("cookie_id", "required")}

    js = ingest.eventlog.js
    payloads = [
        json.dumps(event(1)).encode(),  # seen by gRPC: a duplicate
        json.dumps(event(3)).encode(),
        json.dumps(event(3)).encode(),  # a re-send beyond any JetStream window is still a duplicate
        json.dumps(event(4, amount="lots")).encode(),
        b'{"event_id": "e\xff"}',
        b"{not json",
        json.dumps(event(5, ts="yesterday")).encode(),
        json.dumps(event(6, colour="red")).encode(),
        json.dumps(event(7, type="x" * 11_000)).encode(),
    ]
    for payload in payloads:
        await js.publish(collect_subject("web"), payload)
    await js.publish(collect_subject("nowhere"), json.dumps(event(8)).encode())

    async def dead_letters() -> list[pb.DeadLetter]:
        reply = await ingest.stub.ListDeadLetters(pb.ListDeadLettersRequest())
        return list(reply.dead_letters)

    for _ in range(200):
        if len(await dead_letters()) == 7:
            break
        await asyncio.sleep(0.1)
    letters = await dead_letters()
    reasons = [(d.dataset, *d.reason.split(": ")[:2]) for d in letters]
    assert reasons == [
        ("web", "amount", "type"),
        ("web", "*", "encoding"),
        ("web", "*", "json"),
        ("web", "ts", "type"),
        ("web", "colour", "unknown_field"),
        ("web", "*", "max_size"),
        ("nowhere", "dataset", "exists"),
    ]
    # The message's shape only: no value of it (an email, a phone) ever leaves ingest in a dead letter.
    assert letters[0].raw == deadletters.masked_excerpt(payloads[3])
    assert "lots" not in letters[0].raw
    assert "e4" not in letters[0].raw
    assert letters[0].reason.startswith("amount: type:")
    only_web = await ingest.stub.ListDeadLetters(pb.ListDeadLettersRequest(dataset="web"))
    assert len(only_web.dead_letters) == 6
    assert sorted(r.record_id for r in await ingest.records()) == ["e1", "e3"]

    again = await publish(ingest, [event(3)])  # seen by NATS: a duplicate for gRPC too
    assert again[0].status == pb.EVENT_STATUS_DUPLICATE


async def test_the_cli_lists_dead_letters(ingest: Ingest) -> None:
    await ingest.eventlog.js.publish(collect_subject("web"), json.dumps(event(9, amount="x")).encode())
    for _ in range(200):
        if (await ingest.stub.ListDeadLetters(pb.ListDeadLettersRequest(dataset="web"))).dead_letters:
            break
        await asyncio.sleep(0.1)
    args = ["--addr", f"ingest={ingest.address}", "deadletters", "--service", "ingest", "--dataset", "web"]
    result = await asyncio.to_thread(CliRunner().invoke, cli_app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "amount: type" in result.output
    assert "collect-reject" in result.output


async def test_a_collect_reject_is_redriven_once_its_schema_is_fixed_and_a_rebuild_agrees(
    ingest: Ingest, tmp_path: Path
) -> None:
    """A reject is the kit's dead letter: after a schema version adds the field it lacked, the kit's
    redrive applies it again (accepted); a still-invalid one is dead again, one redrive more; a
    repeated request id changes nothing; a rebuild from the log makes the same decisions."""
    js = ingest.eventlog.js
    fixable = (await js.publish(collect_subject("web"), json.dumps(event(20, coupon="c-1")).encode())).seq
    hopeless = (await js.publish(collect_subject("web"), b"{not json")).seq
    stub = dl_grpc.DeadLetterServiceStub(grpc.aio.insecure_channel(ingest.address))

    async def letters() -> dict[int, dl.DeadLetter]:
        reply = await stub.ListDeadLetters(dl.ListDeadLettersRequest(include_redriven=True))
        return {x.sequence: x for x in reply.dead_letters if x.consumer == INGEST_READS_COLLECT.name}

    for _ in range(200):
        if len(await letters()) == 2:
            break
        await asyncio.sleep(0.1)
    found = await letters()
    assert found[fixable].error_class == "Rejected"
    assert found[fixable].error == "coupon: unknown_field: not in the schema"
    assert "c-1" not in found[fixable].excerpt

    v2 = json_format.ParseDict(WEB, pb.Schema())
    v2.fields.add(name="coupon", type=pb.FIELD_TYPE_STRING)
    await ingest.stub.CreateSchema(pb.CreateSchemaRequest(schema=v2))
    request = dl.RedriveDeadLettersRequest(consumer=INGEST_READS_COLLECT.name, request_id="fix-1")
    assert (await stub.RedriveDeadLetters(request)).requested == 2
    for _ in range(200):
        found = await letters()
        if all(x.state != "redrive_requested" for x in found.values()):
            break
        await asyncio.sleep(0.1)
    assert (found[fixable].state, found[fixable].redrives) == ("redriven", 1)
    assert (found[hopeless].state, found[hopeless].redrives) == ("dead", 1)
    assert "e20" in {r.record_id for r in await ingest.records()}
    # The same request again: nothing more (the hopeless one is not tried a second time).
    assert (await stub.RedriveDeadLetters(request)).requested == 2
    assert (await letters())[hopeless].redrives == 1

    await collect_checkpoint_reaches_end(ingest.engine, ingest.eventlog)
    settings = IngestSettings(
        nats_url=ingest.nats_url, data_dir=tmp_path / "rb", store_url=sqlite_url(tmp_path / "rb.db")
    )
    engine = make_engine(settings.store_url)
    rebuilt = build(settings, engine, ingest.eventlog)
    await rebuilt.processor.rebuild()
    tables = with_checkpoint([*TABLES, *DEADLETTER_TABLES])
    assert canonical_dump(engine, tables) == canonical_dump(ingest.engine, tables)
    engine.dispose()


async def test_event_ids_in_files_are_deduplicated_with_grpc_and_nats_events_for_all_time(ingest_on: Ingest) -> None:
    ingest = ingest_on
    assert (await publish(ingest, [event(1)]))[0].status == pb.EVENT_STATUS_ACCEPTED
    await ingest.eventlog.js.publish(collect_subject("web"), json.dumps(event(2)).encode())
    await until(ingest, lambda ids: "e2" in ids)

    # seen by gRPC (e1), by NATS (e2), twice in the file itself (e3)
    first = "".join(json.dumps(event(i)) + "\n" for i in (1, 2, 3, 3, 4)).encode()
    report = await ingest.upload(first, "events-1", dataset="web", fmt=pb.FILE_FORMAT_JSONL)
    assert report.status == pb.BATCH_STATUS_COMPLETED
    assert (report.rows_read, report.rows_accepted, report.rows_rejected, report.rows_duplicate) == (5, 5, 0, 3)
    assert sorted(r.record_id for r in await ingest.records()) == ["e1", "e2", "e3", "e4"]
    assert [r.row for r in await ingest.records(report.batch_id)] == [3, 5]

    # another file (CSV this time) repeats e4: seen by a file, for a file
    second = csv_bytes(
        [["e4", "2026-01-01T10:00:00Z", "view", "ck4", ""], ["e5", "2026-01-01T10:00:00Z", "view", "ck5", "2.5"]],
        header=["event_id", "ts", "type", "cookie_id", "amount"],
    )
    report = await ingest.upload(second, "events-2", dataset="web")
    assert (report.rows_accepted, report.rows_duplicate) == (2, 1)
    again = await ingest.upload(second, "events-2", dataset="web")
    assert again.duplicate
    assert again.rows_duplicate == 1

    # events of files are duplicates for gRPC and NATS too
    assert [r.status for r in await publish(ingest, [event(5), event(3), event(6)])] == [
        pb.EVENT_STATUS_DUPLICATE,
        pb.EVENT_STATUS_DUPLICATE,
        pb.EVENT_STATUS_ACCEPTED,
    ]
    for i in (4, 5, 7):
        await ingest.eventlog.js.publish(collect_subject("web"), json.dumps(event(i)).encode())
    await until(ingest, lambda ids: "e7" in ids)
    assert sorted(r.record_id for r in await ingest.records()) == [f"e{i}" for i in range(1, 8)]


async def until(ingest: Ingest, condition: Any) -> None:
    for _ in range(300):
        if condition({r.record_id for r in await ingest.records()}):
            return
        await asyncio.sleep(0.1)
    raise AssertionError("the condition did not hold in 30s")


async def test_a_datasets_retention_travels_on_the_config_log_for_segmentation(ingest: Ingest) -> None:
    created = []
    async for msg in ingest.eventlog.read(INGEST_CONFIG.stream.name, INGEST_CONFIG.subject):
        created += [unpack(e, ev.DatasetCreated).dataset for e in msg.events() if is_a(e, ev.DatasetCreated)]
    by_name = {d.name: d for d in created}
    assert by_name["web"].retention_seconds == 86_400
    assert by_name["web"].schema_name == "web_event"
    assert by_name["crm"].retention_seconds == 0  # profile datasets keep no event retention


# ============================================================================ rebuild


async def test_the_store_rebuilt_from_the_log_equals_the_live_one(ingest_on: Ingest, tmp_path: Path) -> None:
    """Live on SQLite and on PostgreSQL; rebuilt into a fresh SQLite store from the log alone."""
    ingest = ingest_on
    rows = [good_row(i) for i in range(1, 800)]
    rows[3][4] = "x"
    await ingest.upload(csv_bytes(rows), "rebuild")
    failing = [good_row(i) for i in range(1, 5)]
    failing[0][4] = "x"
    await ingest.upload(csv_bytes(failing), "rebuild-fails")
    await publish(ingest, [event(1), event(2)])
    await ingest.eventlog.js.publish(collect_subject("web"), b"{bad")
    await ingest.eventlog.js.publish(collect_subject("web"), json.dumps(event(3)).encode())
    await until(ingest, lambda ids: "e3" in ids)
    events_file = "".join(json.dumps(event(i)) + "\n" for i in (2, 3, 4, 4, 5)).encode()
    report = await ingest.upload(events_file, "rebuild-events", dataset="web", fmt=pb.FILE_FORMAT_JSONL)
    assert (report.rows_accepted, report.rows_duplicate) == (5, 3)
    for _ in range(200):
        if len(await ingest.records()) == 798 + 5:
            break
        await asyncio.sleep(0.1)
    await collect_checkpoint_reaches_end(ingest.engine, ingest.eventlog)
    settings = IngestSettings(
        nats_url=ingest.nats_url, data_dir=tmp_path / "rb", store_url=sqlite_url(tmp_path / "rb.db")
    )
    engine = make_engine(settings.store_url)
    rebuilt = build(settings, engine, ingest.eventlog)
    await rebuilt.processor.rebuild()
    tables = with_checkpoint([*TABLES, *DEADLETTER_TABLES])
    assert canonical_dump(engine, tables) == canonical_dump(ingest.engine, tables)
    engine.dispose()


async def collect_checkpoint_reaches_end(engine: Engine, eventlog: EventLog) -> None:
    """Wait until the collect input's checkpoint (committed with the store) covers the whole stream."""
    from sqlmodel import Session

    last = await eventlog.last_sequence(COLLECT.name)
    for _ in range(300):
        with Session(engine) as session:
            if get_checkpoint(session, in_checkpoint(INGEST_READS_COLLECT)) >= last:
                return
        await asyncio.sleep(0.05)
    raise AssertionError("the collect input never caught up")


# ============================================================================ hostile input


async def test_a_jsonl_row_nested_10000_deep_is_rejected_and_the_rest_accepted(ingest: Ingest) -> None:
    lines = [json.dumps({"crm_id": f"J{i}", "visits": i}) for i in range(1, 101)]
    lines.insert(41, '{"crm_id": "deep", "value": ' + "[" * 10_000 + "]" * 10_000 + "}")  # row 42
    report = await ingest.upload(("\n".join(lines) + "\n").encode(), "deep-jsonl", fmt=pb.FILE_FORMAT_JSONL)
    assert report.status == pb.BATCH_STATUS_COMPLETED
    assert (report.rows_read, report.rows_accepted, report.rows_rejected) == (101, 100, 1)
    assert groups(report) == {("*", "depth"): (1, [42])}
    assert len(await ingest.records(report.batch_id)) == 100
    errors = await ingest.stub.ListBatchErrors(pb.ListBatchErrorsRequest(batch_id=report.batch_id))
    assert [(e.row, [(x.field, x.rule, x.message) for x in e.errors]) for e in errors.errors] == [
        (42, [("*", "depth", "nesting deeper than 32")])
    ]


async def test_a_csv_field_of_20_mb_unquoted_is_a_field_size_reject_on_its_row(ingest: Ingest) -> None:
    rows = [good_row(i) for i in range(1, 101)]
    head, tail = csv_bytes(rows[:60]), csv_bytes(rows[60:]).split(b"\n", 1)[1]
    hostile = b"C99999,big@example.com," + b"x" * (20 * 1024 * 1024) + b",gold,1,1.5,yes,1990-01-02\n"  # row 61
    report = await ingest.upload(head + hostile + tail, "huge-field", chunk=256 * 1024)
    assert report.status == pb.BATCH_STATUS_COMPLETED
    assert (report.rows_read, report.rows_accepted, report.rows_rejected) == (101, 100, 1)
    assert groups(report) == {("first_name", "field_size"): (1, [61])}
    assert len(await ingest.records(report.batch_id)) == 100
    errors = await ingest.stub.ListBatchErrors(pb.ListBatchErrorsRequest(batch_id=report.batch_id))
    (error,) = errors.errors
    assert error.row == 61
    assert [(x.field, x.rule, x.message) for x in error.errors] == [
        ("first_name", "field_size", "field larger than 1048576 bytes")
    ]
    assert b"xxxxxxxxxx" not in report.SerializeToString() + errors.SerializeToString()


async def test_a_csv_row_over_the_row_limit_is_a_row_size_reject_on_its_row(ingest: Ingest) -> None:
    rows = [good_row(i) for i in range(1, 101)]
    wide = "y" * (900 * 1024)  # each field within its limit, the row of five of them over 4 MiB
    rows.insert(9, ["C77777", wide, wide, wide, "1", wide, "yes", wide])  # row 10
    report = await ingest.upload(csv_bytes(rows), "long-row", chunk=256 * 1024)
    assert report.status == pb.BATCH_STATUS_COMPLETED
    assert (report.rows_read, report.rows_accepted, report.rows_rejected) == (101, 100, 1)
    assert groups(report) == {("*", "row_size"): (1, [10])}
    errors = await ingest.stub.ListBatchErrors(pb.ListBatchErrorsRequest(batch_id=report.batch_id))
    assert [(x.field, x.rule, x.message) for x in errors.errors[0].errors] == [
        ("*", "row_size", "row larger than 4194304 bytes")
    ]
    assert b"yyyyyyyyyy" not in report.SerializeToString() + errors.SerializeToString()


WIDE = {
    "name": "wide_person",
    "schema_class": "SCHEMA_CLASS_PROFILE",
    "fields": [
        {"name": "crm_id", "type": "FIELD_TYPE_STRING", "identity_namespace": "crm_id", "required": True},
        *({"name": f"note{i}", "type": "FIELD_TYPE_STRING"} for i in range(4)),
    ],
}


async def test_a_row_within_the_read_limits_that_encodes_beyond_half_a_message_is_a_row_size_reject(
    nats_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every record must fit one message, and so must identity's fragment of it (a little larger).
    With the record limit raised by the operator, a row of four 200 KiB fields passes the field,
    row and record limits but not that one: it is a row_size reject, and the rest go through."""
    monkeypatch.setenv("CDP_MAX_PROFILE_RECORD_BYTES", str(4 * 1024 * 1024))
    async with running_ingest(nats_url, sqlite_url(tmp_path / "ingest.db"), tmp_path / "data") as ingest:
        await ingest.stub.CreateSchema(pb.CreateSchemaRequest(schema=json_format.ParseDict(WIDE, pb.Schema())))
        await ingest.stub.CreateDataset(
            pb.CreateDatasetRequest(dataset=pb.Dataset(name="wide", schema_name="wide_person"))
        )
        wide = "w" * (200 * 1024)
        rows = [[f"W{i}", "a", "b", "c", "d"] for i in range(1, 21)]
        rows.insert(4, ["W99", wide, wide, wide, wide])  # row 5
        header = ["crm_id", "note0", "note1", "note2", "note3"]
        report = await ingest.upload(csv_bytes(rows, header), "fat-row", dataset="wide", chunk=256 * 1024)
    assert report.status == pb.BATCH_STATUS_COMPLETED
    assert (report.rows_read, report.rows_accepted, report.rows_rejected) == (21, 20, 1)
    assert groups(report) == {("*", "row_size"): (1, [5])}
    assert b"wwwwwwwwww" not in report.SerializeToString()


async def test_hostile_rows_still_count_toward_the_error_threshold(ingest: Ingest) -> None:
    lines = [json.dumps({"crm_id": f"J{i}"}) for i in range(1, 4)] + ["[" * 5000]
    report = await ingest.upload(("\n".join(lines) + "\n").encode(), "deep-fails", fmt=pb.FILE_FORMAT_JSONL)
    assert report.status == pb.BATCH_STATUS_FAILED  # 1 of 4 rejected, above the default 5%
    assert groups(report) == {("*", "depth"): (1, [4])}
    assert await ingest.records(report.batch_id) == []


async def test_collect_survives_a_deep_event_and_a_huge_one_and_applies_the_next(ingest: Ingest) -> None:
    js = ingest.eventlog.js
    deep = await js.publish(collect_subject("web"), b'{"event_id": "d", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
    huge = json.dumps(event(90, type="z" * (2 * 1024 * 1024))).encode()
    big = await js.publish(collect_subject("web"), huge)
    await js.publish(collect_subject("web"), json.dumps(event(91)).encode())
    await until(ingest, lambda ids: "e91" in ids)
    assert ingest.processor.ready.is_set()
    assert ingest.processor.failures == {}  # the collect consumer never failed: it goes on serving
    letters = (await ingest.stub.ListDeadLetters(pb.ListDeadLettersRequest(dataset="web"))).dead_letters
    assert [(d.sequence, d.reason) for d in letters] == [
        (deep.seq, "*: depth: nesting deeper than 32"),
        (big.seq, "*: event_size: event larger than 1048576 bytes"),
    ]
    assert all(len(d.raw) <= 16_384 for d in letters)  # kept as an excerpt, as every dead letter is
    assert [r.record_id for r in await ingest.records()] == ["e91"]


async def test_a_file_stream_with_a_chunk_that_is_not_a_chunk_is_invalid_argument(ingest: Ingest) -> None:
    """A client stream (IngestFile) whose second message is garbage ends INVALID_ARGUMENT naming
    the method, not INTERNAL; nothing of it is ingested and the service goes on."""
    header = pb.IngestFileChunk(
        header=pb.IngestFileHeader(dataset="crm", batch_key="garbage", format=pb.FILE_FORMAT_CSV)
    )

    async def chunks() -> AsyncIterator[bytes]:
        yield header.SerializeToString()
        yield b"\xff" * 64

    async with grpc.aio.insecure_channel(ingest.address) as channel:
        raw = channel.stream_unary("/cdp.ingest.v1.IngestService/IngestFile", None, None)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await raw(chunks())
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "IngestFile" in (caught.value.details() or "")
    report = await ingest.upload(csv_bytes([good_row(1)]), "after-garbage")
    assert report.rows_accepted == 1
