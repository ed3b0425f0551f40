"""What a definition reads, whether it is evaluated streaming or batch (and why), and reference checks."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from cdp.segmentation.v1 import segmentation_pb2 as pb
from cdp_kit.consent import NESTED, attribute_of
from cdp_kit.errors import InvalidInput, Violation
from cdp_segmentation.language import walk


@dataclass
class Reads:
    """The parts of a profile a segment reads: a change elsewhere cannot change its membership."""

    attributes: set[str] = field(default_factory=set)
    event_types: set[str] = field(default_factory=set)
    namespaces: set[str] = field(default_factory=set)
    segments: set[str] = field(default_factory=set)
    computed: set[str] = field(default_factory=set)
    # Windows (ms) whose end, counted from an event's time, can change the result as the clock moves.
    windows_ms: set[int] = field(default_factory=set)

    def labels(self) -> list[str]:
        return sorted(
            [f"attribute:{a}" for a in self.attributes]
            + [f"event:{e}" for e in self.event_types]
            + [f"identity:{n}" for n in self.namespaces]
            + [f"segment:{s}" for s in self.segments]
            + [f"computed:{c}" for c in self.computed]
        )


def reads_of(ast: pb.Expression) -> Reads:
    reads = Reads()

    def visit(node: pb.Expression) -> None:
        kind = node.WhichOneof("node")
        if kind == "comparison":
            reads.attributes.add(node.comparison.path.split(".")[0])
        elif kind == "exists":
            reads.attributes.add(node.exists.path.split(".")[0])
        elif kind == "consent":
            reads.attributes.update({NESTED, attribute_of(node.consent.purpose)})
        elif kind == "identity":
            reads.namespaces.add(node.identity.namespace)
        elif kind == "member_of":
            reads.segments.add(node.member_of.segment_id or node.member_of.segment_name)
        elif kind == "event":
            reads.event_types.add(node.event.pattern.event_type)
            if node.event.window.WhichOneof("kind") == "within_seconds":
                reads.windows_ms.add(node.event.window.within_seconds * 1000)
        elif kind == "computed":
            # The value changes when events of its type come or go, and when its window passes.
            attribute = node.computed.attribute
            reads.computed.add(node.computed.name)
            reads.event_types.add(attribute.pattern.event_type)
            if attribute.window.WhichOneof("kind") == "within_seconds":
                reads.windows_ms.add(attribute.window.within_seconds * 1000)
        elif kind == "sequence":
            # An A leaves the first step's window (exit) and, not followed, becomes w old (entry).
            seq = node.sequence
            reads.event_types.update({seq.first.event_type, seq.then.event_type})
            if seq.negated:
                reads.windows_ms.add(seq.within_seconds * 1000)
            if seq.first_window.WhichOneof("kind") == "within_seconds":
                reads.windows_ms.add(seq.first_window.within_seconds * 1000)

    walk(ast, visit)
    return reads


def check_where(ast: pb.Expression) -> None:
    """Event `where` conditions compare the event's own fields: nothing else is allowed inside."""

    def visit(node: pb.Expression) -> None:
        kind = node.WhichOneof("node")
        patterns: list[pb.EventPattern] = []
        if kind == "event":
            patterns = [node.event.pattern]
        elif kind == "sequence":
            patterns = [node.sequence.first, node.sequence.then]
        for pattern in patterns:
            if pattern.HasField("where"):
                walk(pattern.where, _field_only(pattern.event_type))

    walk(ast, visit)


def _field_only(event_type: str) -> Callable[[pb.Expression], None]:
    def visit(node: pb.Expression) -> None:
        kind = node.WhichOneof("node")
        if kind not in ("comparison", "exists", "all", "any", "negate"):
            hint = f"inside ({event_type} where …) only the event's fields can be compared, not {kind} conditions"
            raise InvalidInput("invalid audience definition", [Violation("query", "where", hint)])

    return visit


def resolve_segments(ast: pb.Expression, name: str, known: Mapping[str, pb.Segment]) -> None:
    """Fill in the ids of referenced segments; refuse unknown ones and cycles."""

    def visit(node: pb.Expression) -> None:
        if node.WhichOneof("node") != "member_of":
            return
        ref = node.member_of.segment_name
        if ref == name:
            raise _cycle([name, name])
        target = known.get(ref)
        if target is None:
            hint = f"no segment named {ref!r}; define it first (known: {', '.join(sorted(known)) or 'none'})"
            raise InvalidInput("invalid audience definition", [Violation("query", "segment", hint)])
        node.member_of.segment_id = target.id
        path = _path_to(name, ref, known, [name, ref])
        if path:
            raise _cycle(path)

    walk(ast, visit)


def _path_to(goal: str, start: str, known: Mapping[str, pb.Segment], trail: list[str]) -> list[str] | None:
    segment = known.get(start)
    if segment is None:
        return None
    for ref in sorted(reads_of(segment.ast).segments):
        ref_name = next((n for n, s in known.items() if s.id == ref), ref)
        if ref_name == goal:
            return [*trail, goal]
        if ref_name not in trail and (found := _path_to(goal, ref_name, known, [*trail, ref_name])):
            return found
    return None


def _cycle(path: list[str]) -> InvalidInput:
    hint = f"segments may not depend on themselves: {' -> '.join(path)}"
    return InvalidInput("invalid audience definition", [Violation("query", "cycle", hint)])


def resolve_computed(ast: pb.Expression, known: Mapping[str, pb.ComputedAttribute]) -> None:
    """Turn comparisons naming a computed attribute into computed conditions (with its definition)."""

    def visit(node: pb.Expression) -> None:
        if node.WhichOneof("node") == "exists" and node.exists.path in known:
            name = node.exists.path
            hint = f"{name} is a computed attribute: compare its value instead, e.g. {name} > 0"
            raise InvalidInput("invalid audience definition", [Violation("query", "computed", hint)])
        if node.WhichOneof("node") != "comparison" or node.comparison.path not in known:
            return
        cmp = node.comparison
        cond = pb.ComputedCondition(name=cmp.path, op=cmp.op, value=cmp.value, attribute=known[cmp.path])
        node.computed.CopyFrom(cond)

    walk(ast, visit)


def classify(ast: pb.Expression, schedule: str, known_by_id: Mapping[str, pb.Segment]) -> tuple[int, str]:
    """Streaming or batch, and why, for people (the rules are in docs/segmentation.md)."""
    if schedule:
        return (
            pb.EVALUATION_BATCH,
            f"batch: scheduled ({schedule} UTC); evaluated by SQL inside the store on that schedule and on demand",
        )
    reads = reads_of(ast)
    batch_refs = sorted(
        known_by_id[s].name
        for s in reads.segments
        if s in known_by_id and known_by_id[s].evaluation == pb.EVALUATION_BATCH
    )
    if batch_refs:
        return (
            pb.EVALUATION_BATCH,
            f"batch: reads membership of batch segment(s) {', '.join(batch_refs)}, which change only when those "
            "are evaluated; evaluated by SQL inside the store on demand",
        )
    parts = []
    if reads.attributes:
        parts.append(f"attributes {', '.join(sorted(reads.attributes))}")
    if reads.event_types:
        parts.append(f"events {', '.join(sorted(reads.event_types))}")
    if reads.namespaces:
        parts.append(f"identities {', '.join(sorted(reads.namespaces))}")
    if reads.computed:
        parts.append(f"computed attributes {', '.join(sorted(reads.computed))}")
    if reads.segments:
        names = sorted(known_by_id[s].name if s in known_by_id else s for s in reads.segments)
        parts.append(f"streaming segments {', '.join(names)}")
    reason = (
        f"streaming: everything it reads is kept per profile ({'; '.join(parts) or 'nothing'}); "
        "a profile is re-evaluated when a fragment, merge or split changes what it reads"
    )
    if reads.windows_ms:
        spans = ", ".join(_span(w) for w in sorted(reads.windows_ms))
        reason += (
            f"; windows ({spans}) slide on the log's clock, each profile woken at its own next window end "
            "(no batch, no scan)"
        )
    return pb.EVALUATION_STREAMING, reason


def _span(ms: int) -> str:
    """A window in the largest unit that divides it, days at most (as windows are written): 7d, 90m."""
    for unit, size in (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000)):
        if ms % size == 0:
            return f"{ms // size}{unit}"
    return f"{ms}ms"
