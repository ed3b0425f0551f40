"""The profiles one input batch touches, held in memory while the batch is applied.

Applying a fragment row by row through the ORM costs a dozen statements; streaming needs far
less. ``prefetch`` loads every profile of a fetched batch (attributes, events, identities,
memberships) in a few bulk queries; fragments then change the in-memory state, segments are
evaluated against it, and everything changed is written back in bulk (multi-row upserts)
just before the batch's transaction commits. Merges, splits and recomputations use the SQL
functions of profiles.py on the rows written back, so every path agrees (a rebuild replays this one).

Computed attributes (computed.py) are updated here incrementally for each new event, and
recomputed from the in-memory history when events leave (the cap, a redelivery, a due window).

Merges and splits (rare) first write back what is pending and leave their profiles to the SQL path.
"""

from __future__ import annotations

import bisect
import json
import math
import operator
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson
import sqlalchemy as sa
from google.protobuf import struct_pb2
from sqlalchemy import event
from sqlalchemy.dialects import postgresql, sqlite
from sqlmodel import Session

from cdp.identity.v1 import events_pb2 as identity_ev
from cdp_kit.collector import CollectorPause
from cdp_kit.merging import timestamp_ms
from cdp_segmentation.computed import add_event, values, with_defaults
from cdp_segmentation.evaluate import Event
from cdp_segmentation.profiles import ProfileContext, source_of, winner_key
from cdp_segmentation.store import EVENT, RECORD, FragmentRow, MembershipRow, ProfileIdentityRow, ProfileRow

PROFILE: sa.Table = ProfileRow.__table__  # type: ignore[attr-defined]
FRAGMENT: sa.Table = FragmentRow.__table__  # type: ignore[attr-defined]
IDENTITY: sa.Table = ProfileIdentityRow.__table__  # type: ignore[attr-defined]
MEMBERSHIP: sa.Table = MembershipRow.__table__  # type: ignore[attr-defined]
CHUNK = 500
FRAGMENT_COLUMNS: tuple[str, ...] = (
    "source_event_id",
    "profile_id",
    "dataset",
    "kind",
    "event_type",
    "ts_ms",
    "seq",
    "attributes",
    "pos",
)
SQLITE_CACHE_KIB = 65536


@dataclass(slots=True)
class StoredEvent(Event):
    """An event of the history with what orders it (time, log position, id) and its dataset."""

    id: str
    dataset: str
    seq: int

    @property
    def order(self) -> tuple[int, int, str]:
        return (self.ts_ms, self.seq, self.id)


@dataclass
class ProfileState:
    profile_id: str
    exists: bool
    attributes: dict[str, Any] = field(default_factory=dict)
    sources: dict[str, Any] = field(default_factory=dict)
    # The retained history, oldest first by (time, log position, id).
    events: list[StoredEvent] = field(default_factory=list)
    namespaces: set[str] = field(default_factory=set)
    memberships: dict[str, str] = field(default_factory=dict)
    # Computed attribute values (computed.py), kept incrementally.
    computed: dict[str, Any] = field(default_factory=dict)
    next_due_ms: int | None = None
    # Created by a fragment of this batch and not yet evaluated: every segment reads it.
    created: bool = False
    # Types of events the cap dropped since the last evaluation: segments reading them change too.
    dropped_types: set[str] = field(default_factory=set)


class WorkingSet:
    def __init__(
        self,
        session: Session,
        kept: dict[str, ProfileState] | None = None,
        on_end: Callable[[WorkingSet], None] | None = None,
    ) -> None:
        """``kept``: profiles as the store holds them (a previous working set's, committed);
        ``on_end`` is called when the transaction ends (``committed`` tells how)."""
        self.session = session
        self.profiles: dict[str, ProfileState] = kept if kept is not None else {}
        self._fragments: dict[str, tuple[Any, ...]] = {}
        self._dropped: set[str] = set()
        self._identities: dict[tuple[str, str], str] = {}
        # segment -> profile -> (status, changed at): written in key order without sorting
        # (key, value) pairs, a tenth of the cost of sorting the (segment, profile) tuples
        self._memberships: dict[str, dict[str, tuple[str, datetime]]] = {}
        self._dirty: set[str] = set()
        self._on_end = on_end
        self._collector = CollectorPause()
        self._collector.pause()  # see cdp_kit.collector; resumed in ``_end``
        self.committing = False
        self.committed = False
        event.listen(session, "before_commit", self._before_commit)
        event.listen(session, "after_commit", self._after_commit)
        event.listen(session, "after_rollback", self._after_rollback)

    # ------------------------------------------------------------------ loading
    def load(self, profile_ids: Iterable[str]) -> None:
        """Read the profiles not yet held, in bulk (absent ones start empty)."""
        wanted = sorted({p for p in profile_ids if p not in self.profiles})
        if not wanted:
            return
        self.session.flush()
        for start in range(0, len(wanted), CHUNK):
            self._load_chunk(wanted[start : start + CHUNK])

    def _load_chunk(self, ids: list[str]) -> None:
        run = self.session.connection().execute
        for pid in ids:
            self.profiles[pid] = ProfileState(pid, exists=False)
        rows = run(sa.select(PROFILE).where(PROFILE.c.profile_id.in_(ids)))
        for row in rows.mappings():
            state = self.profiles[row["profile_id"]]
            state.exists = True
            state.attributes, state.sources = dict(row["attributes"]), dict(row["sources"])
            state.next_due_ms = row["next_due_ms"]
            state.computed = dict(row["computed"] or {})
        columns = (FRAGMENT.c.profile_id, FRAGMENT.c.source_event_id, FRAGMENT.c.dataset, FRAGMENT.c.event_type)
        events = run(
            sa.select(*columns, FRAGMENT.c.ts_ms, FRAGMENT.c.seq, FRAGMENT.c.attributes).where(
                FRAGMENT.c.profile_id.in_(ids), FRAGMENT.c.kind == EVENT
            )
        )
        for pid, eid, dataset, etype, ts, seq, attrs in events:
            self.profiles[pid].events.append(StoredEvent(etype, int(ts), dict(attrs), eid, dataset, int(seq)))
        for pid in ids:
            self.profiles[pid].events.sort(key=lambda e: e.order)
        for pid, ns in run(
            sa.select(IDENTITY.c.profile_id, IDENTITY.c.namespace).where(IDENTITY.c.profile_id.in_(ids))
        ):
            self.profiles[pid].namespaces.add(ns)
        members = run(
            sa.select(MEMBERSHIP.c.profile_id, MEMBERSHIP.c.segment_id, MEMBERSHIP.c.status).where(
                MEMBERSHIP.c.profile_id.in_(ids)
            )
        )
        for pid, sid, status in members:
            self.profiles[pid].memberships[sid] = status

    def get(self, profile_id: str) -> ProfileState:
        if profile_id not in self.profiles:
            self.load([profile_id])
        return self.profiles[profile_id]

    def live(self, profile_id: str) -> bool:
        """Whether the profile has a row (or gets one at write-back)."""
        return self.profiles[profile_id].exists or profile_id in self._dirty

    def tracks(self, profile_id: str) -> bool:
        return profile_id in self.profiles

    # ------------------------------------------------------------------ changes
    def apply_fragment(
        self, frag: identity_ev.ProfileFragment, seq: int, ctx: ProfileContext, pos: int = 0
    ) -> ProfileState:
        """Keep a fragment (a record's attributes or an event, within retention and the cap), in memory.
        ``seq`` and ``pos``: its log position (message sequence, place among the message's events)."""
        profile_id = frag.profile_id
        state = self.profiles.get(profile_id) or self.get(profile_id)
        if not state.exists and profile_id not in self._dirty:
            state.created = True
        ts_ms = timestamp_ms(frag.occurred_at)
        kind = EVENT if frag.kind == EVENT else RECORD
        attributes = struct_dict(frag.attributes)
        source_event_id, dataset, event_type = frag.source_event_id, frag.dataset, frag.event_type
        # The seg_fragment row, in FRAGMENT_COLUMNS order.
        row = (source_event_id, profile_id, dataset, kind, event_type, ts_ms, seq, attributes, pos)
        if kind == RECORD:
            self._keep(source_event_id, row)
            self._offer(state, attributes, source_of(dataset, ts_ms, seq, pos, source_event_id), ctx)
        elif not _expired(ts_ms, dataset, ctx):
            self._keep(source_event_id, row)
            self._add_event(state, StoredEvent(event_type, ts_ms, attributes, source_event_id, dataset, seq), ctx)
        if ctx.computed and kind == RECORD:
            state.computed = with_defaults(ctx.computed, state.computed)
        for ident in frag.identities:
            self._identities[(ident.namespace, ident.value)] = profile_id
            state.namespaces.add(ident.namespace)
        self._dirty.add(profile_id)
        return state

    def _keep(self, source_event_id: str, row: tuple[Any, ...]) -> None:
        self._fragments[source_event_id] = row
        self._dropped.discard(source_event_id)

    def _offer(
        self, state: ProfileState, attributes: dict[str, Any], candidate: dict[str, Any], ctx: ProfileContext
    ) -> None:
        """Each attribute of a record replaces the kept one unless that one wins by the merge policy."""
        rule, sources = ctx.rule, state.sources
        mine = winner_key(rule, candidate)
        # The attributes a record set share one source dict: compared once in a row.
        last: dict[str, Any] | None = None
        wins = True
        for name, value in attributes.items():
            current = sources.get(name)
            if current is not None:
                if current is not last:
                    last, wins = current, mine >= winner_key(rule, current)
                if not wins:
                    continue
            state.attributes[name] = value
            sources[name] = candidate

    def _add_event(self, state: ProfileState, item: StoredEvent, ctx: ProfileContext) -> None:
        redelivered = _holds(state, item.id)
        # A profile past its next due time waits for the clock to wake it: its values may be stale.
        stale = state.next_due_ms is not None and state.next_due_ms <= ctx.clock_ms
        state.events = [e for e in state.events if e.id != item.id] if redelivered else state.events
        bisect.insort(state.events, item, key=lambda e: e.order)
        excess = len(state.events) - ctx.event_cap
        if excess > 0:
            for old in state.events[:excess]:
                state.dropped_types.add(old.event_type)
                self._fragments.pop(old.id, None)
                self._dropped.add(old.id)
            del state.events[:excess]
        state.next_due_ms = next_due(state, ctx)
        if ctx.computed:
            if redelivered or stale or excess > 0:
                # Events left (or one came again): recompute from the kept events.
                state.computed = values(ctx.computed, state.events, ctx.clock_ms)
            else:
                state.computed = add_event(ctx.computed, state.computed, item, state.events, ctx.clock_ms)

    def membership(self, segment_id: str, profile_id: str, status: str, at: datetime) -> None:
        self.profiles[profile_id].memberships[segment_id] = status
        self._memberships.setdefault(segment_id, {})[profile_id] = (status, at)

    def fold_memberships(self, changes: list[tuple[str, str, str]], at: datetime) -> list[tuple[str, str, str]]:
        """``membership`` for each (segment, profile, status) of a profile held here; returns the others."""
        profiles, pending = self.profiles, self._memberships
        others = []
        for segment_id, profile_id, status in changes:
            state = profiles.get(profile_id)
            if state is None:
                others.append((segment_id, profile_id, status))
            else:
                state.memberships[segment_id] = status
                of_segment = pending.get(segment_id)
                if of_segment is None:
                    of_segment = pending[segment_id] = {}
                of_segment[profile_id] = (status, at)
        return others

    def forget(self, profile_ids: Iterable[str]) -> None:
        for pid in profile_ids:
            self.profiles.pop(pid, None)

    # ------------------------------------------------------------------ writing back
    def write_back(self) -> None:
        """Write everything pending, in bulk, in the batch's transaction."""
        self.session.flush()
        if self.session.get_bind().dialect.name == "sqlite":
            # A batch writes tens of thousands of rows into a few indexes: a page cache that
            # holds them (64 MiB, this connection only) keeps SQLite from spilling mid-transaction.
            self.session.connection().exec_driver_sql(f"PRAGMA cache_size = -{SQLITE_CACHE_KIB}")
        self._write_profiles()
        if self._dropped:
            dropped = sorted(self._dropped)
            for start in range(0, len(dropped), CHUNK):
                chunk = dropped[start : start + CHUNK]
                self.session.execute(sa.delete(FRAGMENT).where(FRAGMENT.c.source_event_id.in_(chunk)))
        fragments = list(self._fragments.values())
        _upsert(self.session, FRAGMENT, FRAGMENT_COLUMNS, fragments, 1)
        identities = [(n, v, p) for (n, v), p in self._identities.items()]
        _upsert(self.session, IDENTITY, ("namespace", "value", "profile_id"), identities, 2)
        members = [
            (sid, pid, *of_segment[pid])
            for sid, of_segment in sorted(self._memberships.items())
            for pid in sorted(of_segment)
        ]
        _upsert(
            self.session, MEMBERSHIP, ("segment_id", "profile_id", "status", "changed_at"), members, 2, ordered=True
        )
        self._fragments, self._dropped, self._identities, self._memberships = {}, set(), {}, {}
        for pid in self._dirty:
            if pid in self.profiles:
                self.profiles[pid].exists = True
        self._dirty = set()
        self.session.expire_all()

    def _write_profiles(self) -> None:
        rows = []
        for pid in self._dirty:
            state = self.profiles.get(pid)
            if state is not None:
                rows.append(
                    (pid, state.attributes, state.sources, len(state.events), state.computed, state.next_due_ms)
                )
        columns = ("profile_id", "attributes", "sources", "events", "computed", "next_due_ms")
        _upsert(self.session, PROFILE, columns, rows, 1)

    def _before_commit(self, session: Session) -> None:
        self.write_back()
        self.committing = True

    def _after_commit(self, session: Session) -> None:
        self.committing, self.committed = False, True
        self._end()

    def _after_rollback(self, session: Session) -> None:
        self.committing, self.committed = False, False
        self._end()

    def _end(self) -> None:
        self._collector.resume()
        on_end, self._on_end = self._on_end, None
        if on_end is not None:
            on_end(self)


def struct_dict(struct: struct_pb2.Struct) -> dict[str, Any]:
    """``json_format.MessageToDict`` of a Struct (numbers as floats; NaN and infinities refused),
    by walking it directly (by key: the map's ``items`` is the pure-Python mixin's)."""
    fields = struct.fields
    return {key: _value(fields[key]) for key in fields}


def _value(value: struct_pb2.Value) -> Any:
    kind = value.WhichOneof("kind")
    if kind == "string_value":
        return value.string_value
    if kind == "number_value":
        number = value.number_value
        if not math.isfinite(number):
            raise ValueError(f"Fail to serialize {number} for Value.number_value")
        return number
    if kind == "bool_value":
        return value.bool_value
    if kind == "struct_value":
        return struct_dict(value.struct_value)
    if kind == "list_value":
        return [_value(item) for item in value.list_value.values]
    return None


def _holds(state: ProfileState, event_id: str) -> bool:
    return any(e.id == event_id for e in state.events)


def _expired(ts_ms: int, dataset: str, ctx: ProfileContext) -> bool:
    retention = ctx.retention_ms.get(dataset)
    return retention is not None and ts_ms <= ctx.clock_ms - retention


def next_due(state: ProfileState, ctx: ProfileContext) -> int | None:
    """``profiles.next_due`` over the in-memory history (the same function of events, windows and clock)."""
    candidates: list[int] = []
    if state.events:
        times = [e.ts_ms for e in state.events]  # ascending
        clock, last = ctx.clock_ms, times[-1]
        candidates += [
            times[bisect.bisect_right(times, clock - width)] + width
            for width in ctx.windows_ms
            if last > clock - width  # some event still within the window
        ]
    for dataset, retention in ctx.retention_ms.items():
        first = next(
            (e.ts_ms for e in state.events if e.dataset == dataset and e.ts_ms > ctx.clock_ms - retention), None
        )
        if first is not None:
            candidates.append(first + retention)
    return min(candidates) if candidates else None


def _upsert(
    session: Session,
    table: sa.Table,
    columns: Sequence[str],
    rows: list[tuple[Any, ...]],
    keys: int,
    *,
    ordered: bool = False,
) -> None:
    """Insert or update ``rows`` (values of ``columns``, whose first ``keys`` are the primary
    key), in key order (B-tree inserts stay local); ``ordered``: they are in key order already."""
    if not rows:
        return
    if not ordered:
        rows.sort(key=operator.itemgetter(*range(keys)))
    dialect = session.get_bind().dialect
    if dialect.name == "sqlite":
        _upsert_sqlite(session, table, columns, rows, keys)
        return
    insert = postgresql.insert(table) if dialect.name == "postgresql" else sqlite.insert(table)
    stmt = insert.on_conflict_do_update(
        index_elements=list(columns[:keys]), set_={c: insert.excluded[c] for c in columns[keys:]}
    )
    for start in range(0, len(rows), CHUNK):
        session.execute(stmt, [dict(zip(columns, row, strict=True)) for row in rows[start : start + CHUNK]])


# JSON columns whose values hold only finite numbers (what a Struct can carry: NaN and the
# infinities are refused when fragments are read), written with orjson: the same JSON values
# as ``json.dumps`` (more compact text), several times faster.
FINITE_JSON = frozenset({"seg_profile.attributes", "seg_profile.sources", "seg_fragment.attributes"})


def _dumps(value: Any) -> str:
    try:
        return orjson.dumps(value).decode()
    except TypeError:  # what orjson does not take (e.g. integers beyond 64 bits): the standard encoder
        return json.dumps(value)


def _upsert_sqlite(
    session: Session, table: sa.Table, columns: Sequence[str], rows: list[tuple[Any, ...]], keys: int
) -> None:
    """The same upsert as one DB-API executemany: values converted by the columns' own bind
    processors (JSON, DATETIME), without SQLAlchemy's per-row statement machinery."""
    dialect = session.get_bind().dialect
    updates = ", ".join(f"{n} = excluded.{n}" for n in columns[keys:])
    sql = (
        f"INSERT INTO {table.name} ({', '.join(columns)}) VALUES ({', '.join('?' for _ in columns)}) "
        f"ON CONFLICT ({', '.join(columns[:keys])}) DO " + (f"UPDATE SET {updates}" if updates else "NOTHING")
    )
    converted: list[list[Any]] = []
    dumps = orjson.dumps
    for i, name in enumerate(columns):
        column = table.c[name]
        process = column.type.dialect_impl(dialect).bind_processor(dialect)
        values = [row[i] for row in rows]
        if f"{table.name}.{name}" in FINITE_JSON:
            try:
                values = [dumps(v).decode() for v in values]
            except TypeError:  # something orjson does not take: each value as ``_dumps`` writes it
                values = [_dumps(v) for v in values]
        elif process is not None and not isinstance(column.type, sa.JSON):
            # Scalars (times): convert each distinct value once.
            once = {v: process(v) for v in set(values)}
            values = [once[v] for v in values]
        elif process is not None:
            values = [process(v) for v in values]
        converted.append(values)
    session.connection().exec_driver_sql(sql, list(zip(*converted, strict=True)))
