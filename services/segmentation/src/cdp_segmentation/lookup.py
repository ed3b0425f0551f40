"""``GetProfile``: the personalisation lookup, served off the event loop from the projection's own tables.

A web server asks for a visitor's profile and audiences by cookie on every page view, so the
call must cost little and never wait behind a fold. The read model is what the projection
already keeps current per profile, read by primary key or by an index on the profile id:

* the identity index (``seg_profile_identity``: namespace + normalised value → profile id);
* the profile row: merged attributes with their sources, computed values, the event count;
* its identities and its memberships (joined to the segment's name);
* the computed definitions, which change rarely: kept parsed here, compared with the table (a
  small read) on every call, so a new definition shows at once; the namespaces' types, read
  again only when a lookup names a namespace not known yet (they are never removed nor changed).

Events are read only when asked (``with_history``: the recent events and the per-source
counts, both from the fragments table, the one read that grows with the profile's history).

Reads are SQLAlchemy Core statements built once (no ORM objects) on a connection of the
service's engine, in a small thread pool: the event loop keeps folding and answering health
and status while a lookup runs (SQLite reads release the GIL; WAL lets them run beside the
writer; each call is one short read transaction, so it sees one committed state). An
in-memory SQLite store has one database per connection, so there the reads run inline.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from google.protobuf import json_format, struct_pb2
from sqlalchemy.engine import Connection, Engine

from cdp.common.v1.envelope_pb2 import IdentityValue
from cdp.segmentation.v1 import segmentation_pb2 as pb
from cdp_kit.errors import InvalidInput, NotFound, Violation
from cdp_kit.identities import Normaliser
from cdp_kit.namespaces import NamespaceRow
from cdp_kit.store import tables_of
from cdp_segmentation import store

RECENT_EVENTS = 20
DEFAULT_THREADS = 4
MAX_PROFILE_ID = 256


_identity, _profile, _membership, _segment, _computed, _fragment, _namespace = tables_of(
    store.ProfileIdentityRow,
    store.ProfileRow,
    store.MembershipRow,
    store.SegmentRow,
    store.ComputedRow,
    store.FragmentRow,
    NamespaceRow,
)

_PROFILE_COLUMNS = (
    _profile.c.profile_id,
    _profile.c.attributes,
    _profile.c.sources,
    _profile.c.events,
    _profile.c.computed,
)
PROFILE = sa.select(*_PROFILE_COLUMNS).where(_profile.c.profile_id == sa.bindparam("profile_id"))
PROFILE_BY_IDENTITY = (
    sa.select(*_PROFILE_COLUMNS)
    .select_from(_identity.join(_profile, _profile.c.profile_id == _identity.c.profile_id))
    .where(_identity.c.namespace == sa.bindparam("namespace"), _identity.c.value == sa.bindparam("value"))
)
IDENTITIES = (
    sa.select(_identity.c.namespace, _identity.c.value)
    .where(_identity.c.profile_id == sa.bindparam("profile_id"))
    .order_by(_identity.c.namespace, _identity.c.value)
)
MEMBERSHIPS = (
    sa.select(_membership.c.segment_id, _segment.c.name, _membership.c.status, _membership.c.changed_at)
    .select_from(_membership.outerjoin(_segment, _segment.c.id == _membership.c.segment_id))
    .where(_membership.c.profile_id == sa.bindparam("profile_id"))
    .order_by(_membership.c.segment_id)
)
# The body as the stored text: compared with the text last parsed, decoded only when it differs.
COMPUTED = sa.select(_computed.c.name, sa.cast(_computed.c.body, sa.Text)).order_by(_computed.c.name)
NAMESPACES = sa.select(_namespace.c.name, _namespace.c.type)
SOURCES = (
    sa.select(_fragment.c.dataset, _fragment.c.kind, sa.func.count(), sa.func.max(_fragment.c.ts_ms))
    .where(_fragment.c.profile_id == sa.bindparam("profile_id"))
    .group_by(_fragment.c.dataset, _fragment.c.kind)
    .order_by(_fragment.c.dataset, _fragment.c.kind)
)
EVENTS = (
    sa.select(
        _fragment.c.source_event_id,
        _fragment.c.event_type,
        _fragment.c.dataset,
        _fragment.c.ts_ms,
        _fragment.c.attributes,
    )
    .where(_fragment.c.profile_id == sa.bindparam("profile_id"), _fragment.c.kind == store.EVENT)
    .order_by(_fragment.c.ts_ms.desc(), _fragment.c.seq.desc(), _fragment.c.source_event_id.desc())
    .limit(RECENT_EVENTS)
)


def set_value(target: struct_pb2.Value, value: Any) -> None:
    """``value`` (JSON-shaped, as the store keeps it) into a ``google.protobuf.Value``, as
    ``json_format.ParseDict`` would, without its per-call reflection."""
    if value is None:
        target.null_value = struct_pb2.NULL_VALUE
    elif isinstance(value, bool):
        target.bool_value = value
    elif isinstance(value, int | float):
        target.number_value = value
    elif isinstance(value, str):
        target.string_value = value
    elif isinstance(value, Mapping):
        target.struct_value.SetInParent()  # an empty object is still an object
        target.struct_value.update(value)
    elif isinstance(value, Sequence):
        target.list_value.SetInParent()
        target.list_value.extend(value)
    else:  # not JSON-shaped: let the reference conversion say why
        json_format.ParseDict(value, target)


def _instant(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


class ProfileReader:
    """Answers ``GetProfile`` from the store on ``engine`` (see the module's docstring)."""

    def __init__(self, engine: Engine, *, phone_region: str, threads: int = DEFAULT_THREADS) -> None:
        self.engine = engine
        self.phone_region = phone_region
        self.sqlite = engine.dialect.name == "sqlite"
        self.inline = self.sqlite and engine.url.database in (None, "", ":memory:")
        self.pool = None if self.inline else ThreadPoolExecutor(max_workers=threads, thread_name_prefix="lookup")
        self._rules = Normaliser.make(phone_region=phone_region)  # the standard namespaces
        self._definitions: dict[str, tuple[str, pb.ComputedAttribute]] = {}
        self._local = threading.local()
        self._lock = threading.Lock()
        self._connections: list[Connection] = []

    async def get(self, request: pb.GetProfileRequest) -> pb.Profile:
        if self.pool is None:
            return self.read(request)
        return await asyncio.get_running_loop().run_in_executor(self.pool, self.read, request)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            connections, self._connections = self._connections, []
        for conn in connections:
            conn.close()

    def read(self, request: pb.GetProfileRequest) -> pb.Profile:
        """The answer to one request, in one read transaction (ended before returning, so a
        reader never holds a snapshot that keeps SQLite's write-ahead log from being checkpointed)."""
        if self.inline:  # the loop's thread shares the one in-memory connection: borrow it per call
            with self.engine.connect() as borrowed:
                return self._message(borrowed, self._row(borrowed, request), with_history=request.with_history)
        conn = self._connection()
        try:
            if self.sqlite:  # pysqlite begins no transaction for a SELECT: each would see its own state
                conn.exec_driver_sql("BEGIN")
            return self._message(conn, self._row(conn, request), with_history=request.with_history)
        finally:
            conn.rollback()

    def _connection(self) -> Connection:
        """This thread's connection, kept open (a pool checkout per call costs more than the reads)."""
        conn: Connection | None = getattr(self._local, "conn", None)
        if conn is None or conn.closed or conn.invalidated:
            conn = self.engine.connect()
            if not self.sqlite:  # one snapshot for the call's reads, not one per statement (READ COMMITTED)
                conn = conn.execution_options(isolation_level="REPEATABLE READ")
            self._local.conn = conn
            with self._lock:
                self._connections.append(conn)
        return conn

    def _row(self, conn: Connection, request: pb.GetProfileRequest) -> sa.Row[Any, Any, Any, Any, Any]:
        if request.HasField("identity"):
            identity = request.identity
            value = self._normalised(conn, identity)
            found = (
                None
                if value is None
                else conn.execute(PROFILE_BY_IDENTITY, {"namespace": identity.namespace, "value": value}).first()
            )
            if found is None:  # names the namespace only: never the value, nor a hash of it
                raise NotFound(f"{identity.namespace} not found")
            return found
        if not request.profile_id:
            raise InvalidInput("missing key", [Violation("key", "required", "a profile id or an identity")])
        if len(request.profile_id) > MAX_PROFILE_ID:  # never echoed: no profile id is this long
            raise InvalidInput(
                "invalid profile id",
                [Violation("profile_id", "length", f"at most {MAX_PROFILE_ID} characters")],
            )
        row = conn.execute(PROFILE, {"profile_id": request.profile_id}).first()
        if row is None:
            raise NotFound(f"profile {request.profile_id!r} not found")
        return row

    def _normalised(self, conn: Connection, identity: IdentityValue) -> str | None:
        """The identity's value normalised as identity normalised it (the kit's normaliser)."""
        rules = self._rules  # one read: another lookup thread may replace it meanwhile
        if identity.namespace not in rules.types:  # namespaces are never removed nor changed: learn new ones
            custom = {str(r[0]): int(r[1]) for r in conn.execute(NAMESPACES)}
            rules = self._rules = Normaliser.make(custom, phone_region=self.phone_region)
        if identity.namespace not in rules.types:
            raise InvalidInput(
                "unknown namespace",
                [Violation("identity", "unknown_namespace", f"namespace {identity.namespace!r} is not defined")],
            )
        return rules.lookup(identity.namespace, identity.value)

    def _computed_definitions(self, conn: Connection) -> list[pb.ComputedAttribute]:
        """Every computed definition, by name; decoded and parsed once per version of its body."""
        known: dict[str, tuple[str, pb.ComputedAttribute]] = {}
        for name, body in conn.execute(COMPUTED):
            cached = self._definitions.get(name)
            if cached is None or cached[0] != body:
                cached = (body, store.computed_of_body(json.loads(body)))
            known[name] = cached
        self._definitions = known
        return [parsed for _, parsed in known.values()]

    def _message(self, conn: Connection, row: sa.Row[Any, Any, Any, Any, Any], *, with_history: bool) -> pb.Profile:
        profile_id, attributes, sources, events, computed_values = row
        params = {"profile_id": profile_id}
        profile = pb.Profile(
            profile_id=profile_id,
            identities=[IdentityValue(namespace=ns, value=v) for ns, v in conn.execute(IDENTITIES, params)],
            events=events,
        )
        for name in sorted(attributes or {}):
            source = (sources or {}).get(name, {})
            attribute = profile.attributes.add(name=name, source_dataset=source.get("dataset", ""))
            set_value(attribute.value, attributes[name])
            if source.get("at"):
                attribute.updated_at.FromDatetime(datetime.fromisoformat(source["at"]))
        realized: list[str] = []
        for segment_id, name, status, changed_at in conn.execute(MEMBERSHIPS, params):
            member = profile.memberships.add(segment_id=segment_id, segment_name=name or "", status=status)
            member.changed_at.FromDatetime(changed_at)
            if status == store.REALIZED:
                realized.append(name or segment_id)
        profile.segments.extend(sorted(realized))
        values = computed_values or {}
        for definition in self._computed_definitions(conn):
            item = profile.computed.add(name=definition.name, definition=definition.definition)
            if definition.name in values:
                set_value(item.value, values[definition.name])
        if with_history:
            for dataset, kind, count, last in conn.execute(SOURCES, params):
                source_msg = profile.sources.add(dataset=dataset, kind=kind, fragments=int(count))
                source_msg.last_at.FromDatetime(_instant(int(last)))
            for event_id, event_type, dataset, ts_ms, fields in conn.execute(EVENTS, params):
                item_event = profile.recent_events.add(event_id=event_id, event_type=event_type, dataset=dataset)
                item_event.occurred_at.FromDatetime(_instant(ts_ms))
                item_event.fields.update(fields or {})
        return profile
