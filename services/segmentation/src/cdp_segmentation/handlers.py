"""Segmentation use cases."""

from __future__ import annotations

import asyncio
from functools import partial

from sqlmodel import select

from cdp.segmentation.v1 import events_pb2 as ev
from cdp.segmentation.v1 import segmentation_pb2 as pb
from cdp_kit.envelope import Cause, deterministic_id, make_envelope, utcnow
from cdp_kit.errors import AlreadyExists, InvalidInput, Violation
from cdp_kit.processor import Processor, UnitOfWork
from cdp_kit.streams import SEGMENTATION_CONFIG
from cdp_kit.telemetry import get_logger
from cdp_segmentation import store
from cdp_segmentation.language import NAME_RE, classify, parse
from cdp_segmentation.membership import backfill_page

log = get_logger(__name__)


class SegmentationHandlers:
    def __init__(self, processor: Processor) -> None:
        self.processor = processor

    async def create_segment(self, name: str, query: str) -> pb.Segment:
        if not NAME_RE.match(name):
            raise InvalidInput(
                "invalid segment name", [Violation("name", "pattern", "lower_snake_case, 1-63 characters")]
            )
        ast = parse(query)
        evaluation, reason = classify(ast)
        segment = pb.Segment(
            id=deterministic_id("segment", name),
            name=name,
            query=query,
            ast=ast,
            evaluation=evaluation,  # type: ignore[arg-type]
            evaluation_reason=reason,
        )
        now = utcnow()
        segment.created_at.FromDatetime(now)

        def decide(uow: UnitOfWork) -> None:
            if store.segment_by_key(uow.session, name) is not None:
                raise AlreadyExists(f"segment {name!r} exists")
            env = make_envelope(
                ev.SegmentDefined(segment=segment),
                event_id=deterministic_id("segment-defined", segment.id),
                subject_key=segment.id,
                occurred_at=now,
                cause=Cause(command_id=segment.id),
            )
            uow.emit(SEGMENTATION_CONFIG, [env])

        await self.processor.execute(f"define:{segment.id}", decide)
        await self.backfill_pending()
        return segment

    async def backfill_pending(self) -> int:
        """Evaluate existing profiles for every segment defined but not yet evaluated."""
        with self.processor.read() as session:
            pending = list(session.exec(select(store.SegmentRow.id).where(store.SegmentRow.evaluated == False)).all())  # noqa: E712
        for segment_id in pending:
            after: str | None = ""
            while after is not None:
                decide = partial(backfill_page, segment_id=segment_id, after=after, at=utcnow())
                after = await self.processor.execute(f"backfill:{segment_id}:{after}", decide)
            log.info("segment_backfilled", segment_id=segment_id)
        return len(pending)

    async def backfill_loop(self) -> None:
        """After a restart, finish any evaluation a crash interrupted."""
        await self.processor.ready.wait()
        while True:
            await self.backfill_pending()
            await asyncio.sleep(2.0)
