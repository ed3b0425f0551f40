"""A loopback TCP proxy a test can sever: put it between one client and a server, then cut
every connection through it (both sides closed at once, as a dropped link or a crashed load
balancer would) while data flows. It keeps accepting: a client that reconnects to it gets a
fresh connection to the server.

It runs its own event loop on a thread, so blocking tests (the embedded ``Stack``) and async
ones can both drive it.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Coroutine
from types import TracebackType
from typing import Any, TypeVar

LOOPBACK = "127.0.0.1"
CHUNK_BYTES = 64 * 1024
CONNECT_TIMEOUT_S = 5.0
T = TypeVar("T")


class _Pair:
    """A client's connection and the proxy's connection to the server on its behalf."""

    def __init__(self, client: asyncio.StreamWriter, server: asyncio.StreamWriter) -> None:
        self.client = client
        self.server = server

    def abort(self) -> None:
        for writer in (self.client, self.server):
            writer.transport.abort()


class TcpProxy:
    """Forwards every connection accepted on ``host:port`` to ``upstream()``.

    ``upstream`` is called for each new connection, so the server's address may be learnt after
    the proxy started (e.g. once the stack chose nats-server's port)."""

    def __init__(self, upstream: Callable[[], tuple[str, int]], *, host: str = LOOPBACK) -> None:
        self.upstream = upstream
        self.host = host
        self.port = 0
        self.accepted = 0
        self.severed = 0
        # Bytes forwarded from the server to its clients, over all connections.
        self.downstream_bytes = 0
        self._pairs: set[_Pair] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="tcp-proxy", daemon=True)
        self._server: asyncio.Server | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> TcpProxy:
        self._thread.start()
        self._server = self._call(asyncio.start_server(self._handle, self.host, 0))
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    def open_connections(self) -> int:
        return self._call(self._count())

    def sever(self) -> int:
        """Close both sides of every connection through the proxy at once; how many were cut."""
        return self._call(self._sever())

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        with contextlib.suppress(Exception):
            self._call(self._close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10.0)
        self._loop.close()

    # ------------------------------------------------------------------ on the proxy's loop

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(30.0)

    async def _count(self) -> int:
        return len(self._pairs)

    async def _sever(self) -> int:
        pairs = list(self._pairs)
        for pair in pairs:
            pair.abort()
        self._pairs.difference_update(pairs)
        self.severed += len(pairs)
        return len(pairs)

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        await self._sever()
        if self._server is not None:
            await self._server.wait_closed()

    async def _handle(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            host, port = self.upstream()
            server_reader, server_writer = await asyncio.wait_for(
                asyncio.open_connection(host, port), CONNECT_TIMEOUT_S
            )
        except (OSError, TimeoutError):
            client_writer.transport.abort()
            return
        self.accepted += 1
        pair = _Pair(client_writer, server_writer)
        self._pairs.add(pair)
        try:
            await asyncio.gather(
                self._pump(client_reader, server_writer), self._pump(server_reader, client_writer, downstream=True)
            )
        finally:
            self._pairs.discard(pair)
            pair.abort()

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, downstream: bool = False
    ) -> None:
        """Copy one direction until either side closes; then close the other direction too."""
        try:
            while data := await reader.read(CHUNK_BYTES):
                if downstream:
                    self.downstream_bytes += len(data)
                writer.write(data)
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.transport.abort()

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
