"""Privacy requests in ingest (cdp.privacy.v1): suppression, erasure, and the acknowledgement.

* Suppress modes add every identity of the person's graph (keyed hashes) to the suppression list;
  a later row, published event or collected event carrying one is dropped and counted (rule
  ``suppressed``; the plain value is never named). Unsuppress lifts them.
* Delete modes erase what ingest holds of the person: the kept rejected rows of batches that carry
  one of their identities, and their raw messages on CDP_COLLECT (by sequence, with JetStream's
  secure erase; ingest indexes which collect sequences carried which identity hash as it reads them).
* Then ``PrivacyApplied`` on ``cdp.privacy.applied.ingest`` with the counts: written by a
  command (the applier) once the collect messages are erased, as a request input message cannot
  both erase on the network and append in its transaction.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlmodel import Field, Session, SQLModel, col, select

from cdp.privacy.v1 import privacy_pb2 as pb
from cdp_ingest.store import BatchErrorRow, BatchRow, DatasetRow, latest_schema
from cdp_kit.envelope import Cause, Envelope, deterministic_id, make_envelope, to_timestamp, unpack, utcnow
from cdp_kit.eventlog import LogMessage
from cdp_kit.identities import Normaliser
from cdp_kit.namespaces import normaliser
from cdp_kit.privacy import (
    KeyVault,
    checked_request,
    identity_hash,
    is_delete,
    is_suppress,
    keep_applying,
    revoke,
)
from cdp_kit.processor import Processor, UnitOfWork
from cdp_kit.store import scrub_after_commit, tables_of, transaction
from cdp_kit.streams import COLLECT, INGEST_PRIVACY_APPLIED
from cdp_kit.telemetry import get_logger, meter

log = get_logger(__name__)
REQUESTED = pb.PrivacyRequested.DESCRIPTOR.full_name
APPLIED = pb.PrivacyApplied.DESCRIPTOR.full_name
SUPPRESSED_RULE = "suppressed"
CHUNK = 500


class SuppressionRow(SQLModel, table=True):
    """An identity whose new data ingest drops (its keyed hash), and the request that asked."""

    __tablename__ = "ingest_suppression"

    identity_hash: str = Field(primary_key=True)
    request_id: str


class CollectIdentityRow(SQLModel, table=True):
    """Which collect message (CDP_COLLECT sequence) carried which identity (keyed hash)."""

    __tablename__ = "ingest_collect_identity"

    identity_hash: str = Field(primary_key=True)
    sequence: int = Field(primary_key=True, sa_type=sa.BigInteger, index=True)


class PrivacyPendingRow(SQLModel, table=True):
    """A request applied to the store whose collect erasure and acknowledgement are still to do."""

    __tablename__ = "ingest_privacy_pending"

    request_id: str = Field(primary_key=True)
    mode: int
    hashes: list[str] = Field(default_factory=list, sa_type=sa.JSON)
    counts: dict[str, int] = Field(default_factory=dict, sa_type=sa.JSON)
    # The keys the person's erased rejected rows were sealed under: identity destroys them too.
    key_refs: list[str] = Field(default_factory=list, sa_type=sa.JSON)


class PrivacyDoneRow(SQLModel, table=True):
    """A request ingest has acknowledged (folded from its own ``PrivacyApplied``)."""

    __tablename__ = "ingest_privacy_done"

    request_id: str = Field(primary_key=True)


PRIVACY_TABLES = tables_of(SuppressionRow, CollectIdentityRow, PrivacyPendingRow, PrivacyDoneRow)


@dataclass(frozen=True)
class Suppression:
    """The suppression list as a check: which of a record's identities (namespace, raw value) is on it."""

    hashes: frozenset[str] = frozenset()
    normaliser: Normaliser = field(default_factory=Normaliser)

    def __bool__(self) -> bool:
        return bool(self.hashes)

    def match(self, identities: Iterable[tuple[str, str]]) -> str | None:
        """The keyed hash of the first suppressed identity, or None."""
        if not self.hashes:
            return None
        for namespace, value in identities:
            hashed = hash_of(self.normaliser, namespace, value)
            if hashed is not None and hashed in self.hashes:
                return hashed
        return None


def hash_of(norm: Normaliser, namespace: str, value: Any) -> str | None:
    if not isinstance(value, str) or not value:
        return None
    canonical, _rule, _detail = norm.normalise(namespace, value)
    return identity_hash(namespace, canonical) if canonical is not None else None


def load_suppression(session: Session, *, phone_region: str) -> Suppression:
    hashes = frozenset(session.exec(select(SuppressionRow.identity_hash)).all())
    if not hashes:
        return Suppression()
    return Suppression(hashes, normaliser(session, phone_region=phone_region))


def count_suppressed(dataset: str, n: int) -> None:
    """Collected events dropped as suppressed: a metric and a log line (the store stays a pure
    projection of the logs, which a dropped event never reaches), never naming the identity."""
    if n <= 0:
        return
    _suppressed_counter().add(n, {"dataset": dataset})
    log.info("collect_events_suppressed", dataset=dataset, events=n)


_COUNTER: list[Any] = []


def _suppressed_counter() -> Any:
    if not _COUNTER:
        _COUNTER.append(
            meter("cdp.ingest").create_counter(
                "cdp.ingest.suppressed", unit="{row}", description="Rows and events dropped by a privacy suppression"
            )
        )
    return _COUNTER[0]


INDEX_PENDING = "ingest_collect_index_pending"


def index_collect(session: Session, sequence: int, norm: Normaliser, identities: Iterable[tuple[str, str]]) -> None:
    """Remember which identities a collect message carried (keyed hashes), for a later erasure.
    Written in one insert per transaction, before it commits (not a statement per message)."""
    hashes = {h for ns, v in identities if (h := hash_of(norm, ns, v)) is not None}
    if hashes:
        session.info.setdefault(INDEX_PENDING, []).extend(
            {"identity_hash": hashed, "sequence": sequence} for hashed in sorted(hashes)
        )


@sa.event.listens_for(Session, "before_commit")
def _write_collect_index(session: Session) -> None:
    rows = session.info.pop(INDEX_PENDING, None)
    if rows:
        table = CollectIdentityRow.__table__  # type: ignore[attr-defined]
        insert = postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert
        session.execute(insert(table).on_conflict_do_nothing(), rows)


@sa.event.listens_for(Session, "after_rollback")
def _forget_collect_index(session: Session) -> None:
    session.info.pop(INDEX_PENDING, None)


def prune_collect_index(session: Session, first_sequence: int) -> int:
    """Forget the messages CDP_COLLECT no longer holds (its retention removed them): nothing left to erase."""
    table = CollectIdentityRow.__table__  # type: ignore[attr-defined]
    return int(session.execute(sa.delete(table).where(table.c.sequence < first_sequence)).rowcount)  # type: ignore[attr-defined]


def _erase_batch_errors(session: Session, hashes: set[str], phone_region: str) -> tuple[int, list[str]]:
    """Delete the kept rejected rows that carry one of these identities (by the keyed hashes their
    sealed form names, and by the schema's identity fields); returns how many, and the key refs
    those rows were sealed under for these identities (identity destroys them at completion)."""
    norm = normaliser(session, phone_region=phone_region)
    erased = 0
    refs: set[str] = set()
    identity_fields: dict[str, dict[str, str]] = {}
    datasets = {b.batch_id: b.dataset for b in session.exec(select(BatchRow)).all()}
    for row in session.exec(select(BatchErrorRow)).all():
        dataset = datasets.get(row.batch_id, "")
        fields = identity_fields.get(dataset)
        if fields is None:
            ds = session.get(DatasetRow, dataset)
            schema = latest_schema(session, ds.schema_name) if ds is not None else None
            fields = {f.name: f.identity_namespace for f in schema.fields if f.identity_namespace} if schema else {}
            identity_fields[dataset] = fields
        theirs = [ref for hashed, ref in (row.key_refs or {}).items() if hashed in hashes]
        if theirs or any(hash_of(norm, ns, row.values.get(name)) in hashes for name, ns in fields.items()):
            refs.update(theirs)
            session.delete(row)
            erased += 1
    session.flush()
    return erased, sorted(refs)


class PrivacyToIngest:
    """Input handler of ``cdp.privacy.requests``: the suppression list and the store's erasure."""

    def __init__(self, vault: KeyVault, *, phone_region: str) -> None:
        self.vault = vault
        self.phone_region = phone_region
        self.changed = asyncio.Event()

    def observe(self, session: Session, msg: LogMessage, env: Envelope) -> None:
        if env.type != REQUESTED:
            return
        req = checked_request(env)
        revoke(session, self.vault, list(req.key_refs))  # remembered: revoked again after a restart
        hashes = sorted({*req.identity_hashes, *req.graph_identity_hashes})
        if is_suppress(req.mode):
            for hashed in hashes:
                session.merge(SuppressionRow(identity_hash=hashed, request_id=req.request_id))
        elif req.mode == pb.PRIVACY_MODE_UNSUPPRESS:
            for part in range(0, len(hashes), CHUNK):
                session.execute(
                    sa.delete(SuppressionRow).where(col(SuppressionRow.identity_hash).in_(hashes[part : part + CHUNK]))
                )
        counts: dict[str, int] = {}
        key_refs: list[str] = []
        if is_suppress(req.mode):
            counts["suppressed_identities"] = len(hashes)
        if is_delete(req.mode):
            counts["batch_errors"], key_refs = _erase_batch_errors(session, set(hashes), self.phone_region)
            revoke(session, self.vault, key_refs)
            scrub_after_commit(session)
        if session.get(PrivacyDoneRow, req.request_id) is None:
            session.merge(
                PrivacyPendingRow(
                    request_id=req.request_id, mode=req.mode, hashes=hashes, counts=counts, key_refs=key_refs
                )
            )
        session.flush()
        self.changed.set()

    def decide(self, uow: UnitOfWork, msg: LogMessage, env: Envelope) -> None:
        return None


def fold_applied(session: Session, env: Envelope) -> None:
    """Fold ingest's own ``PrivacyApplied``: the request is done."""
    if env.type != APPLIED:
        return
    applied = unpack(env, pb.PrivacyApplied)
    pending = session.get(PrivacyPendingRow, applied.request_id)
    if pending is not None:
        session.delete(pending)
    session.merge(PrivacyDoneRow(request_id=applied.request_id))
    session.flush()


PRUNE_EVERY_S = 3600.0


class PrivacyApplier:
    """Erases the collect messages of pending requests, then appends their ``PrivacyApplied``."""

    def __init__(self, processor: Processor, handler: PrivacyToIngest) -> None:
        self.processor = processor
        self.handler = handler
        self._pruned_at = 0.0

    async def prune(self) -> int:
        """At most once per ``PRUNE_EVERY_S``: drop the collect index rows of messages retention removed."""
        loop = asyncio.get_running_loop()
        if self._pruned_at and loop.time() - self._pruned_at < PRUNE_EVERY_S:
            return 0
        self._pruned_at = loop.time()
        info = await self.processor.eventlog.js.stream_info(COLLECT.name)
        async with self.processor.lock:
            with transaction(self.processor.engine) as session:
                return prune_collect_index(session, int(info.state.first_seq or 0))

    async def apply_pending(self) -> int:
        with self.processor.read() as session:
            pending = [
                (p.request_id, p.mode, list(p.hashes), dict(p.counts), list(p.key_refs))
                for p in session.exec(select(PrivacyPendingRow)).all()
            ]
        for request_id, mode, hashes, counts, key_refs in pending:
            erased = 0
            sequences: list[int] = []
            if is_delete(mode):
                with self.processor.read() as session:
                    for part in range(0, len(hashes), CHUNK):
                        sequences += session.exec(
                            select(CollectIdentityRow.sequence).where(
                                col(CollectIdentityRow.identity_hash).in_(hashes[part : part + CHUNK])
                            )
                        ).all()
                sequences = sorted(set(sequences))
                for sequence in sequences:
                    erased += int(await self.processor.eventlog.erase(COLLECT.name, sequence))
            await self._acknowledge(
                request_id,
                {**counts, **({"collect_messages": erased} if is_delete(mode) else {})},
                sequences,
                key_refs,
            )
            log.info("privacy_applied", request_id=request_id, collect_messages=erased, **counts)
        return len(pending)

    async def _acknowledge(
        self, request_id: str, counts: dict[str, int], sequences: Sequence[int], key_refs: Sequence[str] = ()
    ) -> None:
        now = utcnow()

        def decide(uow: UnitOfWork) -> None:
            if uow.session.get(PrivacyDoneRow, request_id) is not None:
                return
            for part in range(0, len(sequences), CHUNK):
                uow.session.execute(
                    sa.delete(CollectIdentityRow).where(
                        col(CollectIdentityRow.sequence).in_(sequences[part : part + CHUNK])
                    )
                )
            applied = pb.PrivacyApplied(request_id=request_id, service="ingest", counts=counts, key_refs=key_refs)
            applied.at.CopyFrom(to_timestamp(now))
            env = make_envelope(
                applied,
                event_id=deterministic_id("privacy-applied", "ingest", request_id),
                subject_key=request_id,
                occurred_at=now,
                cause=Cause(command_id=f"privacy-applied:{request_id}"),
            )
            uow.emit(INGEST_PRIVACY_APPLIED, [env])

        await self.processor.execute(f"privacy-applied:{request_id}", decide)

    async def step(self) -> None:
        await self.apply_pending()
        await self.prune()

    async def loop(self) -> None:
        await keep_applying(
            self.processor.ready,
            self.step,
            what="privacy_apply",
            changed=self.handler.changed,
            recover=self.processor.recover,
        )
