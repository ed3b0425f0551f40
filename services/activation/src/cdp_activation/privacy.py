"""Privacy requests (cdp.privacy.v1) in activation: erase a person, and ask each destination
that received them to remove or delete them.

Identity records each request on ``cdp.privacy.requests`` (PrivacyRequested, with every profile
id of the person). For a delete (``delete`` or ``delete+suppress``), in ONE transaction of the
privacy input:

1. ``observe`` finds every plan whose destination received the person (held members, and the
   records of every add batch, delivered or not), then erases what activation keeps of the
   inputs: profile, fragments, memberships. It runs on every replay, and the privacy input is
   the last input, so a rebuild replays profiles and memberships first and erases them again.
2. ``decide`` (live only) appends, in one message on CDP_DELIVERY:
   * a removal batch per plan whose platform has a removal (BatchPrepared, id
     ``privacy:<request id>:<plan id>``, action ``erase``) holding only the identifiers the
     platform's removal needs, in the form it takes (``Connector.erase_identifiers``: SHA-256
     where it takes hashes). Its records are sealed under a vault key of the batch itself
     (``batchseal.sealed_removal``), not the person's, so they stay deliverable once the person's
     keys are destroyed;
   * ProfilesErased, whose fold erases what the delivery log says of them (held members,
     exclusions, their records in every other batch: an add not yet sent goes without them)
     and keeps their profile ids as tombstones (``act_erased``: facts about them that arrive
     later are not kept). Being on the delivery log, it is folded where it stands among the
     deliveries, so a rebuild (or a start on an empty store) folds every later delivery as the
     live store did, and erased profiles are tombstoned before any input is replayed.

Then ``PrivacyAcks`` appends PrivacyApplied on ``cdp.privacy.applied.activation``: counts, and a
DestinationRemoval per plan ("prepared" with the batch id, or "not supported by the platform").
Identity destroys the person's keys only after every service's acknowledgement, so the removals
are on the log before. The removal batches are delivered by the normal delivery loop (retries,
dead letters, redrive) through ``Connector.erase``; a delivered batch is known on restart from
the log (BatchDelivered), so it is never sent again, and its records then keep only profile ids.
Once a removal batch is delivered (or after ``CDP_REMOVAL_KEY_DAYS`` undelivered) ``PrivacyAcks``
destroys its key and appends RemovalKeysDestroyed, and it appends PrivacyApplied again whenever a
removal's outcome changes ("delivered", "failed: <reason>").

Suppress and unsuppress ask nothing of activation, and a request for profiles activation never
saw finds nothing: each is acknowledged with no counts.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from google.protobuf import json_format
from sqlmodel import Session, col, delete, select

from cdp.activation.v1 import activation_pb2 as pb
from cdp.activation.v1 import events_pb2 as ev
from cdp.common.v1.envelope_pb2 import Sealed
from cdp.privacy.v1 import privacy_pb2 as privacy
from cdp_activation import store
from cdp_activation.batchseal import sealed_removal
from cdp_activation.connectors import Connector, ConnectorConfig, Record, connector_for
from cdp_activation.credentials import is_secret
from cdp_activation.store import (
    BatchRow,
    ErasedRow,
    ExclusionRow,
    FragmentRow,
    KeyRefRow,
    MemberRow,
    PlanMemberRow,
    PrivacyRow,
    ProfileRow,
)
from cdp_kit.envelope import Envelope, deterministic_id, is_a, make_envelope, unpack, utcnow
from cdp_kit.eventlog import MAX_MESSAGE_BYTES, LogMessage
from cdp_kit.privacy import KeyVault, NoKeyVault, checked_request, keep_applying, revoke
from cdp_kit.processor import Processor, UnitOfWork
from cdp_kit.store import scrub_after_commit
from cdp_kit.streams import ACTIVATION_DELIVERIES, privacy_applied_log
from cdp_kit.telemetry import get_logger
from cdp_kit.vault import PersonVault

log = get_logger(__name__)

ACTIVATION_PRIVACY_APPLIED = privacy_applied_log("activation")
ERASE_MODES = frozenset({privacy.PRIVACY_MODE_DELETE, privacy.PRIVACY_MODE_DELETE_AND_SUPPRESS})
ERASE = "erase"
PREPARED = "prepared"
DELIVERED = "delivered"
FAILED = "failed:"
NOT_DELIVERED = "not delivered within the removal key horizon: its identifiers are destroyed"
NOT_SUPPORTED = "not supported by the platform"
NOTHING_TO_MATCH = "failed: no identifier the platform can match on"
BATCH_PREFIX = "privacy:"
CHUNK = 500  # bounded IN lists


def removal_batch_id(request_id: str, plan_id: str) -> str:
    return f"{BATCH_PREFIX}{request_id}:{plan_id}"


def request_of(batch_id: str) -> str | None:
    """The request id of a removal batch id, None for any other batch."""
    if not batch_id.startswith(BATCH_PREFIX):
        return None
    request_id, _, plan_id = batch_id.removeprefix(BATCH_PREFIX).partition(":")
    return request_id if plan_id else None


def removal_dict(removal: privacy.DestinationRemoval) -> dict[str, Any]:
    return json_format.MessageToDict(removal, preserving_proto_field_name=True)


def hashing_config(connector: Connector, dest: pb.Destination) -> ConnectorConfig:
    """The destination's settings that shape identifiers (phone region, gmail rule, external id
    namespace), without its secrets: nothing is decrypted to prepare a removal."""
    raw = json_format.MessageToDict(dest.config)
    fields = connector.config_model.model_fields
    return connector.config_model.model_construct(**{k: v for k, v in raw.items() if k in fields and not is_secret(k)})


def _chunks(items: list[str]) -> Iterable[list[str]]:
    for start in range(0, len(items), CHUNK):
        yield items[start : start + CHUNK]


def _deleted(result: Any) -> int:
    return max(int(getattr(result, "rowcount", 0) or 0), 0)


PlannedBatch = tuple[str, str, list[pb.Record]]
"""(plan id, destination id, erase records) of one removal batch to record."""


@dataclass
class Erasure:
    """What observe found for decide: the removal batches to record, the removals that need no
    batch, and the profiles."""

    profile_ids: list[str]
    batches: list[PlannedBatch] = field(default_factory=list)
    removals: list[privacy.DestinationRemoval] = field(default_factory=list)


def received_by(session: Session, profile_ids: set[str]) -> dict[str, dict[str, dict[str, Any]]]:
    """plan id -> profile id -> the record the destination was sent, for every plan whose
    destination received one of the profiles: held members, and every add batch (delivered,
    pending or dead-lettered: a send may have reached the platform). Reads only."""
    received: dict[str, dict[str, dict[str, Any]]] = {}
    batches_t = BatchRow.__table__  # type: ignore[attr-defined]
    rows = session.execute(
        sa.select(batches_t.c.plan_id, batches_t.c.records)
        .where(batches_t.c.action == "add")
        .order_by(batches_t.c.plan_id, batches_t.c.sequence)
    ).all()
    for plan_id, records in rows:
        for rec in records or []:
            if str(rec.get("profile_id")) in profile_ids:
                received.setdefault(plan_id, {})[str(rec["profile_id"])] = rec
    for part in _chunks(sorted(profile_ids)):
        for member in session.exec(select(PlanMemberRow).where(col(PlanMemberRow.profile_id).in_(part))):
            received.setdefault(member.plan_id, {})[member.profile_id] = member.record or {
                "profile_id": member.profile_id
            }
    return received


def plan_removals(session: Session, profile_ids: list[str]) -> Erasure:
    """The removal batch of each plan whose platform has a removal, holding only what the
    platform needs (``Connector.erase_identifiers``), and the removals that need no batch."""
    erasure = Erasure(profile_ids)
    for plan_id, records_of in sorted(received_by(session, set(profile_ids)).items()):
        plan_row = session.get(store.PlanRow, plan_id)
        dest_row = session.get(store.DestinationRow, plan_row.destination_id) if plan_row else None
        if plan_row is None or dest_row is None:
            continue
        dest = store.destination_of(dest_row)
        connector = connector_for(dest.connector)
        removal = privacy.DestinationRemoval(destination=dest.name, plan_id=plan_id, profiles=len(records_of))
        config = hashing_config(connector, dest)
        if not connector.erases(config):
            removal.status = NOT_SUPPORTED
            erasure.removals.append(removal)
            continue
        records: list[pb.Record] = []
        for pid, rec in sorted(records_of.items()):
            if found := connector.erase_identifiers(config, Record.of(rec)):
                out = pb.Record(profile_id=pid)
                for key, values in sorted(found.items()):
                    out.identities[key].values.extend(values)
                records.append(out)
        if records:
            erasure.batches.append((plan_id, dest_row.id, records))
        else:
            removal.status = NOTHING_TO_MATCH
            erasure.removals.append(removal)
    return erasure


def _delete_profiles(session: Session, models: Iterable[tuple[str, Any]], ids: list[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for name, model in models:
        column = col(model.profile_id)
        n = sum(_deleted(session.exec(delete(model).where(column.in_(part)))) for part in _chunks(ids))
        if n:
            counts[name] = n
    return counts


def _tombstones(session: Session, ids: list[str]) -> None:
    for pid in ids:
        session.merge(ErasedRow(profile_id=pid))
    session.info.pop(ERASED_CACHE, None)


def erase_inputs(session: Session, profile_ids: list[str]) -> dict[str, int]:
    """Erase what activation keeps of other services' facts about the profiles (replayed from
    the inputs, so erased on every replay): profile, fragments, memberships."""
    ids = sorted(set(profile_ids))
    counts = _delete_profiles(
        session, (("profiles", ProfileRow), ("fragments", FragmentRow), ("memberships", MemberRow)), ids
    )
    _tombstones(session, ids)
    session.flush()
    return counts


def erase_deliveries(session: Session, profile_ids: list[str]) -> dict[str, int]:
    """Erase what activation's own delivery log says of the profiles (folded from ProfilesErased,
    where it stands on that log): held members, exclusions, their records in every batch but a
    removal batch (a batch not yet sent goes without them)."""
    ids = sorted(set(profile_ids))
    wanted = set(ids)
    counts = _delete_profiles(session, (("plan_members", PlanMemberRow), ("exclusions", ExclusionRow)), ids)
    batches_t = BatchRow.__table__  # type: ignore[attr-defined]
    stripped = 0
    for batch_id, records in session.execute(
        sa.select(batches_t.c.id, batches_t.c.records).where(batches_t.c.action != ERASE)
    ).all():
        kept = [r for r in records or [] if str(r.get("profile_id")) not in wanted]
        if len(kept) != len(records or []):
            stripped += len(records) - len(kept)
            session.execute(batches_t.update().where(batches_t.c.id == batch_id).values(records=kept))
    if stripped:
        counts["delivery_records"] = stripped
    _tombstones(session, ids)
    session.flush()
    return counts


def _add_counts(row: PrivacyRow, counts: dict[str, int]) -> None:
    merged = dict(row.counts)
    for name, n in counts.items():
        merged[name] = int(merged.get(name, 0)) + n
    row.counts = dict(sorted(merged.items()))


ERASED_CACHE = "act_erased_profiles"


def fit(records: list[pb.Record]) -> list[list[pb.Record]]:
    """Consecutive chunks of records, each within half a log message."""
    budget = MAX_MESSAGE_BYTES // 2
    out: list[list[pb.Record]] = [[]]
    size = 0
    for rec in records:
        need = rec.ByteSize() + 8
        if out[-1] and size + need > budget:
            out.append([])
            size = 0
        out[-1].append(rec)
        size += need
    return out


def is_erased(session: Session, profile_id: str) -> bool:
    """Whether a privacy request erased the profile (read once per transaction)."""
    erased: set[str] | None = session.info.get(ERASED_CACHE)
    if erased is None:
        erased = set(session.exec(select(ErasedRow.profile_id)).all())
        session.info[ERASED_CACHE] = erased
    return profile_id in erased


class PrivacyHandler:
    """The privacy input: the inputs' part of the erasure in ``observe`` (every replay); the
    removal batches and ProfilesErased (the delivery log's part) in ``decide``."""

    def __init__(self, vault: KeyVault | None = None) -> None:
        # What observe found for decide, by request id: the unit's decide follows its observe in
        # the same transaction (a replay observes and does not decide: ``finish`` drops it).
        self._found: dict[str, Erasure] = {}
        self.vault: KeyVault = vault if vault is not None else NoKeyVault()

    def observe(self, session: Session, msg: LogMessage, env: Envelope) -> None:
        if not is_a(env, privacy.PrivacyRequested):
            return
        request = checked_request(env)
        counts: dict[str, int] = {}
        if request.mode in ERASE_MODES and request.key_refs:
            # From now on what arrives sealed with the person's keys reads as erased here; which
            # key sealed which identity (it names the identity) goes.
            revoke(session, self.vault, list(request.key_refs))  # remembered: revoked again after a restart
            refs = sorted(request.key_refs)
            for start in range(0, len(refs), 500):
                session.execute(sa.delete(KeyRefRow).where(col(KeyRefRow.key_ref).in_(refs[start : start + 500])))
        if request.mode in ERASE_MODES and request.profile_ids and not request.nothing_held:
            ids = list(request.profile_ids)
            self._found[request.request_id] = plan_removals(session, ids)  # before anything is erased
            counts = erase_inputs(session, ids)
            scrub_after_commit(session)
        row = session.get(PrivacyRow, request.request_id) or PrivacyRow(request_id=request.request_id)
        if not row.applied:
            _add_counts(row, counts)
            session.add(row)
        session.flush()

    def decide(self, uow: UnitOfWork, msg: LogMessage, env: Envelope) -> None:
        if not is_a(env, privacy.PrivacyRequested):
            return
        request = unpack(env, privacy.PrivacyRequested)
        found = self._found.pop(request.request_id, None)
        if found is None:
            return
        now = utcnow()
        for plan_id, dest_id, records in found.batches:
            # One batch per plan; records that would not fit one log message go in further
            # batches "<id>:2", "<id>:3", ... (their event must fit one message).
            for n, chunk in enumerate(fit(records), start=1):
                plan = uow.session.get(store.PlanRow, plan_id)
                assert plan is not None  # found by observe in this transaction
                batch_id = removal_batch_id(request.request_id, plan_id) + (f":{n}" if n > 1 else "")
                batch = pb.Batch(
                    id=batch_id,
                    plan_id=plan_id,
                    destination=dest_id,
                    action=ERASE,
                    sequence=plan.batch_seq,
                    records=chunk,
                )
                batch.prepared_at.FromDatetime(now)
                event_id = deterministic_id("privacy-batch", batch_id)
                payload, parts = ev.BatchPrepared(batch=batch), list[Sealed]()
                vault = self.vault
                if isinstance(vault, PersonVault) and vault.sealing:
                    payload, parts = sealed_removal(vault, batch, event_id)
                prepared = make_envelope(
                    payload, event_id=event_id, subject_key=dest_id, occurred_at=now, cause=uow.cause
                )
                prepared.sealed.extend(parts)
                uow.emit(ACTIVATION_DELIVERIES, [prepared])  # folded at once: the plan's next sequence moves on
        erased = ev.ProfilesErased(
            request_id=request.request_id, profile_ids=found.profile_ids, removals=found.removals
        )
        uow.emit(
            ACTIVATION_DELIVERIES,
            [
                make_envelope(
                    erased,
                    event_id=deterministic_id("privacy-erased", request.request_id),
                    subject_key=request.request_id,
                    occurred_at=now,
                    cause=uow.cause,
                )
            ],
        )

    def finish(self, session: Session) -> None:
        self._found.clear()


def fold_erased(session: Session, erased: ev.ProfilesErased) -> None:
    counts = erase_deliveries(session, list(erased.profile_ids))
    row = session.get(PrivacyRow, erased.request_id) or PrivacyRow(request_id=erased.request_id)
    if not row.applied:
        _add_counts(row, counts)
        row.removals = {**row.removals, **{r.plan_id: removal_dict(r) for r in erased.removals}}
        session.add(row)


def fold_prepared(session: Session, batch: pb.Batch) -> None:
    """A removal batch was recorded: its request says so ("prepared")."""
    request_id = request_of(batch.id)
    if request_id is None:
        return
    dest_row = session.get(store.DestinationRow, batch.destination)
    removal = privacy.DestinationRemoval(
        destination=dest_row.name if dest_row else batch.destination,
        plan_id=batch.plan_id,
        status=PREPARED,
        batch_id=batch.id,
        profiles=len(batch.records),
    )
    row = session.get(PrivacyRow, request_id) or PrivacyRow(request_id=request_id)
    if not row.applied:
        earlier = row.removals.get(batch.plan_id)
        if earlier and earlier.get("batch_id"):  # a further batch of the same plan: counted in the first
            removal.batch_id = str(earlier["batch_id"])
            removal.profiles += int(earlier.get("profiles", 0))
        row.removals = {**row.removals, batch.plan_id: removal_dict(removal)}
        session.add(row)


def _open(status: str) -> bool:
    """Whether a removal's outcome may still change: prepared, or failed while it can be redriven."""
    return status == PREPARED or (status.startswith(FAILED) and NOT_DELIVERED not in status)


def fold_applied(session: Session, applied: privacy.PrivacyApplied) -> None:
    """PrivacyApplied of activation: the first one, and later ones reporting the removals' outcomes."""
    row = session.get(PrivacyRow, applied.request_id) or PrivacyRow(request_id=applied.request_id)
    row.counts = dict(sorted(applied.counts.items()))
    row.removals = {r.plan_id: removal_dict(r) for r in applied.removals}
    row.applied = True
    row.open_removals = any(r.batch_id and _open(r.status) for r in applied.removals)
    session.add(row)


def fold_keys_destroyed(session: Session, destroyed: ev.RemovalKeysDestroyed) -> None:
    """The keys of removal batches are destroyed: each keeps only its profile ids (on a replay its
    sealed records no longer open), and one not delivered fails for good (nothing left to send)."""
    for batch_id in destroyed.batch_ids:
        row = session.get(BatchRow, batch_id)
        if row is None or row.keys_destroyed:
            continue
        row.keys_destroyed = True
        row.records = [{"profile_id": str(r.get("profile_id"))} for r in row.records or []]
        if row.status != "delivered":
            row.status, row.reason, row.permanent = "dead", NOT_DELIVERED, True
        session.add(row)


def _aware(at: datetime) -> datetime:
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)  # SQLite gives naive UTC back


def removal_status(session: Session, removal: dict[str, Any]) -> str:
    """A removal's status from its batches (the first, ``<id>:2``, ...): "delivered" once all are,
    "failed: <reason>" while one is dead-lettered, else as recorded."""
    batch_id = str(removal.get("batch_id") or "")
    status = str(removal.get("status", ""))
    if not batch_id:
        return status
    query = select(BatchRow.id, BatchRow.status, BatchRow.reason).where(
        BatchRow.action == ERASE, BatchRow.plan_id == str(removal.get("plan_id", ""))
    )
    batches = [
        (state, reason)
        for found, state, reason in session.exec(query)
        if found == batch_id or found.startswith(batch_id + ":")
    ]
    if not batches:
        return status
    dead = [reason for state, reason in batches if state == "dead"]
    if dead:
        return f"{FAILED} {dead[0]}".rstrip()
    if all(state == "delivered" for state, _ in batches):
        return DELIVERED
    return PREPARED


def applied_event(row: PrivacyRow) -> privacy.PrivacyApplied:
    applied = privacy.PrivacyApplied(request_id=row.request_id, service="activation")
    for name, n in sorted(row.counts.items()):
        applied.counts[name] = int(n)
    for _, removal in sorted(row.removals.items()):
        applied.removals.append(json_format.ParseDict(removal, privacy.DestinationRemoval()))
    return applied


class PrivacyAcks:
    """Appends PrivacyApplied for each request whose erasure and removal batches are committed, and
    again when a removal's outcome is known ("delivered", "failed: ..."); destroys the vault key of
    each removal batch once it is delivered, or after ``removal_key_s`` undelivered
    (RemovalKeysDestroyed)."""

    def __init__(self, processor: Processor, interval_s: float, removal_key_s: float = 30 * 86400.0) -> None:
        self.processor = processor
        self.interval_s = interval_s
        self.removal_key_s = removal_key_s

    async def run(self) -> None:
        await keep_applying(
            self.processor.ready,
            self.tick,
            what="privacy_ack",
            recover=self.processor.recover,
            interval_s=self.interval_s,
        )

    async def tick(self) -> int:
        with self.processor.read() as session:
            pending = list(
                session.exec(
                    select(PrivacyRow.request_id)
                    .where(col(PrivacyRow.applied).is_(False))
                    .order_by(col(PrivacyRow.request_id))
                ).all()
            )
        for request_id in pending:
            await self._ack(request_id)
        await self._report_outcomes()
        await self._destroy_removal_keys()
        return len(pending)

    async def _report_outcomes(self) -> None:
        """A further PrivacyApplied for each request whose removals' outcomes changed."""
        with self.processor.read() as session:
            rows = session.exec(
                select(PrivacyRow).where(col(PrivacyRow.applied).is_(True), col(PrivacyRow.open_removals).is_(True))
            ).all()
            changed = [
                row.request_id
                for row in rows
                if any(removal_status(session, r) != r.get("status") for r in row.removals.values())
            ]
        for request_id in changed:
            await self._report(request_id)

    async def _report(self, request_id: str) -> None:
        now = utcnow()

        def decide(uow: UnitOfWork) -> None:
            row = uow.session.get(PrivacyRow, request_id)
            if row is None or not row.applied:
                return
            statuses = {plan_id: removal_status(uow.session, r) for plan_id, r in row.removals.items()}
            if all(statuses[plan_id] == r.get("status") for plan_id, r in row.removals.items()):
                return
            applied = applied_event(row)
            for removal in applied.removals:
                removal.status = statuses[removal.plan_id]
            applied.at.FromDatetime(now)
            outcome = json.dumps(sorted(statuses.items()))
            env = make_envelope(
                applied,
                event_id=deterministic_id("privacy-applied", "activation", request_id, outcome),
                subject_key=request_id,
                occurred_at=now,
                cause=uow.cause,
            )
            uow.emit(ACTIVATION_PRIVACY_APPLIED, [env])
            log.info("privacy_removals_reported", request=request_id, statuses=sorted(set(statuses.values())))

        await self.processor.execute(f"privacy-removals:{request_id}:{now.isoformat()}", decide)

    async def _destroy_removal_keys(self) -> None:
        """Destroy the vault key of each removal batch delivered, or undelivered past the horizon,
        then record it (RemovalKeysDestroyed). A destroy done before a crash is done again (it
        finds nothing: 0 keys) and then recorded."""
        vault = self.processor.vault
        if vault is None:
            return
        horizon = utcnow() - timedelta(seconds=self.removal_key_s)
        with self.processor.read() as session:
            # Only the columns needed (not the records), through the index on action.
            query = select(BatchRow.id, BatchRow.status, BatchRow.prepared_at, BatchRow.removal_keys).where(
                BatchRow.action == ERASE, col(BatchRow.keys_destroyed).is_(False)
            )
            due = [
                (batch_id, [str(ref) for ref in refs])
                for batch_id, status, prepared_at, refs in session.exec(query)
                if refs and (status == "delivered" or _aware(prepared_at) <= horizon)
            ]
        for batch_id, refs in due:
            keys = await vault.destroy(refs)
            now = utcnow()

            def decide(uow: UnitOfWork, batch_id: str = batch_id, keys: int = keys, now: datetime = now) -> None:
                row = uow.session.get(BatchRow, batch_id)
                if row is None or row.keys_destroyed:
                    return
                env = make_envelope(
                    ev.RemovalKeysDestroyed(batch_ids=[batch_id], keys=keys),
                    event_id=deterministic_id("removal-keys-destroyed", batch_id),
                    subject_key=row.destination_id,
                    occurred_at=now,
                    cause=uow.cause,
                )
                uow.emit(ACTIVATION_DELIVERIES, [env])

            await self.processor.execute(f"removal-keys:{batch_id}", decide)
            log.info("removal_keys_destroyed", batch=batch_id, keys=keys)

    async def _ack(self, request_id: str) -> None:
        now = utcnow()

        def decide(uow: UnitOfWork) -> None:
            row = uow.session.get(PrivacyRow, request_id)
            if row is None or row.applied:
                return
            applied = applied_event(row)
            applied.at.FromDatetime(now)
            env = make_envelope(
                applied,
                event_id=deterministic_id("privacy-applied", "activation", request_id),
                subject_key=request_id,
                occurred_at=now,
                cause=uow.cause,
            )
            uow.emit(ACTIVATION_PRIVACY_APPLIED, [env])
            log.info(
                "privacy_applied",
                request=request_id,
                removals=len(applied.removals),
                profiles=int(applied.counts.get("profiles", 0)),
            )

        await self.processor.execute(f"privacy-applied:{request_id}", decide)
