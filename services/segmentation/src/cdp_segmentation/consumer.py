"""Identity's fragments, merges and splits (and ingest's datasets): keep the unified profiles,
re-evaluate only the segments that read what changed, emit membership changes."""

from __future__ import annotations

from sqlmodel import Session

from cdp.identity.v1 import events_pb2 as identity_ev
from cdp.ingest.v1 import events_pb2 as ingest_ev
from cdp_kit.envelope import Envelope, from_timestamp, is_a, unpack
from cdp_kit.eventlog import LogMessage
from cdp_kit.processor import UnitOfWork
from cdp_segmentation import store
from cdp_segmentation.membership import Catalog, exit_all, reevaluate
from cdp_segmentation.profiles import apply_fragment, apply_merge, apply_split
from cdp_segmentation.store import EVENT, DatasetRow


class ProfilesToMemberships:
    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self._split_parts: dict[str, list[str]] = {}
        # Profiles a fragment of the current message created: every segment reads a new profile.
        self._created: set[str] = set()
        self._sequence = 0

    def observe(self, session: Session, msg: LogMessage, env: Envelope) -> None:
        ctx = self.catalog.context(session)
        if msg.sequence != self._sequence:
            self._sequence, self._created, self._split_parts = msg.sequence, set(), {}
        if is_a(env, identity_ev.ProfileFragment):
            frag = unpack(env, identity_ev.ProfileFragment)
            if session.get(store.ProfileRow, frag.profile_id) is None:
                self._created.add(frag.profile_id)
            apply_fragment(session, frag, msg.sequence, ctx)
        elif is_a(env, identity_ev.ProfilesMerged):
            apply_merge(session, unpack(env, identity_ev.ProfilesMerged), ctx)
        elif is_a(env, identity_ev.ProfileSplit):
            self._split_parts[env.id] = apply_split(session, unpack(env, identity_ev.ProfileSplit), ctx)

    def decide(self, uow: UnitOfWork, msg: LogMessage, env: Envelope) -> None:
        at = from_timestamp(env.occurred_at)
        session = uow.session
        now_ms = self.catalog.context(session).clock_ms
        if is_a(env, identity_ev.ProfileFragment):
            frag = unpack(env, identity_ev.ProfileFragment)
            if frag.profile_id in self._created:
                segments = self.catalog.affected(session, everything=True)
            elif frag.kind == EVENT:
                segments = self.catalog.affected(
                    session, event_types={frag.event_type}, identities=bool(frag.identities)
                )
            else:
                names = set(frag.attributes.fields)
                segments = self.catalog.affected(session, attributes=names, identities=bool(frag.identities))
            reevaluate(uow, frag.profile_id, segments, at, f"fragment:{env.id}", now_ms)
        elif is_a(env, identity_ev.ProfilesMerged):
            merged = unpack(env, identity_ev.ProfilesMerged)
            for absorbed in merged.absorbed:
                exit_all(uow, absorbed, at, f"merged-into:{merged.survivor}:{env.id}")
            everything = self.catalog.affected(session, everything=True)
            reevaluate(uow, merged.survivor, everything, at, f"merge:{env.id}", now_ms)
        elif is_a(env, identity_ev.ProfileSplit):
            split = unpack(env, identity_ev.ProfileSplit)
            parts = self._split_parts.pop(env.id, None) or sorted(
                {split.profile_id, *(p.profile_id for p in split.parts)}
            )
            everything = self.catalog.affected(session, everything=True)
            for part in parts:
                reevaluate(uow, part, everything, at, f"split:{env.id}", now_ms)


class DatasetsOfIngest:
    """Keeps each dataset's event retention (ingest's config log)."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog

    def observe(self, session: Session, msg: LogMessage, env: Envelope) -> None:
        if is_a(env, ingest_ev.DatasetCreated):
            dataset = unpack(env, ingest_ev.DatasetCreated).dataset
            session.merge(DatasetRow(name=dataset.name, retention_seconds=max(0, dataset.retention_seconds)))
            session.flush()
            self.catalog.invalidate()

    def decide(self, uow: UnitOfWork, msg: LogMessage, env: Envelope) -> None:
        return None


__all__ = ["DatasetsOfIngest", "ProfilesToMemberships", "store"]
