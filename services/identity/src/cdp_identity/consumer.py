"""Validated records from ingest become profile fragments, merges, decisions and splits."""

from __future__ import annotations

from sqlmodel import Session

from cdp.identity.v1 import events_pb2 as ev
from cdp.ingest.v1 import events_pb2 as ingest_ev
from cdp.ingest.v1 import ingest_pb2
from cdp_identity.engine import Maker, Normaliser, kept_and_dropped, resolve_record
from cdp_identity.graph import WorkingSet
from cdp_identity.projection import IdentityProjection
from cdp_kit.envelope import Envelope, from_timestamp, is_a, unpack
from cdp_kit.eventlog import LogMessage
from cdp_kit.processor import UnitOfWork
from cdp_kit.streams import IDENTITY_FRAGMENTS
from cdp_kit.telemetry import get_logger

log = get_logger(__name__)
PREFETCHED = "cdp_identity_prefetched"


class RecordsToFragments:
    """Input handler for CDP_INGEST. Identity keeps nothing of ingest's facts but what it decides;
    ``observe`` only loads, for the first record of each message, the graphs of every identity
    the message names (one bulk read per message instead of several per record)."""

    def __init__(self, projection: IdentityProjection) -> None:
        self.projection = projection
        self.normalise = Normaliser()

    def observe(self, session: Session, msg: LogMessage, env: Envelope) -> None:
        seen = session.info.setdefault(PREFETCHED, set())
        if (msg.stream, msg.sequence) in seen:
            return
        seen.add((msg.stream, msg.sequence))
        ws = self.projection.graph(session)
        keys: list[str] = []
        for other in msg.events():
            if is_a(other, ingest_ev.RecordAccepted):
                record = unpack(other, ingest_ev.RecordAccepted)
                kept, _ = kept_and_dropped(ws, self.normalise, [(i.namespace, i.value) for i in record.identities])
                keys.extend(kept)
        ws.load(keys)

    def decide(self, uow: UnitOfWork, msg: LogMessage, env: Envelope) -> None:
        if not is_a(env, ingest_ev.RecordAccepted):
            return
        record = unpack(env, ingest_ev.RecordAccepted)
        ws: WorkingSet = self.projection.graph(uow.session)
        kept, dropped = kept_and_dropped(ws, self.normalise, [(i.namespace, i.value) for i in record.identities])
        if not kept:
            log.info("record_without_identities", record_event=env.id, dataset=record.dataset, dropped=len(dropped))
        fragment = ev.ProfileFragment(
            source_event_id=env.id,
            record_id=record.record_id,
            dataset=record.dataset,
            kind="event" if record.schema_class == ingest_pb2.SCHEMA_CLASS_EVENT else "record",
            attributes=record.attributes,
            occurred_at=record.occurred_at,
            event_type=record.event_type,
            batch_id=record.batch_id,
        )
        make = Maker(env.id, from_timestamp(env.occurred_at), uow.cause, dict(env.trace_context))
        resolve_record(ws, kept, dropped, fragment, make, lambda events: uow.emit(IDENTITY_FRAGMENTS, events))
