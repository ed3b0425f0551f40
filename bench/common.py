"""Timing helpers shared by the benchmarks: best-of-N wall time, figures, ratios."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from tempfile import TemporaryDirectory

from cdp_kit.eventlog import EventLog
from cdp_kit.natsauth import ADMIN, ensure_secrets, stack_auth, stack_env
from cdp_kit.natsserver import NatsServer


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
