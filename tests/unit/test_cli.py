"""The `cdp` command line against in-process fake gRPC servers: help, address resolution,
error rendering, and the requests each command sends."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
import typer
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from typer.testing import CliRunner, Result
from typing_extensions import override

from cdp.common.v1 import admin_pb2, admin_pb2_grpc
from cdp.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from cdp_cli import inputs
from cdp_cli.app import app
from cdp_cli.client import Client, parse_addr_option, resolve_address, resolve_addresses
from cdp_cli.errors import CliError
from cdp_kit.natsserver import free_port

runner = CliRunner()


def invoke(args: list[str], env: dict[str, str | None] | None = None) -> Result:
    clean: dict[str, str | None] = {f"CDP_{s.upper()}_ADDR": None for s in ("ingest", "identity", "segmentation")}
    clean |= {"CDP_ACTIVATION_ADDR": None, "CDP_DATA_DIR": None, "COLUMNS": "200"}
    return runner.invoke(app, args, env=clean | (env or {}))


# --------------------------------------------------------------------------- help


def command_paths(command: object, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    yield prefix
    for name, sub in getattr(command, "commands", {}).items():
        yield from command_paths(sub, (*prefix, name))


def test_every_command_has_help() -> None:
    paths = list(command_paths(typer.main.get_command(app)))
    assert ("ingest",) in paths
    assert ("schema", "create") in paths
    assert ("destination", "create") in paths
    assert len(paths) > 20
    for path in paths:
        result = invoke([*path, "--help"])
        assert result.exit_code == 0, (path, result.output)
        assert "Usage" in result.output


# --------------------------------------------------------------------------- addresses


def write_stack_file(data_dir: Path, services: dict[str, str], pid: int | None = None) -> None:
    data_dir.mkdir(parents=True, exist_ok=True)
    content = {"nats_url": "nats://127.0.0.1:1", "services": services, "pid": os.getpid() if pid is None else pid}
    (data_dir / "stack.json").write_text(json.dumps(content))


def test_address_comes_from_explicit_then_env_then_stack_file(tmp_path: Path) -> None:
    write_stack_file(tmp_path, {"ingest": "127.0.0.1:1001", "identity": "127.0.0.1:1002"})
    env = {"CDP_INGEST_ADDR": "10.0.0.1:2001"}
    assert resolve_address("identity", tmp_path, environ={}) == "127.0.0.1:1002"
    assert resolve_address("ingest", tmp_path, environ=env) == "10.0.0.1:2001"
    assert resolve_address("ingest", tmp_path, {"ingest": "h:3"}, environ=env) == "h:3"
    assert resolve_addresses(tmp_path, environ={}) == {"ingest": "127.0.0.1:1001", "identity": "127.0.0.1:1002"}


def test_env_address_works_without_stack_file(tmp_path: Path) -> None:
    assert resolve_addresses(tmp_path, environ={"CDP_SEGMENTATION_ADDR": "h:1"}) == {"segmentation": "h:1"}


def test_missing_stack_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(CliError, match=r"no stack found: .*stack\.json does not exist"):
        resolve_addresses(tmp_path, environ={})
    with pytest.raises(CliError, match="CDP_INGEST_ADDR"):
        resolve_address("ingest", tmp_path, environ={})


def test_stale_stack_file_is_reported(tmp_path: Path) -> None:
    write_stack_file(tmp_path, {"ingest": "127.0.0.1:1"}, pid=2**22 + 12345)  # above pid_max's default
    with pytest.raises(CliError, match="stale"):
        resolve_address("ingest", tmp_path, environ={})


def test_service_missing_from_stack_file(tmp_path: Path) -> None:
    write_stack_file(tmp_path, {"ingest": "127.0.0.1:1"})
    with pytest.raises(CliError, match="runs without it"):
        resolve_address("activation", tmp_path, environ={})


def test_addr_option_is_validated() -> None:
    assert parse_addr_option(["ingest=h:1"]) == {"ingest": "h:1"}
    for bad in ("ingest", "nope=h:1", "ingest="):
        with pytest.raises(CliError, match="SERVICE=HOST:PORT"):
            parse_addr_option([bad])


# --------------------------------------------------------------------------- errors


def test_grpc_error_is_one_line_with_exit_code_1(tmp_path: Path) -> None:
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    result = invoke(["--data-dir", str(tmp_path), "schema", "list"], env={"CDP_INGEST_ADDR": address})
    assert result.exit_code == 1
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: ingest at {address}: UNAVAILABLE: ")
    assert "Traceback" not in result.output


def test_cli_error_without_stack_is_one_line(tmp_path: Path) -> None:
    result = invoke(["--data-dir", str(tmp_path), "dataset", "list"])
    assert result.exit_code == 1
    assert result.stderr.startswith("error: no address for ingest")
    assert len(result.stderr.strip().splitlines()) == 1


def test_bad_identity_argument(tmp_path: Path) -> None:
    result = invoke(["--addr", "segmentation=127.0.0.1:1", "profile", "get", "email:"])
    assert result.exit_code == 1
    assert "expected NAMESPACE:VALUE" in result.stderr
    resolved = invoke(["--addr", "identity=127.0.0.1:1", "identity", "resolve", "no-colon"])
    assert resolved.exit_code == 1
    assert "expected NAMESPACE:VALUE" in resolved.stderr


# --------------------------------------------------------------------------- a fake ingest service


@dataclass
class FakeIngest(ingest_pb2_grpc.IngestServiceServicer):
    schemas: list[ingest_pb2.Schema] = field(default_factory=list)
    chunks: list[ingest_pb2.IngestFileChunk] = field(default_factory=list)
    publish_sizes: list[int] = field(default_factory=list)
    batch_status: ingest_pb2.BatchStatus.ValueType = ingest_pb2.BATCH_STATUS_COMPLETED

    @override
    def CreateSchema(self, request: ingest_pb2.CreateSchemaRequest, context: grpc.ServicerContext) -> ingest_pb2.Schema:
        schema = ingest_pb2.Schema()
        schema.CopyFrom(request.schema)
        schema.version = 1
        self.schemas.append(schema)
        return schema

    @override
    def GetSchema(self, request: ingest_pb2.GetSchemaRequest, context: grpc.ServicerContext) -> ingest_pb2.Schema:
        context.abort(grpc.StatusCode.NOT_FOUND, f"schema {request.name} does not exist")
        raise AssertionError("unreachable")

    @override
    def ListSchemas(
        self, request: ingest_pb2.ListSchemasRequest, context: grpc.ServicerContext
    ) -> ingest_pb2.ListSchemasResponse:
        return ingest_pb2.ListSchemasResponse(schemas=self.schemas)

    @override
    def CreateDataset(
        self, request: ingest_pb2.CreateDatasetRequest, context: grpc.ServicerContext
    ) -> ingest_pb2.Dataset:
        return request.dataset

    @override
    def ListDatasets(
        self, request: ingest_pb2.ListDatasetsRequest, context: grpc.ServicerContext
    ) -> ingest_pb2.ListDatasetsResponse:
        return ingest_pb2.ListDatasetsResponse()

    @override
    def IngestFile(
        self, request_iterator: Iterable[ingest_pb2.IngestFileChunk], context: grpc.ServicerContext
    ) -> ingest_pb2.BatchReport:
        self.chunks = list(request_iterator)
        header = self.chunks[0].header
        return ingest_pb2.BatchReport(
            batch_id="b-1",
            batch_key=header.batch_key,
            dataset=header.dataset,
            status=self.batch_status,
            rows_read=3,
            rows_accepted=2,
            rows_rejected=1,
            rejects=[ingest_pb2.RejectGroup(field="email", rule="required", count=1, first_rows=[2])],
            failure="too many rejected rows" if self.batch_status == ingest_pb2.BATCH_STATUS_FAILED else "",
        )

    @override
    def GetBatch(self, request: ingest_pb2.GetBatchRequest, context: grpc.ServicerContext) -> ingest_pb2.BatchReport:
        return ingest_pb2.BatchReport(batch_id=request.batch_id)

    @override
    def PublishEvents(
        self, request: ingest_pb2.PublishEventsRequest, context: grpc.ServicerContext
    ) -> ingest_pb2.PublishEventsResponse:
        self.publish_sizes.append(len(request.events))
        results = [self._result(index, event["n"]) for index, event in enumerate(request.events)]
        return ingest_pb2.PublishEventsResponse(results=results)

    @staticmethod
    def _result(index: int, number: object) -> ingest_pb2.EventResult:
        n = int(number) if isinstance(number, float) else 0
        if n % 100 == 0:
            error = ingest_pb2.FieldError(field="n", rule="maximum", message="too round")
            return ingest_pb2.EventResult(index=index, status=ingest_pb2.EVENT_STATUS_REJECTED, errors=[error])
        status = ingest_pb2.EVENT_STATUS_DUPLICATE if n % 10 == 0 else ingest_pb2.EVENT_STATUS_ACCEPTED
        return ingest_pb2.EventResult(index=index, status=status, event_id=f"e{n}")


class FakeAdmin(admin_pb2_grpc.AdminServiceServicer):
    def __init__(self) -> None:
        self.consumer = admin_pb2.ConsumerStatus(
            name="ingest-events",
            stream="CDP_INGEST",
            applied_sequence=3,
            stream_last_sequence=5,
            lag=2,
            state="lagging",
        )

    @override
    def GetStatus(self, request: admin_pb2.GetStatusRequest, context: grpc.ServicerContext) -> admin_pb2.ServiceStatus:
        return admin_pb2.ServiceStatus(service="ingest", version="0.1.0", ready=True, consumers=[self.consumer])


@dataclass
class FakeServer:
    address: str
    ingest: FakeIngest
    admin: FakeAdmin

    def env(self) -> dict[str, str | None]:
        return {"CDP_INGEST_ADDR": self.address}


@pytest.fixture
def fake_server() -> Iterator[FakeServer]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    fake = FakeIngest()  # type: ignore[abstract]  # only the RPCs the CLI tests call
    ingest_pb2_grpc.add_IngestServiceServicer_to_server(fake, server)
    admin = FakeAdmin()
    admin_pb2_grpc.add_AdminServiceServicer_to_server(admin, server)
    checker = health.HealthServicer()
    checker.set("", health_pb2.HealthCheckResponse.SERVING)
    checker.set("liveness", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(checker, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield FakeServer(f"127.0.0.1:{port}", fake, admin)
    finally:
        server.stop(0)


SCHEMA_YAML = """
name: crm
schema_class: SCHEMA_CLASS_PROFILE
fields:
  - {name: crm_id, type: FIELD_TYPE_STRING, required: true, identity_namespace: crm_id}
  - {name: email, type: FIELD_TYPE_STRING, identity_namespace: email}
  - {name: tier, type: FIELD_TYPE_STRING, enum_values: [gold, silver]}
"""


def test_schema_create_from_yaml(tmp_path: Path, fake_server: FakeServer) -> None:
    path = tmp_path / "crm.yaml"
    path.write_text(SCHEMA_YAML)
    result = invoke(["schema", "create", str(path)], env=fake_server.env())
    assert result.exit_code == 0, result.output
    assert "schema crm v1 registered (profile, 3 fields)" in result.stdout
    sent = fake_server.ingest.schemas[0]
    assert sent.fields[0].identity_namespace == "crm_id"
    assert list(sent.fields[2].enum_values) == ["gold", "silver"]

    listed = invoke(["schema", "list", "--json"], env=fake_server.env())
    assert listed.exit_code == 0, listed.output
    assert json.loads(listed.stdout)["schemas"][0]["schema_class"] == "SCHEMA_CLASS_PROFILE"


def test_schema_create_names_the_bad_field(tmp_path: Path, fake_server: FakeServer) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"name": "x", "fields": [{"name": "a", "type": "FIELD_TYPE_TEXT"}]}))
    result = invoke(["schema", "create", str(path)], env=fake_server.env())
    assert result.exit_code == 1
    assert "fields[0].type: 'FIELD_TYPE_TEXT' is not a FieldType" in result.stderr
    assert "valid: " in result.stderr
    assert "string" in result.stderr


def test_not_found_is_rendered_with_its_details(fake_server: FakeServer) -> None:
    result = invoke(["schema", "get", "nope"], env=fake_server.env())
    assert result.exit_code == 1
    assert result.stderr.strip() == f"error: ingest at {fake_server.address}: NOT_FOUND: schema nope does not exist"


def test_ingest_streams_header_then_256k_chunks(tmp_path: Path, fake_server: FakeServer) -> None:
    path = tmp_path / "crm.csv"
    content = b"crm_id,email\n" + b"".join(b"c%06d,x%06d@example.com\n" % (i, i) for i in range(25_000))
    path.write_bytes(content)
    result = invoke(["ingest", str(path), "--dataset", "crm", "--json"], env=fake_server.env())
    assert result.exit_code == 0, result.output

    header, *data = fake_server.ingest.chunks
    assert header.WhichOneof("part") == "header"
    assert header.header.dataset == "crm"
    assert header.header.format == ingest_pb2.FILE_FORMAT_CSV
    assert header.header.file_name == "crm.csv"
    assert header.header.batch_key == f"crm.csv:{hashlib.sha256(content).hexdigest()}"
    assert [len(c.data) for c in data[:-1]] == [inputs.CHUNK_BYTES] * (len(data) - 1)
    assert b"".join(c.data for c in data) == content
    report = json.loads(result.stdout)
    assert report["batch_id"] == "b-1"
    assert report["rows_rejected"] == "1"


def test_ingest_failed_batch_exits_1(tmp_path: Path, fake_server: FakeServer) -> None:
    fake_server.ingest.batch_status = ingest_pb2.BATCH_STATUS_FAILED
    path = tmp_path / "rows.data"
    path.write_text('{"a": 1}\n')
    result = invoke(
        ["ingest", str(path), "--dataset", "d", "--format", "jsonl", "--batch-key", "k1"], env=fake_server.env()
    )
    assert result.exit_code == 1
    assert fake_server.ingest.chunks[0].header.batch_key == "k1"
    assert fake_server.ingest.chunks[0].header.format == ingest_pb2.FILE_FORMAT_JSONL
    assert "too many rejected rows" in result.stderr


def test_ingest_needs_a_format_it_can_tell(tmp_path: Path, fake_server: FakeServer) -> None:
    path = tmp_path / "rows.data"
    path.write_text("x\n")
    result = invoke(["ingest", str(path), "--dataset", "d"], env=fake_server.env())
    assert result.exit_code == 1
    assert "--format" in result.stderr


def test_events_send_batches_of_500_and_counts(tmp_path: Path, fake_server: FakeServer) -> None:
    path = tmp_path / "events.jsonl"
    lines = [json.dumps({"n": n, "type": "page_view"}) for n in range(1, 1202)]
    path.write_text("\n".join(lines[:600]) + "\n\n" + "\n".join(lines[600:]) + "\n")
    result = invoke(["events", "send", str(path), "--dataset", "web", "--json"], env=fake_server.env())
    assert result.exit_code == 0, result.output
    assert fake_server.ingest.publish_sizes == [500, 500, 201]
    totals = json.loads(result.stdout)
    assert totals["rejected"] == 12
    assert totals["duplicate"] == 120 - 12
    assert totals["accepted"] == 1201 - 120
    assert totals["rejections"][0]["line"] == 100
    assert totals["rejections"][6]["line"] == 701  # the blank line shifts later lines by one


def test_events_send_names_a_bad_line(tmp_path: Path, fake_server: FakeServer) -> None:
    path = tmp_path / "events.jsonl"
    path.write_text('{"n": 1}\n{oops\n')
    result = invoke(["events", "send", str(path), "--dataset", "web"], env=fake_server.env())
    assert result.exit_code == 1
    assert f"{path}:2: not valid JSON" in result.stderr


def test_status_json_shows_health_and_lag(tmp_path: Path, fake_server: FakeServer) -> None:
    write_stack_file(tmp_path, {"ingest": fake_server.address})
    result = invoke(["status", "--data-dir", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    ingest = json.loads(result.stdout)["services"]["ingest"]
    assert ingest["health"] == "SERVING"
    consumer = ingest["status"]["consumers"][0]
    assert ingest["liveness"] == "SERVING"
    # Sequences and lags are numbers (canonical protobuf JSON would write 64-bit integers as strings).
    assert (consumer["applied_sequence"], consumer["stream_last_sequence"], consumer["lag"]) == (3, 5, 2)
    assert consumer["state"] == "lagging"
    assert consumer["error"] == ""


def test_status_exits_1_and_names_a_stuck_consumer(tmp_path: Path, fake_server: FakeServer) -> None:
    fake_server.admin.consumer.state = "stuck"
    fake_server.admin.consumer.stalled_seconds = 75.0
    fake_server.admin.consumer.error = "append to cdp.profile.0.fragments failed: message size exceeds maximum"
    write_stack_file(tmp_path, {"ingest": fake_server.address})
    for args in (["status"], ["status", "--json"]):
        result = invoke(["--data-dir", str(tmp_path), *args])
        assert result.exit_code == 1, result.output
        assert "ingest: consumer ingest-events is stuck (75 s without progress)" in result.stderr
        assert "message size exceeds maximum" in result.stderr
    table = invoke(["--data-dir", str(tmp_path), "status"])
    assert "stuck" in table.stdout
    assert "message size exceeds maximum" in table.stdout


def test_status_reports_an_unreachable_service_and_exits_1(tmp_path: Path, fake_server: FakeServer) -> None:
    dead = f"127.0.0.1:{free_port()}"
    write_stack_file(tmp_path, {"ingest": fake_server.address, "identity": dead})
    result = invoke(["--data-dir", str(tmp_path), "status"])
    assert result.exit_code == 1
    assert "SERVING" in result.stdout
    assert "UNREACHABLE" in result.stdout
    assert "ingest-events" in result.stdout


# --------------------------------------------------------------------------- argument parsing


def test_destination_config_pairs() -> None:
    config = inputs.parse_config(["path=/tmp/out", "batch_size:=100", "hash:=true", 'fields:=["a","b"]', "x=a=b"])
    assert dict(config) == {"path": "/tmp/out", "batch_size": 100.0, "hash": True, "fields": ["a", "b"], "x": "a=b"}
    with pytest.raises(CliError, match="KEY=VALUE"):
        inputs.parse_config(["novalue"])
    with pytest.raises(CliError, match="must be JSON"):
        inputs.parse_config(["n:=nope"])


def test_split_list_and_identity() -> None:
    assert inputs.split_list(" a, b,,c ") == ["a", "b", "c"]
    assert inputs.split_list(None) == []
    identity = inputs.parse_identity("email:Ann@Example.com")
    assert (identity.namespace, identity.value) == ("email", "Ann@Example.com")


def test_client_closes_its_channels(tmp_path: Path, fake_server: FakeServer) -> None:
    with Client(tmp_path, {"ingest": fake_server.address}) as client:
        reply = client.ingest.ListSchemas(ingest_pb2.ListSchemasRequest(), timeout=5)
        assert list(reply.schemas) == []
        assert client.health("ingest").Check(health_pb2.HealthCheckRequest(), timeout=5).status == 1
