"""Timing helpers shared by the benchmarks: best-of-N wall time, figures, ratios."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from tempfile import TemporaryDirectory

from cdp_kit.eventlog import EventLog
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
