"""Validated records from ingest become profile fragments (and merges)."""

from __future__ import annotations

from sqlmodel import Session

from cdp.common.v1.envelope_pb2 import IdentityValue
from cdp.identity.v1 import events_pb2 as ev
from cdp.ingest.v1 import events_pb2 as ingest_ev
from cdp.ingest.v1 import ingest_pb2
from cdp_identity import store
from cdp_identity.domain import Known, normalise, resolve
from cdp_kit.envelope import Envelope, deterministic_id, from_timestamp, is_a, make_envelope, unpack
from cdp_kit.eventlog import LogMessage
from cdp_kit.processor import UnitOfWork
from cdp_kit.streams import IDENTITY_FRAGMENTS
from cdp_kit.telemetry import get_logger

log = get_logger(__name__)


class RecordsToFragments:
    """Input handler for CDP_INGEST: identity keeps nothing of ingest's facts but what it decides."""

    def observe(self, session: Session, msg: LogMessage, env: Envelope) -> None:
        return None

    def decide(self, uow: UnitOfWork, msg: LogMessage, env: Envelope) -> None:
        if not is_a(env, ingest_ev.RecordAccepted):
            return
        record = unpack(env, ingest_ev.RecordAccepted)
        identities = _normalised(record)
        if not identities:
            log.info("record_without_identities", record_event=env.id, dataset=record.dataset)
            return
        touched = store.profiles_of(uow.session, identities)
        outcome = resolve(identities, [Known(p.profile_id, p.ordinal) for p in touched])
        at = from_timestamp(env.occurred_at)
        events: list[Envelope] = []
        if outcome.absorbed:
            merged = ev.ProfilesMerged(
                survivor=outcome.profile_id,
                absorbed=list(outcome.absorbed),
                via=IdentityValue(namespace=identities[0][0], value=identities[0][1]),
                reason="a record holds identities of several profiles: the oldest profile survives",
            )
            events.append(
                make_envelope(
                    merged,
                    event_id=deterministic_id("merge", env.id),
                    subject_key=outcome.profile_id,
                    occurred_at=at,
                    cause=uow.cause,
                    trace_context=dict(env.trace_context),
                )
            )
        fragment = ev.ProfileFragment(
            profile_id=outcome.profile_id,
            source_event_id=env.id,
            record_id=record.record_id,
            dataset=record.dataset,
            kind="event" if record.schema_class == ingest_pb2.SCHEMA_CLASS_EVENT else "record",
            identities=[IdentityValue(namespace=ns, value=v) for ns, v in identities],
            attributes=record.attributes,
            occurred_at=record.occurred_at,
            event_type=record.event_type,
            batch_id=record.batch_id,
        )
        events.append(
            make_envelope(
                fragment,
                event_id=deterministic_id("fragment", env.id),
                subject_key=outcome.profile_id,
                occurred_at=at,
                cause=uow.cause,
                trace_context=dict(env.trace_context),
            )
        )
        uow.emit(IDENTITY_FRAGMENTS, events)


def _normalised(record: ingest_ev.RecordAccepted) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for ident in record.identities:
        value = normalise(ident.namespace, ident.value)
        if value is not None and (ident.namespace, value) not in out:
            out.append((ident.namespace, value))
    return out
