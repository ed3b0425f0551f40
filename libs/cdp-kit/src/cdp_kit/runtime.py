"""What every service process shares: ``python -m cdp_<svc> serve|rebuild``.

Each service's composition root builds its parts (``Service``) from settings, an
engine and the event log; this module runs them: store creation, log recovery,
consumers, the gRPC server with health and status, signals and graceful shutdown.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from sqlalchemy.engine import Engine

from cdp.common.v1 import admin_pb2
from cdp_kit import deadletter_api
from cdp_kit.errors import Unavailable
from cdp_kit.eventlog import EventLog
from cdp_kit.grpc_server import GrpcServer, Registration
from cdp_kit.processor import Processor, in_checkpoint, own_checkpoint
from cdp_kit.settings import ServiceSettings
from cdp_kit.store import all_checkpoints, make_engine
from cdp_kit.telemetry import configure_logging, configure_tracing, get_logger

S = TypeVar("S", bound=ServiceSettings)
log = get_logger(__name__)
VERSION = "0.1.0"


@dataclass
class Service:
    processor: Processor
    registrations: list[Registration]
    background: list[Callable[[], Coroutine[Any, Any, None]]] = field(default_factory=list)


Builder = Callable[[S, Engine, EventLog], Service]


async def connect(settings: ServiceSettings, *, attempts: int = 60) -> EventLog:
    """Connect to NATS and declare the streams, waiting for NATS to come up."""
    delay = 0.25
    for attempt in range(1, attempts + 1):
        try:
            eventlog = await EventLog.connect(settings.nats_url, f"cdp-{settings.service}")
            await eventlog.ensure_streams(replicas=settings.stream_replicas)
            return eventlog
        except Unavailable as exc:
            if attempt == attempts:
                raise
            log.warning("nats_unavailable", error=exc.message, attempt=attempt)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)
    raise AssertionError("unreachable")


async def service_status(service: Service, name: str) -> admin_pb2.ServiceStatus:
    processor = service.processor
    with processor.read() as session:
        checkpoints = all_checkpoints(session)
    status = admin_pb2.ServiceStatus(service=name, version=VERSION, ready=processor.ready.is_set())
    for inp in processor.inputs:
        applied = checkpoints.get(in_checkpoint(inp.spec), 0)
        last = await processor.eventlog.last_sequence(inp.spec.stream.name)
        lag = await processor.eventlog.consumer_lag(inp.spec)
        status.consumers.append(
            admin_pb2.ConsumerStatus(
                name=inp.spec.name,
                stream=inp.spec.stream.name,
                applied_sequence=applied,
                stream_last_sequence=last,
                lag=lag[1] if lag is not None else max(0, last - applied),
                error=processor.failures.get(inp.spec.name, ""),
            )
        )
    for own in processor.own_logs:
        status.own_logs.append(
            admin_pb2.OwnLogStatus(
                stream=own.stream.name, subject=own.subject, folded_sequence=checkpoints.get(own_checkpoint(own), 0)
            )
        )
    return status


async def serve(settings: S, build: Builder[S]) -> int:
    engine = make_engine(settings.resolved_store_url(), sqlite_mmap_mib=settings.sqlite_mmap_mib)
    eventlog = await connect(settings)
    service = build(settings, engine, eventlog)
    service.processor.create_store()

    async def status() -> admin_pb2.ServiceStatus:
        return await service_status(service, settings.service)

    registrations = [*service.registrations, deadletter_api.registration(service.processor)]
    server = GrpcServer(settings.grpc_host, settings.resolved_port(), registrations, status)
    port = await server.start()
    log.info("grpc_listening", address=f"{settings.grpc_host}:{port}", store=engine.url.render_as_string())

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    tasks = [asyncio.create_task(service.processor.run(), name="processor")]
    tasks += [asyncio.create_task(job(), name=f"background-{i}") for i, job in enumerate(service.background)]
    watcher = asyncio.create_task(_health_watch(service.processor, eventlog, server))
    stopper = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait([*tasks, stopper], return_when=asyncio.FIRST_COMPLETED)
    exit_code = 0
    for task in done:
        if task is not stopper and task.exception() is not None:
            log.error("task_failed", task=task.get_name(), exc_info=task.exception())
            exit_code = 1
    log.info("shutting_down", grace_s=settings.shutdown_grace_s)
    service.processor.stop()
    await server.stop(settings.shutdown_grace_s)
    for task in [*tasks, watcher, stopper]:
        task.cancel()
    await asyncio.gather(*tasks, watcher, stopper, return_exceptions=True)
    await eventlog.close()
    engine.dispose()
    log.info("stopped", exit_code=exit_code)
    return exit_code


async def _health_watch(processor: Processor, eventlog: EventLog, server: GrpcServer) -> None:
    """SERVING only while recovery is done and NATS is connected: probes see the truth."""
    serving: bool | None = None
    while True:
        now = processor.ready.is_set() and eventlog.connected
        if now != serving:
            await server.set_serving(now)
            log.info("health", serving=now)
            serving = now
        await asyncio.sleep(0.25)


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


def main(settings_type: type[S], build: Builder[S], argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m cdp_{settings_type.service}")
    parser.add_argument("command", choices=["serve", "rebuild"], help="serve: run; rebuild: drop the store, replay")
    args = parser.parse_args(argv)
    settings = settings_type()
    configure_logging(settings.service, settings.log_format, settings.log_level)
    configure_tracing(settings.service, settings.trace_exporter)
    runner = serve if args.command == "serve" else rebuild
    return asyncio.run(runner(settings, build))
