"""As a user would meet it: a CSV with bad emails and phones, and a bad event on cdp.collect.
The batch report, the rejected rows, the dead letters, what the CLI prints and every log line
the service writes show no raw value; raw rows are refused without the operator role."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
import structlog
from google.protobuf import json_format
from typer.testing import CliRunner

from cdp.common.v1 import deadletter_pb2 as dl
from cdp.common.v1 import deadletter_pb2_grpc as dl_grpc
from cdp.ingest.v1 import ingest_pb2 as pb
from cdp_cli.app import app as cli_app
from cdp_kit.store import sqlite_url
from cdp_kit.streams import collect_subject
from cdp_kit.telemetry import configure_logging, pii_hash
from tests.integration.test_ingest_service import Ingest, csv_bytes, event, rpc_error, running_ingest

CONTACT = {
    "name": "contact",
    "schema_class": "SCHEMA_CLASS_PROFILE",
    "fields": [
        {"name": "email", "type": "FIELD_TYPE_STRING", "identity_namespace": "email"},
        {"name": "phone", "type": "FIELD_TYPE_STRING", "identity_namespace": "phone"},
        {"name": "full_name", "type": "FIELD_TYPE_STRING"},
        {"name": "age", "type": "FIELD_TYPE_INTEGER", "minimum": 0},
    ],
}
# Rejected rows: no usable identity (a bad email and a bad phone), and a bad age beside a good email.
BAD_EMAIL, BAD_PHONE = "ann.leak(at)example.com", "+1 555 01"
GOOD_EMAIL, GOOD_PHONE, NAME = "bob.leak@example.com", "+14155550123", "Bobby Tables"
EVENT_EMAIL, EVENT_PHONE = "carol.leak@example.com", "+442071838750"
RAW = [BAD_EMAIL, BAD_PHONE, GOOD_EMAIL, GOOD_PHONE, NAME, EVENT_EMAIL, EVENT_PHONE]
FRAGMENTS = ["leak", "5550123", "Tables", "2071838750"]  # no part of any either, anywhere


@pytest.fixture
def service_log(tmp_path: Path) -> Iterator[Path]:
    """The service's log, JSON at debug level, as a deployment writes it (to a file here)."""
    path = tmp_path / "ingest.log"
    with path.open("w") as out:
        configure_logging("ingest", "json", "debug")
        structlog.configure(logger_factory=structlog.PrintLoggerFactory(out))
        yield path
    structlog.contextvars.clear_contextvars()
    structlog.reset_defaults()


@pytest.fixture
async def ingest(nats_url: str, tmp_path: Path, service_log: pytest.CaptureFixture[str]) -> AsyncIterator[Ingest]:
    async with running_ingest(nats_url, sqlite_url(tmp_path / "ingest.db"), tmp_path / "data") as harness:
        await harness.stub.CreateSchema(pb.CreateSchemaRequest(schema=json_format.ParseDict(CONTACT, pb.Schema())))
        await harness.stub.CreateDataset(
            pb.CreateDatasetRequest(dataset=pb.Dataset(name="contacts", schema_name="contact"))
        )
        yield harness


def assert_no_raw_value(text: str, where: str) -> None:
    for value in [*RAW, *FRAGMENTS]:
        assert value not in text, f"{value!r} in {where}"


async def test_bad_emails_and_phones_show_nowhere_but_as_keyed_hashes_and_shapes(
    ingest: Ingest, service_log: Path
) -> None:
    rows = [
        ["ok1@example.com", "+14155550100", "Ok One", "30"],
        [BAD_EMAIL, BAD_PHONE, "Ann Leak", "41"],  # row 2: no usable identity
        [GOOD_EMAIL, GOOD_PHONE, NAME, "many"],  # row 3: age not an integer
    ]
    report = await ingest.upload(
        csv_bytes(rows, ["email", "phone", "full_name", "age"]), "contacts-1", dataset="contacts", threshold=0.9
    )
    assert (report.rows_accepted, report.rows_rejected) == (1, 2)
    fetched = await ingest.stub.GetBatch(pb.GetBatchRequest(batch_id=report.batch_id))
    errors = await ingest.stub.ListBatchErrors(pb.ListBatchErrorsRequest(batch_id=report.batch_id))
    by_row = {e.row: json_format.MessageToDict(e.values) for e in errors.errors}
    assert by_row[2] == {
        "email": pii_hash(BAD_EMAIL),
        "phone": pii_hash(BAD_PHONE),
        "full_name": "xxx xxxx",
        "age": "99",
    }
    assert by_row[3]["email"] == pii_hash(GOOD_EMAIL)
    assert by_row[3]["full_name"] == "xxxxx xxxxxx"
    samples = {(g.field, g.rule): list(g.samples) for g in fetched.rejects}
    assert samples[("email", "identity")] == [pii_hash(BAD_EMAIL)]
    assert samples[("age", "type")] == ["xxxx"]

    await ingest.eventlog.js.publish(
        collect_subject("web"), json.dumps(event(1, email=EVENT_EMAIL, phone=EVENT_PHONE)).encode()
    )
    for _ in range(200):
        letters = (await ingest.stub.ListDeadLetters(pb.ListDeadLettersRequest(dataset="web"))).dead_letters
        if letters:
            break
        await asyncio.sleep(0.1)
    kit_letters = await dl_grpc.DeadLetterServiceStub(grpc.aio.insecure_channel(ingest.address)).ListDeadLetters(
        dl.ListDeadLettersRequest()
    )
    assert len(letters) == 1
    assert len(kit_letters.dead_letters) == 1

    runner = CliRunner()
    addr = ["--addr", f"ingest={ingest.address}"]
    shown_errors = await asyncio.to_thread(
        runner.invoke, cli_app, [*addr, "batch", "errors", report.batch_id], env={"COLUMNS": "400"}
    )
    shown_letters = await asyncio.to_thread(
        runner.invoke, cli_app, [*addr, "deadletters", "--service", "ingest"], env={"COLUMNS": "400"}
    )
    assert shown_errors.exit_code == 0, shown_errors.output
    assert shown_letters.exit_code == 0, shown_letters.output
    assert pii_hash(GOOD_EMAIL) in shown_errors.output

    for where, text in [
        ("the upload's report", str(report)),
        ("GetBatch", str(fetched)),
        ("ListBatchErrors", str(errors)),
        ("ingest's dead letters", str(letters)),
        ("the kit's dead letters", str(kit_letters)),
        ("cdp batch errors", shown_errors.output),
        ("cdp deadletters", shown_letters.output),
        ("the service's log", await asyncio.to_thread(service_log.read_text)),
    ]:
        assert_no_raw_value(text, where)

    refused = await rpc_error(
        ingest.stub.ListBatchErrors(pb.ListBatchErrorsRequest(batch_id=report.batch_id, raw=True))
    )
    assert refused.code() == grpc.StatusCode.PERMISSION_DENIED
    log_text = await asyncio.to_thread(service_log.read_text)
    assert '"service": "ingest"' in log_text  # the search below looked at real lines
    assert_no_raw_value(log_text, "the service's log")
