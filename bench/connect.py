"""How the end-to-end benchmarks reach the stack: the one place that opens a NATS connection
for publishing and the one place that creates gRPC clients. The stack is secured as `cdp up`
runs it (NATS: TLS and a user per role; gRPC: TLS and a token per role): a bench says which
stack it runs with ``use_stack``, which its load processes inherit through the environment."""

from __future__ import annotations

import os
from pathlib import Path

import grpc
import nats
from nats.aio.client import Client as Nats

from cdp_cli.client import MAX_MESSAGE_BYTES, Client, stack_channel
from cdp_kit.natsauth import ADMIN, PUBLISHER, stack_auth

STACK_DIR = "CDP_BENCH_STACK_DIR"  # the running stack's data dir, for the load processes


def use_stack(data_dir: Path) -> None:
    """Connections from here on (and from processes started from here) use this stack's credentials."""
    os.environ[STACK_DIR] = str(data_dir)


def _stack_dir() -> Path | None:
    value = os.environ.get(STACK_DIR)
    return Path(value) if value else None


CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]


async def nats_connect(url: str, *, publisher: bool = False) -> Nats:
    """A NATS connection as an outside event publisher opens one (``publisher``: the user that may
    only publish ``cdp.collect.>``), or as the admin (the baseline's own stream, reading back)."""
    data_dir = _stack_dir()
    options = {}
    if data_dir is not None:
        options = stack_auth(data_dir / "secrets", PUBLISHER if publisher else ADMIN).connect_options()
    return await nats.connect(
        url, connect_timeout=5, max_reconnect_attempts=2, pending_size=64 * 1024 * 1024, **options
    )


def client(data_dir: Path, addresses: dict[str, str], timeout_s: float = 60.0) -> Client:
    """The CLI's blocking client of the stack (set-up, status, counts)."""
    return Client(data_dir, addresses=addresses, timeout=timeout_s)


def aio_channel(address: str) -> grpc.aio.Channel:
    """An asyncio gRPC channel to one service (the lookup load: a reader's token over TLS)."""
    data_dir = _stack_dir()
    if data_dir is None:
        return grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
    return stack_channel(data_dir, address, "reader")
