"""Delivery: membership changes become micro-batches of adds and removes per plan, sent by
one worker per destination.

* The **planner** (one loop) diffs each plan's wanted audience (segment members with the
  identities the destination needs, consent for its marketing action, no policy
  violation) against what the destination holds plus what is in flight, records who is
  excluded and why (ExclusionsChanged), and cuts batches by size and age. A batch is
  recorded (BatchPrepared, id derived from plan and sequence) BEFORE it is sent.
* A **worker** per destination sends its pending batches in order, through the
  destination's rate limiter, with retries (exponential backoff with jitter, honouring
  Retry-After), and records the outcome: BatchDelivered, or BatchFailed (dead letter) at
  once for a permanent error or after ``max_attempts`` transient ones. Workers are
  independent tasks with their own HTTP session and timeouts, so a slow, failing or
  hanging destination delays no other.
* After a crash, pending batches are sent again with the same id: destinations that
  support idempotency (file names, Idempotency-Key, Meta session ids) add nothing twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiohttp
import sqlalchemy as sa
from aiolimiter import AsyncLimiter
from croniter import croniter  # type: ignore[import-untyped]
from google.protobuf import json_format, struct_pb2
from sqlmodel import Session, col, func, select

from cdp.activation.v1 import activation_pb2 as pb
from cdp.activation.v1 import events_pb2 as ev
from cdp.common.v1.envelope_pb2 import Sealed
from cdp_activation import credentials, governance, store
from cdp_activation.batchseal import batch_refs, sealed_prepared
from cdp_activation.changes import Changes
from cdp_activation.connectors import (
    Action,
    Batch,
    Connector,
    ConnectorConfig,
    DeliveryError,
    Record,
    SendContext,
    connector_for,
)
from cdp_activation.settings import ActivationSettings
from cdp_kit.consent import MARKETING_ACTIONS
from cdp_kit.consent import consent_of as consent_of  # the gate reads consent as segmentation does
from cdp_kit.envelope import deterministic_id, make_envelope, utcnow
from cdp_kit.eventlog import MAX_MESSAGE_BYTES
from cdp_kit.keyring import KeyFile, KeyringError
from cdp_kit.processor import Processor, UnitOfWork, own_checkpoint
from cdp_kit.store import get_checkpoint
from cdp_kit.streams import ACTIVATION_DELIVERIES
from cdp_kit.telemetry import get_logger
from cdp_kit.urlmask import mask_url_credentials

log = get_logger(__name__)
DELIVERIES_CHECKPOINT = own_checkpoint(ACTIVATION_DELIVERIES)
ACTIONS = MARKETING_ACTIONS


@dataclass
class PlanWork:
    plan: pb.ActivationPlan
    destination: str  # its id
    adds: list[Record]
    removes: list[Record]
    excluded: dict[str, str]
    cleared: list[str]
    config: ConnectorConfig
    next_seq: int
    cut: int = 0


@dataclass
class DestinationState:
    limiter: AsyncLimiter
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    http: aiohttp.ClientSession | None = None
    rate: float = 0.0


PAGE = 2000  # profile ids read per query round of a plan (then the event loop runs again)


@dataclass
class PlanContext:
    """What a plan's evaluation needs besides its members: read once per plan and round."""

    plan: pb.ActivationPlan
    dest: pb.Destination
    connector: Connector
    violations: list[str]
    adding: set[str]  # in an add batch not delivered yet (pending or dead-lettered)
    removing: set[str]  # in a removal (or erasure) batch not delivered yet
    default_consent: str
    config: ConnectorConfig  # the destination's, its secrets opened

    @property
    def in_flight(self) -> set[str]:
        return self.adding | self.removing


InFlight = dict[str, tuple[str, frozenset[str]]]
"""A plan's batches not delivered yet: batch id -> (action, profile ids)."""


def in_flight_of(session: Session, plan_id: str, known: InFlight) -> InFlight:
    """The plan's batches not delivered yet (pending or dead-lettered), the records of those not
    in ``known`` read (a batch's profile ids do not change but by an erasure, whose profiles are
    gone). Read BEFORE the held members: a batch delivered in between is then seen in flight,
    never as neither."""
    batches_t = store.BatchRow.__table__  # type: ignore[attr-defined]
    query = sa.select(batches_t.c.id, batches_t.c.action).where(
        batches_t.c.plan_id == plan_id, batches_t.c.status.in_(["pending", "dead"])
    )
    out: InFlight = {}
    unknown: list[str] = []
    for batch_id, action in session.execute(query):
        if batch_id in known:
            out[batch_id] = known[batch_id]
        else:
            unknown.append(batch_id)
            out[batch_id] = (str(action), frozenset())
    for start in range(0, len(unknown), 500):  # bounded IN lists
        query = sa.select(batches_t.c.id, batches_t.c.records).where(batches_t.c.id.in_(unknown[start : start + 500]))
        for batch_id, records in session.execute(query):
            out[batch_id] = (out[batch_id][0], frozenset(str(r["profile_id"]) for r in records or []))
    return out


def candidates(session: Session, plan: pb.ActivationPlan) -> list[str]:
    """Every profile id a whole plan's evaluation looks at: its segment's members, the members
    the destination holds, and those it leaves out."""
    found = set(store.members(session, plan.segment))
    found.update(store.plan_members(session, plan.id))
    found.update(session.exec(select(store.ExclusionRow.profile_id).where(store.ExclusionRow.plan_id == plan.id)))
    return sorted(found)


Evaluated = tuple[list[Record], list[Record], dict[str, str], list[str], set[str]]
"""A plan's adds, removes, new exclusions (profile id -> reason), ended exclusions, and the
profiles whose change waits for their batch in flight (an exit while the add is sent)."""


def evaluate(session: Session, ctx: PlanContext, page: list[str]) -> Evaluated:
    """A plan's changes among the profile ids ``page`` (sorted): adds (wanted: segment members
    with the identities the destination needs, consent for its marketing action, no policy
    violation; not held nor in flight), removes (held, no longer wanted, not in flight), who is
    now left out with a new reason, whose exclusion ends, and who is deferred: in flight one way
    and now wanted the other (looked at again once that batch is delivered). Reads only these
    ids' rows."""
    plan, dest, connector = ctx.plan, ctx.dest, ctx.connector
    members_t = store.MemberRow.__table__  # type: ignore[attr-defined]
    profiles_t = store.ProfileRow.__table__  # type: ignore[attr-defined]
    held_t = store.PlanMemberRow.__table__  # type: ignore[attr-defined]
    excl_t = store.ExclusionRow.__table__  # type: ignore[attr-defined]
    profiles: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}
    held: dict[str, dict[str, Any] | None] = {}
    before: dict[str, str] = {}
    for start in range(0, len(page), 500):  # bounded IN lists
        part = page[start : start + 500]
        query = (
            sa.select(profiles_t.c.profile_id, profiles_t.c.identities, profiles_t.c.attributes)
            .join(members_t, members_t.c.profile_id == profiles_t.c.profile_id)
            .where(members_t.c.segment_id == plan.segment, members_t.c.profile_id.in_(part))
        )
        profiles.update((pid, (identities, attributes)) for pid, identities, attributes in session.execute(query))
        query = sa.select(held_t.c.profile_id, held_t.c.record).where(
            held_t.c.plan_id == plan.id, held_t.c.profile_id.in_(part)
        )
        held.update((pid, record) for pid, record in session.execute(query))
        query = sa.select(excl_t.c.profile_id, excl_t.c.reason).where(
            excl_t.c.plan_id == plan.id, excl_t.c.profile_id.in_(part)
        )
        before.update((pid, reason) for pid, reason in session.execute(query))
    needed = connector.required_identities(list(plan.identities))
    excluded: dict[str, str] = {}
    want: dict[str, Record] = {}
    for pid in page:
        profile = profiles.get(pid)
        if profile is None:
            continue  # not a member, or absorbed, deleted, or its facts not here yet
        known, attrs = profile
        if ctx.violations:
            excluded[pid] = f"policy: {ctx.violations[0]}"
            continue
        consent = consent_of(attrs, dest.marketing_action)
        if consent != "y" and not (consent == "unknown" and ctx.default_consent == "y"):
            excluded[pid] = f"consent {dest.marketing_action}={consent}"
            continue
        have = [ns for ns in needed if known.get(ns)]
        if needed and connector.identity_rule == "all" and len(have) < len(needed):
            excluded[pid] = f"missing identity {next(ns for ns in needed if ns not in have)}"
            continue
        if needed and connector.identity_rule == "any" and not have:
            excluded[pid] = f"missing identity {'|'.join(needed)}"
            continue
        namespaces = sorted(known) if connector.all_identities else list(plan.identities)
        identities = {ns: list(known[ns]) for ns in namespaces if known.get(ns)}
        attributes = {a: attrs[a] for a in plan.attributes if a in attrs}
        want[pid] = Record(pid, identities, attributes)
    adds = [rec for pid, rec in want.items() if pid not in held and pid not in ctx.in_flight]
    removes = [
        Record.of(record or {"profile_id": pid})
        for pid, record in sorted(held.items())
        if pid not in want and pid not in ctx.in_flight
    ]
    new = {pid: reason for pid, reason in excluded.items() if before.get(pid) != reason}
    cleared = sorted(pid for pid in before if pid not in excluded)
    deferred = {pid for pid in ctx.adding if pid not in want} | {pid for pid in ctx.removing if pid in want}
    return adds, removes, new, cleared, deferred & set(page)


def to_proto(rec: Record) -> pb.Record:
    out = pb.Record(profile_id=rec.profile_id)
    for ns, values in sorted(rec.identities.items()):
        out.identities[ns].values.extend(values)
    out.attributes.CopyFrom(json_format.ParseDict(rec.attributes, struct_pb2.Struct()))
    return out


def split_to_fit(records: list[Record], size: int) -> list[list[pb.Record]]:
    """Chunks of at most ``size`` records whose BatchPrepared fits one log message."""
    out: list[list[pb.Record]] = []
    budget = MAX_MESSAGE_BYTES // 2
    protos = [to_proto(r) for r in records]
    sizes = [p.ByteSize() + 8 for p in protos]
    for start in range(0, len(protos), size):
        end = min(start + size, len(protos))
        while start < end:
            take = end - start
            while take > 1 and sum(sizes[start : start + take]) > budget:
                take //= 2
            out.append(protos[start : start + take])
            start += take
    return out


class Deliverer:
    def __init__(
        self, processor: Processor, settings: ActivationSettings, keys: KeyFile, changes: Changes | None = None
    ) -> None:
        self.processor = processor
        self.settings = settings
        self.keys = keys
        self.export_root = settings.resolved_export_dir()
        self.destinations: dict[str, DestinationState] = {}
        self.first_seen: dict[str, float] = {}
        # Scheduled plans: the wall-clock time of their next cron run.
        self.next_run: dict[str, datetime] = {}
        # What changed since the last round (noted by the inputs' and the delivery log's folds):
        # a round evaluates only those profiles, and a plan whole only when it is new to this
        # process or its config, the merge policy, a label or a policy changed.
        self.changes = changes if changes is not None else Changes()
        # Plans evaluated whole since the start, and the policy violations each had then.
        self.planned: set[str] = set()
        self.violations: dict[str, list[str]] = {}
        # Per plan, profile ids whose changes were not cut yet: a partial batch waiting for its
        # age, or everything a scheduled plan collects until its cron run.
        self.pending: dict[str, set[str]] = {}
        # Per plan, profile ids whose change waits for their batch in flight, and those batches.
        self.deferred: dict[str, set[str]] = {}
        self.in_flight: dict[str, InFlight] = {}
        self.batch_age: dict[str, float] = {}
        self.key_ids: tuple[str, ...] | None = None
        # Destinations whose secrets cannot be decrypted now, with why (logged once).
        self.unreadable: dict[str, str] = {}
        # Profile ids evaluated, over all rounds (an idle round evaluates none).
        self.evaluated = 0

    # ------------------------------------------------------------------ loop
    async def run(self) -> None:
        await self.processor.ready.wait()
        try:
            while True:
                try:
                    await self.tick()
                except Exception:
                    log.exception("delivery_planning_failed")
                await asyncio.sleep(self.settings.delivery_interval_s)
        finally:
            await self.close()

    async def close(self) -> None:
        """Stop the workers (a hanging send is abandoned: its batch stays pending and is sent
        again, with the same id, after the restart) and close their HTTP sessions."""
        tasks = [s.task for s in self.destinations.values() if s.task is not None]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5.0)
        for state in self.destinations.values():
            if state.http is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(state.http.close(), 5.0)
        self.destinations.clear()

    async def tick(self, force: bool = False) -> int:
        """Plan one round: record exclusions, cut due batches, wake the workers. Returns batches cut."""
        dirty, delivered, everything = self.changes.take()
        # An unreadable destination becomes readable only when the master key versions change (a
        # rotation, a restart): every plan is evaluated whole again then.
        key_ids = tuple(self.keys.keyring.key_ids)
        if key_ids != self.key_ids:
            everything = True
        if everything:
            self.planned.clear()
        try:
            cut = await self._round(dirty, delivered, force)
        except BaseException:
            self.changes.put_back(dirty, delivered, everything)
            raise
        self.key_ids = key_ids
        self._wake_workers()
        return cut

    async def _round(self, dirty: set[str], delivered: set[str], force: bool) -> int:
        now = time.monotonic()
        wall = datetime.now(UTC)
        if not dirty and not force and self._idle(now, wall, delivered):
            return 0  # nothing changed: no profile is read
        with self.processor.read() as session:
            rows = list(session.exec(select(store.PlanRow).order_by(col(store.PlanRow.id))))
        cut = 0
        for row in rows:
            cut += await self._plan(row, dirty, delivered, force, now, wall)
        return cut

    def _idle(self, now: float, wall: datetime, delivered: set[str]) -> bool:
        """Whether a round with nothing new has nothing to do: every plan evaluated whole, no
        deferred change whose batch was delivered, no partial batch old enough nor a scheduled
        plan's cron run due."""
        with self.processor.read() as session:
            plan_ids = set(session.exec(select(store.PlanRow.id)))
        if plan_ids - self.planned:
            return False
        if delivered and any(ids & delivered for ids in self.deferred.values()):
            return False
        for plan_id, ids in self.pending.items():
            if not ids:
                continue
            if plan_id in self.next_run:
                if self.next_run[plan_id] <= wall:
                    return False
            elif now - self.first_seen.get(plan_id, now) >= self.batch_age.get(plan_id, 0.0):
                return False
        return True

    async def _plan(
        self, row: store.PlanRow, dirty: set[str], delivered: set[str], force: bool, now: float, wall: datetime
    ) -> int:
        """One plan's round: evaluate what changed for it (all of it when it is new here), record
        exclusions, cut the due batches. Returns batches cut."""
        plan = store.plan_of(row)
        scheduled = plan.schedule not in ("", "streaming")
        whole = row.id not in self.planned
        pending = self.pending.get(row.id, set())
        resume = self.deferred.get(row.id, set()) & delivered  # their batch was delivered
        if scheduled:
            # Until the cron run: only what is new is evaluated (its exclusions recorded), and
            # collected; at the run, everything collected is evaluated again and cut.
            run_due = force or self.next_run.get(row.id, wall) <= wall
            carried = pending if run_due else set()
        else:
            aged = force or now - self.first_seen.get(row.id, now) >= self.batch_age.get(row.id, 0.0)
            carried = pending if (aged or dirty or resume) else set()  # a partial batch waits for its age
        if not whole and not dirty and not carried and not resume:
            return 0
        with self.processor.read() as session:
            ctx = self._context(session, row, plan)
            if ctx is None:
                self.planned.discard(row.id)
                return 0  # its destination or segment is not known (yet), or its secrets unreadable
            if ctx.violations != self.violations.get(row.id, ctx.violations):
                whole = True  # a new source of a labelled field: the whole audience is left out (or back)
            self.violations[row.id] = ctx.violations
            self.batch_age[row.id] = ctx.config.batch_age_s
            ids = candidates(session, plan) if whole else sorted(dirty | carried | resume)
        adds: list[Record] = []
        removes: list[Record] = []
        excluded: dict[str, str] = {}
        cleared: list[str] = []
        deferred = set() if whole else self.deferred.get(row.id, set()) - set(ids)
        for start in range(0, len(ids), PAGE):
            with self.processor.read() as session:
                a, r, e, c, d = evaluate(session, ctx, ids[start : start + PAGE])
            adds += a
            removes += r
            excluded.update(e)
            cleared += c
            deferred |= d
            self.evaluated += min(PAGE, len(ids) - start)
            await asyncio.sleep(0)  # a whole 100k audience: status and health go on answering
        item = PlanWork(ctx.plan, ctx.dest.id, adds, removes, excluded, cleared, ctx.config, row.batch_seq)
        left, complete = await self._cut(item, scheduled, force, now)
        if not complete:
            self.planned.discard(row.id)  # another writer took the sequence: plan it whole again
            self.pending.pop(row.id, None)
            return 0
        if scheduled:
            # collected earlier, not looked at this round (kept even when this round found nothing)
            left |= pending - carried
        self.pending[row.id] = left
        self.deferred[row.id] = deferred
        self.planned.add(row.id)
        return item.cut

    def _context(self, session: Session, row: store.PlanRow, plan: pb.ActivationPlan) -> PlanContext | None:
        dest_row = session.get(store.DestinationRow, row.destination_id)
        if dest_row is None or session.get(store.SegmentRow, row.segment_id) is None:
            return None
        dest = store.destination_of(dest_row)
        config = self._config(dest)
        if config is None:
            return None
        connector = connector_for(dest.connector)
        batches = self.in_flight[row.id] = in_flight_of(session, row.id, self.in_flight.get(row.id, {}))
        adding = {pid for action, pids in batches.values() if action == "add" for pid in pids}
        removing = {pid for action, pids in batches.values() if action != "add" for pid in pids}
        violations = governance.violations(session, dest.marketing_action, [*plan.attributes, *plan.identities])
        return PlanContext(plan, dest, connector, violations, adding, removing, self.settings.unknown_consent, config)

    async def _cut(self, item: PlanWork, scheduled: bool, force: bool, now: float) -> tuple[set[str], bool]:
        """Record the plan's exclusion changes and prepare its due batches. Returns the profile
        ids whose changes wait (a partial batch, a scheduled plan before its run) and whether
        every batch could be prepared."""
        if item.excluded or item.cleared:
            await self._record_exclusions(item)
        changes = len(item.adds) + len(item.removes)
        if not changes:
            self.first_seen.pop(item.plan.id, None)
            return set(), True
        size = item.config.batch_size
        if scheduled:
            if not (force or self._cron_due(item.plan)):
                # scheduled: everything changed since the last run goes at the next one
                return {r.profile_id for r in (*item.adds, *item.removes)}, True
            due = True
        else:
            since = self.first_seen.setdefault(item.plan.id, now)
            due = force or now - since >= item.config.batch_age_s
        seq = item.next_seq
        left: set[str] = set()
        for action, records in (("remove", item.removes), ("add", item.adds)):
            for chunk in split_to_fit(records, size):
                if len(chunk) < size and not due:
                    left.update(r.profile_id for r in chunk)  # a partial batch waits for its age
                    continue
                if not await self._prepare(item, action, chunk, seq):
                    return left, False
                seq += 1
                item.cut += 1
        if not left:
            self.first_seen.pop(item.plan.id, None)
        return left, True

    def _config(self, dest: pb.Destination) -> ConnectorConfig | None:
        """The destination's settings with its secrets opened in memory; None (said once in the
        log) while a secret cannot be decrypted, e.g. its master key version was retired too
        early: that destination waits, every other one goes on."""
        try:
            config = credentials.connector_config(dest, self.keys.keyring)
        except KeyringError as exc:
            if self.unreadable.get(dest.id) != str(exc):
                self.unreadable[dest.id] = str(exc)
                log.error("destination_secret_unreadable", destination=dest.name, reason=str(exc))
            return None
        self.unreadable.pop(dest.id, None)
        return config

    def _cron_due(self, plan: pb.ActivationPlan) -> bool:
        wall = datetime.now(UTC)
        if plan.id not in self.next_run:
            self.next_run[plan.id] = croniter(plan.schedule, wall).get_next(datetime)
        if wall < self.next_run[plan.id]:
            return False
        self.next_run[plan.id] = croniter(plan.schedule, wall).get_next(datetime)
        return True

    async def _record_exclusions(self, item: PlanWork) -> None:
        changed = ev.ExclusionsChanged(plan_id=item.plan.id, excluded=item.excluded, cleared=item.cleared)
        now = utcnow()
        # The same change can come back (excluded, cleared, excluded again): the delivery log's
        # position makes each its own message (JetStream drops a repeated message id).
        with self.processor.read() as session:
            position = get_checkpoint(session, DELIVERIES_CHECKPOINT)
        diff = json.dumps([sorted(item.excluded.items()), item.cleared])
        key = deterministic_id("exclusions", item.plan.id, position, diff)

        def decide(uow: UnitOfWork) -> None:
            env = make_envelope(changed, event_id=key, subject_key=item.plan.id, occurred_at=now, cause=uow.cause)
            uow.emit(ACTIVATION_DELIVERIES, [env])

        await self.processor.execute(f"exclusions:{key}", decide)

    async def _prepare(self, item: PlanWork, action: str, records: list[pb.Record], seq: int) -> bool:
        batch_id = deterministic_id("batch", item.plan.id, seq)
        batch = pb.Batch(
            id=batch_id,
            plan_id=item.plan.id,
            destination=item.destination,
            action=action,
            sequence=seq,
            records=records,
        )
        now = utcnow()
        batch.prepared_at.FromDatetime(now)
        refs = await batch_refs(self.processor, batch)

        def decide(uow: UnitOfWork) -> bool:
            plan = uow.session.get(store.PlanRow, item.plan.id)
            if plan is None or plan.batch_seq != seq:
                return False  # someone prepared this sequence already: plan again next round
            prepared, parts = ev.BatchPrepared(batch=batch), list[Sealed]()
            if refs is not None and self.processor.vault is not None:
                prepared, sealed = sealed_prepared(self.processor.vault, batch, refs, batch_id)
                parts = list(sealed)
            env = make_envelope(
                prepared,
                event_id=batch_id,
                subject_key=item.destination,
                occurred_at=now,
                cause=uow.cause,
            )
            env.sealed.extend(parts)
            uow.emit(ACTIVATION_DELIVERIES, [env])
            return True

        return await self.processor.execute(f"prepare:{batch_id}", decide)

    # --------------------------------------------------------------- workers
    def _wake_workers(self) -> None:
        with self.processor.read() as session:
            pending = set(
                session.exec(select(store.BatchRow.destination_id).where(store.BatchRow.status == "pending")).all()
            )
        for dest_id in pending:
            state = self._state(dest_id)
            if state.task is None or state.task.done():
                state.task = asyncio.create_task(self._worker(dest_id), name=f"deliver:{dest_id}")
            state.wake.set()

    def _state(self, dest_id: str) -> DestinationState:
        if dest_id not in self.destinations:
            self.destinations[dest_id] = DestinationState(limiter=AsyncLimiter(1, 1))
        return self.destinations[dest_id]

    async def _worker(self, dest_id: str) -> None:
        state = self._state(dest_id)
        while True:
            state.wake.clear()
            job = self._next_batch(dest_id)
            if job is None:
                await state.wake.wait()
                continue
            try:
                await self._send(state, *job)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("delivery_worker_failed", destination=dest_id)
                await asyncio.sleep(self.settings.delivery_interval_s)

    def _next_batch(self, dest_id: str) -> tuple[store.BatchRow, pb.Destination, Batch, int] | None:
        with self.processor.read() as session:
            row = session.exec(
                select(store.BatchRow)
                .where(store.BatchRow.destination_id == dest_id, store.BatchRow.status == "pending")
                .order_by(col(store.BatchRow.prepared_at), col(store.BatchRow.plan_id), col(store.BatchRow.sequence))
                .limit(1)  # else every pending batch's records are read (JSON-decoded) to take the first
            ).first()
            if row is None:
                return None
            plan_row = session.get(store.PlanRow, row.plan_id)
            dest_row = session.get(store.DestinationRow, dest_id)
            if plan_row is None or dest_row is None:
                return None
            plan, dest = store.plan_of(plan_row), store.destination_of(dest_row)
            segment = session.get(store.SegmentRow, plan.segment)
            connector = connector_for(dest.connector)
            records = [Record.of(r) for r in row.records]
            config = self._config(dest)
            if config is None:
                return None  # the batch stays pending until the key is back
            snapshot: list[Record] | None = None
            if connector.wants_snapshot(config):
                held = {
                    m.profile_id: Record.of(m.record or {"profile_id": m.profile_id})
                    for m in session.exec(select(store.PlanMemberRow).where(store.PlanMemberRow.plan_id == plan.id))
                }
                for rec in records:
                    if row.action == "add":
                        held[rec.profile_id] = rec
                    else:
                        held.pop(rec.profile_id, None)
                snapshot = [held[k] for k in sorted(held)]
                members = len(held)
            else:
                count = session.exec(
                    select(func.count()).select_from(store.PlanMemberRow).where(store.PlanMemberRow.plan_id == plan.id)
                ).one()
                # An erasure's people are no longer held (erased from the store when it was prepared).
                erased = 0 if row.action == "erase" else len(records)
                members = int(count) + (len(records) if row.action == "add" else -erased)
            action: Action = "add" if row.action == "add" else "erase" if row.action == "erase" else "remove"
            batch = Batch(
                id=row.id,
                plan_id=plan.id,
                destination=dest.name,
                segment=segment.name if segment else plan.segment,
                action=action,
                sequence=row.sequence,
                records=records,
                identities=list(plan.identities),
                attributes=list(plan.attributes),
                snapshot=snapshot,
            )
            session.expunge(row)
            return row, dest, batch, max(members, 0)

    async def _send(
        self, state: DestinationState, row: store.BatchRow, dest: pb.Destination, batch: Batch, members: int
    ) -> None:
        connector = connector_for(dest.connector)
        config = credentials.connector_config(dest, self.keys.keyring)  # opened in memory only
        if state.rate != config.rate_per_s:
            state.limiter, state.rate = AsyncLimiter(config.rate_per_s, 1.0), config.rate_per_s
        if state.http is None:
            state.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=config.timeout_s))
        ctx = SendContext(http=state.http, export_root=self.export_root, members_after=members)
        started = time.monotonic()
        attempts = 0
        while True:
            attempts += 1
            try:
                async with state.limiter:
                    # Under a lease whose renewal is late (cdp_kit.lease): a standby may be taking
                    # over; nothing goes to a destination until it is renewed (or the process steps
                    # down). Checked right before the send, after the rate limiter's wait. The
                    # condition is the lease's age on the clock: there is no event to wait on.
                    while not self.processor.may_act():  # noqa: ASYNC110
                        await asyncio.sleep(0.1)
                    # A privacy erasure goes through the platform's removal or deletion API.
                    send = connector.erase if batch.action == "erase" else connector.send
                    result = await asyncio.wait_for(send(ctx, config, batch), timeout=config.timeout_s)
                break
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a connector bug or a timeout is transient, never a crash
                error = exc if isinstance(exc, DeliveryError) else DeliveryError(describe(exc, config), permanent=False)
                error.reason = mask_url_credentials(error.reason)
                if error.permanent or attempts >= config.max_attempts:
                    await self._record_failed(batch, attempts, error)
                    return
                delay = error.retry_after if error.retry_after is not None else backoff(config, attempts)
                log.info(
                    "delivery_retry",
                    destination=dest.name,
                    batch=batch.id,
                    attempt=attempts,
                    reason=error.reason,
                    delay_s=round(delay, 3),
                )
                await asyncio.sleep(min(delay, config.backoff_max_s))
        latency = (time.monotonic() - started) * 1000
        done = ev.BatchDelivered(
            batch_id=batch.id,
            attempts=attempts,
            latency_ms=latency,
            activated=result.activated,
            location=mask_url_credentials(result.location),
            rejected=result.rejected,
            warnings=result.warnings,
        )
        now = utcnow()
        done.at.FromDatetime(now)
        await self._record(done, f"delivered:{batch.id}", dest.id, now)
        log.info(
            "delivered",
            destination=dest.name,
            batch=batch.id,
            action=batch.action,
            profiles=len(batch.records),
            activated=result.activated,
            attempts=attempts,
            latency_ms=round(latency, 1),
        )

    async def _record_failed(self, batch: Batch, attempts: int, error: DeliveryError) -> None:
        failed = ev.BatchFailed(batch_id=batch.id, attempts=attempts, reason=error.reason, permanent=error.permanent)
        now = utcnow()
        failed.at.FromDatetime(now)
        await self._record(failed, f"failed:{batch.id}:{now.isoformat()}", batch.destination, now)
        log.warning(
            "delivery_dead_lettered",
            destination=batch.destination,
            batch=batch.id,
            attempts=attempts,
            reason=error.reason,
        )

    async def _record(self, event: Any, key: str, subject: str, now: Any) -> None:
        event_id = deterministic_id("outcome", key)

        def decide(uow: UnitOfWork) -> None:
            env = make_envelope(event, event_id=event_id, subject_key=subject, occurred_at=now, cause=uow.cause)
            uow.emit(ACTIVATION_DELIVERIES, [env])

        await self.processor.execute(key, decide)


def describe(exc: BaseException, config: ConnectorConfig) -> str:
    if isinstance(exc, TimeoutError):
        return f"no answer within {config.timeout_s}s"
    return f"connector error {type(exc).__name__}"


def backoff(config: ConnectorConfig, attempt: int) -> float:
    """Exponential backoff with full jitter around the doubled delay."""
    base = config.backoff_s * (2 ** (attempt - 1))
    return float(min(config.backoff_max_s, base) * random.uniform(0.5, 1.5))
