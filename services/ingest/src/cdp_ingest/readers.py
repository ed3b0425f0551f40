"""Reading CSV on every core: blocks of complete rows judged by reader processes, in order.

Parsing, converting, validating and encoding a row costs ~14 µs of Python; one process
reads ~70,000 rows/s at best, and the GIL keeps threads from doing better. A batch's CSV is
already cut into blocks of complete rows (at a newline outside quotes); after the header,
each block goes to a reader process with the number of its first row, and the results are
taken back **in block order**, so reports, staged chunks and row numbers are exactly those
of reading in one process (a test compares them). Row numbers are known before a block is
read: the service counts the rows of each block itself (a count of newlines when the block
holds no quote, carriage return, NUL or blank line; else the ``csv`` module's count).

Readers are plain child processes (``python -m cdp_ingest.readers``) speaking length-prefixed
pickle frames on their stdin/stdout: no ``multiprocessing`` (which re-imports the parent's
main module and does not mix with gRPC's threads). They start with the first large batch and
are kept for the next ones. A reader ends when its stdin closes, which the kernel does when
the service dies, even by ``kill -9``, and a watchdog thread ends it mid-block then too.
Block ``k`` goes to reader ``k mod n``; at most ``2 x n`` blocks are in flight, so memory
stays bounded whatever the file size.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import pickle
import queue
import struct
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from typing import IO, TypeVar, cast

from cdp.ingest.v1 import ingest_pb2 as pb
from cdp_ingest.domain import IdentityRules, Validator
from cdp_ingest.judging import Judged, judge
from cdp_ingest.limits import Limits
from cdp_ingest.parsing import CsvParser, decode
from cdp_ingest.records import RecordBuilder
from cdp_kit.errors import CdpError, Unavailable
from cdp_kit.telemetry import configure_pii_hash
from cdp_kit.vault import LocalKeys

T = TypeVar("T")
_LEN = struct.Struct("<I")


@dataclass(frozen=True)
class ReadSpec:
    """What a worker needs to judge the rows of one batch: small, picklable and hashable."""

    schema: bytes
    textual: bool
    drop_unknown: bool
    max_bytes: int
    dataset: str
    batch_id: str
    received_at: datetime
    header: tuple[str, ...]
    limits: Limits
    identity: IdentityRules
    # Seal records (cdp_kit.vault.LocalKeys) with key refs keyed by the service's PII hash key.
    seal: bool = False
    pii_key: bytes = field(default=b"", repr=False)


@lru_cache(maxsize=8)
def _compiled(spec: ReadSpec) -> tuple[Validator, RecordBuilder]:
    schema = pb.Schema.FromString(spec.schema)
    validator = Validator(
        schema,
        textual=spec.textual,
        drop_unknown=spec.drop_unknown,
        max_bytes=spec.max_bytes,
        max_depth=spec.limits.max_depth,
        identity=spec.identity,
    )
    if spec.pii_key:
        configure_pii_hash(spec.pii_key)
    builder = RecordBuilder(
        spec.dataset,
        schema.schema_class,
        spec.batch_id,
        spec.received_at,
        record_time=bool(schema.timestamp_field),
        keys=LocalKeys() if spec.seal else None,
    )
    return validator, builder


def judge_block(spec: ReadSpec, block: bytes, first_row: int) -> Judged:
    """Run in a worker: parse one block of complete CSV rows (after the header) and judge them."""
    validator, builder = _compiled(spec)
    parser = CsvParser.after_header(list(spec.header), first_row, spec.limits)
    return judge(parser.parse(block), validator, builder)


def count_rows(block: bytes) -> int:
    """How many rows ``CsvParser.parse`` reads from a block of complete rows (blank lines are not rows).
    ``CsvParser.split`` keeps rows over the row limit out of blocks, so the ``csv`` module
    counts rows of bounded size."""
    plain = b'"' not in block and b"\r" not in block and b"\x00" not in block and b"\n\n" not in block
    if plain and not block.startswith(b"\n"):
        return block.count(b"\n") + (0 if not block or block.endswith(b"\n") else 1)
    text, _dirty = decode(block)
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    rows = 0
    while True:
        try:
            values = next(reader)
        except StopIteration:
            return rows
        except csv.Error:
            rows += 1  # CsvParser reports such a row as one rejected row
            continue
        if values:
            rows += 1


def _watch_parent(parent: int) -> None:
    """End this reader when the service that started it is gone."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()


def _write(stream: IO[bytes], item: object) -> None:
    blob = pickle.dumps(item, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_LEN.pack(len(blob)) + blob)
    stream.flush()


def _read(stream: IO[bytes]) -> object:
    head = stream.read(_LEN.size)
    if len(head) < _LEN.size:
        raise EOFError
    (size,) = _LEN.unpack(head)
    blob = stream.read(size)
    if len(blob) < size:
        raise EOFError
    return pickle.loads(blob)


def serve(requests: IO[bytes], answers: IO[bytes]) -> None:
    """A reader's loop: (spec, block, first row) in, ``Judged`` (or an error's text) out, until EOF."""
    while True:
        try:
            request = _read(requests)
        except EOFError:
            return
        spec, block, first_row = cast(tuple[ReadSpec, bytes, int], request)
        try:
            answer: object = judge_block(spec, block, first_row)
        except Exception as exc:  # reported to the service, which fails the batch
            answer = f"{type(exc).__name__}: {exc}"
        _write(answers, answer)


class _Reader:
    """One reader process, with a thread that feeds it blocks (so the service never waits for
    a busy reader to take one) and a thread that drains its answers (so it never blocks
    writing them)."""

    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "cdp_ingest.readers", str(os.getpid())],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        self.answers: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._requests: queue.SimpleQueue[object] = queue.SimpleQueue()
        threading.Thread(target=self._drain, name="csv-reader-answers", daemon=True).start()
        threading.Thread(target=self._feed, name="csv-reader-requests", daemon=True).start()

    def _feed(self) -> None:
        assert self.process.stdin is not None
        while (item := self._requests.get()) is not _STOP:
            try:
                _write(self.process.stdin, item)
            except (OSError, ValueError):
                return  # the reader is gone: its answers thread reports it

    def _drain(self) -> None:
        assert self.process.stdout is not None
        try:
            while True:
                self.answers.put(_read(self.process.stdout))
        except (EOFError, OSError, pickle.UnpicklingError):
            self.answers.put(_DIED)

    def send(self, item: object) -> None:
        if not self.alive():
            raise ReaderDied("a CSV reader process died; send the batch again")
        self._requests.put(item)

    def answer(self) -> Judged:
        got = self.answers.get()
        if got is _DIED:
            raise ReaderDied("a CSV reader process died; send the batch again")
        if isinstance(got, str):
            raise CdpError(f"reading the file failed: {got}")
        assert isinstance(got, Judged)
        return got

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        self._requests.put(_STOP)
        if self.process.stdin is not None:
            with contextlib.suppress(OSError):
                self.process.stdin.close()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


_DIED = "\x00died"
_STOP = object()


class ReaderDied(Unavailable):
    """A reader process is gone; the batch fails and can be sent again."""


class ReaderPool:
    """Reader processes shared by the batches of one service (started on first use).
    One batch uses them at a time (a lock): a second large batch reads in its own process."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._readers: list[_Reader] = []
        self._lock = threading.Lock()

    def acquire(self) -> list[_Reader] | None:
        if not self._lock.acquire(blocking=False):
            return None
        if len(self._readers) != self.workers or not all(r.alive() for r in self._readers):
            for reader in self._readers:
                reader.stop()
            self._readers = [_Reader() for _ in range(self.workers)]
        return self._readers

    def release(self, broken: bool) -> None:
        if broken:
            for reader in self._readers:
                reader.stop()
            self._readers = []
        self._lock.release()

    def close(self) -> None:
        """Stop the readers (waiting a little for a batch that is using them to let go)."""
        held = self._lock.acquire(timeout=10)
        try:
            for reader in self._readers:
                reader.stop()
            self._readers = []
        finally:
            if held:
                self._lock.release()


class BlockQueue:
    """Blocks of one batch in flight on the readers; results come back in submission order.
    A result judged in the service (a row refused as too large) waits its turn among them."""

    def __init__(self, pool: ReaderPool, readers: list[_Reader], spec: ReadSpec) -> None:
        self.pool = pool
        self.readers = readers
        self.spec = spec
        self._sent = 0
        self._pending: deque[_Reader | Judged] = deque()
        self._released = False

    def submit(self, block: bytes, first_row: int) -> list[Judged]:
        """Send a block; answers the results now due (the oldest, when too many are in flight)."""
        done: list[Judged] = []
        while len(self._pending) >= 2 * len(self.readers):
            done.append(self._next())
        reader = self.readers[self._sent % len(self.readers)]
        self._guard(reader.send, (self.spec, block, first_row))
        self._sent += 1
        self._pending.append(reader)
        return done

    def submit_judged(self, judged: Judged) -> None:
        """A result already known, due after the blocks sent before it."""
        self._pending.append(judged)

    def drain(self) -> list[Judged]:
        done = []
        while self._pending:
            done.append(self._next())
        self.release(broken=False)
        return done

    def release(self, broken: bool) -> None:
        if not self._released:
            self._released = True
            in_flight = any(isinstance(entry, _Reader) for entry in self._pending)
            self.pool.release(broken or in_flight)

    def _next(self) -> Judged:
        head = self._pending.popleft()
        if isinstance(head, Judged):
            return head
        return self._guard(head.answer)

    def _guard(self, call: Callable[..., T], *args: object) -> T:
        try:
            return call(*args)
        except CdpError:
            self.release(broken=True)
            raise


def main() -> None:
    _watch_parent(int(sys.argv[1]))
    serve(sys.stdin.buffer, sys.stdout.buffer)


if __name__ == "__main__":
    main()
