"""Validated records from ingest become profile fragments, merges, decisions and splits."""

from __future__ import annotations

from collections.abc import Sequence

from sqlmodel import Session

from cdp.identity.v1 import events_pb2 as ev
from cdp.ingest.v1 import events_pb2 as ingest_ev
from cdp.ingest.v1 import ingest_pb2
from cdp_identity.engine import Maker, Normaliser, kept_and_dropped, resolve_record
from cdp_identity.graph import Made, WorkingSet
from cdp_identity.projection import IdentityProjection
from cdp_identity.sealing import IdentitySealer
from cdp_kit.envelope import Causation, Cause, Envelope, unpack
from cdp_kit.eventlog import LogMessage
from cdp_kit.processor import UnitOfWork
from cdp_kit.streams import IDENTITY_FRAGMENTS
from cdp_kit.telemetry import get_logger
from cdp_kit.vault import PersonVault

log = get_logger(__name__)
RECORD_ACCEPTED = ingest_ev.RecordAccepted.DESCRIPTOR.full_name
RECORD_URL = f"type.googleapis.com/{RECORD_ACCEPTED}"
EVENT_CLASS = int(ingest_pb2.SCHEMA_CLASS_EVENT)


# What identity reads of one RecordAccepted: the record, its kept identity keys (strongest
# first), its dropped identities and the key of each of its identities in the record's order
# (None: dropped).
Parsed = tuple[ingest_ev.RecordAccepted, list[str], list[ev.DroppedIdentity], list[str | None]]


class RecordsToFragments:
    """Input handler for CDP_INGEST. Identity keeps nothing of ingest's facts but what it decides.
    The first ``decide`` of a fetched batch reads every record ``prefetch`` handed over, normalises
    its identities and loads the graphs of all of them in a few bulk queries; then it works in memory."""

    def __init__(self, projection: IdentityProjection, vault: PersonVault | None = None) -> None:
        self.projection = projection
        self.vault = vault  # seals fragments under their record's keys (None: sealing is off)
        self.normalise = Normaliser()
        self._cause: Cause | None = None
        self._causation = Causation()

    def prefetch(self, session: Session, envelopes: Sequence[Envelope]) -> None:
        """Remember the batch; the first ``decide`` reads it (a replay that decides nothing reads nothing)."""
        self.projection.graph(session).unread = [env for env in envelopes if env.type == RECORD_ACCEPTED]

    def _read_batch(self, ws: WorkingSet) -> None:
        keys: list[str] = []
        for env in ws.unread:
            parsed = self._parse(ws, env)
            ws.parsed[env.id] = parsed
            keys += parsed[1]
        ws.unread = []
        ws.load(keys)

    def observe(self, session: Session, msg: LogMessage, env: Envelope) -> None:
        """Nothing to keep: ingest's records live on ingest's log."""

    def decide(self, uow: UnitOfWork, msg: LogMessage, env: Envelope) -> None:
        if env.type != RECORD_ACCEPTED:
            return
        ws: WorkingSet = self.projection.graph(uow.session)
        if ws.unread:
            self._read_batch(ws)
        parsed = ws.parsed.pop(env.id, None) or self._parse(ws, env)
        record, kept, dropped, node_keys = parsed
        if not kept:
            log.info("record_without_identities", record_event=env.id, dataset=record.dataset, dropped=len(dropped))
        fragment = fragment_of(env.id, record)
        if uow.cause is not self._cause:  # one Causation per input message, shared by its records' events
            self._cause, self._causation = uow.cause, uow.cause.to_proto()
        make = Maker(env.id, env.occurred_at, uow.cause, env.trace_context, self._causation)
        fold_made = self.projection.fold_made
        sealer = self._sealer(ws, node_keys, env)
        make.seal = sealer

        def emit_fragment(data: bytes, made: Made) -> None:
            if sealer is not None:
                ws.note_key_refs(sealer.refs_of(made[1]).items())
            uow.emit_encoded(IDENTITY_FRAGMENTS, [data], lambda session: fold_made(session, made))

        resolve_record(
            ws, kept, dropped, fragment, make, lambda events: uow.emit(IDENTITY_FRAGMENTS, events), emit_fragment
        )

    def _sealer(self, ws: WorkingSet, node_keys: list[str | None], env: Envelope) -> IdentitySealer | None:
        """Seals the record's fragment under the record's keys (its refs travel in the record, one
        per identity in the record's order, as ``node_keys`` are)."""
        if self.vault is None or not self.vault.sealing or not env.sealed:
            return None
        refs = list(env.sealed[0].key_refs)
        ref_of: dict[str, str] = {}
        for key, ref in zip(node_keys, refs, strict=False):
            if key is not None:
                ref_of.setdefault(key, ref)
        return IdentitySealer(self.vault, ws, ref_of, list(dict.fromkeys(refs)))

    def _parse(self, ws: WorkingSet, env: Envelope) -> Parsed:
        # The caller checked env.type: parse the payload without Any.Unpack's type-url round trip, unless
        # the payload says it is another message (then unpack refuses it and the input is dead-lettered).
        if env.payload.type_url == RECORD_URL:
            record = ingest_ev.RecordAccepted.FromString(env.payload.value)
        else:
            record = unpack(env, ingest_ev.RecordAccepted)
        node_keys: list[str | None] = []
        raw = [(i.namespace, i.value) for i in record.identities]
        kept, dropped = kept_and_dropped(ws.rules, self.normalise, raw, node_keys)
        return record, kept, dropped, node_keys


def fragment_of(source_event_id: str, record: ingest_ev.RecordAccepted) -> ev.ProfileFragment:
    """A record's fragment before it is resolved (no profile, identities or anchor yet)."""
    return ev.ProfileFragment(
        source_event_id=source_event_id,
        record_id=record.record_id,
        dataset=record.dataset,
        kind="event" if record.schema_class == EVENT_CLASS else "record",
        attributes=record.attributes,
        occurred_at=record.occurred_at,
        event_type=record.event_type,
        batch_id=record.batch_id,
    )
