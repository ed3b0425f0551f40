"""What every service process shares: ``python -m cdp_<svc> serve|rebuild``.

Each service's composition root builds its parts (``Service``) from settings, an
engine and the event log; this module runs them: store creation, log recovery,
consumers, the gRPC server with health and status, signals and graceful shutdown.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import time
from collections.abc import Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import nats.errors
from opentelemetry.metrics import CallbackOptions, Meter, Observation
from sqlalchemy.engine import Engine

from cdp.common.v1 import admin_pb2
from cdp_kit import deadletter_api, deadletters, piikey
from cdp_kit.errors import Unavailable
from cdp_kit.eventlog import EventLog
from cdp_kit.grpc_auth import ServerTls, TokenTable
from cdp_kit.grpc_server import GrpcServer, Registration
from cdp_kit.lease import Lease
from cdp_kit.processor import Deposed, Input, LeaseStale, Processor, in_checkpoint, own_checkpoint
from cdp_kit.settings import ServiceSettings
from cdp_kit.store import all_checkpoints, make_engine
from cdp_kit.streams import KEYS, LEASES, SERVICE_LOGS, ConsumerSpec
from cdp_kit.telemetry import configure_logging, configure_pii_hash, configure_tracing, get_logger, meter

S = TypeVar("S", bound=ServiceSettings)
log = get_logger(__name__)
VERSION = "0.1.0"


@dataclass
class Service:
    processor: Processor
    registrations: list[Registration]
    background: list[Callable[[], Coroutine[Any, Any, None]]] = field(default_factory=list)
    # Called once the gRPC server stopped, before the engine is disposed (e.g. a reader's threads).
    closers: list[Callable[[], None]] = field(default_factory=list)


Builder = Callable[[S, Engine, EventLog], Service]


async def connect(settings: ServiceSettings, *, attempts: int = 60) -> EventLog:
    """Connect to NATS as the service's user and check that its streams exist, waiting for NATS to
    come up and for the streams to be provisioned (``cdp admin provision``: a service never creates,
    updates or deletes a stream)."""
    delay = 0.25
    logs = SERVICE_LOGS.get(settings.service)
    streams = [own.stream for own in logs.own_logs] + [spec.stream for spec in logs.inputs] + [KEYS] if logs else []
    if settings.lease_ttl_s > 0:
        streams.append(LEASES)
    for attempt in range(1, attempts + 1):
        eventlog: EventLog | None = None
        try:
            eventlog = await EventLog.connect(settings.nats_url, f"cdp-{settings.service}", auth=settings.nats_auth())
            await eventlog.verify_streams(dict.fromkeys(streams))
            return eventlog
        except Unavailable as exc:
            if eventlog is not None:
                await eventlog.close()
            if attempt == attempts:
                raise
            log.warning("nats_unavailable", error=exc.message, attempt=attempt)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)
    raise AssertionError("unreachable")


# What ServiceStatus.role says.
SINGLE = "single"
ACTIVE = "active"
STANDBY = "standby"
# What ConsumerStatus.state says (admin.proto documents each).
STARTING = "starting"
CAUGHT_UP = "caught_up"
LAGGING = "lagging"
RETRYING = "retrying"
STUCK = "stuck"
# How often readiness is re-evaluated (and how late a stuck consumer may be noticed beyond the limit).
HEALTH_POLL_S = 0.25


def consumer_state(*, recovered: bool, stalled_s: float, stall_after_s: float, error: str, lag: int) -> str:
    """One consumer's state from what status knows of it (see admin.proto's ConsumerStatus.state)."""
    if not recovered:
        return STARTING
    if stalled_s >= stall_after_s:
        return STUCK
    if error:
        return RETRYING
    return CAUGHT_UP if lag == 0 else LAGGING


class Vitals:
    """What readiness, status and metrics read of a running processor: recovered, NATS connected,
    and which consumers are stuck.

    A consumer counts as stalled from its last progress (``ConsumerHealth.progressed_at``), but
    never from before the service recovered: consumers only start then, so a long recovery must
    not make them look stuck at once. Recovery is noticed by polling (``recovered``), which the
    health watch does every ``HEALTH_POLL_S``."""

    def __init__(
        self, processor: Processor, eventlog: EventLog, stall_after_s: float, instruments: Meter | None = None
    ) -> None:
        self.processor = processor
        self.eventlog = eventlog
        self.stall_after_s = stall_after_s
        self._recovered_at: float | None = None
        instruments = instruments or meter(f"cdp.{processor.service}")
        instruments.create_observable_gauge(
            "cdp.input.stalled",
            callbacks=[self._observe_stalled],
            unit="s",
            description="Seconds since the consumer last progressed (a batch applied or nothing left to read)",
        )
        instruments.create_observable_gauge(
            "cdp.input.stuck",
            callbacks=[self._observe_stuck],
            unit="{consumer}",
            description="1 while the consumer is stuck (no progress for CDP_STALL_AFTER_S), else 0",
        )

    def recovered(self) -> bool:
        if not self.processor.ready.is_set():
            self._recovered_at = None
            return False
        if self._recovered_at is None:
            self._recovered_at = time.monotonic()
        return True

    def stalled_for(self, consumer: str) -> float:
        """Seconds since ``consumer`` last progressed, counted from recovery at the earliest; 0 before."""
        if not self.recovered() or self._recovered_at is None:
            return 0.0
        return min(self.processor.health[consumer].stalled_for(), time.monotonic() - self._recovered_at)

    def reason(self, consumer: str) -> str:
        """Why ``consumer`` does not progress: its error, or, with none recorded, how long it has not."""
        error = self.processor.health[consumer].error
        if error:
            return error
        # No error yet no progress: a batch still applying, or a call that never returns.
        return f"no fetch went through for {self.stalled_for(consumer):.0f} s (no error recorded)"

    def stuck(self) -> dict[str, str]:
        """Every stuck consumer with its reason."""
        return {
            name: self.reason(name) for name in self.processor.health if self.stalled_for(name) >= self.stall_after_s
        }

    def ready(self) -> bool:
        """Readiness: recovered, NATS connected and no consumer stuck."""
        return self.recovered() and self.eventlog.connected and not self.stuck()

    def _observe_stalled(self, _options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(self.stalled_for(name), {"consumer": name}) for name in self.processor.health]

    def _observe_stuck(self, _options: CallbackOptions) -> Iterable[Observation]:
        stuck = self.stuck()
        return [Observation(int(name in stuck), {"consumer": name}) for name in self.processor.health]


def _has_wildcard(subject: str) -> bool:
    return any(token in ("*", ">") for token in subject.split("."))


async def filter_last_sequence(eventlog: EventLog, spec: ConsumerSpec) -> int:
    """Stream sequence of the last message on the consumer's filter subject (0 if none).

    JetStream's "last message on a subject" takes one literal subject. For a wildcard filter,
    stream info with ``subjects_filter`` lists the literal subjects under it, and the answer is
    the greatest of their last messages. A filter that is the stream's only subject is the whole
    stream, whose last sequence the stream info holds (no message is fetched)."""
    stream = spec.stream.name
    if spec.stream.subjects == (spec.filter_subject,):
        return await eventlog.last_sequence(stream)
    if not _has_wildcard(spec.filter_subject):
        return await eventlog.last_sequence(stream, spec.filter_subject)
    info = await eventlog.js.stream_info(stream, subjects_filter=spec.filter_subject)
    lasts = [await eventlog.last_sequence(stream, subject) for subject in info.state.subjects or {}]
    return max(lasts, default=0)


async def _lag(eventlog: EventLog, spec: ConsumerSpec, applied: int, last: int) -> int:
    """Messages on the filter not yet applied. Nothing once applied reaches last: the consumer's own
    count also holds messages already committed whose acknowledgement is still on its way."""
    if applied >= last:
        return 0
    counted = await eventlog.consumer_lag(spec)
    return counted[1] if counted is not None else last - applied


async def consumer_status(vitals: Vitals, inp: Input, applied: int, dead: int = 0) -> admin_pb2.ConsumerStatus:
    spec = inp.spec
    eventlog = vitals.eventlog
    last = await filter_last_sequence(eventlog, spec)
    lag = await _lag(eventlog, spec, applied, last)
    health = vitals.processor.health[spec.name]
    stalled = vitals.stalled_for(spec.name)
    state = consumer_state(
        recovered=vitals.recovered(),
        stalled_s=stalled,
        stall_after_s=vitals.stall_after_s,
        error=health.error,
        lag=lag,
    )
    return admin_pb2.ConsumerStatus(
        name=spec.name,
        stream=spec.stream.name,
        applied_sequence=applied,
        stream_last_sequence=last,
        lag=lag,
        error=vitals.reason(spec.name) if state == STUCK else health.error,
        state=state,
        stalled_seconds=round(stalled, 1),
        gaps=health.gaps,
        dead_letters=dead,
        aged_out=health.aged_out,
    )


async def service_status(
    service: Service, name: str, vitals: Vitals, lease: Lease | None = None
) -> admin_pb2.ServiceStatus:
    processor = service.processor
    with processor.read() as session:
        checkpoints = all_checkpoints(session)
        dead = deadletters.dead_per_consumer(session)
    status = admin_pb2.ServiceStatus(
        service=name,
        version=VERSION,
        ready=vitals.ready(),
        recovered=vitals.recovered(),
        nats_connected=processor.eventlog.connected,
        stall_after_seconds=vitals.stall_after_s,
    )
    if lease is None:
        status.role = SINGLE
    else:
        status.role = ACTIVE if lease.epoch else STANDBY
        status.instance = lease.instance
        status.lease_holder = lease.holder.instance if lease.holder is not None else ""
        status.lease_epoch = lease.epoch
    if processor.vault is not None:
        status.erased_events = processor.vault.erased
        status.erased_fields = processor.vault.erased_fields
    for inp in processor.inputs:
        applied = checkpoints.get(in_checkpoint(inp.spec), 0)
        status.consumers.append(await consumer_status(vitals, inp, applied, dead.get(inp.spec.name, 0)))
    for own in processor.own_logs:
        status.own_logs.append(
            admin_pb2.OwnLogStatus(
                stream=own.stream.name, subject=own.subject, folded_sequence=checkpoints.get(own_checkpoint(own), 0)
            )
        )
    return status


def grpc_security(settings: ServiceSettings) -> dict[str, Any]:
    """GrpcServer's TLS, token and reflection arguments from settings; refuses a half-configured server."""
    problem = settings.grpc_security_problem()
    if problem is not None:
        raise SystemExit(problem)
    health_port = settings.grpc_health_port or None
    if settings.grpc_insecure:
        log.warning("grpc_insecure", detail="gRPC serves plaintext without authentication (CDP_GRPC_INSECURE)")
        return {"reflection": settings.grpc_reflection, "health_port": health_port}
    cert, key, tokens_file = settings.grpc_tls_cert_file, settings.grpc_tls_key_file, settings.grpc_tokens_file
    if cert is None or key is None or tokens_file is None:  # grpc_security_problem said so already
        raise SystemExit("gRPC security is not configured")
    try:
        tls = ServerTls.load(cert, key)
        tokens = TokenTable.load(tokens_file)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"gRPC security: {exc}") from None
    return {"tls": tls, "tokens": tokens, "reflection": settings.grpc_reflection, "health_port": health_port}


async def serve(settings: S, build: Builder[S]) -> int:
    grpc_kwargs = grpc_security(settings)  # before anything starts: a misconfiguration fails fast
    engine = make_engine(settings.resolved_store_url(), sqlite_mmap_mib=settings.sqlite_mmap_mib)
    eventlog = await connect(settings)
    service = build(settings, engine, eventlog)
    service.processor.create_store()
    vitals = Vitals(service.processor, eventlog, settings.stall_after_s)
    lease = (
        Lease(eventlog, settings.service, settings.resolved_instance(), settings.lease_ttl_s)
        if settings.lease_ttl_s > 0
        else None
    )

    async def status() -> admin_pb2.ServiceStatus:
        try:
            return await service_status(service, settings.service, vitals, lease)
        except (TimeoutError, nats.errors.Error) as exc:
            # Where each consumer stands is NATS' to say; a busy or reconnecting server is a
            # retryable UNAVAILABLE for the caller, not an internal error.
            raise Unavailable(f"status: NATS did not answer ({type(exc).__name__})") from exc

    registrations = [*service.registrations, deadletter_api.registration(service.processor)]
    refusal = _standby_refusal(settings.service, lease, registrations)
    server = GrpcServer(
        settings.grpc_host, settings.resolved_port(), registrations, status, refusal=refusal, **grpc_kwargs
    )
    port = await server.start()
    log.info(
        "grpc_listening",
        address=f"{settings.grpc_host}:{port}",
        tls=server.tls is not None,
        authenticated=server.auth.tokens is not None,
        health_port=server.bound_health_port or None,
        store=engine.url.render_as_string(),
    )

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    stopper = asyncio.create_task(stop.wait())
    watcher = asyncio.create_task(health_watch(vitals, server))
    tasks: list[asyncio.Task[Any]] = []
    exit_code = 0
    if lease is None or await standby(service.processor, lease, stop, settings.follow_interval_s):
        fenced = True
        if lease is not None:
            # Renewing from the start: fencing and recovering a long tail must not let it expire.
            tasks.append(asyncio.create_task(lease.keep(), name="lease"))
            tasks.append(asyncio.create_task(service.processor.deposed.wait(), name="deposed"))
            service.processor.may_act = lease.valid
            fenced = await _fence(service.processor, lease)
            lease.serving = fenced
        if fenced:
            tasks.append(asyncio.create_task(service.processor.run(), name="processor"))
            tasks += [asyncio.create_task(job(), name=f"background-{i}") for i, job in enumerate(service.background)]
            done, _ = await asyncio.wait([*tasks, stopper], return_when=asyncio.FIRST_COMPLETED)
            exit_code = _exit_code(done, stopper, service.processor)
        else:
            exit_code = STEPPED_DOWN
    log.info("shutting_down", grace_s=settings.shutdown_grace_s)
    service.processor.stop()
    await server.stop(settings.shutdown_grace_s)
    for task in [*tasks, watcher, stopper]:
        task.cancel()
    # Bounded: a task that does not end on cancellation (seen once in CI: activation's shutdown
    # outlived the supervisor's 15 s, so it was killed before releasing its lease) must not keep
    # the process from releasing the lease and closing; it is named in the log instead.
    _, left = await asyncio.wait([*tasks, watcher, stopper], timeout=SHUTDOWN_TASKS_S)
    if left:
        log.warning("shutdown_tasks_left", tasks=sorted(t.get_name() for t in left), waited_s=SHUTDOWN_TASKS_S)
    if lease is not None and (exit_code == 0 or (exit_code == STEPPED_DOWN and not lease.lost.is_set())):
        await lease.release()  # nothing more is appended: a standby may take over at once
    await eventlog.close()
    for close in service.closers:
        close()
    engine.dispose()
    log.info("stopped", exit_code=exit_code)
    return exit_code


# How long cancelled tasks get to end at shutdown.
SHUTDOWN_TASKS_S = 3.0
# The exit code of an instance that lost its lease or was fenced (EX_TEMPFAIL): restarted, it
# comes back as a standby.
STEPPED_DOWN = 75


async def _fence(processor: Processor, lease: Lease, attempts: int = 5) -> bool:
    """Fence every own log for this holder; False (step down) when the lease lapsed meanwhile, or
    NATS kept failing (the lease is then released, so a standby need not wait out the TTL)."""
    delay = 0.5
    for attempt in range(1, attempts + 1):
        if lease.lost.is_set() or not lease.valid():
            log.error("lease_lapsed_while_fencing", service=processor.service, epoch=lease.epoch)
            return False
        try:
            await processor.fence(lease.fence)
            return lease.valid()
        except LeaseStale:
            continue
        except (Unavailable, nats.errors.Error, TimeoutError) as exc:
            log.warning("fence_failed", service=processor.service, attempt=attempt, error=str(exc))
            await asyncio.sleep(delay)
            delay *= 2
    return False


def _exit_code(done: set[asyncio.Task[Any]], stopper: asyncio.Task[Any], processor: Processor) -> int:
    if processor.deposed.is_set():
        return STEPPED_DOWN
    exit_code = 0
    for task in done:
        if task is stopper:
            continue
        exc = task.exception()
        if isinstance(exc, Deposed):
            return STEPPED_DOWN
        if exc is not None:
            if task.get_name() == "lease":
                return STEPPED_DOWN
            log.error("task_failed", task=task.get_name(), exc_info=exc)
            exit_code = 1
    return exit_code


def _standby_refusal(
    service: str, lease: Lease | None, registrations: Sequence[Registration]
) -> Callable[[str], str | None] | None:
    """While a standby, the service's own RPCs (not status or health) answer UNAVAILABLE, but for
    the reads each registration lists (``replica_reads``): a standby is a read replica."""
    if lease is None:
        return None
    served = {r.full_name: r.replica_reads for r in registrations}

    def refusal(method: str) -> str | None:
        if lease.serving and lease.valid():
            return None
        name, _, rpc = method.lstrip("/").partition("/")
        if name not in served or rpc in served[name]:
            return None
        holder = lease.holder.instance if lease.holder is not None else "unknown"
        return f"this {service} instance is a standby: the active instance ({holder}) serves this; retry"

    return refusal


async def standby(processor: Processor, lease: Lease, stop: asyncio.Event, interval_s: float) -> bool:
    """Wait for the lease, following the log meanwhile (a hot standby). True once this instance
    holds it, False when told to stop first."""

    async def follow() -> None:
        while True:
            try:
                reached = await processor.follow()
                log.debug("standby_followed", reached_end=reached)
            except (Unavailable, nats.errors.Error, OSError) as exc:
                log.warning("standby_follow_failed", error=str(exc))
            await asyncio.sleep(interval_s)

    follower = asyncio.create_task(follow(), name="follow")
    acquiring = asyncio.create_task(lease.acquire(), name="acquire")
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait([acquiring, stopping], return_when=asyncio.FIRST_COMPLETED)
    # A follow round in the middle of a transaction is let finish (processor.lock), then stopped.
    async with processor.lock:
        follower.cancel()
    await asyncio.gather(follower, return_exceptions=True)
    stopping.cancel()
    if not acquiring.done():
        acquiring.cancel()
        await asyncio.gather(acquiring, return_exceptions=True)
        return False
    return True


async def health_watch(vitals: Vitals, server: GrpcServer) -> None:
    """Readiness tells the truth: SERVING only while recovered, connected to NATS and no consumer
    is stuck. A stuck service stays live (restarting it would meet the same message again) but
    leaves its Service's endpoints, and says why in its log."""
    serving: bool | None = None
    while True:
        now = vitals.ready()
        if now != serving:
            await server.set_serving(now)
            log.info(
                "health",
                serving=now,
                recovered=vitals.recovered(),
                nats_connected=vitals.eventlog.connected,
                stuck=vitals.stuck(),
            )
            serving = now
        await asyncio.sleep(HEALTH_POLL_S)


async def rebuild(settings: S, build: Builder[S]) -> int:
    engine = make_engine(settings.resolved_store_url(), sqlite_mmap_mib=settings.sqlite_mmap_mib)
    eventlog = await connect(settings)
    try:
        service = build(settings, engine, eventlog)
        await service.processor.rebuild()
        with service.processor.read() as session:
            log.info("rebuilt", checkpoints=all_checkpoints(session))
    finally:
        await eventlog.close()
        engine.dispose()
    return 0


def configure_pii_key(settings: ServiceSettings) -> bool:
    """Key ``pii_hash`` from the deployment's key file; False (after saying why) when the process
    must not start. An ephemeral key, asked for explicitly, is said loudly."""
    try:
        key = piikey.load_key(settings.pii_hash_key_file, ephemeral=settings.pii_hash_ephemeral)
    except piikey.PiiKeyError as exc:
        log.error("pii_hash_key_missing", reason=str(exc))
        return False
    if key is None:
        key = piikey.ephemeral_key()
        log.warning(
            "pii_hash_key_ephemeral",
            reason="CDP_PII_HASH_EPHEMERAL is set and no CDP_PII_HASH_KEY_FILE: PII tags use a random key "
            "that changes at every start and differs between services; never run a deployment like this",
        )
    configure_pii_hash(key)
    return True


def main(settings_type: type[S], build: Builder[S], argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m cdp_{settings_type.service}")
    parser.add_argument("command", choices=["serve", "rebuild"], help="serve: run; rebuild: drop the store, replay")
    args = parser.parse_args(argv)
    settings = settings_type()
    configure_logging(settings.service, settings.log_format, settings.log_level)
    if not configure_pii_key(settings):
        return 2
    configure_tracing(settings.service, settings.trace_exporter)
    runner = serve if args.command == "serve" else rebuild
    return asyncio.run(runner(settings, build))
