"""Identity's fragments, merges and splits (and ingest's datasets): keep the unified profiles,
re-evaluate only the segments that read what changed, emit membership changes."""

from __future__ import annotations

import functools
from datetime import datetime

from google.protobuf.timestamp_pb2 import Timestamp
from sqlmodel import Session

from cdp.identity.v1 import events_pb2 as identity_ev
from cdp.ingest.v1 import events_pb2 as ingest_ev
from cdp.ingest.v1 import ingest_pb2
from cdp_kit.envelope import Envelope, from_timestamp, is_a, unpack
from cdp_kit.eventlog import LogMessage
from cdp_kit.merging import positions
from cdp_kit.processor import UnitOfWork
from cdp_segmentation import store
from cdp_segmentation.membership import Catalog, exit_all, reevaluate, reevaluate_state
from cdp_segmentation.privacy import REQUESTED as PRIVACY_ERASURE
from cdp_segmentation.privacy import (
    erase_requested,
    mark_unreadable,
    merge_unreadable,
    split_unreadable,
    unreadable,
)
from cdp_segmentation.profiles import apply_merge, apply_split
from cdp_segmentation.store import EVENT, DatasetRow, SchemaRow
from cdp_segmentation.vocabulary import consent_attributes, flatten

FRAGMENT = identity_ev.ProfileFragment
FRAGMENT_TYPE = FRAGMENT.DESCRIPTOR.full_name
FRAGMENT_URL = f"type.googleapis.com/{FRAGMENT_TYPE}"


def _unpack_fragment(env: Envelope) -> identity_ev.ProfileFragment:
    """``unpack(env, FRAGMENT)``, parsing the payload directly when its type is the expected one."""
    if env.payload.type_url == FRAGMENT_URL:
        return FRAGMENT.FromString(env.payload.value)
    return unpack(env, FRAGMENT)


@functools.lru_cache(maxsize=1024)
def _datetime(seconds: int, nanos: int) -> datetime:
    """``from_timestamp`` of a Timestamp (the fragments of a batch share few times)."""
    return from_timestamp(Timestamp(seconds=seconds, nanos=nanos))


class ProfilesToMemberships:
    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self._split_parts: dict[str, list[str]] = {}
        self._sequence = 0
        self._fragments: dict[str, identity_ev.ProfileFragment] = {}
        self._positions_of: LogMessage | None = None
        self._positions: dict[str, int] = {}

    def observe(self, session: Session, msg: LogMessage, env: Envelope) -> None:
        ctx = self.catalog.context(session)
        if msg.sequence != self._sequence:
            self._sequence, self._split_parts = msg.sequence, {}
        working = self.catalog.working_for(session)
        if is_a(env, identity_ev.ProfileFragment):
            working.apply_fragment(self._fragment(env), msg.sequence, ctx, self._position(msg, env))
        elif is_a(env, identity_ev.ProfilesMerged):
            merged = unpack(env, identity_ev.ProfilesMerged)
            self._leave_to_sql(session, [merged.survivor, *merged.absorbed])
            apply_merge(session, merged, ctx)
            merge_unreadable(session, merged.survivor, merged.absorbed)
        elif is_a(env, identity_ev.ProfileSplit):
            split = unpack(env, identity_ev.ProfileSplit)
            self._leave_to_sql(session, [split.profile_id, *(p.profile_id for p in split.parts)])
            self._split_parts[env.id] = apply_split(session, split, ctx)
            split_unreadable(session, split.profile_id, self._split_parts[env.id])
        elif env.type == PRIVACY_ERASURE:  # identity erased a person here, in order (see privacy.py)
            erase_requested(session, self.catalog, env)

    def observe_erased(self, session: Session, msg: LogMessage, env: Envelope) -> None:
        """A fragment sealed under keys a privacy delete destroyed: its profile is unreadable
        until identity's erasure of it is read (``privacy.PrivacyUnreadableRow``). On a rebuild
        this is every fragment of an erased person; live, those read after the request."""
        if env.type == FRAGMENT_TYPE:
            refs = [ref for part in env.sealed if part.ciphertext for ref in part.key_refs]
            mark_unreadable(session, _unpack_fragment(env).profile_id, refs)

    def _position(self, msg: LogMessage, env: Envelope) -> int:
        """The envelope's place among its message's events: with the sequence, its log position.
        A pure function of the message (a retry or a replay of it finds the same places)."""
        if msg is not self._positions_of:
            self._positions_of = msg
            self._positions = positions(msg.events())
        return self._positions.get(env.id, 0)

    def _leave_to_sql(self, session: Session, profile_ids: list[str]) -> None:
        working = self.catalog.working_for(session)
        working.write_back()
        working.forget(profile_ids)

    def prefetch(self, session: Session, envelopes: list[Envelope]) -> None:
        """Load every profile the batch's fragments touch, in bulk."""
        self._fragments = {e.id: _unpack_fragment(e) for e in envelopes if e.type == FRAGMENT_TYPE}
        self.catalog.working_for(session).load(f.profile_id for f in self._fragments.values())

    def _fragment(self, env: Envelope) -> identity_ev.ProfileFragment:
        """Unpacked once per batch (in prefetch), not again in observe and decide."""
        frag = self._fragments.get(env.id)
        return frag if frag is not None else _unpack_fragment(env)

    def decide(self, uow: UnitOfWork, msg: LogMessage, env: Envelope) -> None:
        occurred = env.occurred_at
        at = _datetime(occurred.seconds, occurred.nanos)
        session = uow.session
        now_ms = self.catalog.context(session).clock_ms
        if env.type == FRAGMENT_TYPE:
            frag = self._fragment(env)
            working = self.catalog.working_for(session)
            state = working.get(frag.profile_id)
            if not working.live(frag.profile_id):  # merged away later in the same message
                exit_all(uow, self.catalog, frag.profile_id, at, f"fragment:{env.id}")
                return
            cause = f"fragment:{env.id}"
            if unreadable(session, frag.profile_id):  # a person being erased: see privacy.py
                state.created = False
                state.dropped_types.clear()
                return
            if state.created:
                # New: the segments that read nothing it has take their value for the empty profile.
                segments, reading = self.catalog.created(session, state)
                state.created = False
                state.dropped_types.clear()
                presumed = self.catalog.empty_values(session)
                reevaluate_state(
                    uow, self.catalog, state, segments, at, cause, now_ms, presumed=presumed, evaluate=reading
                )
                return
            # Segments reading what changed: the attributes of a record, the type of an event,
            # and the types of events the cap dropped (possibly in another fragment of the message).
            names = set(frag.attributes.fields) if frag.kind != EVENT else set()
            types = {frag.event_type, *state.dropped_types} if frag.kind == EVENT else set(state.dropped_types)
            segments = self.catalog.affected(
                session, attributes=names, event_types=types, identities=bool(frag.identities)
            )
            state.dropped_types.clear()
            reevaluate_state(uow, self.catalog, state, segments, at, cause, now_ms)
        elif is_a(env, identity_ev.ProfilesMerged):
            merged = unpack(env, identity_ev.ProfilesMerged)
            self._leave_to_sql(session, [merged.survivor, *merged.absorbed])
            for absorbed in merged.absorbed:
                exit_all(uow, self.catalog, absorbed, at, f"merged-into:{merged.survivor}:{env.id}")
            if unreadable(session, merged.survivor):  # a person being erased: see privacy.py
                return
            everything = self.catalog.affected(session, everything=True)
            reevaluate(uow, self.catalog, merged.survivor, everything, at, f"merge:{env.id}", now_ms)
        elif is_a(env, identity_ev.ProfileSplit):
            split = unpack(env, identity_ev.ProfileSplit)
            parts = self._split_parts.pop(env.id, None) or sorted(
                {split.profile_id, *(p.profile_id for p in split.parts)}
            )
            self._leave_to_sql(session, parts)
            everything = self.catalog.affected(session, everything=True)
            for part in parts:
                if not unreadable(session, part):  # a person being erased: see privacy.py
                    reevaluate(uow, self.catalog, part, everything, at, f"split:{env.id}", now_ms)


class DatasetsOfIngest:
    """Keeps each dataset's event retention and each schema's fields (ingest's config log)."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog

    def observe(self, session: Session, msg: LogMessage, env: Envelope) -> None:
        if is_a(env, ingest_ev.DatasetCreated):
            dataset = unpack(env, ingest_ev.DatasetCreated).dataset
            session.merge(DatasetRow(name=dataset.name, retention_seconds=max(0, dataset.retention_seconds)))
            session.flush()
            self.catalog.invalidate()
        elif is_a(env, ingest_ev.SchemaRegistered):
            schema = unpack(env, ingest_ev.SchemaRegistered).schema
            kind = "event" if schema.schema_class == ingest_pb2.SCHEMA_CLASS_EVENT else "profile"
            fields = flatten(schema.fields) | consent_attributes(schema.fields)
            row = SchemaRow(name=schema.name, schema_class=kind, fields=fields, event_types=list(schema.event_types))
            session.merge(row)

    def decide(self, uow: UnitOfWork, msg: LogMessage, env: Envelope) -> None:
        return None


__all__ = ["DatasetsOfIngest", "ProfilesToMemberships", "store"]
