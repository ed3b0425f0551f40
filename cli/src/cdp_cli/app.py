"""``cdp``: run the embedded stack and drive the services over gRPC.

Every read command takes ``--json`` and prints the protobuf answer in its canonical JSON
form. Failed calls print one line, ``error: <service> at <address>: <CODE>: <details>``,
and exit with code 1.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Annotated, Any

import grpc
import typer
from grpc_health.v1 import health_pb2
from rich.logging import RichHandler
from typer.core import TyperGroup

from cdp.activation.v1 import activation_pb2
from cdp.common.v1 import admin_pb2
from cdp.identity.v1 import identity_pb2
from cdp.ingest.v1 import ingest_pb2
from cdp.segmentation.v1 import segmentation_pb2
from cdp_cli import (
    cmd_activation,
    cmd_admin,
    cmd_deadletters,
    cmd_identity,
    cmd_ingest,
    cmd_publish,
    cmd_segmentation,
    inputs,
    render,
)
from cdp_cli.client import (
    DEFAULT_TIMEOUT_S,
    SERVICES,
    UNREACHABLE,
    Client,
    describe_rpc_error,
    parse_addr_option,
    rpc_code,
)
from cdp_cli.errors import CliError
from cdp_cli.stack import Stack
from cdp_cli.wait import STUCK, Stage, wait_applied

SERVING = "SERVING"
LIVENESS = "liveness"  # cdp_kit.grpc_server.LIVENESS: the CLI does not import the kit


@dataclass
class AppState:
    """Global options, and the client built from them on first use."""

    data_dir: Path
    addresses: dict[str, str]
    timeout: float
    _client: Client | None = field(default=None, repr=False)

    def use_data_dir(self, override: Path | None) -> None:
        if override is not None:
            self.data_dir = override

    def client(self) -> Client:
        if self._client is None:
            self._client = Client(self.data_dir, self.addresses, timeout=self.timeout)
        return self._client

    def describe(self, err: grpc.RpcError) -> str:
        return self._client.describe_failure(err) if self._client else describe_rpc_error(err)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


class CdpGroup(TyperGroup):
    """Renders expected failures (gRPC errors, bad input) as one line and exit code 1."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except grpc.RpcError as exc:
            state = ctx.obj if isinstance(ctx.obj, AppState) else None
            render.error(state.describe(exc) if state else describe_rpc_error(exc))
            raise typer.Exit(1) from None
        except CliError as exc:
            headline, _, detail = exc.message.partition("\n")
            render.error(headline)
            if detail:
                render.detail(detail)
            raise typer.Exit(1) from None
        finally:
            if isinstance(ctx.obj, AppState):
                ctx.obj.close()


def _group(help_text: str) -> typer.Typer:
    return typer.Typer(help=help_text, no_args_is_help=True, add_completion=False)


app = typer.Typer(
    cls=CdpGroup,
    help="The customer data platform from the command line: run the stack, define data, audiences, activations.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
schema_app = _group("Schemas: the typed fields that datasets are validated against.")
dataset_app = _group("Datasets: where batches and events land, each bound to a schema.")
events_app = _group("Online events, published to a dataset.")
segment_app = _group("Segments: audiences defined over profiles and events.")
profile_app = _group("Unified profiles.")
identity_app = _group("The identity graph.")
destination_app = _group("Destinations that audiences are activated to.")
app.add_typer(schema_app, name="schema")
app.add_typer(dataset_app, name="dataset")
app.add_typer(events_app, name="events")
app.add_typer(segment_app, name="segment")
app.add_typer(profile_app, name="profile")
app.add_typer(identity_app, name="identity")
app.add_typer(destination_app, name="destination")
app.add_typer(cmd_activation.deliveries_app, name="deliveries")
app.add_typer(cmd_activation.app, name="governance")
app.add_typer(cmd_ingest.batch_app, name="batch")
app.add_typer(cmd_deadletters.app, name="deadletters")
app.add_typer(cmd_admin.app, name="admin")
events_app.command("publish")(cmd_publish.events_publish)

JsonFlag = Annotated[bool, typer.Option("--json", help="Print the answer as JSON.")]
DataDirOverride = Annotated[
    Path | None, typer.Option("--data-dir", help="Data folder (overrides the global --data-dir).", show_default=False)
]


@app.callback()
def root(
    ctx: typer.Context,
    data_dir: Annotated[
        Path, typer.Option("--data-dir", envvar="CDP_DATA_DIR", help="Data folder of the local stack (stack.json).")
    ] = Path(".cdp"),
    addr: Annotated[
        list[str] | None,
        typer.Option("--addr", metavar="SERVICE=HOST:PORT", help="A service address; beats CDP_<SERVICE>_ADDR."),
    ] = None,
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds each call may take.")] = DEFAULT_TIMEOUT_S,
) -> None:
    """The customer data platform from the command line."""
    ctx.obj = AppState(data_dir=data_dir, addresses=parse_addr_option(addr or []), timeout=timeout)


def _state(ctx: typer.Context) -> AppState:
    state = ctx.find_object(AppState)
    if state is None:  # a sub-command invoked on its own, without the root callback
        state = AppState(Path(".cdp"), {}, DEFAULT_TIMEOUT_S)
        ctx.obj = state
    return state


def _client(ctx: typer.Context) -> Client:
    return _state(ctx).client()


# --------------------------------------------------------------------------- up


@app.command()
def up(
    ctx: typer.Context,
    data_dir: DataDirOverride = None,
    services: Annotated[str, typer.Option("--services", help="Comma-separated services to start.")] = ",".join(
        SERVICES
    ),
    ready_timeout: Annotated[float, typer.Option("--ready-timeout", help="Seconds each may take to be ready.")] = 90.0,
) -> None:
    """Start nats-server and the services on loopback ports, and supervise them until Ctrl-C."""
    state = _state(ctx)
    state.use_data_dir(data_dir)
    stack = Stack(state.data_dir, inputs.split_list(services), ready_timeout_s=ready_timeout)
    _log_supervisor_to_console()
    with _interrupt_on_sigterm():
        try:
            with render.err.status(f"starting the stack in {state.data_dir} …"):
                stack.start()
            _print_stack(stack)
            _wait_forever()
        except KeyboardInterrupt:
            render.err.print("stopping …")
        finally:
            _ignore_signals()
            stack.stop()
    render.err.print("stopped")


def _log_supervisor_to_console() -> None:
    logger = logging.getLogger("cdp_cli.stack")
    if not any(isinstance(h, RichHandler) for h in logger.handlers):
        logger.addHandler(RichHandler(console=render.err, show_path=False))
    logger.setLevel(logging.WARNING)


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def _interrupt_on_sigterm() -> Iterator[None]:
    """SIGTERM stops `cdp up` like Ctrl-C does; the previous handlers come back afterwards."""
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGINT, _raise_interrupt)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _ignore_signals() -> None:
    """While stopping, a second Ctrl-C must not cut the shutdown short."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _wait_forever() -> None:
    forever = threading.Event()
    while not forever.wait(1.0):
        pass


def _print_stack(stack: Stack) -> None:
    pids = stack.pids
    rows = [("nats", stack.nats_url, pids.get("nats"), stack.logs_dir / "nats.log")]
    rows += [
        (name, address, pids.get(name), stack.logs_dir / f"{name}.log") for name, address in stack.addresses.items()
    ]
    render.print_table(f"cdp stack in {stack.data_dir}", ["process", "address", "pid", "log"], rows)
    render.out.print(f"addresses written to {stack.stack_file}; press Ctrl-C to stop")


# --------------------------------------------------------------------------- status


@dataclass
class ServiceReport:
    service: str
    address: str
    health: str
    live: str = UNREACHABLE
    status: admin_pb2.ServiceStatus | None = None
    error: str | None = None

    def stuck(self) -> list[admin_pb2.ConsumerStatus]:
        return [c for c in self.status.consumers if c.state == STUCK] if self.status else []

    def as_dict(self) -> dict[str, Any]:
        return {
            "address": self.address,
            "health": self.health,
            "liveness": self.live,
            "status": render.message_dict(self.status, int64_as_number=True) if self.status is not None else None,
            "error": self.error,
        }


def _health_of(client: Client, service: str, name: str) -> str:
    """The status name a health check of ``name`` answers; UNKNOWN when the server does not know
    the name (a version from before the liveness check)."""
    try:
        reply = client.health(service).Check(health_pb2.HealthCheckRequest(service=name), timeout=client.timeout)
    except grpc.RpcError as exc:
        if rpc_code(exc) == grpc.StatusCode.NOT_FOUND:
            return "UNKNOWN"
        raise
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


def _service_report(client: Client, service: str, address: str) -> ServiceReport:
    report = ServiceReport(service, address, UNREACHABLE)
    try:
        # "" answers readiness: recovered, NATS connected, no consumer stuck.
        report.health = _health_of(client, service, "")
        report.live = _health_of(client, service, LIVENESS)
        report.status = client.admin(service).GetStatus(admin_pb2.GetStatusRequest(), timeout=client.timeout)
    except grpc.RpcError as exc:
        report.error = describe_rpc_error(exc)
    return report


@app.command()
def status(ctx: typer.Context, data_dir: DataDirOverride = None, as_json: JsonFlag = False) -> None:
    """Health of each service and, per consumer, its state, the applied sequence, the last sequence
    on its filter and the lag. Exit code 1 when a service is not SERVING or a consumer is stuck."""
    state = _state(ctx)
    state.use_data_dir(data_dir)
    client = state.client()
    reports = [_service_report(client, name, address) for name, address in client.addresses().items()]
    if as_json:
        render.print_json({"services": {r.service: r.as_dict() for r in reports}})
    else:
        _print_status(reports)
    for r in reports:
        for c in r.stuck():
            render.error(
                f"{r.service}: consumer {c.name} is stuck ({c.stalled_seconds:.0f} s without progress): {c.error}"
            )
    if any(r.health != SERVING or r.stuck() for r in reports):
        raise typer.Exit(1)


def _print_status(reports: list[ServiceReport]) -> None:
    render.print_table(
        "services",
        ["service", "address", "health", "live", "ready", "version", "error"],
        [
            (
                r.service,
                r.address,
                r.health,
                r.live,
                r.status.ready if r.status else None,
                r.status.version if r.status else "",
                r.error,
            )
            for r in reports
        ],
    )
    consumers = [(r.service, c) for r in reports if r.status for c in r.status.consumers]
    if consumers:
        render.print_table(
            "consumers",
            ["service", "consumer", "stream", "state", "applied", "last", "lag", "stalled s", "gaps", "dead", "error"],
            [
                (
                    s,
                    c.name,
                    c.stream,
                    c.state,
                    c.applied_sequence,
                    c.stream_last_sequence,
                    c.lag,
                    f"{c.stalled_seconds:.0f}",
                    c.gaps,
                    c.dead_letters,
                    c.error,
                )
                for s, c in consumers
            ],
        )
    own_logs = [(r.service, o) for r in reports if r.status for o in r.status.own_logs]
    if own_logs:
        render.print_table(
            "own logs",
            ["service", "stream", "subject", "folded"],
            [(s, o.stream, o.subject, o.folded_sequence) for s, o in own_logs],
        )


# --------------------------------------------------------------------------- schemas and datasets


def _field_identities(schema: ingest_pb2.Schema) -> list[str]:
    return [f"{f.name}→{f.identity_namespace}" for f in schema.fields if f.identity_namespace]


def _schema_class(schema: ingest_pb2.Schema) -> str:
    return render.enum_label(ingest_pb2.SchemaClass.Name(schema.schema_class), "SCHEMA_CLASS_")


@schema_app.command("create")
def schema_create(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(help="JSON or YAML file holding a cdp.ingest.v1.Schema.")],
    as_json: JsonFlag = False,
) -> None:
    """Register a schema (or a compatible new version of one)."""
    schema = inputs.parse_schema(file)
    client = _client(ctx)
    reply = client.ingest.CreateSchema(ingest_pb2.CreateSchemaRequest(schema=schema), timeout=client.timeout)
    if as_json:
        render.print_message(reply)
        return
    render.success(
        f"schema {reply.name} v{reply.version} registered ({_schema_class(reply)}, {len(reply.fields)} fields)"
    )


@schema_app.command("get")
def schema_get(
    ctx: typer.Context,
    name: str,
    version: Annotated[int, typer.Option("--version", help="0 = the latest.")] = 0,
    as_json: JsonFlag = False,
) -> None:
    """Show one schema and its fields."""
    client = _client(ctx)
    reply = client.ingest.GetSchema(ingest_pb2.GetSchemaRequest(name=name, version=version), timeout=client.timeout)
    if as_json:
        render.print_message(reply)
        return
    render.print_table(
        f"{reply.name} v{reply.version} ({_schema_class(reply)})",
        ["field", "type", "required", "identity"],
        [
            (
                f.name,
                render.enum_label(ingest_pb2.FieldType.Name(f.type), "FIELD_TYPE_"),
                f.required,
                f.identity_namespace,
            )
            for f in reply.fields
        ],
    )


@schema_app.command("list")
def schema_list(ctx: typer.Context, as_json: JsonFlag = False) -> None:
    """List the schemas (latest versions)."""
    client = _client(ctx)
    reply = client.ingest.ListSchemas(ingest_pb2.ListSchemasRequest(), timeout=client.timeout)
    if as_json:
        render.print_message(reply)
        return
    render.print_table(
        "schemas",
        ["name", "version", "class", "fields", "identities"],
        [(s.name, s.version, _schema_class(s), len(s.fields), _field_identities(s)) for s in reply.schemas],
    )


@dataset_app.command("create")
def dataset_create(
    ctx: typer.Context,
    name: str,
    schema: Annotated[str, typer.Option("--schema", help="Name of the schema rows are validated against.")],
    profile_enabled: Annotated[
        bool,
        typer.Option(
            "--profile-enabled", help="Recorded on the dataset (every dataset's records feed unified profiles today)."
        ),
    ] = False,
    retention_days: Annotated[
        int, typer.Option("--retention-days", help="Event datasets: days events count (0 = forever).")
    ] = 0,
    unknown_fields: Annotated[
        str, typer.Option("--unknown-fields", help="reject or drop fields the schema does not know.")
    ] = "reject",
    allow_anonymous_rows: Annotated[
        bool,
        typer.Option(
            "--allow-anonymous-rows",
            help="Keep rows with no usable identity value (they link to no one) instead of rejecting them.",
        ),
    ] = False,
    as_json: JsonFlag = False,
) -> None:
    """Create a dataset bound to a schema."""
    policies = {"reject": ingest_pb2.UNKNOWN_FIELDS_REJECT, "drop": ingest_pb2.UNKNOWN_FIELDS_DROP}
    if unknown_fields not in policies:
        raise CliError(f"--unknown-fields {unknown_fields!r}: use reject or drop")
    dataset = ingest_pb2.Dataset(
        name=name,
        schema_name=schema,
        profile_enabled=profile_enabled,
        retention_seconds=retention_days * 86_400,
        unknown_fields=policies[unknown_fields],
        allow_anonymous_rows=allow_anonymous_rows,
    )
    client = _client(ctx)
    reply = client.ingest.CreateDataset(ingest_pb2.CreateDatasetRequest(dataset=dataset), timeout=client.timeout)
    if as_json:
        render.print_message(reply)
        return
    profile = ", profile-enabled" if reply.profile_enabled else ""
    render.success(f"dataset {reply.name} created (schema {reply.schema_name}{profile})")


@dataset_app.command("list")
def dataset_list(ctx: typer.Context, as_json: JsonFlag = False) -> None:
    """List the datasets."""
    client = _client(ctx)
    reply = client.ingest.ListDatasets(ingest_pb2.ListDatasetsRequest(), timeout=client.timeout)
    if as_json:
        render.print_message(reply)
        return
    render.print_table(
        "datasets",
        ["name", "schema", "profile", "retention (days)", "unknown fields", "anonymous rows"],
        [
            (
                d.name,
                d.schema_name,
                d.profile_enabled,
                d.retention_seconds // 86_400 if d.retention_seconds else "forever",
                render.enum_label(ingest_pb2.UnknownFields.Name(d.unknown_fields), "UNKNOWN_FIELDS_"),
                "kept" if d.allow_anonymous_rows else "rejected",
            )
            for d in reply.datasets
        ],
    )


# --------------------------------------------------------------------------- ingest


@app.command()
def ingest(
    ctx: typer.Context,
    path: Annotated[Path, typer.Argument(help="The file to ingest.", exists=True, dir_okay=False, readable=True)],
    dataset: Annotated[str, typer.Option("--dataset", help="The dataset it lands in.")],
    batch_key: Annotated[
        str | None, typer.Option("--batch-key", help="Idempotency key (default: file name + sha256).")
    ] = None,
    fmt: Annotated[
        str | None, typer.Option("--format", help="csv, jsonl or parquet (default: from the suffix).")
    ] = None,
    error_threshold: Annotated[
        float | None, typer.Option("--error-threshold", help="Share of rejected rows that fails the batch.")
    ] = None,
    wait: Annotated[
        bool,
        typer.Option(
            "--wait", help="Then wait until identity, segmentation and activation have applied what the batch caused."
        ),
    ] = False,
    wait_timeout: Annotated[
        float, typer.Option("--wait-timeout", help="Seconds --wait may take before it fails.")
    ] = 300.0,
    as_json: JsonFlag = False,
) -> None:
    """Upload a batch file to a dataset and print its report; exit code 1 when the batch failed, or
    with --wait when a downstream stage is stuck or does not finish in time."""
    header = ingest_pb2.IngestFileHeader(
        dataset=dataset,
        batch_key=batch_key or inputs.default_batch_key(path),
        format=inputs.file_format(path, fmt),
        file_name=path.name,
    )
    if error_threshold is not None:
        header.error_threshold = error_threshold
    report = _upload(_client(ctx), path, header)
    if as_json:
        render.print_message(report)
    else:
        _print_batch_report(report)
    if report.status == ingest_pb2.BATCH_STATUS_FAILED:
        raise typer.Exit(1)
    if wait:
        _wait_downstream(_client(ctx), wait_timeout)


def _wait_downstream(client: Client, timeout_s: float) -> None:
    """Progress goes to stderr, so that stdout keeps only the report (--json stays parseable)."""

    def done(stage: Stage, target: int) -> None:
        render.err.print(f"✓ {stage.name}: applied up to sequence {target}", soft_wrap=True)

    with render.err.status("waiting for the services downstream …"):
        wait_applied(client, timeout_s, on_stage=done)


def _upload(client: Client, path: Path, header: ingest_pb2.IngestFileHeader) -> ingest_pb2.BatchReport:
    return cmd_ingest.upload(client, path, header)


def _print_batch_report(report: ingest_pb2.BatchReport) -> None:
    state = render.enum_label(ingest_pb2.BatchStatus.Name(report.status), "BATCH_STATUS_")
    render.print_table(
        f"batch {report.batch_id}",
        ["dataset", "status", "read", "accepted", "rejected", "duplicate rows", "batch re-sent"],
        [
            (
                report.dataset,
                state,
                report.rows_read,
                report.rows_accepted,
                report.rows_rejected,
                report.rows_duplicate,
                report.duplicate,
            )
        ],
    )
    if report.rejects:
        render.print_table(
            "rejected rows",
            ["field", "rule", "count", "first rows"],
            [(g.field, g.rule, g.count, list(g.first_rows)) for g in report.rejects],
        )
    if report.failure:
        render.error(f"batch failed: {report.failure}")


# --------------------------------------------------------------------------- events


@dataclass
class SendTotals:
    accepted: int = 0
    duplicate: int = 0
    rejected: int = 0
    rejections: list[dict[str, Any]] = field(default_factory=list)

    def add(self, result: ingest_pb2.EventResult, line: int) -> None:
        if result.status == ingest_pb2.EVENT_STATUS_ACCEPTED:
            self.accepted += 1
        elif result.status == ingest_pb2.EVENT_STATUS_DUPLICATE:
            self.duplicate += 1
        else:
            self.rejected += 1
            errors = [render.message_dict(e) for e in result.errors]
            self.rejections.append({"line": line, "event_id": result.event_id, "errors": errors})


@events_app.command("send")
def events_send(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(help="JSON lines, one event object per line.")],
    dataset: Annotated[str, typer.Option("--dataset", help="The event dataset they land in.")],
    as_json: JsonFlag = False,
) -> None:
    """Publish events from a JSON-lines file, in calls of 500."""
    events = inputs.read_event_lines(file)
    client = _client(ctx)
    totals = SendTotals()
    for batch in inputs.batched(events):
        request = ingest_pb2.PublishEventsRequest(dataset=dataset, events=[e.event for e in batch])
        reply = client.ingest.PublishEvents(request, timeout=client.timeout)
        for result in reply.results:
            totals.add(result, batch[result.index].line if result.index < len(batch) else 0)
    if as_json:
        render.print_json(
            {
                "accepted": totals.accepted,
                "duplicate": totals.duplicate,
                "rejected": totals.rejected,
                "rejections": totals.rejections,
            }
        )
        return
    render.print_table(
        f"events from {file.name}",
        ["accepted", "duplicate", "rejected"],
        [(totals.accepted, totals.duplicate, totals.rejected)],
    )
    _print_rejections(totals.rejections)


def _print_rejections(rejections: list[dict[str, Any]], limit: int = 20) -> None:
    rows = [
        (r["line"], e.get("field", ""), e.get("rule", ""), e.get("message", ""))
        for r in rejections[:limit]
        for e in (r["errors"] or [{}])
    ]
    if rows:
        render.print_table("rejected events", ["line", "field", "rule", "message"], rows)
    if len(rejections) > limit:
        render.warn(f"{len(rejections) - limit} more rejected events not shown (use --json)")


# --------------------------------------------------------------------------- segments and profiles


def _evaluation(segment: segmentation_pb2.Segment) -> str:
    return render.enum_label(segmentation_pb2.Evaluation.Name(segment.evaluation), "EVALUATION_")


@segment_app.command("create")
def segment_create(
    ctx: typer.Context,
    name: str,
    query: Annotated[str, typer.Argument(help='The definition, e.g. loyalty.tier = "gold".')],
    as_json: JsonFlag = False,
) -> None:
    """Define a segment; the answer says whether it is evaluated streaming or batch, and why."""
    client = _client(ctx)
    request = segmentation_pb2.CreateSegmentRequest(name=name, query=query)
    reply = client.segmentation.CreateSegment(request, timeout=client.timeout)
    if as_json:
        render.print_message(reply)
        return
    render.success(f"segment {reply.name} created (id {reply.id})")
    render.out.print(f"evaluation: {_evaluation(reply)} — {reply.evaluation_reason}", soft_wrap=True)


@segment_app.command("get")
def segment_get(ctx: typer.Context, segment: str, as_json: JsonFlag = False) -> None:
    """Show one segment (by name or id)."""
    client = _client(ctx)
    reply = client.segmentation.GetSegment(segmentation_pb2.GetSegmentRequest(segment=segment), timeout=client.timeout)
    if as_json:
        render.print_message(reply)
        return
    _print_segments([reply])


@segment_app.command("list")
def segment_list(ctx: typer.Context, as_json: JsonFlag = False) -> None:
    """List the segments with their size and evaluation mode."""
    client = _client(ctx)
    reply = client.segmentation.ListSegments(segmentation_pb2.ListSegmentsRequest(), timeout=client.timeout)
    if as_json:
        render.print_message(reply)
        return
    _print_segments(list(reply.segments))


def _print_segments(segments: list[segmentation_pb2.Segment]) -> None:
    render.print_table(
        "segments",
        ["name", "id", "size", "evaluation", "query", "created"],
        [(s.name, s.id, s.size, _evaluation(s), s.query, s.created_at) for s in segments],
    )


@segment_app.command("members")
def segment_members(
    ctx: typer.Context,
    segment: Annotated[str, typer.Argument(help="Segment name or id.")],
    limit: Annotated[
        int, typer.Option("--limit", help="At most this many profile ids (0 = the server's default).")
    ] = 0,
    as_json: JsonFlag = False,
) -> None:
    """List the profile ids currently realized in a segment."""
    client = _client(ctx)
    request = segmentation_pb2.ListMembersRequest(segment=segment, limit=limit)
    reply = client.segmentation.ListMembers(request, timeout=client.timeout)
    if as_json:
        render.print_message(reply)
        return
    render.out.print(f"{len(reply.profile_ids)} members in segment {segment}", soft_wrap=True)
    if reply.profile_ids:
        render.print_table(None, ["profile id"], [(p,) for p in reply.profile_ids])


@profile_app.command("get")
def profile_get(
    ctx: typer.Context,
    key: Annotated[
        str,
        typer.Argument(
            metavar="NS:VALUE|PROFILE_ID",
            help="An identity (e.g. email:ann@example.com) or a profile id (as `segment members --json` lists).",
        ),
    ],
    as_json: JsonFlag = False,
) -> None:
    """Look up a unified profile by one of its identities or by its profile id."""
    if ":" in key:
        request = segmentation_pb2.GetProfileRequest(identity=inputs.parse_identity(key))
    else:
        request = segmentation_pb2.GetProfileRequest(profile_id=key.strip())
    client = _client(ctx)
    try:
        reply = client.segmentation.GetProfile(request, timeout=client.timeout)
    except grpc.RpcError as exc:
        if rpc_code(exc) == grpc.StatusCode.NOT_FOUND:
            # The server never repeats the value asked for; what the user typed is theirs to see.
            raise CliError(f"no profile for {key}: {describe_rpc_error(exc)}") from exc
        raise
    if as_json:
        render.print_message(reply)
        return
    render.out.print(
        f"profile {reply.profile_id} — {reply.events} events, segments: {', '.join(reply.segments) or 'none'}"
    )
    render.print_table("identities", ["namespace", "value"], [(i.namespace, i.value) for i in reply.identities])
    render.print_table(
        "attributes",
        ["name", "value", "dataset", "updated"],
        [(a.name, render.json_value(a.value), a.source_dataset, a.updated_at) for a in reply.attributes],
    )
    render.print_table("computed", ["name", "value", "definition"], cmd_segmentation.computed_rows(reply))


@identity_app.command("resolve")
def identity_resolve(
    ctx: typer.Context,
    identity: Annotated[str, typer.Argument(metavar="NS:VALUE", help="An identity, e.g. email:ann@example.com.")],
    as_json: JsonFlag = False,
) -> None:
    """The profile id an identity belongs to, and the other identities linked to it."""
    request = identity_pb2.ResolveRequest(identity=inputs.parse_identity(identity))
    client = _client(ctx)
    reply = client.identity.Resolve(request, timeout=client.timeout)
    if as_json:
        render.print_message(reply)
        return
    render.print_table(
        f"profile {reply.profile_id}", ["namespace", "value"], [(i.namespace, i.value) for i in reply.identities]
    )


# --------------------------------------------------------------------------- activation


@destination_app.command("create")
def destination_create(
    ctx: typer.Context,
    name: str,
    connector: Annotated[str, typer.Option("--connector", help="Connector type, e.g. file_export.")],
    action: Annotated[
        str, typer.Option("--action", help="Marketing action: email_marketing, sms_marketing, ad_targeting, …")
    ],
    config: Annotated[
        list[str] | None,
        typer.Option("--config", metavar="KEY=VALUE", help="Connector setting; KEY:=JSON for numbers, lists …"),
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Create a destination: a connector, its settings and the marketing action it serves."""
    destination = activation_pb2.Destination(
        name=name, connector=connector, config=inputs.parse_config(config or []), marketing_action=action
    )
    client = _client(ctx)
    request = activation_pb2.CreateDestinationRequest(destination=destination)
    reply = client.activation.CreateDestination(request, timeout=client.timeout)
    if as_json:
        render.print_message(reply)
        return
    render.success(f"destination {reply.name} created (id {reply.id}, {reply.connector}, {reply.marketing_action})")


@destination_app.command("list")
def destination_list(ctx: typer.Context, as_json: JsonFlag = False) -> None:
    """List the destinations (secrets masked)."""
    client = _client(ctx)
    reply = client.activation.ListDestinations(activation_pb2.ListDestinationsRequest(), timeout=client.timeout)
    if as_json:
        render.print_message(reply)
        return
    render.print_table(
        "destinations",
        ["name", "id", "connector", "action", "config"],
        [(d.name, d.id, d.connector, d.marketing_action, render.json_value(d.config)) for d in reply.destinations],
    )


@app.command()
def activate(
    ctx: typer.Context,
    destination: Annotated[str, typer.Option("--destination", help="Destination name or id.")],
    segment: Annotated[str, typer.Option("--segment", help="Segment name or id.")],
    attributes: Annotated[str, typer.Option("--attributes", help="Comma-separated profile attributes.")] = "",
    identities: Annotated[str, typer.Option("--identities", help="Comma-separated identity namespaces.")] = "",
    schedule: Annotated[str, typer.Option("--schedule", help='"streaming" or a cron expression.')] = "streaming",
    as_json: JsonFlag = False,
) -> None:
    """Activate a segment to a destination."""
    request = activation_pb2.ActivateRequest(
        destination=destination,
        segment=segment,
        attributes=inputs.split_list(attributes),
        identities=inputs.split_list(identities),
        schedule=schedule,
    )
    client = _client(ctx)
    reply = client.activation.Activate(request, timeout=client.timeout)
    if as_json:
        render.print_message(reply)
        return
    render.success(f"plan {reply.id}: segment {reply.segment} → {reply.destination} ({reply.schedule})")


@app.command()
def plans(ctx: typer.Context, as_json: JsonFlag = False) -> None:
    """List the activation plans."""
    client = _client(ctx)
    reply = client.activation.ListPlans(activation_pb2.ListPlansRequest(), timeout=client.timeout)
    if as_json:
        render.print_message(reply)
        return
    render.print_table(
        "activation plans",
        ["id", "destination", "segment", "attributes", "identities", "schedule"],
        [(p.id, p.destination, p.segment, list(p.attributes), list(p.identities), p.schedule) for p in reply.plans],
    )


@cmd_activation.deliveries_app.callback(invoke_without_command=True)
def deliveries(
    ctx: typer.Context,
    destination: Annotated[str, typer.Option("--destination", help="Only this destination (name or id).")] = "",
    as_json: JsonFlag = False,
) -> None:
    """List deliveries: what went to each destination, and where; monitoring per destination and plan."""
    if ctx.invoked_subcommand:
        return
    client = _client(ctx)
    request = activation_pb2.ListDeliveriesRequest(destination=destination)
    reply = client.activation.ListDeliveries(request, timeout=client.timeout)
    if as_json:
        render.print_message(reply)
        return
    render.print_table(
        "deliveries",
        ["id", "destination", "plan", "members", "added", "removed", "location", "at", "through seq"],
        [
            (d.id, d.destination, d.plan_id, d.members, d.added, d.removed, d.location, d.at, d.through_sequence)
            for d in reply.deliveries
        ],
    )
    cmd_activation.print_stats(reply)


@app.command()
def demo(
    people: Annotated[int, typer.Option("--people", min=10, max=100_000, help="CRM people to generate.")] = 200,
    kill: Annotated[
        str, typer.Option("--kill", help="SIGKILL this service mid-flow, to see that nothing changes.")
    ] = "",
    data_dir: DataDirOverride = None,
) -> None:
    """Start the stack, run the walking skeleton on generated data, print the summary, stop."""
    from cdp_cli.demo import run_demo

    if kill and kill not in SERVICES:
        raise typer.BadParameter(f"--kill takes one of {', '.join(SERVICES)}")
    _log_supervisor_to_console()
    run_demo(data_dir, people=people, kill=kill or None)


cmd_identity.register(identity_app)
cmd_segmentation.register(segment_app, lambda ctx: _client(ctx))
app.add_typer(cmd_segmentation.computed_app(lambda ctx: _client(ctx)), name="computed")


def main() -> None:
    """Entry point of the ``cdp`` console script."""
    render.use_page_width()
    app()
