"""Publish many messages to JetStream with a bounded number in flight, and back off when the
server says it is overloaded.

JetStream answers a publish with ``429 Too Many Requests`` (err_code 10167) when a stream's inbound
queue is full (``jetstream { max_buffered_msgs, max_buffered_size }``; 100,000 messages or 128 MB by
default): the message was **not** stored. nats-py's ``publish_async`` cannot report it (its reply
handler raises instead of failing the future, which then never resolves: a publisher awaiting it
hangs), so this module publishes with ``JetStreamContext.publish`` (a request that raises the
``APIError``) from at most ``window`` concurrent tasks, and publishes a refused message again after an
exponential backoff with jitter, up to ``give_up_s``. A message whose acknowledgement was lost (a
timeout) is published again too: with a ``Nats-Msg-Id`` header JetStream stores it once.

Order: messages are sent in order; one published again after a 429 lands after those sent
meanwhile (each one's own stream sequence says where).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterable, Callable, Iterable, Mapping
from dataclasses import dataclass

import nats.errors
import nats.js.errors
from nats.js.api import PubAck
from nats.js.client import JetStreamContext

TOO_MANY_REQUESTS = 429
TOO_MANY_REQUESTS_ERR = 10167
FIRST_BACKOFF_S = 0.05
MAX_BACKOFF_S = 2.0


@dataclass(frozen=True)
class Outgoing:
    subject: str
    data: bytes
    headers: Mapping[str, str] | None = None


@dataclass
class PublishStats:
    published: int = 0
    # Publishes refused with 429 (or timed out) and sent again.
    retried: int = 0


class PublishFailed(Exception):
    """A message could not be published (refused for good, or still overloaded after ``give_up_s``)."""


def overloaded(exc: BaseException) -> bool:
    """A refusal that a later attempt may pass: JetStream's 429, or no answer in time."""
    if isinstance(exc, nats.js.errors.APIError):
        return exc.code == TOO_MANY_REQUESTS or exc.err_code == TOO_MANY_REQUESTS_ERR
    return isinstance(exc, nats.errors.TimeoutError | TimeoutError)


async def publish_bounded(
    js: JetStreamContext,
    messages: Iterable[Outgoing] | AsyncIterable[Outgoing],
    *,
    window: int = 256,
    on_ack: Callable[[PubAck], None] | None = None,
    timeout_s: float = 10.0,
    give_up_s: float = 120.0,
) -> PublishStats:
    """Publish every message, at most ``window`` awaiting their acknowledgement at a time.

    ``on_ack`` sees each acknowledgement (from the event loop, in completion order). Raises
    ``PublishFailed`` for the first message that fails for good; the others in flight finish first."""
    stats = PublishStats()
    slots = asyncio.Semaphore(window)
    failures: list[Exception] = []
    tasks: set[asyncio.Task[None]] = set()

    async def one(msg: Outgoing) -> None:
        try:
            backoff = FIRST_BACKOFF_S
            loop = asyncio.get_running_loop()
            deadline = loop.time() + give_up_s
            while True:
                try:
                    ack = await js.publish(msg.subject, msg.data, timeout=timeout_s, headers=dict(msg.headers or {}))
                    break
                except Exception as exc:
                    if not overloaded(exc) or loop.time() >= deadline:
                        raise PublishFailed(f"publishing to {msg.subject} failed: {exc}") from exc
                    stats.retried += 1
                    await asyncio.sleep(backoff * (0.5 + random.random()))  # jitter, not crypto
                    backoff = min(backoff * 2, MAX_BACKOFF_S)
            stats.published += 1
            if on_ack is not None:
                on_ack(ack)
        except Exception as exc:
            failures.append(exc)
        finally:
            slots.release()

    async def send(msg: Outgoing) -> None:
        await slots.acquire()
        if failures:
            slots.release()
            return
        task = asyncio.create_task(one(msg))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    if isinstance(messages, AsyncIterable):
        async for msg in messages:
            await send(msg)
            if failures:
                break
    else:
        for msg in messages:
            await send(msg)
            if failures:
                break
    if tasks:
        await asyncio.gather(*tasks)
    if failures:
        first = failures[0]
        if isinstance(first, PublishFailed):
            raise first
        raise PublishFailed(str(first)) from first
    return stats
