"""The streaming evaluator: one AST, one profile, in Python. Pure: the time is passed in.

Semantics (the SQL compiler in ``sql.py`` implements the same, see docs/segmentation.md):
a comparison is false when the attribute is missing or null, or of another kind than the
literal (then only ``!=`` is true); relative windows hold events that occurred after
``now - window``; ``A followed by B within w`` needs a B strictly after an A and at most w
later; ``A not followed by B within w`` needs an A at least w old with no such B. A window on the
first step (``A within v followed by …``) restricts the A to those in it, as for event conditions;
the B is counted from its A, in or out of that window.
"""

from __future__ import annotations

import bisect
import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from cdp.segmentation.v1 import segmentation_pb2 as pb
from cdp_kit.consent import consent_of, consent_text

MISSING = object()


@dataclass(slots=True)
class Event:
    """One event of a profile's history (never changed once made: not frozen only because a
    frozen dataclass is several times slower to make, and streaming makes one per event)."""

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
    # The stored values of the computed attributes (computed.py), by name.
    computed: dict[str, Any] = field(default_factory=dict)
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
    firsts = [e for e in events if in_pattern(seq.first, e) and in_window(seq.first_window, e.ts_ms, now_ms)]
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
        return consent_of(profile.attributes, ast.consent.purpose) == consent_text(ast.consent.value)
    if node == "member_of":
        return ast.member_of.segment_id in profile.memberships
    if node == "computed":
        cond = ast.computed
        return compare(cond.op, profile.computed.get(cond.name, MISSING), literal_value(cond.value))
    return False


# --------------------------------------------------------------------------- compiled
# The same semantics as ``matches``, with the tree walked once per segment instead of once per
# evaluation: streaming evaluates thousands of profiles a second against the same definitions.
# Each comparison is specialised for its operator and the kind of its literal (``compare``
# decides both for every value); anything not specialised falls back to ``compare`` itself.
Test = Callable[[ProfileData, int], bool]
FieldTest = Callable[[dict[str, Any]], bool]
EventTest = Callable[[Event], bool]
Check = Callable[[Any], bool]

_ORDER: dict[int, Callable[[Any, Any], bool]] = {
    pb.COMPARE_OP_EQ: operator.eq,
    pb.COMPARE_OP_NE: operator.ne,
    pb.COMPARE_OP_LT: operator.lt,
    pb.COMPARE_OP_LE: operator.le,
    pb.COMPARE_OP_GT: operator.gt,
    pb.COMPARE_OP_GE: operator.ge,
}
_INEQUALITIES = (pb.COMPARE_OP_LT, pb.COMPARE_OP_LE, pb.COMPARE_OP_GT, pb.COMPARE_OP_GE)


def _getter(path: str) -> Callable[[dict[str, Any]], Any]:
    if "." not in path:
        return lambda values: values.get(path, MISSING)
    return lambda values: lookup(values, path)


def compile_check(op: pb.CompareOp.ValueType, expected: Any) -> Check:
    """A function of the actual value equal to ``compare(op, actual, expected)``."""
    if isinstance(expected, str):
        if op == pb.COMPARE_OP_EQ:
            return lambda a: bool(a == expected)  # only a string equals a string
        if op == pb.COMPARE_OP_NE:
            return lambda a: a is not MISSING and a is not None and bool(a != expected)
        if op in _INEQUALITIES:
            order = _ORDER[op]
            return lambda a: isinstance(a, str) and order(a, expected)
    elif isinstance(expected, bool):
        if op == pb.COMPARE_OP_EQ:
            return lambda a: a is expected
        if op == pb.COMPARE_OP_NE:
            return lambda a: a is not MISSING and a is not None and a is not expected
    elif is_number(expected):
        if op == pb.COMPARE_OP_EQ:
            return lambda a: is_number(a) and bool(a == expected)
        if op == pb.COMPARE_OP_NE:
            return lambda a: a is not MISSING and a is not None and (not is_number(a) or bool(a != expected))
        if op in _INEQUALITIES:
            order = _ORDER[op]
            return lambda a: is_number(a) and order(a, expected)
    elif op == pb.COMPARE_OP_IN and isinstance(expected, list) and all(isinstance(e, str) for e in expected):
        strings = frozenset(expected)
        return lambda a: isinstance(a, str) and a in strings
    return lambda a: compare(op, a, expected)


def compile_fields(ast: pb.Expression) -> FieldTest:
    node = ast.WhichOneof("node")
    if node == "comparison":
        cmp = ast.comparison
        path, expected = cmp.path, literal_value(cmp.value)
        if cmp.op == pb.COMPARE_OP_EQ and isinstance(expected, str) and "." not in path:
            return lambda values: bool(values.get(path) == expected)
        check, get = compile_check(cmp.op, expected), _getter(path)
        return lambda values: check(get(values))
    if node == "exists":
        present = _getter(ast.exists.path)
        return lambda values: present(values) not in (MISSING, None)
    if node in ("all", "any"):
        return _combine_fields(node, [compile_fields(t) for t in getattr(ast, node).terms])
    if node == "negate":
        inner = compile_fields(ast.negate)
        return lambda values: not inner(values)
    return lambda values: False


def _combine_fields(node: str, terms: list[FieldTest]) -> FieldTest:
    """``all``/``any`` of compiled field tests."""
    if len(terms) == 1:
        return terms[0]
    if len(terms) == 2:
        a, b = terms
        return (lambda v: a(v) and b(v)) if node == "all" else (lambda v: a(v) or b(v))
    if node == "all":
        return lambda v: all(t(v) for t in terms)
    return lambda v: any(t(v) for t in terms)


def _combine(node: str, terms: list[Test]) -> Test:
    """``all``/``any`` of compiled tests."""
    if len(terms) == 1:
        return terms[0]
    if len(terms) == 2:
        a, b = terms
        return (lambda p, now: a(p, now) and b(p, now)) if node == "all" else (lambda p, now: a(p, now) or b(p, now))
    if node == "all":
        return lambda p, now: all(t(p, now) for t in terms)
    return lambda p, now: any(t(p, now) for t in terms)


def compile_pattern(pattern: pb.EventPattern) -> EventTest:
    event_type = pattern.event_type
    where = compile_fields(pattern.where) if pattern.HasField("where") else None
    if where is None:
        return (lambda e: e.event_type == event_type) if event_type else (lambda e: True)
    if not event_type:
        return lambda e: where(e.fields)
    return lambda e: e.event_type == event_type and where(e.fields)


def _bounds(window: pb.Window) -> Callable[[int], tuple[float, float, bool]]:
    """The window as a function of ``now``: (low, high, whether low is excluded), for
    ``low < ts < high`` or ``low <= ts < high``; equal to ``in_window``."""
    kind = window.WhichOneof("kind")
    if kind == "within_seconds":
        width = window.within_seconds * 1000
        return lambda now: (now - width, math.inf, True)
    if kind == "between":
        fixed = (window.between.from_ms, window.between.to_ms, False)
        return lambda now: fixed
    return lambda now: (-math.inf, math.inf, True)


def _compile_event(cond: pb.EventCondition) -> Test:
    """``aggregate`` then ``compare``, selecting the events in one comprehension with no call per
    event (but the ``where``): streaming evaluates these for every event it receives."""
    bounds, event_type = _bounds(cond.window), cond.pattern.event_type
    where = compile_fields(cond.pattern.where) if cond.pattern.HasField("where") else None
    agg, op, value = cond.aggregate, cond.op, cond.value
    # An aggregate is a float and the literal a double: ``compare`` is the plain operator.
    order = _ORDER.get(op) or (lambda a, b: compare(op, a, b))
    name, get = cond.field, _getter(cond.field)
    plain = "." not in name

    def selected(p: ProfileData, now: int) -> list[Event]:
        """The events the condition reads: in the window, of the type, matching ``where``."""
        low, high, strict = bounds(now)
        return [
            e
            for e in p.events
            if (low < e.ts_ms if strict else low <= e.ts_ms)
            and e.ts_ms < high
            and (not event_type or e.event_type == event_type)
            and (where is None or where(e.fields))
        ]

    if agg == pb.AGGREGATE_COUNT:
        return lambda p, now: order(float(len(selected(p, now))), value)

    def numbers(p: ProfileData, now: int) -> list[Any]:
        found = []
        for e in selected(p, now):
            v = e.fields.get(name, MISSING) if plain else get(e.fields)
            if isinstance(v, int | float) and not isinstance(v, bool):
                found.append(v)
        return found

    if agg == pb.AGGREGATE_SUM:
        return lambda p, now: order(float(sum(numbers(p, now))), value)

    def test(p: ProfileData, now: int) -> bool:
        found = numbers(p, now)
        if not found:
            return False
        if agg == pb.AGGREGATE_MIN:
            return order(float(min(found)), value)
        if agg == pb.AGGREGATE_MAX:
            return order(float(max(found)), value)
        return order(float(sum(found)) / len(found), value)

    return test


def _compile_sequence(seq: pb.Sequence) -> Test:
    """``followed``, in one pass over the events (the pattern tests inlined but the ``where``)."""
    first_type, then_type = seq.first.event_type, seq.then.event_type
    first_where = compile_fields(seq.first.where) if seq.first.HasField("where") else None
    then_where = compile_fields(seq.then.where) if seq.then.HasField("where") else None
    width, negated = seq.within_seconds * 1000, seq.negated
    bounds = _bounds(seq.first_window)

    def test(profile: ProfileData, now_ms: int) -> bool:
        firsts, thens = [], []
        low, high, strict = bounds(now_ms)
        for e in profile.events:
            if (
                (not first_type or e.event_type == first_type)
                and (low < e.ts_ms if strict else low <= e.ts_ms)
                and e.ts_ms < high
                and (first_where is None or first_where(e.fields))
            ):
                firsts.append(e.ts_ms)
            if (not then_type or e.event_type == then_type) and (then_where is None or then_where(e.fields)):
                thens.append(e.ts_ms)
        if not firsts:
            return False
        thens.sort()
        count = len(thens)
        # An A is answered by some B with a < b <= a + width: the first B after it is within the width.
        for a in firsts:
            if negated and a + width > now_ms:
                continue
            after = bisect.bisect_right(thens, a)
            answered = after < count and thens[after] <= a + width
            if answered != negated:
                return True
        return False

    return test


def compile_ast(ast: pb.Expression) -> Test:
    """A function of (profile, now) equal to ``matches(ast, profile, now)``."""
    node = ast.WhichOneof("node")
    if node in ("comparison", "exists"):
        fields = compile_fields(ast)
        return lambda p, now: fields(p.attributes)
    if node in ("all", "any"):
        return _combine(node, [compile_ast(t) for t in getattr(ast, node).terms])
    if node == "negate":
        inner = compile_ast(ast.negate)
        return lambda p, now: not inner(p, now)
    if node == "event":
        return _compile_event(ast.event)
    if node == "sequence":
        return _compile_sequence(ast.sequence)
    if node == "identity":
        namespace = ast.identity.namespace
        return lambda p, now: namespace in p.namespaces
    if node == "consent":
        purpose, wanted = ast.consent.purpose, consent_text(ast.consent.value)
        return lambda p, now: consent_of(p.attributes, purpose) == wanted
    if node == "member_of":
        segment_id = ast.member_of.segment_id
        return lambda p, now: segment_id in p.memberships
    if node == "computed":
        name, check = ast.computed.name, compile_check(ast.computed.op, literal_value(ast.computed.value))
        return lambda p, now: check(p.computed.get(name, MISSING))
    return lambda p, now: False
