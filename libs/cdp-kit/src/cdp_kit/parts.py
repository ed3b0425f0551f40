"""Multi-part causes: one cause's outputs spread over several messages, applied whole or not at all.

No valid input may cause more than one message can hold, so a cause whose events exceed one
message is appended as numbered parts: each part carries ``Cdp-Part: i/n`` beside its
``Cdp-Cause``, and the part with i = n completes the cause. Parts go out one after another
under the subject's expected-sequence guard, so on the log they are consecutive on their
subject, and nothing else of the same writer comes between them.

A reader (a downstream consumer, or the writer folding its own log back) applies a cause only
when its last part has arrived, as one unit in one transaction, keyed by the last part's
sequence; a consumer's checkpoint never passes part of a cause. If the writer died between
parts, the parts on the log are an **aborted attempt**: the writer's recovery does not fold
them, re-decides the cause, and appends it again after them. So a reader drops a part group
as soon as its subject carries anything but the group's next part.

A consumer reads one writer's subjects (every profile-keyed stream has one writer per
subject, and a partitioned consumer filters its partition). A message of another subject
between the parts of a group would mean two writers' causes interleave on one consumer; that
is refused loudly (``InterleavedParts``: the consumer stalls and shows why) rather than guessed.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Generic, TypeVar

from cdp_kit.errors import Unavailable
from cdp_kit.eventlog import LogMessage
from cdp_kit.telemetry import get_logger

PART_HEADER = "Cdp-Part"
log = get_logger(__name__)


T = TypeVar("T")


def part_header(index: int, count: int) -> str:
    return f"{index}/{count}"


def part_of(msg: LogMessage) -> tuple[int, int] | None:
    """(i, n) of a part message, or None for an ordinary message (or a malformed header)."""
    raw = msg.headers.get(PART_HEADER)
    if raw is None:
        return None
    index, _, count = raw.partition("/")
    if not (index.isdigit() and count.isdigit()) or not 1 <= int(index) <= int(count):
        return None
    return int(index), int(count)


class InterleavedParts(Unavailable):
    """Another subject's message came between the parts of a cause: two writers on one consumer."""


class Assembler(Generic[T]):
    """Turns messages, in stream order, into units: one ordinary message, or every part of one
    cause. ``T`` is whatever travels with each message (the raw NATS message to ack)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._open: list[tuple[LogMessage, T]] = []
        self._count = 0
        self._discarded: list[tuple[LogMessage, T]] = []
        self.dropped = 0

    @property
    def held(self) -> list[tuple[LogMessage, T]]:
        """The parts of a cause whose last part has not arrived yet."""
        return list(self._open)

    def discarded(self) -> list[tuple[LogMessage, T]]:
        """The parts of aborted attempts dropped since the last call: never to be applied, so a
        consumer acknowledges them (unacknowledged, JetStream would redeliver them for ever)."""
        out, self._discarded = self._discarded, []
        return out

    def feed(self, items: Iterable[tuple[LogMessage, T]]) -> list[list[tuple[LogMessage, T]]]:
        """Take the next messages; return the units they complete, in order."""
        ready: list[list[tuple[LogMessage, T]]] = []
        for item in items:
            unit = self._take(item)
            if unit is not None:
                ready.append(unit)
        return ready

    def _take(self, item: tuple[LogMessage, T]) -> list[tuple[LogMessage, T]] | None:
        msg = item[0]
        part = part_of(msg)
        if self._open:
            if part == (len(self._open) + 1, self._count):
                self._open.append(item)
                return self._close() if part[0] == part[1] else None
            if msg.subject != self._open[0][0].subject:
                raise InterleavedParts(
                    f"{self.name}: {msg.stream} message {msg.sequence} on {msg.subject} came between the parts "
                    f"of a cause on {self._open[0][0].subject}: give each writer's subjects their own consumer"
                )
            self._abort()
        if part is None:
            return [item]
        if part[0] != 1:
            # The rest of a group whose beginning is not here: an attempt that was aborted.
            self.dropped += 1
            self._discarded.append(item)
            log.warning(
                "part_without_its_beginning_dropped", reader=self.name, stream=msg.stream, sequence=msg.sequence
            )
            return None
        self._open, self._count = [item], part[1]
        return self._close() if part[1] == 1 else None

    def _close(self) -> list[tuple[LogMessage, T]]:
        unit, self._open, self._count = self._open, [], 0
        return unit

    def _abort(self) -> None:
        first = self._open[0][0]
        self.dropped += len(self._open)
        self._discarded += self._open
        log.warning(
            "aborted_parts_dropped",
            reader=self.name,
            stream=first.stream,
            first_sequence=first.sequence,
            parts=f"{len(self._open)}/{self._count}",
        )
        self._close()


def split_by_size(sizes: Sequence[int], limit: int) -> list[tuple[int, int]]:
    """[start, end) ranges of consecutive items whose sizes add up to at most ``limit`` each
    (an item larger than ``limit`` alone fills one range)."""
    ranges: list[tuple[int, int]] = []
    start, total = 0, 0
    for i, size in enumerate(sizes):
        if i > start and total + size > limit:
            ranges.append((start, i))
            start, total = i, 0
        total += size
    if start < len(sizes):
        ranges.append((start, len(sizes)))
    return ranges
