"""How the end-to-end benchmarks reach the stack: the one place that opens a NATS connection
for publishing and the one place that creates gRPC clients (credentials and TLS, when the
stack has them, are added here and nowhere else)."""

from __future__ import annotations

from pathlib import Path

import grpc
import nats
from nats.aio.client import Client as Nats

from cdp_cli.client import MAX_MESSAGE_BYTES, Client

CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]


async def nats_connect(url: str) -> Nats:
    """A NATS connection as an outside event publisher (or the baseline's reader) opens one."""
    return await nats.connect(url, connect_timeout=5, max_reconnect_attempts=2, pending_size=64 * 1024 * 1024)


def client(data_dir: Path, addresses: dict[str, str], timeout_s: float = 60.0) -> Client:
    """The CLI's blocking client of the stack (set-up, status, counts)."""
    return Client(data_dir, addresses=addresses, timeout=timeout_s)


def aio_channel(address: str) -> grpc.aio.Channel:
    """An asyncio gRPC channel to one service (the lookup load)."""
    return grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
