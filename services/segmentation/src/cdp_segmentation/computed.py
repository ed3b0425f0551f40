"""Computed attributes: an aggregate of an event field over a lookback window, one value per profile.

A value is a pure function of the profile's retained events and the log's clock::

    count        the matching events in the window                     (0 when none)
    sum          the numeric values of the field                        (0 when none)
    min / max    the numeric values of the field                        (no value when none)
    most_recent  the field of the newest matching event that has it    (no value when none)

"Newest" is by event time, then log position, then event id (the history's order); relative
windows hold the events that occurred after ``clock - window`` (as segment windows do).
``values`` computes them from scratch; ``add`` updates them for one new event (the streaming
path), and the profile is recomputed from its kept events whenever events leave (window end on
the clock, retention, the cap, a merge or a split). Stored values are what segments compare.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cdp.segmentation.v1 import segmentation_pb2 as pb
from cdp_segmentation.evaluate import MISSING, Event, EventTest, compile_pattern, is_number, lookup

ComputedValues = dict[str, Any]


@dataclass(frozen=True)
class ComputedDef:
    name: str
    attribute: pb.ComputedAttribute
    chosen: EventTest
    get: Callable[[dict[str, Any]], Any]

    @classmethod
    def of(cls, attribute: pb.ComputedAttribute) -> ComputedDef:
        field = attribute.field

        def get(values: dict[str, Any]) -> Any:
            return lookup(values, field) if field else MISSING

        return cls(attribute.name, attribute, compile_pattern(attribute.pattern), get)

    @property
    def aggregate(self) -> int:
        return int(self.attribute.aggregate)

    @property
    def event_type(self) -> str:
        return self.attribute.pattern.event_type

    @property
    def window_ms(self) -> int | None:
        """The relative window in ms (the clock wakes the profile when an event leaves it)."""
        if self.attribute.window.WhichOneof("kind") == "within_seconds":
            return int(self.attribute.window.within_seconds) * 1000
        return None

    def in_window(self, ts_ms: int, now_ms: int) -> bool:
        window = self.attribute.window
        kind = window.WhichOneof("kind")
        if kind == "within_seconds":
            return ts_ms > now_ms - window.within_seconds * 1000
        if kind == "between":
            return window.between.from_ms <= ts_ms < window.between.to_ms
        return True

    def counts(self, event: Event, now_ms: int) -> bool:
        return self.in_window(event.ts_ms, now_ms) and self.chosen(event)

    def value(self, events: Sequence[Event], now_ms: int) -> Any:
        """From scratch over ``events`` (oldest first, in the history's order); MISSING for no value."""
        chosen = [e for e in events if self.counts(e, now_ms)]
        if self.aggregate == pb.AGGREGATE_COUNT:
            return float(len(chosen))
        if self.aggregate == pb.AGGREGATE_MOST_RECENT:
            for event in reversed(chosen):
                found = self.get(event.fields)
                if found is not MISSING and found is not None:
                    return found
            return MISSING
        numbers = [float(v) for v in (self.get(e.fields) for e in chosen) if is_number(v)]
        if self.aggregate == pb.AGGREGATE_SUM:
            total = 0.0
            for number in numbers:
                total += number
            return total
        if not numbers:
            return MISSING
        return min(numbers) if self.aggregate == pb.AGGREGATE_MIN else max(numbers)

    def add(self, current: Any, event: Event, events: Sequence[Event], now_ms: int) -> Any:
        """The value after ``event`` joined the history ``events`` (which holds it), from the value before."""
        if not self.counts(event, now_ms):
            return current
        if self.aggregate == pb.AGGREGATE_COUNT:
            return (0.0 if current is MISSING else float(current)) + 1.0
        if self.aggregate == pb.AGGREGATE_MOST_RECENT:
            # The newest matching event with the field decides; usually the one just added, at the end.
            return self.value_from_end(events, now_ms)
        number = self.get(event.fields)
        if not is_number(number):
            return current if current is not MISSING or self.aggregate != pb.AGGREGATE_SUM else 0.0
        number = float(number)
        if self.aggregate == pb.AGGREGATE_SUM:
            return (0.0 if current is MISSING else float(current)) + number
        if current is MISSING:
            return number
        return min(float(current), number) if self.aggregate == pb.AGGREGATE_MIN else max(float(current), number)

    def value_from_end(self, events: Sequence[Event], now_ms: int) -> Any:
        for event in reversed(events):
            if self.counts(event, now_ms):
                found = self.get(event.fields)
                if found is not MISSING and found is not None:
                    return found
        return MISSING


def values(defs: Sequence[ComputedDef], events: Sequence[Event], now_ms: int) -> ComputedValues:
    """Every computed attribute of a profile from scratch (absent values left out)."""
    out: ComputedValues = {}
    for d in defs:
        value = d.value(events, now_ms)
        if value is not MISSING:
            out[d.name] = value
    return out


def add_event(
    defs: Sequence[ComputedDef], current: Mapping[str, Any], event: Event, events: Sequence[Event], now_ms: int
) -> ComputedValues:
    """The values after one event joined the history (only the attributes it matches change)."""
    out = with_defaults(defs, current)
    for d in defs:
        if d.event_type and d.event_type != event.event_type:
            continue
        value = d.add(out.get(d.name, MISSING), event, events, now_ms)
        if value is MISSING:
            out.pop(d.name, None)
        else:
            out[d.name] = value
    return out


def with_defaults(defs: Sequence[ComputedDef], current: Mapping[str, Any]) -> ComputedValues:
    """count and sum are 0 over no events; the others have no value."""
    out = dict(current)
    for d in defs:
        if d.aggregate in (pb.AGGREGATE_COUNT, pb.AGGREGATE_SUM) and d.name not in out:
            out[d.name] = 0.0
    return out


def windows_ms(defs: Sequence[ComputedDef]) -> set[int]:
    return {w for w in (d.window_ms for d in defs) if w is not None}
