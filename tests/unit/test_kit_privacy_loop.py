"""cdp_kit.privacy.keep_applying: a service's privacy background loop survives every failure."""

from __future__ import annotations

import asyncio

from cdp_kit.eventlog import AppendConflict
from cdp_kit.privacy import keep_applying


async def test_a_failed_recovery_after_an_append_conflict_does_not_end_the_loop() -> None:
    """An append conflict folds the log first (``recover``); when that fails too (the server away
    for a moment), the work stays pending and the next turn runs it again: the loop goes on."""
    ready, changed, done = asyncio.Event(), asyncio.Event(), asyncio.Event()
    ready.set()
    steps: list[str] = []
    recoveries: list[str] = []

    async def step() -> None:
        steps.append("step")
        if len(steps) == 1:
            raise AppendConflict("someone appended first")
        done.set()

    async def recover() -> None:
        recoveries.append("recover")
        raise ConnectionError("the server is away")

    task = asyncio.create_task(
        keep_applying(ready, step, what="privacy_test", changed=changed, recover=recover, interval_s=0.01)
    )
    again = asyncio.create_task(done.wait())
    try:
        finished, _ = await asyncio.wait({task, again}, return_when=asyncio.FIRST_COMPLETED)
        assert task not in finished, task.exception()  # the loop ended: the request would stay pending for ever
        assert steps == ["step", "step"]
        assert recoveries == ["recover"]
    finally:
        for pending in (task, again):
            pending.cancel()
        await asyncio.gather(task, again, return_exceptions=True)
