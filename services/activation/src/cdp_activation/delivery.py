"""Deliveries: when a plan's segment changed since its last delivery, send the audience
and record the outcome on the log (CDP_DELIVERY)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from google.protobuf import json_format
from sqlmodel import Session, select

from cdp.activation.v1 import activation_pb2 as pb
from cdp.activation.v1 import events_pb2 as ev
from cdp_activation import store
from cdp_activation.connectors import Audience, connector_for
from cdp_activation.connectors.base import Member
from cdp_activation.settings import ActivationSettings
from cdp_kit.envelope import deterministic_id, make_envelope, utcnow
from cdp_kit.processor import Processor, UnitOfWork
from cdp_kit.streams import ACTIVATION_DELIVERIES
from cdp_kit.telemetry import get_logger

log = get_logger(__name__)


@dataclass(frozen=True)
class Due:
    plan: pb.ActivationPlan
    destination: pb.Destination
    segment_name: str
    through: int
    audience: Audience


class Deliverer:
    def __init__(self, processor: Processor, settings: ActivationSettings) -> None:
        self.processor = processor
        self.settings = settings

    async def run(self) -> None:
        await self.processor.ready.wait()
        while True:
            try:
                await self.deliver_due()
            except Exception:
                log.exception("delivery_round_failed")
            await asyncio.sleep(self.settings.delivery_interval_s)

    async def deliver_due(self) -> int:
        with self.processor.read() as session:
            due = [d for row in session.exec(select(store.PlanRow)).all() if (d := self._due(session, row))]
        for item in due:
            await self._deliver(item)
        return len(due)

    def _due(self, session: Session, row: store.PlanRow) -> Due | None:
        through = store.last_change(session, row.segment_id)
        if row.deliveries and through <= row.delivered_through:
            return None
        segment = session.get(store.SegmentRow, row.segment_id)
        destination = session.get(store.DestinationRow, row.destination_id)
        if segment is None or destination is None:
            return None
        member_ids = store.members(session, row.segment_id)
        profiles = {p.profile_id: p for p in (session.get(store.ProfileRow, m) for m in member_ids) if p}
        if len(profiles) < len(member_ids):
            return None  # profile facts not here yet: deliver on a later round
        plan = store.plan_of(row)
        before = store.plan_members(session, row.id)
        audience = Audience(
            destination=destination.name,
            segment=segment.name,
            members=[Member(m, profiles[m].identities, profiles[m].attributes) for m in member_ids],
            added=sorted(set(member_ids) - before),
            removed=sorted(before - set(member_ids)),
            identities=list(plan.identities),
            attributes=list(plan.attributes),
        )
        return Due(plan, store.destination_of(destination), segment.name, through, audience)

    async def _deliver(self, due: Due) -> None:
        dest = due.destination
        connector = connector_for(dest.connector, self.settings.resolved_export_dir())
        config = json_format.MessageToDict(dest.config)
        result = await connector.deliver(config, due.audience)
        delivery = pb.Delivery(
            id=deterministic_id("delivery", due.plan.id, due.through),
            plan_id=due.plan.id,
            destination=dest.id,
            members=result.delivered,
            added=len(due.audience.added),
            removed=len(due.audience.removed),
            location=result.location,
            through_sequence=due.through,
            excluded=result.excluded,
        )
        now = utcnow()
        delivery.at.FromDatetime(now)
        completed = ev.DeliveryCompleted(
            delivery=delivery, added_profiles=due.audience.added, removed_profiles=due.audience.removed
        )

        def decide(uow: UnitOfWork) -> None:
            env = make_envelope(completed, event_id=delivery.id, subject_key=dest.id, occurred_at=now, cause=uow.cause)
            uow.emit(ACTIVATION_DELIVERIES, [env])

        await self.processor.execute(f"deliver:{delivery.id}", decide)
        log.info(
            "delivered",
            destination=dest.name,
            plan=due.plan.id,
            members=result.delivered,
            added=delivery.added,
            removed=delivery.removed,
            excluded=dict(result.excluded),
        )
