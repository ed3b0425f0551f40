"""Graph decisions: what a record or an unlink does to the graph, as events.

Every function here reads the working set and returns (or emits) the events; the store only
changes when those events are folded, so a rebuild from the log reproduces every decision.

Rules (docs/identity.md explains them for users):

* A record's kept identities are taken strongest first (namespace priority, then value);
  the first is the record's **anchor**.
* Each next identity joins the record's group unless its graph would bring a second value
  of a unique namespace (``unique_namespace``), it was detached by an operator, or the
  pair was unlinked by an operator (``unlinked``). A refused identity stays in its own
  graph: **the first link wins**; the refusal is recorded as a decision.
* The graphs of the group are merged: the **oldest profile survives** (lowest creation
  ordinal); a group touching no known identity founds a profile whose id is derived from
  its anchor.
* Over ``max_identities``, identities are detached from the graph (all their links
  removed), cookies first, then devices, then people ids, least recently seen first; never
  the profile's founding identity. Each detachment is a decision; the graph then splits.
* A split keeps the profile id on the part holding the founding identity; other parts get
  ids derived from the profile, the cause and their strongest identity. A fragment goes
  to the part holding its anchor.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import datetime

from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from cdp.common.v1.envelope_pb2 import IdentityValue, Sealed
from cdp.identity.v1 import events_pb2 as ev
from cdp_identity.domain import Rules, components, node_key, split_key, split_profile_id
from cdp_identity.graph import Made, WorkingSet, pair
from cdp_kit.envelope import (
    SCHEMA_VERSION,
    VARINTS,
    Causation,
    Cause,
    Envelope,
    deterministic_id,
    to_timestamp,
    varint,
)
from cdp_kit.telemetry import pii_hash

Emit = Callable[[list[Envelope]], None]
# Emits a record's fragment, encoded, with what folding it does (instead of ``Emit``-ing an Envelope).
EmitFragment = Callable[[bytes, Made], None]
TYPE_URL_PREFIX = "type.googleapis.com/"
SCHEMA_FIELD = b"\x30" + varint(SCHEMA_VERSION)  # Envelope.schema_version (field 6, varint)
TYPE_FIELDS: dict[str, tuple[bytes, bytes]] = {}  # payload type -> (Envelope.type field, Any.type_url field)


def ident(key: str) -> IdentityValue:
    ns, value = split_key(key)
    return IdentityValue(namespace=ns, value=value)


def link(a: str, b: str) -> ev.IdentityLink:
    a, b = pair(a, b)
    return ev.IdentityLink(a=ident(a), b=ident(b))


class Normaliser:
    """A bounded memo of normalised raw identities (the same cookie arrives many times): a raw
    (namespace, value) maps to its node key and its rank. Only values of defined namespaces are
    remembered; namespaces are never removed and never change, so an entry stays right."""

    def __init__(self, limit: int = 200_000) -> None:
        self.limit = limit
        self.memo: dict[tuple[str, str], tuple[tuple[int, str, str], str]] = {}


def kept_and_dropped(
    rules: Rules, normalise: Normaliser, raw: list[tuple[str, str]], node_keys: list[str | None] | None = None
) -> tuple[list[str], list[ev.DroppedIdentity]]:
    """The record's usable identity keys, strongest first, and what was dropped (with a hash, never
    the value). ``node_keys``, when given, gets each raw identity's key in the record's order (None:
    dropped): which key ref is whose, for sealing (``cdp_identity.consumer``)."""
    ranked: dict[str, tuple[int, str, str]] = {}
    dropped: list[ev.DroppedIdentity] = []
    memo = normalise.memo
    namespaces = rules.namespaces
    for item in raw:
        hit = memo.get(item)
        if hit is None or item[0] not in namespaces:
            namespace, value = item
            clean, rule, detail = rules.normalise(namespace, value)
            if clean is None:
                dropped.append(
                    ev.DroppedIdentity(namespace=namespace, rule=rule, value_hash=pii_hash(value), detail=detail)
                )
                if node_keys is not None:
                    node_keys.append(None)
                continue
            hit = (rules.order(namespace, clean), node_key(namespace, clean))
            if namespace in namespaces:
                if len(memo) >= normalise.limit:
                    memo.clear()
                memo[item] = hit
        ranked[hit[1]] = hit[0]
        if node_keys is not None:
            node_keys.append(hit[1])
    if len(ranked) < 2:
        return list(ranked), dropped
    return sorted(ranked, key=ranked.__getitem__), dropped


class Maker:
    """Deterministic envelopes for one cause."""

    def __init__(
        self,
        base: str,
        at: datetime | Timestamp,
        cause: Cause,
        trace: Mapping[str, str],
        causation: Causation | None = None,
    ) -> None:
        self.base = base
        self.at = at if isinstance(at, Timestamp) else to_timestamp(at)
        self.micros = self.at.seconds * 1_000_000 + self.at.nanos // 1000
        self.causation = causation if causation is not None else cause.to_proto()
        self.trace = trace
        self.n = 0
        # Seals the personal fields of a payload (cdp_identity.consumer.FragmentSealer): the
        # payload to encode and its sealed part, or the payload as it is and None.
        self.seal: Callable[[Message, str], tuple[Message, list[Sealed]]] | None = None
        self._head: bytes | None = None  # encoded occurred_at, schema_version, causation, trace_context

    def __call__(self, payload: Message, subject_key: str, kind: str) -> Envelope:
        self.n += 1
        event_id = (
            deterministic_id(kind, self.base) if kind == "fragment" else deterministic_id(kind, self.base, self.n)
        )
        parts: list[Sealed] = []
        if self.seal is not None:
            payload, parts = self.seal(payload, event_id)
        env = Envelope(
            id=event_id,
            type=payload.DESCRIPTOR.full_name,
            subject_key=subject_key,
            schema_version=SCHEMA_VERSION,
            causation=self.causation,
            occurred_at=self.at,
        )
        if self.trace:
            env.trace_context.update(self.trace)
        env.payload.type_url = TYPE_URL_PREFIX + payload.DESCRIPTOR.full_name
        env.payload.value = payload.SerializeToString()
        env.sealed.extend(parts)
        return env

    def encoded(self, payload: Message, subject_key: str, kind: str) -> bytes:
        """The envelope ``self(payload, subject_key, kind)`` makes, as wire bytes without
        ``recorded_at`` (for ``UnitOfWork.emit_encoded``): no Envelope object, no second copy of
        the payload. Fields in number order; tests/unit/test_identity_encoding.py checks equality."""
        self.n += 1
        if self._head is None:
            head = [
                _ld(b"\x22", self.at.SerializeToString()),
                SCHEMA_FIELD,
                _ld(b"\x3a", self.causation.SerializeToString()),
            ]
            for k, v in self.trace.items():
                head.append(_ld(b"\x42", _ld(b"\x0a", k.encode()) + _ld(b"\x12", v.encode())))
            self._head = b"".join(head)
        name = payload.DESCRIPTOR.full_name
        type_fields = TYPE_FIELDS.get(name)
        if type_fields is None:
            type_fields = TYPE_FIELDS[name] = (
                _ld(b"\x12", name.encode()),
                _ld(b"\x0a", (TYPE_URL_PREFIX + name).encode()),
            )
        event_id = (
            deterministic_id(kind, self.base) if kind == "fragment" else deterministic_id(kind, self.base, self.n)
        )
        sealed = b""
        if self.seal is not None:
            payload, parts = self.seal(payload, event_id)
            sealed = b"".join(_ld(b"\x52", part.SerializeToString()) for part in parts)
        body = payload.SerializeToString()
        n = len(body)
        any_ = type_fields[1] + b"\x12" + (VARINTS[n] if n < 16384 else varint(n)) + body
        return b"".join(
            (
                _ld(b"\x0a", event_id.encode()),
                type_fields[0],
                _ld(b"\x1a", subject_key.encode()),
                self._head,
                _ld(b"\x4a", any_),
                sealed,
            )
        )


def _ld(tag: bytes, data: bytes) -> bytes:
    """A length-delimited protobuf field: tag, length, bytes."""
    n = len(data)
    return tag + (VARINTS[n] if n < 16384 else varint(n)) + data


def resolve_record(
    ws: WorkingSet,
    kept: list[str],
    dropped: list[ev.DroppedIdentity],
    fragment: ev.ProfileFragment,
    make: Maker,
    emit: Emit,
    emit_fragment: EmitFragment | None = None,
) -> None:
    """Emit the events of one record: refusals, merge, fragment, then any size-guardrail split.
    With ``emit_fragment``, the fragment goes out encoded through it (the other events through
    ``emit``, first); without, as an Envelope with the others, remembered in ``ws.made`` until folded."""
    source = fragment.source_event_id
    if not kept:
        # A record that links no one (every identity dropped, or none at all: a dataset that
        # allows anonymous rows) is no profile's: no fragment, a decision counted in the stats.
        decision = ev.GraphDecision(
            rule="no_identities",
            reason="no identity of the record can link anyone" if dropped else "the record carries no identity",
            source_event_id=source,
            dropped=dropped,
        )
        emit([make(decision, source, "decision")])
        return
    ws.load(kept)
    unlinked = ws.unlinked()
    events: list[Envelope] = []
    detached = [k for k in kept if (k, "") in unlinked] if unlinked else []
    if detached and len(detached) < len(kept):
        for key in detached:
            events.append(
                _refusal(ws, make, key, kept, "unlinked", "an operator removed this identity from its graph", source)
            )
        kept = [k for k in kept if (k, "") not in unlinked]
    elif detached:
        for key in kept[1:]:
            events.append(
                _refusal(
                    ws, make, key, kept[:1], "unlinked", "an operator removed this identity from its graph", source
                )
            )
        kept = kept[:1]
    accepted: list[str] = []
    profiles: list[str] = []
    group_uniques: dict[str, str] = {}
    rules = ws.rules
    nodes = ws.nodes
    for key in kept:
        node = nodes.get(key)
        pid = node.profile_id if node is not None else ""
        if accepted and pid and pid in profiles:
            accepted.append(key)
            continue
        if accepted and unlinked and any(pair(key, other) in unlinked for other in accepted):
            events.append(
                _refusal(ws, make, key, accepted, "unlinked", "an operator unlinked these identities", source)
            )
            continue
        if pid:
            uniques = ws.uniques(pid)
        else:
            ns, value = split_key(key)
            uniques = {ns: value} if rules.is_unique(ns) else {}
        clash = sorted(n for n, v in uniques.items() if group_uniques.get(n, v) != v) if uniques else []
        if clash:
            reason = (
                f"linking would put two {'/'.join(clash)} values in one graph: "
                "the identity stays in its graph (the first link wins)"
            )
            events.append(_refusal(ws, make, key, accepted, "unique_namespace", reason, source))
            continue
        accepted.append(key)
        group_uniques.update(uniques)
        if pid:
            profiles.append(pid)
    anchor = accepted[0]
    if len(profiles) == 1:
        survivor = profiles[0]
        absorbed = []
    elif profiles:
        known = [ws.profile(p) for p in profiles]
        ranked = sorted((p.ordinal, p.profile_id) for p in known if p is not None)
        survivor = ranked[0][1]
        absorbed = [pid for _, pid in ranked[1:]]
    else:
        survivor = ws.new_profile_id(*split_key(anchor))
        absorbed = []
    if absorbed:
        events.append(
            make(
                ev.ProfilesMerged(
                    survivor=survivor,
                    absorbed=absorbed,
                    via=ident(anchor),
                    reason="a record holds identities of several profiles: the oldest profile survives",
                ),
                survivor,
                "merge",
            )
        )
    resolved(fragment, survivor, accepted, dropped)
    if emit_fragment is None:
        made = make(fragment, survivor, "fragment")
        ws.made[made.id] = (fragment, accepted, anchor, make.micros)
        events.append(made)
        emit(events)
    else:
        if events:
            emit(events)
        emit_fragment(make.encoded(fragment, survivor, "fragment"), (fragment, accepted, anchor, make.micros))
    if len(ws.members.get(survivor, ())) > ws.rules.max_identities:
        enforce_size(ws, survivor, make, emit, source)


def resolved(fragment: ev.ProfileFragment, pid: str, keys: list[str], dropped: list[ev.DroppedIdentity]) -> None:
    """Complete a record's fragment: its profile, its identities (strongest first; the first is
    the anchor) and what was dropped."""
    fragment.profile_id = pid
    identities = fragment.identities
    for k in keys:
        ns, _, value = k.partition(":")
        identities.add(namespace=ns, value=value)
    ns, _, value = keys[0].partition(":")
    fragment.anchor.namespace = ns
    fragment.anchor.value = value
    if dropped:
        fragment.dropped.extend(dropped)


def _refusal(ws: WorkingSet, make: Maker, key: str, group: list[str], rule: str, reason: str, source: str) -> Envelope:
    node = ws.nodes.get(key)
    decision = ev.GraphDecision(
        rule=rule,
        reason=reason,
        profile_id=node.profile_id if node is not None else "",
        source_event_id=source,
        identity=ident(key),
        refused_links=[link(key, other) for other in group if other != key],
    )
    if group:
        decision.other.CopyFrom(ident(group[0]))
    return make(decision, decision.profile_id or key, "decision")


def enforce_size(ws: WorkingSet, pid: str, make: Maker, emit: Emit, source: str) -> None:
    """Detach identities of an oversized graph until every part fits, then split it."""
    limit = ws.rules.max_identities
    members = set(ws.members[pid])
    profile = ws.profile(pid)
    founder = profile.founder if profile is not None else ""
    rules = ws.rules

    def rank(k: str) -> tuple[int, int, str]:
        return (rules.eviction_class(split_key(k)[0]), ws.nodes[k].last_seen, k)

    candidates = sorted((k for k in members if k != founder), key=rank)
    edges = set(ws.edges_among(members))
    detached: list[str] = []
    for key in candidates:
        parts = components(members, edges)
        if max(len(p) for p in parts) <= limit:
            break
        big = max(parts, key=len)
        if key not in big:
            continue
        gone = {e for e in edges if key in e}
        edges -= gone
        detached.append(key)
        decision = ev.GraphDecision(
            rule="max_identities",
            reason=(
                f"the graph exceeded {limit} identities: the least recently seen "
                f"{'cookie' if rank(key)[0] == 0 else 'device' if rank(key)[0] == 1 else 'identity'} was detached"
            ),
            profile_id=pid,
            source_event_id=source,
            identity=ident(key),
            removed_links=[link(a, b) for a, b in sorted(gone)],
        )
        emit([make(decision, pid, "decision")])
    split = split_event(ws, pid, make.base, "the size guardrail detached identities")
    if split is not None:
        emit([make(split, pid, "split")])


def split_event(ws: WorkingSet, pid: str, cause: str, reason: str) -> ev.ProfileSplit | None:
    """The split of a profile whose links no longer connect it (after removals were folded)."""
    members = set(ws.members.get(pid, ()))
    parts = components(members, ws.edges_among(members))
    if len(parts) <= 1:
        return None
    profile = ws.profile(pid)
    founder = profile.founder if profile is not None and profile.founder in members else ""
    order = ws.rules.order

    def strongest(part: set[str]) -> str:
        return min(part, key=lambda k: order(*split_key(k)))

    if not founder:
        founder = strongest(max(parts, key=lambda p: (len(p), [-ord(c) for c in strongest(p)])))
    parts.sort(key=lambda p: (founder not in p, order(*split_key(strongest(p)))))
    anchored = ws.fragments_anchored(sorted(members))
    split = ev.ProfileSplit(profile_id=pid, reason=reason)
    for part in parts:
        head = founder if founder in part else strongest(part)
        part_id = pid if founder in part else split_profile_id(pid, cause, head)
        keys = sorted(part, key=lambda k: order(*split_key(k)))
        fragment_ids = sorted(f for k in keys for f in anchored.get(k, ()))
        split.parts.append(
            ev.SplitPart(
                profile_id=part_id,
                identities=[ident(k) for k in keys],
                fragment_ids=fragment_ids,
                founder=ident(head),
            )
        )
    return split


def unlink(
    ws: WorkingSet, key: str, other: str, reason: str, make: Maker, emit: Emit
) -> tuple[ev.GraphDecision | None, ev.ProfileSplit | None, bool]:
    """Remove a link (``other`` set) or every link of an identity, remembered; then split."""
    ws.load([key, other] if other else [key])
    node = ws.nodes.get(key)
    if node is None:
        return None, None, False
    pid = node.profile_id
    if other:
        removed = [pair(key, other)] if other in ws.adj.get(key, set()) else []
        entry = pair(key, other)
        rule = "unlink_link"
    else:
        removed = sorted(pair(key, b) for b in ws.adj.get(key, set()))
        entry = (key, "")
        rule = "unlink_identity"
    if not removed and entry in ws.unlinked():
        return None, None, False
    decision = ev.GraphDecision(
        rule=rule,
        reason=reason or "removed by an operator",
        profile_id=pid,
        source_event_id=make.base,
        identity=ident(key),
        removed_links=[link(a, b) for a, b in removed],
        remember=True,
    )
    if other:
        decision.other.CopyFrom(ident(other))
    emit([make(decision, pid, "decision")])
    split = split_event(ws, pid, make.base, f"{rule}: {reason or 'removed by an operator'}")
    if split is not None:
        emit([make(split, pid, "split")])
    return decision, split, bool(removed)
