"""The merge rule: which record's value of an attribute a unified profile shows.

One pure rule, used by segmentation (the profile it shows and evaluates segments on) and by
activation (the attributes it sends and its consent gate reads), so the two always agree.

Each record fragment has an origin: its dataset, its record time, and its place in identity's
log (the stream sequence of the message, then the fragment's place among the message's events).
Two fragments never share a log position, so the rule is a total order and needs no id.

* ``timestamp`` (no precedence): the newest record time wins, then the later log position.
* ``dataset_precedence``: the first listed dataset holding the attribute wins; the datasets
  after it, then unlisted ones; within one rank, as ``timestamp``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from google.protobuf.timestamp_pb2 import Timestamp


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a record's attribute values came from, with what orders them."""

    dataset: str
    ts_ms: int
    seq: int
    pos: int = 0


@dataclass(frozen=True, slots=True)
class MergeRule:
    """A merge policy as a rule: ``precedence`` empty is ``timestamp``, else ``dataset_precedence``."""

    precedence: tuple[str, ...] = ()
    _rank: dict[str, int] = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        rank: dict[str, int] = {}
        for i, dataset in enumerate(self.precedence):
            rank.setdefault(dataset, i)
        object.__setattr__(self, "_rank", rank)

    def key(self, dataset: str, ts_ms: int, seq: int, pos: int) -> tuple[int, ...]:
        """The larger key wins an attribute."""
        if not self.precedence:
            return (ts_ms, seq, pos)
        return (-self._rank.get(dataset, len(self.precedence)), ts_ms, seq, pos)

    def key_of(self, origin: Origin) -> tuple[int, ...]:
        return self.key(origin.dataset, origin.ts_ms, origin.seq, origin.pos)

    def wins(self, candidate: Origin, current: Origin | None) -> bool:
        """Whether ``candidate`` replaces ``current`` (the same origin again replaces itself)."""
        return current is None or self.key_of(candidate) >= self.key_of(current)


def resolve(
    rule: MergeRule, records: Iterable[tuple[Mapping[str, Any], Origin]]
) -> tuple[dict[str, Any], dict[str, Origin]]:
    """Each attribute's value from the record whose origin wins it, and that origin. The records'
    order does not matter (the rule is total): a fold, a merge and a split all end here."""
    attributes: dict[str, Any] = {}
    origins: dict[str, Origin] = {}
    for values, origin in records:
        key = rule.key_of(origin)
        for name, value in values.items():
            current = origins.get(name)
            if current is None or key >= rule.key_of(current):
                attributes[name], origins[name] = value, origin
    return attributes, origins


def timestamp_ms(ts: Timestamp) -> int:
    """A fragment's record time in milliseconds: ``to_ms(from_timestamp(ts))`` without the
    datetime, the same float arithmetic (``datetime.timestamp`` is the exact microseconds over
    10**6), so every service reading a fragment finds the same time."""
    return int((ts.seconds * 1_000_000 + ts.nanos // 1000) / 1_000_000 * 1000)


class _HasId(Protocol):
    @property
    def id(self) -> str: ...


def positions(events: Sequence[_HasId]) -> dict[str, int]:
    """Each event's place among its message's events: with the stream sequence, its log position.
    A pure function of the message, so a retry or a replay finds the same places."""
    return {event.id: i for i, event in enumerate(events)}
