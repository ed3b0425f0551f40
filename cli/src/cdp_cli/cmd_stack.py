"""`cdp up`, `cdp status`, `cdp demo`: the embedded stack, its health, and the demo on it."""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Annotated, Any, Literal

import grpc
import typer
from grpc_health.v1 import health_pb2
from rich.logging import RichHandler

from cdp.common.v1 import admin_pb2
from cdp_cli import (
    inputs,
    render,
)
from cdp_cli.client import (
    SERVICES,
    UNREACHABLE,
    Client,
    ServiceName,
    describe_rpc_error,
    read_stack_file,
    rpc_code,
)
from cdp_cli.context import DataDirOverride, JsonFlag, client_of, state_of
from cdp_cli.stack import Stack
from cdp_cli.wait import STUCK
from cdp_kit.natsserver import DEFAULT_DURABILITY
from cdp_kit.streams import SERVICE_LOGS

_client = client_of
_state = state_of


SERVING = "SERVING"


# cdp_kit.natsserver.DURABILITIES, as the choices --durability lists.
Durability = Literal["default", "always"]

LIVENESS = "liveness"  # cdp_kit.grpc_server.LIVENESS: the CLI does not import the kit


def up(
    ctx: typer.Context,
    data_dir: DataDirOverride = None,
    services: Annotated[str, typer.Option("--services", help="Comma-separated services to start.")] = ",".join(
        SERVICES
    ),
    ready_timeout: Annotated[float, typer.Option("--ready-timeout", help="Seconds each may take to be ready.")] = 90.0,
    nats_cluster: Annotated[
        int,
        typer.Option(
            "--nats-cluster",
            min=1,
            max=7,
            envvar="CDP_NATS_CLUSTER",
            help="NATS nodes: 1 runs one nats-server; 3 a JetStream cluster with every stream at R3, "
            "which keeps working when one node is lost.",
        ),
    ] = 1,
    durability: Annotated[
        Durability,
        typer.Option(
            "--durability",
            envvar="CDP_NATS_DURABILITY",
            help="'always': NATS fsyncs every write before acknowledging it (sync_interval: always); "
            "'default': every 2 minutes, relying on replicas in between. See docs/operations.md.",
        ),
    ] = "default",
) -> None:
    """Start nats-server and the services on loopback ports, and supervise them until Ctrl-C.

    Example: cdp up --data-dir .cdp --nats-cluster 3 --durability always
    """
    state = _state(ctx)
    state.use_data_dir(data_dir)
    stack = Stack(
        state.data_dir,
        inputs.split_list(services),
        ready_timeout_s=ready_timeout,
        nats_cluster=nats_cluster,
        durability=durability,
    )
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
    rows = [
        (name, address, pids.get(name), stack.logs_dir / f"{name}.log") for name, address in stack.nats_nodes.items()
    ]
    rows += [
        (name, address, pids.get(name), stack.logs_dir / f"{name}.log") for name, address in stack.addresses.items()
    ]
    render.print_table(f"cdp stack in {stack.data_dir}", ["process", "address", "pid", "log"], rows)
    if stack.secrets is not None:
        render.out.print(
            f"gRPC: TLS (authority {stack.secrets.pki.ca_cert}) and tokens per role in {stack.secrets.tokens_dir}"
        )
    if stack.clustered:
        render.out.print(f"NATS: a {stack.nats_cluster}-node JetStream cluster, streams at R{stack.nats_cluster}")
    if stack.durability != DEFAULT_DURABILITY:
        render.out.print(f"NATS durability: sync_interval {stack.durability}")
    render.out.print(f"addresses written to {stack.stack_file}; press Ctrl-C to stop")


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


@dataclass
class NodeReport:
    """One NATS node of the local stack, as its monitoring endpoint answers."""

    name: str
    address: str
    health: str
    jetstream: str = ""
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"address": self.address, "health": self.health, "jetstream": self.jetstream, "error": self.error}


def _monitor(port: int, path: str) -> Any:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/{path}", timeout=2.0) as reply:
        return json.loads(reply.read())


def _node_report(name: str, address: str, monitor_port: int) -> NodeReport:
    """``/healthz`` (the full check: for a cluster node, in contact with the meta leader and
    current) and, from ``/jsz``, the node's part in the JetStream cluster."""
    report = NodeReport(name, address, UNREACHABLE)
    try:
        health = _monitor(monitor_port, "healthz")
        report.health = "ok" if health.get("status") == "ok" else str(health.get("error") or health.get("status"))
    except urllib.error.HTTPError as exc:  # 503 with the reason in the body
        try:
            body = json.loads(exc.read())
            report.health = str(body.get("error") or body.get("status") or exc.code)
        except ValueError:
            report.health = f"HTTP {exc.code}"
    except (OSError, ValueError) as exc:
        report.error = str(exc)
        return report
    try:
        meta = _monitor(monitor_port, "jsz").get("meta_cluster") or {}
        if meta:
            role = "leader" if meta.get("leader") == _monitor(monitor_port, "varz").get("server_name") else "follower"
            report.jetstream = (
                f"meta {role} (leader {meta.get('leader') or 'none'}, {meta.get('cluster_size', '?')} peers)"
            )
    except (OSError, ValueError) as exc:
        report.error = str(exc)
    return report


def _node_reports(data_dir: Path) -> list[NodeReport]:
    info = read_stack_file(data_dir)
    if info is None or not info.running:  # services named by address, no local stack
        return []
    return [_node_report(name, address, port) for name, (address, port) in info.nats_nodes.items()]


@dataclass
class HeldFor:
    """What NATS holds for one consumer of a service that does not answer (its monitoring endpoint's
    view): the service cannot say how far behind it is, the server can."""

    service: str
    consumer: str
    stream: str
    pending: int
    ack_pending: int
    acked_sequence: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "consumer": self.consumer,
            "stream": self.stream,
            "pending": self.pending,
            "ack_pending": self.ack_pending,
            "acked_sequence": self.acked_sequence,
        }


def _held_for_unreachable(data_dir: Path, reports: list[ServiceReport]) -> list[HeldFor]:
    """For each service of a local stack that did not answer, its consumers as nats-server sees them
    (``/jsz`` with consumer details): a frozen or stuck service shows its backlog growing."""
    silent = [r.service for r in reports if r.status is None and r.service in SERVICE_LOGS]
    info = read_stack_file(data_dir)
    if not silent or info is None or not info.running or not info.nats_nodes:
        return []
    wanted = {spec.name: service for service in silent for spec in SERVICE_LOGS[service].inputs}
    held: dict[str, HeldFor] = {}
    for _address, port in info.nats_nodes.values():
        try:
            jsz = _monitor(port, "jsz?accounts=true&streams=true&consumers=true&config=false")
        except (OSError, ValueError):
            continue
        for account in jsz.get("account_details") or []:
            for stream in account.get("stream_detail") or []:
                for consumer in stream.get("consumer_detail") or []:
                    name = consumer.get("name", "")
                    if name in wanted and name not in held:
                        held[name] = HeldFor(
                            wanted[name],
                            name,
                            str(stream.get("name", "")),
                            int(consumer.get("num_pending") or 0),
                            int(consumer.get("num_ack_pending") or 0),
                            int((consumer.get("ack_floor") or {}).get("stream_seq") or 0),
                        )
    return sorted(held.values(), key=lambda h: (h.service, h.consumer))


def status(ctx: typer.Context, data_dir: DataDirOverride = None, as_json: JsonFlag = False) -> None:
    """Health of each service and, per consumer, its state, the applied sequence, the last sequence
    on its filter and the lag; the NATS nodes of a local stack (``cdp up``) and their health.
    Exit code 1 when a service is not SERVING, a consumer is stuck or a NATS node is not healthy.

    Example: cdp status --json
    """
    state = _state(ctx)
    state.use_data_dir(data_dir)
    client = state.client()
    reports = [_service_report(client, name, address) for name, address in client.addresses().items()]
    nodes = _node_reports(client.data_dir)
    held = _held_for_unreachable(client.data_dir, reports)
    if as_json:
        out: dict[str, Any] = {"services": {r.service: r.as_dict() for r in reports}}
        for h in held:
            out["services"][h.service].setdefault("held_by_nats", []).append(h.as_dict())
        if nodes:
            out["nats"] = {n.name: n.as_dict() for n in nodes}
        render.print_json(out)
    else:
        _print_status(reports)
        if held:
            render.print_table(
                "held by NATS for services that do not answer",
                ["service", "consumer", "stream", "pending", "unacknowledged", "acknowledged to"],
                [(h.service, h.consumer, h.stream, h.pending, h.ack_pending, h.acked_sequence) for h in held],
            )
        if nodes:
            render.print_table(
                "nats",
                ["node", "address", "health", "jetstream", "error"],
                [(n.name, n.address, n.health, n.jetstream, n.error) for n in nodes],
            )
    for h in held:
        if h.pending or h.ack_pending:
            render.error(
                f"{h.service} does not answer, and its consumer {h.consumer} has {h.pending} message(s) "
                f"waiting and {h.ack_pending} delivered but not acknowledged"
            )
    for r in reports:
        for c in r.stuck():
            render.error(
                f"{r.service}: consumer {c.name} is stuck ({c.stalled_seconds:.0f} s without progress): {c.error}"
            )
    for n in nodes:
        if n.health != "ok":
            render.error(f"NATS node {n.name} ({n.address}) is not healthy: {n.health}")
    if any(r.health != SERVING or r.stuck() for r in reports) or any(n.health != "ok" for n in nodes):
        raise typer.Exit(1)


def _role(status: admin_pb2.ServiceStatus | None) -> str:
    """``single``, or under a lease (docs/operations.md) e.g. ``standby (identity-b; active: identity-a)``."""
    if status is None or not status.role:
        return ""
    if status.role == "single":
        return status.role
    if status.role == "active":
        return f"active ({status.instance}, epoch {status.lease_epoch})"
    return f"{status.role} ({status.instance}; active: {status.lease_holder or '?'})"


def _print_status(reports: list[ServiceReport]) -> None:
    render.print_table(
        "services",
        ["service", "address", "health", "live", "ready", "role", "version", "error"],
        [
            (
                r.service,
                r.address,
                r.health,
                r.live,
                r.status.ready if r.status else None,
                _role(r.status),
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
            [
                *("service", "consumer", "stream", "state", "applied", "last", "lag"),
                *("stalled s", "gaps", "dead", "aged out", "error"),
            ],
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
                    c.aged_out,
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


def demo(
    people: Annotated[int, typer.Option("--people", min=10, max=100_000, help="CRM people to generate.")] = 200,
    kill: Annotated[
        ServiceName | None, typer.Option("--kill", help="SIGKILL this service mid-flow, to see that nothing changes.")
    ] = None,
    data_dir: DataDirOverride = None,
) -> None:
    """Start the stack, run the walking skeleton on generated data, print the summary, stop.

    Example: cdp demo --kill identity
    """
    from cdp_cli.demo import run_demo

    _log_supervisor_to_console()
    run_demo(data_dir, people=people, kill=kill)
