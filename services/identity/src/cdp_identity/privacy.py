"""Privacy requests (cdp.privacy.v1): identity records them, erases the person's graph, tracks every
service's progress and completes them.

* ``Submit`` normalises the identities as ``Resolve`` does, resolves the whole person (every profile
  the identities belong to, every identity of those graphs) and appends ``PrivacyRequested`` on
  ``cdp.privacy.requests``: keyed hashes only. Its fold erases the graph (delete modes).
* Every applier (``cdp_kit.streams.privacy_appliers``) answers with ``PrivacyApplied``; identity
  reads them (``IDENTITY_READS_PRIVACY_APPLIED``) into the request's progress.
* Once every applier has applied it, the completer destroys the person's keys (``KeyVault``) and
  appends ``PrivacyCompleted``. Activation records its destination removals before it says it
  applied a request, so the keys go only after the removals are prepared.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from google.protobuf.timestamp_pb2 import Timestamp
from sqlmodel import Session, col, select

from cdp.common.v1.envelope_pb2 import IdentityValue
from cdp.privacy.v1 import privacy_pb2 as pb
from cdp_identity import store
from cdp_identity.graph import WorkingSet, load_rules
from cdp_identity.store import PrivacyProgressRow, PrivacyRequestRow
from cdp_kit.envelope import Cause, Envelope, deterministic_id, from_timestamp, make_envelope, unpack, utcnow
from cdp_kit.errors import InvalidInput, NotFound, Unavailable, Violation
from cdp_kit.eventlog import AppendConflict, LogMessage
from cdp_kit.privacy import (
    MAX_IDENTITIES,
    NOTHING_TO_APPLY,
    REQUEST_ID_RE,
    KeyVault,
    checked_request,
    derived_request_id,
    identity_hash,
    is_delete,
    is_suppress,
    keep_applying,
    revoke,
)
from cdp_kit.processor import Deposed, Processor, UnitOfWork
from cdp_kit.sealing import valid_ref
from cdp_kit.store import scrub_after_commit, transaction
from cdp_kit.streams import IDENTITY_FRAGMENTS, PRIVACY_REQUESTS, privacy_appliers
from cdp_kit.telemetry import get_logger, pii_hash

log = get_logger(__name__)
# The longest identity value a privacy request takes (an email is at most 254; ids are shorter).
MAX_VALUE_CHARS = 1024
REQUESTED = pb.PrivacyRequested.DESCRIPTOR.full_name
COMPLETED = pb.PrivacyCompleted.DESCRIPTOR.full_name
APPLIED = pb.PrivacyApplied.DESCRIPTOR.full_name
SELF = "identity"
CHUNK = 500


def micros(ts: Timestamp) -> int:
    return ts.seconds * 1_000_000 + ts.nanos // 1000


def timestamp(us: int) -> Timestamp:
    ts = Timestamp()
    ts.seconds, rest = divmod(us, 1_000_000)
    ts.nanos = rest * 1000
    return ts


def _key_refs_for(ws: WorkingSet, profile_ids: Sequence[str]) -> list[str]:
    """Every vault key ref (crypto-shredding) of every identity of these profiles: what completing
    the request destroys. The store's, and those the working set has not written yet."""
    held = {key for pid in profile_ids for key in ws.members.get(pid, ())}
    pending = {ref for ref, key in ws.key_refs.items() if key in held}
    return sorted(pending.union(store.key_refs_for_profiles(ws.session, profile_ids)))


# ----------------------------------------------------------------------------- the fold


def _chunks(items: Sequence[str]) -> list[Sequence[str]]:
    return [items[i : i + CHUNK] for i in range(0, len(items), CHUNK)]


def erase_profiles(ws: WorkingSet, profile_ids: Sequence[str]) -> dict[str, int]:
    """Erase what identity holds of these profiles: their graphs (nodes, links), the profiles merged
    into them, the fragments anchored on their identities, the decisions and unlinks naming them.
    Deterministic (a replay erases the same), and the working set forgets everything it held."""
    session = ws.session
    ws.write()  # everything in memory reaches the store before rows are deleted under it
    pids: set[str] = set(profile_ids)
    frontier = set(pids)
    while frontier:  # profiles merged into these (transitively): rows without members
        found = {
            row[0]
            for part in _chunks(sorted(frontier))
            for row in session.execute(
                sa.select(store.PROFILE.c.profile_id).where(store.PROFILE.c.merged_into.in_(part))
            ).all()
        }
        frontier = found - pids
        pids |= frontier
    ordered = sorted(pids)
    ws.load_profiles(ordered)
    keys = sorted({key for pid in ordered for key in ws.members.get(pid, ())})
    held = set(keys)
    links = sum(1 for a, _b in ws.links if a in held)
    counts = {"graph_nodes": len(keys), "links": links, "profiles": 0, "fragments": 0, "decisions": 0}
    conn = session.connection()
    for part in _chunks(keys):
        conn.execute(sa.delete(store.NODE).where(store.NODE.c.key.in_(part)))
        counts["fragments"] += conn.execute(sa.delete(store.FRAGMENT).where(store.FRAGMENT.c.anchor.in_(part))).rowcount
        d = store.DECISION.c
        counts["decisions"] += conn.execute(
            sa.delete(store.DECISION).where(sa.or_(d.identity.in_(part), d.other.in_(part)))
        ).rowcount
        u = store.UNLINKED.c
        conn.execute(sa.delete(store.UNLINKED).where(sa.or_(u.a.in_(part), u.b.in_(part))))
        # Which key sealed which identity names the identity: it goes too (the refs are on the request).
        conn.execute(sa.delete(store.KEY_REF).where(store.KEY_REF.c.key.in_(part)))
    for part in _chunks(ordered):
        counts["decisions"] += conn.execute(
            sa.delete(store.DECISION).where(store.DECISION.c.profile_id.in_(part))
        ).rowcount
        counts["profiles"] += conn.execute(
            sa.delete(store.PROFILE).where(store.PROFILE.c.profile_id.in_(part))
        ).rowcount
    ws.forget_all()
    scrub_after_commit(session)
    return counts


def fold_erasure(session: Session, ws: WorkingSet, env: Envelope, vault: KeyVault) -> None:
    """Fold a ``PrivacyRequested`` on identity's fragments log: the erasure of the person's graph, in
    its place among the fragments (a replay erases exactly what the live store erased, and a person
    who comes back later comes back on a replay too)."""
    if env.type != REQUESTED:
        return
    req = unpack(env, pb.PrivacyRequested)
    if session.get(PrivacyProgressRow, (req.request_id, SELF)) is not None:
        return
    revoke(session, vault, list(req.key_refs))  # remembered: a restart before completion revokes again
    counts: dict[str, int] = {}
    if is_delete(req.mode) and not req.nothing_held:
        counts = erase_profiles(ws, list(req.profile_ids))
    session.add(
        PrivacyProgressRow(
            request_id=req.request_id,
            service=SELF,
            at=micros(req.at),
            counts=counts,
            erasure=req.SerializeToString(deterministic=True),
        )
    )
    session.flush()
    ws.note_erasure()


def fold_privacy(session: Session, env: Envelope) -> None:
    """Fold identity's own privacy events (``cdp.privacy.requests``): the request and its completion."""
    if env.type == REQUESTED:
        req = checked_request(env)  # what identity could not have recorded is set aside
        if session.get(PrivacyRequestRow, req.request_id) is not None:
            return
        ordinal = session.execute(sa.select(sa.func.max(store.PRIVACY_REQUEST.c.ordinal))).scalar() or 0
        session.add(
            PrivacyRequestRow(
                request_id=req.request_id,
                ordinal=int(ordinal) + 1,
                mode=req.mode,
                state=pb.PRIVACY_STATE_RECEIVED,
                identity_hashes=list(req.identity_hashes),
                profile_ids=list(req.profile_ids),
                key_refs=list(req.key_refs),
                nothing_held=req.nothing_held,
                received_at=micros(req.at),
            )
        )
        if session.get(PrivacyProgressRow, (req.request_id, SELF)) is None:  # nothing to erase
            session.add(PrivacyProgressRow(request_id=req.request_id, service=SELF, at=micros(req.at)))
        session.flush()
    elif env.type == APPLIED:  # identity's own erasure, counted when it happened
        applied = unpack(env, pb.PrivacyApplied)
        progress = session.get(PrivacyProgressRow, (applied.request_id, SELF))
        if applied.service == SELF and progress is not None:
            progress.counts = dict(applied.counts)
            session.add(progress)
            session.flush()
    elif env.type == COMPLETED:
        done = unpack(env, pb.PrivacyCompleted)
        row = session.get(PrivacyRequestRow, done.request_id)
        if row is None or row.state == pb.PRIVACY_STATE_COMPLETED:
            return
        row.state = pb.PRIVACY_STATE_COMPLETED
        row.completed_at = micros(done.at)
        row.keys_destroyed = done.keys_destroyed
        session.add(row)
        session.flush()


class PrivacyApplied:
    """Input handler of every service's ``PrivacyApplied`` (cdp.privacy.applied.>): the progress."""

    def __init__(self) -> None:
        self.changed = asyncio.Event()

    def observe(self, session: Session, msg: LogMessage, env: Envelope) -> None:
        if env.type != pb.PrivacyApplied.DESCRIPTOR.full_name:
            return
        applied = unpack(env, pb.PrivacyApplied)
        removals = [
            {
                "destination": r.destination,
                "plan_id": r.plan_id,
                "status": r.status,
                "batch_id": r.batch_id,
                "profiles": r.profiles,
            }
            for r in applied.removals
        ]
        # A service may report again (activation, once its removals are delivered or failed): the
        # latest counts and removals, the time it first applied the request.
        earlier = session.get(PrivacyProgressRow, (applied.request_id, applied.service))
        session.merge(
            PrivacyProgressRow(
                request_id=applied.request_id,
                service=applied.service,
                at=earlier.at if earlier is not None else micros(applied.at),
                counts=dict(applied.counts),
                removals=removals,
                key_refs=sorted({*(earlier.key_refs if earlier is not None else []), *applied.key_refs}),
            )
        )
        row = session.get(PrivacyRequestRow, applied.request_id)
        if row is not None and row.state == pb.PRIVACY_STATE_RECEIVED:
            row.state = pb.PRIVACY_STATE_APPLYING
            session.add(row)
        session.flush()
        self.changed.set()

    def decide(self, uow: UnitOfWork, msg: LogMessage, env: Envelope) -> None:
        return None


# ----------------------------------------------------------------------------- reading


def to_proto(session: Session, row: PrivacyRequestRow) -> pb.PrivacyRequest:
    out = pb.PrivacyRequest(
        request_id=row.request_id,
        mode=row.mode,  # type: ignore[arg-type]
        state=row.state,  # type: ignore[arg-type]
        identity_hashes=row.identity_hashes,
        profile_ids=row.profile_ids,
        nothing_held=row.nothing_held,
        keys_destroyed=row.keys_destroyed,
    )
    out.received_at.CopyFrom(timestamp(row.received_at))
    if row.completed_at:
        out.completed_at.CopyFrom(timestamp(row.completed_at))
    progress = {
        p.service: p
        for p in session.exec(select(PrivacyProgressRow).where(PrivacyProgressRow.request_id == row.request_id)).all()
    }
    for service in (SELF, *privacy_appliers(), *sorted(set(progress) - {SELF, *privacy_appliers()})):
        p = progress.get(service)
        item = pb.ServiceProgress(service=service, applied=p is not None, status=service_status(row, service, p))
        if p is not None:
            item.at.CopyFrom(timestamp(p.at))
            item.counts.update({k: int(v) for k, v in p.counts.items()})
            for r in p.removals:
                out.removals.append(pb.DestinationRemoval(**r))  # type: ignore[arg-type]
        out.services.append(item)
    return out


APPLIED_STATUS = "applied"
PENDING_STATUS = "pending"
INGEST = "ingest"


def service_status(row: PrivacyRequestRow, service: str, progress: PrivacyProgressRow | None) -> str:
    """What is true of one service for a request. A request that held nothing completes at once:
    a service that has not acknowledged it (yet) has nothing to apply, except ingest for a
    suppression (it still records the suppression, then acknowledges)."""
    if progress is not None:
        return APPLIED_STATUS
    if row.nothing_held and not (service == INGEST and is_suppress(row.mode)):
        return NOTHING_TO_APPLY
    return PENDING_STATUS


# The appliers that may name further keys of the person: ingest (the keys of its rejected rows).
KEY_NAMERS = frozenset({INGEST})


def _identity_part(ref: str) -> str:
    """The keyed hash of the identity a key ref belongs to: cdp_kit.vault.new_key's middle part
    (``block.identity.generation``), the first of an older ``identity.generation`` ref."""
    return ref.split(".")[-2]


def _erasure_envelope(erasure: bytes, request_id: str, cause: Cause) -> Envelope:
    """The envelope of an erasure already on the fragments log, made again exactly (same id)."""
    requested = pb.PrivacyRequested.FromString(erasure)
    return make_envelope(
        requested,
        event_id=deterministic_id("privacy-requested", request_id),
        subject_key=request_id,
        occurred_at=from_timestamp(requested.at),
        cause=cause,
    )


def key_refs_of(session: Session, row: PrivacyRequestRow) -> list[str]:
    """The keys a request destroys: the person's (PrivacyRequested.key_refs) and those the appliers
    sealed the person's data under that identity did not know (PrivacyApplied.key_refs).

    An applier's ref is taken only from ``KEY_NAMERS`` and only when it is a key of one of the
    person's identities (another generation of a key identity knows): no service can have the keys
    of somebody else destroyed by naming them in its report."""
    own = {ref for ref in row.key_refs if valid_ref(ref)}
    persons = {_identity_part(ref) for ref in own}
    refs = set(own)
    refused = 0
    for progress in session.exec(select(PrivacyProgressRow).where(PrivacyProgressRow.request_id == row.request_id)):
        named = progress.key_refs or []
        taken = [
            ref for ref in named if progress.service in KEY_NAMERS and valid_ref(ref) and _identity_part(ref) in persons
        ]
        refs.update(taken)
        refused += len(named) - len(taken)
    if refused:
        log.warning("privacy_key_refs_refused", request_id=row.request_id, refused=refused)
    return sorted(refs)


def pending(session: Session) -> list[PrivacyRequestRow]:
    """Requests every applier has applied that are not completed yet."""
    wanted = set(privacy_appliers())
    rows = session.exec(select(PrivacyRequestRow).where(PrivacyRequestRow.state != pb.PRIVACY_STATE_COMPLETED)).all()
    out = []
    for row in rows:
        done = set(
            session.exec(
                select(PrivacyProgressRow.service).where(PrivacyProgressRow.request_id == row.request_id)
            ).all()
        )
        if wanted <= done:
            out.append(row)
    return out


# ----------------------------------------------------------------------------- commands


class PrivacyHandlers:
    def __init__(
        self, processor: Processor, ws_of: Any, base_rules: Any, vault: KeyVault, applied: PrivacyApplied
    ) -> None:
        self.processor = processor
        self.ws_of = ws_of  # session -> WorkingSet
        self.base_rules = base_rules
        self.vault = vault
        self.applied = applied

    def _normalise(self, identities: Sequence[IdentityValue]) -> list[str]:
        with self.processor.read() as session:
            rules = load_rules(session, self.base_rules)
        keys: list[str] = []
        violations: list[Violation] = []
        for n, ident in enumerate(identities):
            if len(ident.value) > MAX_VALUE_CHARS:  # no identity is this long: refused before any normaliser runs
                violations.append(
                    Violation(f"identities[{n}]", "max_length", f"a value of at most {MAX_VALUE_CHARS} characters")
                )
                continue
            value, rule, detail = rules.normalise(ident.namespace, ident.value)
            if not ident.namespace or value is None:
                named = pii_hash(f"{ident.namespace}:{ident.value}")
                violations.append(
                    Violation(
                        f"identities[{n}]", rule or "valid", f"identity {named}: {detail or 'a namespace and a value'}"
                    )
                )
            else:
                keys.append(f"{ident.namespace}:{value}")
        if violations:
            raise InvalidInput("invalid identities", violations)
        return list(dict.fromkeys(keys))

    async def submit(self, request: pb.SubmitPrivacyRequest) -> pb.PrivacyRequest:
        if request.mode == pb.PRIVACY_MODE_UNSPECIFIED or request.mode not in pb.PrivacyMode.values():
            raise InvalidInput(
                "invalid request", [Violation("mode", "required", "delete, suppress, delete+suppress or unsuppress")]
            )
        if request.request_id and not REQUEST_ID_RE.match(request.request_id):
            raise InvalidInput(
                "invalid request", [Violation("request_id", "pattern", "letters, digits, '-', '_', '.', at most 64")]
            )
        if not request.identities:
            raise InvalidInput("invalid request", [Violation("identities", "required", "at least one identity")])
        if len(request.identities) > MAX_IDENTITIES:
            raise InvalidInput(
                "invalid request",
                [
                    Violation(
                        "identities",
                        "maximum",
                        f"at most {MAX_IDENTITIES} identities per request, not {len(request.identities)}",
                    )
                ],
            )
        keys = self._normalise(request.identities)
        hashes = [identity_hash(*key.split(":", 1)) for key in keys]
        request_id = request.request_id or derived_request_id(request.mode, hashes)
        with self.processor.read() as session:
            row = session.get(PrivacyRequestRow, request_id)
            if row is not None:
                return to_proto(session, row)
        now = utcnow()
        mode = request.mode

        def decide(uow: UnitOfWork) -> list[Envelope]:
            session = uow.session
            ws = self.ws_of(session)
            ws.load(keys)
            pids = sorted({ws.nodes[k].profile_id for k in keys if k in ws.nodes})
            graph = sorted({identity_hash(*k.split(":", 1)) for pid in pids for k in ws.members.get(pid, ())})
            nothing_held = not pids
            requested = pb.PrivacyRequested(
                request_id=request_id,
                mode=mode,
                identity_hashes=hashes,
                profile_ids=pids,
                graph_identity_hashes=graph or sorted(set(hashes)),
                # Only a delete destroys keys: a suppression keeps what is held, on the log too.
                key_refs=_key_refs_for(ws, pids) if is_delete(mode) else [],
                nothing_held=nothing_held,
            )
            requested.at.CopyFrom(timestamp(int(now.timestamp() * 1_000_000)))
            cause = uow.cause
            events = [
                make_envelope(
                    requested,
                    event_id=deterministic_id("privacy-requested", request_id),
                    subject_key=request_id,
                    occurred_at=now,
                    cause=cause,
                )
            ]
            if nothing_held:
                completed = pb.PrivacyCompleted(request_id=request_id, keys_destroyed=0)
                completed.at.CopyFrom(requested.at)
                events.append(
                    make_envelope(
                        completed,
                        event_id=deterministic_id("privacy-completed", request_id),
                        subject_key=request_id,
                        occurred_at=now,
                        cause=cause,
                    )
                )
            return events

        reply = await self._record(request_id, decide)
        log.info(
            "privacy_requested",
            request_id=request_id,
            mode=pb.PrivacyMode.Name(mode),
            identities=len(hashes),
            profiles=len(reply.profile_ids),
            nothing_held=reply.nothing_held,
        )
        self.applied.changed.set()
        return reply

    async def _record(self, request_id: str, decide: Callable[[UnitOfWork], list[Envelope]]) -> pb.PrivacyRequest:
        """Two causes in one transaction: the erasure on the fragments log (in its place among the
        fragments, for identity and for every reader of the profiles), then the request itself on
        ``cdp.privacy.requests``. Retried once after a guard conflict, like a command."""
        processor = self.processor
        for attempt in (1, 2):
            try:
                async with processor.lock:
                    with transaction(processor.engine) as session:
                        found = session.get(PrivacyRequestRow, request_id)
                        if found is not None:
                            return to_proto(session, found)
                        uow = UnitOfWork(session, processor, Cause(command_id=f"privacy-erase:{request_id}"))
                        try:
                            before = session.get(PrivacyProgressRow, (request_id, SELF))
                            if before is not None and before.erasure:
                                # The erasure is on the fragments log already (an earlier attempt
                                # whose record below did not make it): record that one, as it was.
                                events = [_erasure_envelope(before.erasure, request_id, uow.cause)]
                                requested = unpack(events[0], pb.PrivacyRequested)
                            else:
                                events = decide(uow)
                                requested = unpack(events[0], pb.PrivacyRequested)
                                if is_delete(requested.mode) and not requested.nothing_held:
                                    uow.emit(IDENTITY_FRAGMENTS, events[:1])
                            recorded = Cause(command_id=f"privacy:{request_id}")
                            await uow.next_cause(recorded)
                            # What identity erased, as a fact: a rebuild finds the person's fragments
                            # already erased (crypto-shredding), so it cannot count them again.
                            progress = session.get(PrivacyProgressRow, (request_id, SELF))
                            erased = pb.PrivacyApplied(
                                request_id=request_id, service=SELF, counts=progress.counts if progress else {}
                            )
                            erased.at.CopyFrom(requested.at)
                            own = make_envelope(
                                erased,
                                event_id=deterministic_id("privacy-applied", SELF, request_id),
                                subject_key=request_id,
                                occurred_at=utcnow(),
                                cause=recorded,
                            )
                            uow.emit(PRIVACY_REQUESTS, [events[0], own, *events[1:]])
                            await uow.flush(recorded)
                        except BaseException:
                            await uow.abandon()
                            raise
                        row = session.get(PrivacyRequestRow, request_id)
                        assert row is not None
                        return to_proto(session, row)
            except AppendConflict:
                if attempt == 2:
                    raise
                try:
                    await processor.recover()
                except Deposed as exc:  # the caller gets a retryable answer; the process stops
                    raise Unavailable("identity was deposed by another instance: retry") from exc
        raise AssertionError("unreachable")

    def get(self, request_id: str) -> pb.PrivacyRequest:
        if not REQUEST_ID_RE.match(request_id):  # what no request id can be is not echoed back (nor logged)
            raise InvalidInput(
                "invalid request", [Violation("request_id", "pattern", "letters, digits, '-', '_', '.', at most 64")]
            )
        with self.processor.read() as session:
            row = session.get(PrivacyRequestRow, request_id)
            if row is None:
                raise NotFound(f"privacy request {request_id!r} not found")
            return to_proto(session, row)

    def list(self, limit: int) -> list[pb.PrivacyRequest]:
        with self.processor.read() as session:
            rows = session.exec(
                select(PrivacyRequestRow).order_by(col(PrivacyRequestRow.ordinal).desc()).limit(limit or 100)
            ).all()
            return [to_proto(session, row) for row in rows]

    async def complete_pending(self) -> int:
        """Complete every request all appliers have applied: destroy its keys, then say so."""
        with self.processor.read() as session:
            ready = [(row.request_id, key_refs_of(session, row)) for row in pending(session)]
        done = 0
        for request_id, key_refs in ready:
            try:
                await self._complete(request_id, key_refs)
                done += 1
            except (AppendConflict, Unavailable):
                raise  # folded or retried by the loop (keep_applying)
            except Exception as exc:  # one request that cannot complete holds up no other
                log.warning("privacy_complete_failed", request_id=request_id, error_class=type(exc).__name__)
        return done

    async def _complete(self, request_id: str, key_refs: Sequence[str]) -> None:
        destroyed = await self.vault.destroy(key_refs)
        now = utcnow()

        def decide(
            uow: UnitOfWork, request_id: str = request_id, destroyed: int = destroyed, now: datetime = now
        ) -> None:
            row = uow.session.get(PrivacyRequestRow, request_id)
            if row is None or row.state == pb.PRIVACY_STATE_COMPLETED:
                return
            completed = pb.PrivacyCompleted(request_id=request_id, keys_destroyed=destroyed)
            completed.at.CopyFrom(timestamp(int(now.timestamp() * 1_000_000)))
            env = make_envelope(
                completed,
                event_id=deterministic_id("privacy-completed", request_id),
                subject_key=request_id,
                occurred_at=now,
                cause=Cause(command_id=f"privacy-completed:{request_id}"),
            )
            uow.emit(PRIVACY_REQUESTS, [env])

        await self.processor.execute(f"privacy-completed:{request_id}", decide)
        log.info("privacy_completed", request_id=request_id, keys_destroyed=destroyed)

    async def completer_loop(self) -> None:
        """Complete requests as their last applier reports (and at start, whatever was left)."""
        await keep_applying(
            self.processor.ready,
            self.complete_pending,
            what="privacy_complete",
            changed=self.applied.changed,
            recover=self.processor.recover,
        )
