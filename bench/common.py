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
