"""Timing helpers shared by the benchmarks: best-of-N wall time, figures, ratios."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from tempfile import TemporaryDirectory

import grpc

from cdp.common.v1 import admin_pb2
from cdp_kit.eventlog import EventLog
from cdp_kit.grpc_auth import GRPC_LEAF, ServerTls, TokenTable, ensure_local_secrets
from cdp_kit.grpc_server import GrpcServer, Registration
from cdp_kit.natsauth import ADMIN, ensure_secrets, stack_auth, stack_env
from cdp_kit.natsserver import NatsServer
from cdp_kit.roles import Role

# gRPC security on against off: measured in this order, so a drift (a store that grows, a
# machine that gets busier) weighs on both alike.
ABBA = ("off", "on", "on", "off")


@dataclass(frozen=True)
class Figure:
    name: str
    items: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.items / self.seconds if self.seconds else float("inf")


async def best_of(repeats: int, name: str, items: int, run: Callable[[], Awaitable[None]]) -> Figure:
    """The fastest of ``repeats`` runs: on a noisy machine the minimum is the least disturbed."""
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        await run()
        best = min(best, time.perf_counter() - started)
    return Figure(name, items, best)


def report(title: str, baseline: Figure, measured: list[Figure]) -> None:
    print(f"\n== {title}")
    print(f"   {baseline.name:<48} {baseline.rate:>12,.0f} items/s   (baseline)")
    for fig in measured:
        print(f"   {fig.name:<48} {fig.rate:>12,.0f} items/s   ratio {fig.rate / baseline.rate:5.2f}")


@asynccontextmanager
async def nats_eventlog() -> AsyncIterator[EventLog]:
    with TemporaryDirectory(prefix="cdp-bench-") as tmp, NatsServer(Path(tmp) / "js") as server:
        log = await EventLog.connect(server.url, "cdp-bench")
        await log.ensure_streams()
        try:
            yield log
        finally:
            await log.close()


@asynccontextmanager
async def grpc_on_and_off(registrations: list[Registration], role: Role) -> AsyncIterator[dict[str, grpc.aio.Channel]]:
    """The same servicers behind a plaintext port without authentication ("off") and behind
    TLS with bearer tokens as ``cdp up`` runs them ("on", a client with ``role``'s token)."""

    async def status() -> admin_pb2.ServiceStatus:
        return admin_pb2.ServiceStatus(service="bench")

    with TemporaryDirectory(prefix="cdp-bench-secrets-") as tmp:
        local = ensure_local_secrets(Path(tmp))
        leaf = local.pki.leaf(GRPC_LEAF)
        plain = GrpcServer("127.0.0.1", 0, registrations, status)
        secure = GrpcServer(
            "127.0.0.1",
            0,
            registrations,
            status,
            tls=ServerTls.load(leaf.cert, leaf.key),
            tokens=TokenTable.load(local.tokens_file),
        )
        plain_port, secure_port = await plain.start(), await secure.start()
        channels = {
            "off": grpc.aio.insecure_channel(f"127.0.0.1:{plain_port}"),
            "on": grpc.aio.secure_channel(f"127.0.0.1:{secure_port}", local.client(role).channel_credentials()),
        }
        try:
            yield channels
        finally:
            for channel in channels.values():
                await channel.close(None)
            await plain.stop(0)
            await secure.stop(0)


def report_security(title: str, off: list[Figure], on: list[Figure]) -> None:
    """The same figures with NATS security off (plain TCP, anonymous) and on (TLS, per-service users
    and permissions), and the cost of security as the ratio on/off (goal >= 0.9)."""
    print(f"\n== {title}: NATS security off vs on (TLS + users + permissions), goal ratio >= 0.9")
    for plain, secured in zip(off, on, strict=True):
        ratio = secured.rate / plain.rate if plain.rate else float("nan")
        print(
            f"   {plain.name:<48} off {plain.rate:>11,.0f}/s   on {secured.rate:>11,.0f}/s   ratio {ratio:5.2f}"
            f"{'' if ratio >= 0.9 else '   (below goal)'}"
        )


@dataclass
class BenchNats:
    """A fresh nats-server, plain or secured; ``service`` connects as that service (when secured),
    ``admin`` as the admin (who provisions the streams)."""

    server: NatsServer
    service: EventLog
    admin: EventLog
    env: dict[str, str]  # CDP_NATS_* for a subprocess connecting as the publisher


@asynccontextmanager
async def bench_nats(secure: bool, service: str, tmp: Path) -> AsyncIterator[BenchNats]:
    secrets = tmp / "secrets"
    config = ensure_secrets(secrets) if secure else ""
    with NatsServer(tmp / "js", config=config, tls=secure) as server:
        service_auth = stack_auth(secrets, service) if secure else None
        admin_auth = stack_auth(secrets, ADMIN) if secure else None
        admin = await EventLog.connect(server.url, "cdp-bench-admin", auth=admin_auth)
        await admin.ensure_streams()
        log = await EventLog.connect(server.url, f"cdp-{service}", auth=service_auth)
        env = stack_env(secrets, "publisher") if secure else {}
        try:
            yield BenchNats(server, log, admin, env)
        finally:
            await log.close()
            await admin.close()
