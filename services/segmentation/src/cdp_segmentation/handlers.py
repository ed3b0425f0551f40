"""Segmentation use cases: define segments, explain them, evaluate in batch, move the clock."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial

import nats.errors
from google.protobuf.message import Message
from sqlmodel import Session, col, select

from cdp.segmentation.v1 import events_pb2 as ev
from cdp.segmentation.v1 import segmentation_pb2 as pb
from cdp_kit.envelope import Cause, deterministic_id, make_envelope, utcnow
from cdp_kit.errors import AlreadyExists, CdpError, FailedPrecondition, InvalidInput, NotFound, Unavailable, Violation
from cdp_kit.processor import Processor, UnitOfWork, in_checkpoint
from cdp_kit.runtime import filter_last_sequence
from cdp_kit.store import get_checkpoint
from cdp_kit.streams import SEGMENTATION_CONFIG, SEGMENTATION_MEMBERSHIPS, SEGMENTATION_READS_INGEST_CONFIG
from cdp_kit.telemetry import get_logger
from cdp_segmentation import store
from cdp_segmentation.analysis import check_where, classify, reads_of, resolve_computed, resolve_segments
from cdp_segmentation.cron import last_fire, parse_cron
from cdp_segmentation.language import KEYWORDS, NAME_RE, parse, parse_computed
from cdp_segmentation.membership import Catalog, Changes, backfill_page, reevaluate
from cdp_segmentation.profiles import due_profiles, iso, refresh_due, to_ms
from cdp_segmentation.sql import check_compiles, matching, matching_all, too_complex
from cdp_segmentation.store import EXITED, REALIZED, ProfileRow

log = get_logger(__name__)
PAGE = 1000
# How long a definition waits for schemas ingest registered before it (then UNAVAILABLE).
SCHEMA_WAIT_S = 10.0
SCHEMA_POLL_S = 0.02


@dataclass
class Compiled:
    ast: pb.Expression
    evaluation: int
    reason: str
    reads: list[str]


_TOO_COMPLEX_HINT = (
    "the definition, with the segments it refers to (in segment …) written out in it, is too deep or too "
    "large for one SQL statement; simplify it or nest fewer segments"
)


def _complex_query(why: str) -> InvalidInput:
    """INVALID_ARGUMENT naming the query, when the store found its statement too complex (logged
    as a warning, without a traceback)."""
    log.warning("query_too_complex", reason=why)
    return InvalidInput(
        f"audience definition too complex to evaluate: {_TOO_COMPLEX_HINT} ({why})",
        [Violation("query", "complexity", _TOO_COMPLEX_HINT)],
    )


class SegmentationHandlers:
    def __init__(
        self,
        processor: Processor,
        catalog: Catalog,
        *,
        clock_interval_s: float = 5.0,
        wall_clock: Callable[[], datetime] | None = None,
        schema_wait_s: float = SCHEMA_WAIT_S,
    ) -> None:
        self.processor = processor
        self.catalog = catalog
        self.clock_interval_s = clock_interval_s
        self.schema_wait_s = schema_wait_s
        # The service ticks the log's clock to the wall clock before evaluating a new windowed
        # segment; tests that drive the log's clock by hand leave it out.
        self.wall_clock = wall_clock

    # ------------------------------------------------------------ definitions
    async def _configure(
        self,
        command_id: str,
        payload: Message,
        *,
        event_id: str,
        subject_key: str,
        at: datetime,
        refuse: Callable[[Session], str | None] | None = None,
    ) -> None:
        """Append one config event (unless ``refuse`` says why it already exists), then drop the cached catalog."""

        def decide(uow: UnitOfWork) -> None:
            reason = refuse(uow.session) if refuse is not None else None
            if reason:
                raise AlreadyExists(reason)
            env = make_envelope(
                payload, event_id=event_id, subject_key=subject_key, occurred_at=at, cause=Cause(command_id=command_id)
            )
            uow.emit(SEGMENTATION_CONFIG, [env])

        try:
            await self.processor.execute(command_id, decide)
        finally:
            self.catalog.invalidate()

    async def learn_schemas(self) -> None:
        """Wait (at most ``schema_wait_s``) until the store has applied ingest's config log up to its
        last message, so a definition is checked against every schema created before it was sent."""
        spec = SEGMENTATION_READS_INGEST_CONFIG
        try:
            last = await filter_last_sequence(self.processor.eventlog, spec)
        except (TimeoutError, nats.errors.Error) as exc:
            reason = f"schema not yet known: ingest's schemas could not be read ({type(exc).__name__})"
            raise Unavailable(reason) from exc
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.schema_wait_s
        while True:
            with self.processor.read() as session:
                applied = get_checkpoint(session, in_checkpoint(spec))
            if applied >= last:
                return
            if loop.time() >= deadline:
                log.warning("schemas_not_yet_known", applied=applied, last=last)
                raise Unavailable(
                    f"schema not yet known: segmentation has applied ingest's schemas up to config position "
                    f"{applied} of {last}; try again shortly (see `cdp status`, consumer {spec.name})"
                )
            await asyncio.sleep(SCHEMA_POLL_S)

    def compile(self, name: str, query: str, schedule: str) -> Compiled:
        with self.processor.read() as session:
            vocabulary = store.vocabulary(session)
            known = {row.name: store.segment_of(row) for row in store.all_segments(session)}
            computed = {a.name: a for a in store.all_computed(session)}
        ast = parse(query, vocabulary.check)
        check_where(ast)
        resolve_computed(ast, computed)
        if schedule:
            parse_cron(schedule)
        resolve_segments(ast, name, known)
        by_id = {s.id: s for s in known.values()}
        evaluation, reason = classify(ast, schedule, by_id)
        with self.processor.read() as session:
            try:
                check_compiles(session.connection(), ast, store.clock_ms(session), by_id)
            except Exception as exc:
                if (why := too_complex(exc)) is None:
                    raise
                raise _complex_query(why) from None
        return Compiled(ast, evaluation, reason, reads_of(ast).labels())

    async def create_segment(self, name: str, query: str, schedule: str = "") -> pb.Segment:
        if not NAME_RE.match(name):
            raise InvalidInput(
                "invalid segment name", [Violation("name", "pattern", "lower_snake_case, 1-63 characters")]
            )
        await self.learn_schemas()
        compiled = self.compile(name, query, schedule)
        segment = pb.Segment(
            id=deterministic_id("segment", name),
            name=name,
            query=query,
            ast=compiled.ast,
            evaluation=compiled.evaluation,  # type: ignore[arg-type]
            evaluation_reason=compiled.reason,
            schedule=schedule,
            reads=compiled.reads,
        )
        now = utcnow()
        segment.created_at.FromDatetime(now)

        def exists(session: Session) -> str | None:
            return f"segment {name!r} exists" if store.segment_by_key(session, name) is not None else None

        await self._configure(
            f"define:{segment.id}",
            ev.SegmentDefined(segment=segment),
            event_id=deterministic_id("segment-defined", segment.id),
            subject_key=segment.id,
            at=now,
            refuse=exists,
        )
        if self.wall_clock is not None and self.needs_clock():
            # Evaluate existing profiles as of now, not as of the last tick: a windowed segment
            # defined after its data would otherwise realize members the next tick exits.
            await self.tick(self.wall_clock())
        await self.backfill_pending()
        return segment

    async def create_computed(self, name: str, definition: str) -> pb.ComputedAttribute:
        """Define a computed attribute (a config event); every profile's value is computed when it is folded."""
        if not NAME_RE.match(name):
            raise InvalidInput(
                "invalid computed attribute name", [Violation("name", "pattern", "lower_snake_case, 1-63 characters")]
            )
        await self.learn_schemas()
        with self.processor.read() as session:
            vocabulary = store.vocabulary(session)
        if name in KEYWORDS.split("|") or name in ("avg", "most_recent"):
            hint = f"{name!r} is a word of the audience language; choose another name"
            raise InvalidInput("invalid computed attribute name", [Violation("name", "reserved", hint)])
        if name in vocabulary.attributes:
            hint = f"{name!r} is a profile attribute a schema declares; choose another name"
            raise InvalidInput("invalid computed attribute name", [Violation("name", "taken", hint)])
        attribute = parse_computed(definition, vocabulary.check)
        check_where(pb.Expression(event=pb.EventCondition(pattern=attribute.pattern)))
        attribute.id = deterministic_id("computed", name)
        attribute.name = name
        attribute.definition = definition.strip()
        now = utcnow()
        attribute.created_at.FromDatetime(now)

        def exists(session: Session) -> str | None:
            return f"computed attribute {name!r} exists" if session.get(store.ComputedRow, name) is not None else None

        await self._configure(
            f"computed:{attribute.id}",
            ev.ComputedAttributeDefined(attribute=attribute),
            event_id=deterministic_id("computed-defined", attribute.id),
            subject_key=attribute.id,
            at=now,
            refuse=exists,
        )
        return attribute

    def computed_attributes(self) -> list[pb.ComputedAttribute]:
        with self.processor.read() as session:
            return store.all_computed(session)

    async def explain(self, query: str, schedule: str = "") -> pb.Explanation:
        await self.learn_schemas()
        compiled = self.compile("", query, schedule)
        with self.processor.read() as session:
            known = {row.id: store.segment_of(row) for row in store.all_segments(session)}
        try:
            # In a worker thread (its own connection): on a large store the count takes seconds,
            # during which the event loop goes on folding inputs and answering other calls.
            profiles, size = await asyncio.to_thread(self._estimate, compiled.ast, known)
        except Exception as exc:
            if (why := too_complex(exc)) is None:
                raise
            raise _complex_query(why) from None
        return pb.Explanation(
            ast=compiled.ast,
            evaluation=compiled.evaluation,  # type: ignore[arg-type]
            evaluation_reason=compiled.reason,
            estimated_size=size,
            profiles=profiles,
            reads=compiled.reads,
        )

    def _estimate(self, ast: pb.Expression, known: dict[str, pb.Segment]) -> tuple[int, int]:
        """The profiles in the store and how many match ``ast`` now (the log's clock), in one read."""
        with self.processor.read() as session:
            clock = store.clock_ms(session)
            return store.profile_count(session), len(matching(session.connection(), ast, clock, known))

    async def set_merge_policy(self, policy: pb.MergePolicy) -> pb.MergePolicy:
        if policy.kind == pb.MERGE_POLICY_KIND_UNSPECIFIED:
            policy.kind = pb.MERGE_POLICY_KIND_TIMESTAMP
        if policy.kind == pb.MERGE_POLICY_KIND_DATASET_PRECEDENCE and not policy.datasets:
            raise InvalidInput(
                "invalid merge policy", [Violation("policy.datasets", "required", "dataset_precedence lists datasets")]
            )
        if policy.kind == pb.MERGE_POLICY_KIND_TIMESTAMP and policy.datasets:
            raise InvalidInput(
                "invalid merge policy", [Violation("policy.datasets", "unexpected", "timestamp takes no datasets")]
            )
        now = utcnow()
        key = deterministic_id("merge-policy", policy.SerializeToString(deterministic=True).hex(), now.isoformat())

        await self._configure(
            f"merge-policy:{key}", ev.MergePolicySet(policy=policy), event_id=key, subject_key="merge-policy", at=now
        )
        await self.backfill_pending()
        return policy

    # ---------------------------------------------------------------- backfill
    async def backfill_pending(self) -> int:
        """Evaluate existing profiles for every streaming segment defined (or re-opened) but not yet evaluated."""
        with self.processor.read() as session:
            rows = list(session.exec(select(store.SegmentRow).where(store.SegmentRow.evaluated == False)).all())  # noqa: E712
            pending = [(r.id, r.generation, store.segment_of(r).evaluation) for r in rows]
        for segment_id, generation, evaluation in pending:
            if evaluation == pb.EVALUATION_BATCH:
                async for _ in self.evaluate_batch(segment_id):
                    pass
                continue
            after: str | None = ""
            while after is not None:
                decide = partial(
                    backfill_page,
                    catalog=self.catalog,
                    segment_id=segment_id,
                    generation=generation,
                    after=after,
                    at=utcnow(),
                )
                after = await self.processor.execute(f"backfill:{segment_id}:{generation}:{after}", decide)
            log.info("segment_backfilled", segment_id=segment_id)
        return len(pending)

    # ------------------------------------------------------------------- batch
    async def evaluate_batch(self, key: str) -> AsyncIterator[pb.EvaluationProgress]:
        """SQL inside the store, a page of profiles per command; emits the same membership changes."""
        with self.processor.read() as session:
            row = store.segment_by_key(session, key)
            if row is None:
                raise NotFound(f"segment {key!r} not found")
            segment_id, total = row.id, store.profile_count(session)
            now_ms = store.clock_ms(session)
        run_id = f"{now_ms}-{to_ms(utcnow())}"
        progress = pb.EvaluationProgress(segment_id=segment_id, profiles_total=total)
        after = ""
        while True:
            decide = partial(self._batch_page, segment_id=segment_id, run_id=run_id, after=after, now_ms=now_ms)
            last, done, realized, exited = await self.processor.execute(f"batch:{segment_id}:{run_id}:{after}", decide)
            progress.profiles_done += done
            progress.realized += realized
            progress.exited += exited
            if last is None:
                progress.done = True
                yield progress
                return
            yield progress
            after = last

    def _batch_page(
        self, uow: UnitOfWork, *, segment_id: str, run_id: str, after: str, now_ms: int
    ) -> tuple[str | None, int, int, int]:
        session = uow.session
        known = {row.id: store.segment_of(row) for row in store.all_segments(session)}
        ast = known[segment_id].ast
        ids = list(
            session.exec(
                select(ProfileRow.profile_id)
                .where(col(ProfileRow.profile_id) > after)
                .order_by(col(ProfileRow.profile_id))
                .limit(PAGE)
            ).all()
        )
        at = datetime.fromtimestamp(now_ms / 1000, UTC) if now_ms else utcnow()
        cause = f"batch:{run_id}"
        if not ids:
            done = ev.SegmentBatchEvaluated(segment_id=segment_id, run_id=run_id, profiles=store.profile_count(session))
            done.at.FromDatetime(at)
            marker = make_envelope(
                done,
                event_id=deterministic_id("batch-evaluated", segment_id, run_id),
                subject_key=segment_id,
                occurred_at=at,
                cause=uow.cause,
            )
            uow.emit(SEGMENTATION_MEMBERSHIPS, [marker])
            return None, 0, 0, 0
        try:
            found = matching_all(session.connection(), {segment_id: ast}, now_ms, known, lo=after, hi=ids[-1])
        except Exception as exc:
            why = too_complex(exc)
            if why is None:
                raise
            log.warning("segment_too_complex", segment_id=segment_id, reason=why)
            raise FailedPrecondition(
                f"segment {known[segment_id].name!r} cannot be evaluated: {_TOO_COMPLEX_HINT} ({why})",
                [Violation("query", "complexity", _TOO_COMPLEX_HINT)],
            ) from None
        inside = found[segment_id]
        current = store.statuses(session, segment_id, ids)
        changes = Changes(uow, at, cause)
        for profile_id in ids:
            now_in = profile_id in inside
            if now_in != (current.get(profile_id) == REALIZED):
                changes.add(segment_id, profile_id, REALIZED if now_in else EXITED)
        emitted = changes.emit(self.catalog)
        realized = sum(1 for p in ids if p in inside and current.get(p) != REALIZED)
        return ids[-1], len(ids), realized, emitted - realized

    # ------------------------------------------------------------------- clock
    async def tick(self, at: datetime) -> int:
        """Move the log's clock to ``at`` and wake the profiles whose next window end has passed
        (an indexed query on their next due time: no scan of all profiles). Returns the changes."""
        ms = to_ms(at)
        changes, page = 0, 0
        while True:
            decide = partial(self._tick_page, at=at, ms=ms, first=page == 0)
            emitted, more = await self.processor.execute(f"clock:{ms}:{page}", decide)
            changes += emitted
            page += 1
            if not more:
                return changes

    def _tick_page(self, uow: UnitOfWork, *, at: datetime, ms: int, first: bool) -> tuple[int, bool]:
        session = uow.session
        if first and ms > store.clock_ms(session):
            ticked = ev.ClockTicked()
            ticked.at.FromDatetime(at)
            env = make_envelope(
                ticked, event_id=deterministic_id("clock", ms), subject_key="clock", occurred_at=at, cause=uow.cause
            )
            uow.emit(SEGMENTATION_MEMBERSHIPS, [env])
        ctx = self.catalog.context(session)
        due = due_profiles(session, ctx.clock_ms, PAGE)
        segments = self.catalog.affected(session, timed=True)
        emitted = 0
        for profile_id in due:
            refresh_due(session, profile_id, ctx)
            emitted += reevaluate(uow, self.catalog, profile_id, segments, at, f"clock:{ms}", ctx.clock_ms)
        session.flush()
        return emitted, len(due) == PAGE

    def needs_clock(self) -> bool:
        """Tick only when time changes something: windows, retention or schedules."""
        with self.processor.read() as session:
            segments = self.catalog.segments(session)
            if any(s.reads.windows_ms for s in segments if s.streaming) or store.retention_ms(session):
                return True
            if self.catalog.windows(session):  # computed attributes over a relative window
                return True
            return any(s.schedule for s in segments)

    async def clock_loop(self) -> None:
        await self.processor.ready.wait()
        while True:
            if self.needs_clock():
                await self.tick(utcnow())
                await self.run_schedules()
            await asyncio.sleep(self.clock_interval_s)

    async def run_schedules(self) -> None:
        with self.processor.read() as session:
            rows = [(r.id, store.segment_of(r).schedule, r.last_run_ms) for r in store.all_segments(session)]
            clock = store.clock_ms(session)
        for segment_id, schedule, last_run in rows:
            if schedule and last_fire(schedule, last_run, clock) is not None:
                log.info("scheduled_evaluation", segment_id=segment_id, clock=iso(clock))
                async for _ in self.evaluate_batch(segment_id):
                    pass

    async def backfill_loop(self) -> None:
        """After a restart, finish any evaluation a crash interrupted."""
        await self.processor.ready.wait()
        while True:
            try:
                await self.backfill_pending()
            except CdpError as exc:  # e.g. a guard conflict with a concurrent command: try again later
                log.warning("backfill_retry", error=exc.message)
            await asyncio.sleep(2.0)
