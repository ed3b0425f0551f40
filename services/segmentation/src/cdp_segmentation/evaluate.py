"""The streaming evaluator: one AST, one profile, in Python. Pure: the time is passed in.

Semantics (the SQL compiler in ``sql.py`` implements the same, see docs/segmentation.md):
a comparison is false when the attribute is missing or null, or of another kind than the
literal (then only ``!=`` is true); relative windows hold events that occurred after
``now - window``; ``A followed by B within w`` needs a B strictly after an A and at most w
later; ``A not followed by B within w`` needs an A at least w old with no such B.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from cdp.segmentation.v1 import segmentation_pb2 as pb

MISSING = object()


@dataclass(frozen=True)
class Event:
    event_type: str
    ts_ms: int
    fields: dict[str, Any]


@dataclass
class ProfileData:
    """What the language sees of one profile. Events load on first use (most segments never read them)."""

    attributes: dict[str, Any]
    namespaces: set[str]
    memberships: set[str]
    load_events: Callable[[], Sequence[Event]] = lambda: ()
    _events: Sequence[Event] | None = field(default=None, repr=False)

    @property
    def events(self) -> Sequence[Event]:
        if self._events is None:
            self._events = self.load_events()
        return self._events


def lookup(values: dict[str, Any], path: str) -> Any:
    value: Any = values
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return MISSING
        value = value[part]
    return value


def literal_value(lit: pb.Literal) -> Any:
    kind = lit.WhichOneof("kind")
    if kind == "list_value":
        return [literal_value(i) for i in lit.list_value.items]
    if kind is None:
        return None
    return getattr(lit, kind)


def _same_kind(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool)
    numeric = (int, float)
    if isinstance(a, numeric) and isinstance(b, numeric):
        return True
    return isinstance(a, str) and isinstance(b, str)


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def compare(op: pb.CompareOp.ValueType, actual: Any, expected: Any) -> bool:
    if actual is MISSING or actual is None:
        return False
    if op == pb.COMPARE_OP_IN:
        return any(_same_kind(actual, e) and actual == e for e in expected)
    if op == pb.COMPARE_OP_CONTAINS:
        if isinstance(actual, list):
            return any(isinstance(item, str) and item == expected for item in actual)
        return isinstance(actual, str) and expected in actual
    if op == pb.COMPARE_OP_STARTS_WITH:
        return isinstance(actual, str) and actual.startswith(expected)
    if not _same_kind(actual, expected):
        return op == pb.COMPARE_OP_NE
    if op == pb.COMPARE_OP_EQ:
        return bool(actual == expected)
    if op == pb.COMPARE_OP_NE:
        return bool(actual != expected)
    if op == pb.COMPARE_OP_LT:
        return bool(actual < expected)
    if op == pb.COMPARE_OP_LE:
        return bool(actual <= expected)
    if op == pb.COMPARE_OP_GT:
        return bool(actual > expected)
    return bool(actual >= expected)


def matches_fields(ast: pb.Expression, values: dict[str, Any]) -> bool:
    """Attribute-level conditions (also the `where` of event patterns, over an event's fields)."""
    node = ast.WhichOneof("node")
    if node == "comparison":
        cmp = ast.comparison
        return compare(cmp.op, lookup(values, cmp.path), literal_value(cmp.value))
    if node == "exists":
        return lookup(values, ast.exists.path) not in (MISSING, None)
    if node == "all":
        return all(matches_fields(t, values) for t in ast.all.terms)
    if node == "any":
        return any(matches_fields(t, values) for t in ast.any.terms)
    if node == "negate":
        return not matches_fields(ast.negate, values)
    return False


def in_pattern(pattern: pb.EventPattern, event: Event) -> bool:
    if pattern.event_type and event.event_type != pattern.event_type:
        return False
    return not pattern.HasField("where") or matches_fields(pattern.where, event.fields)


def in_window(window: pb.Window, ts_ms: int, now_ms: int) -> bool:
    kind = window.WhichOneof("kind")
    if kind == "within_seconds":
        return ts_ms > now_ms - window.within_seconds * 1000
    if kind == "between":
        return window.between.from_ms <= ts_ms < window.between.to_ms
    return True


def aggregate(cond: pb.EventCondition, events: Sequence[Event], now_ms: int) -> float | None:
    chosen = [e for e in events if in_pattern(cond.pattern, e) and in_window(cond.window, e.ts_ms, now_ms)]
    if cond.aggregate == pb.AGGREGATE_COUNT:
        return float(len(chosen))
    values = [v for v in (lookup(e.fields, cond.field) for e in chosen) if is_number(v)]
    if cond.aggregate == pb.AGGREGATE_SUM:
        return float(sum(values))
    if not values:
        return None
    if cond.aggregate == pb.AGGREGATE_MIN:
        return float(min(values))
    if cond.aggregate == pb.AGGREGATE_MAX:
        return float(max(values))
    return float(sum(values)) / len(values)


def followed(seq: pb.Sequence, events: Sequence[Event], now_ms: int) -> bool:
    width = seq.within_seconds * 1000
    firsts = [e for e in events if in_pattern(seq.first, e)]
    thens = [e for e in events if in_pattern(seq.then, e)]

    def answered(a: Event) -> bool:
        return any(a.ts_ms < b.ts_ms <= a.ts_ms + width for b in thens)

    if seq.negated:
        return any(a.ts_ms + width <= now_ms and not answered(a) for a in firsts)
    return any(answered(a) for a in firsts)


def matches(ast: pb.Expression, profile: ProfileData, now_ms: int) -> bool:
    node = ast.WhichOneof("node")
    if node in ("comparison", "exists"):
        return matches_fields(ast, profile.attributes)
    if node == "all":
        return all(matches(t, profile, now_ms) for t in ast.all.terms)
    if node == "any":
        return any(matches(t, profile, now_ms) for t in ast.any.terms)
    if node == "negate":
        return not matches(ast.negate, profile, now_ms)
    if node == "event":
        value = aggregate(ast.event, profile.events, now_ms)
        return value is not None and compare(ast.event.op, value, ast.event.value)
    if node == "sequence":
        return followed(ast.sequence, profile.events, now_ms)
    if node == "identity":
        return ast.identity.namespace in profile.namespaces
    if node == "consent":
        return compare(
            pb.COMPARE_OP_EQ, lookup(profile.attributes, f"consents.{ast.consent.purpose}"), ast.consent.value
        )
    if node == "member_of":
        return ast.member_of.segment_id in profile.memberships
    return False
