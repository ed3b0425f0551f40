"""Folds activation's own events (config and delivery outcomes) into its store."""

from __future__ import annotations

from google.protobuf import json_format
from sqlmodel import Session, col, delete

from cdp.activation.v1 import events_pb2 as ev
from cdp_activation.store import DeliveryRow, DestinationRow, PlanMemberRow, PlanRow
from cdp_kit.envelope import Envelope, from_timestamp, is_a, unpack
from cdp_kit.streams import OwnLog


def _dict(msg: object) -> dict[str, object]:
    return json_format.MessageToDict(msg, preserving_proto_field_name=True)  # type: ignore[arg-type]


class ActivationProjection:
    def fold(self, session: Session, own: OwnLog, env: Envelope) -> None:
        if is_a(env, ev.DestinationCreated):
            dest = unpack(env, ev.DestinationCreated).destination
            session.merge(DestinationRow(id=dest.id, name=dest.name, body=_dict(dest)))
        elif is_a(env, ev.PlanCreated):
            plan = unpack(env, ev.PlanCreated).plan
            session.merge(
                PlanRow(id=plan.id, destination_id=plan.destination, segment_id=plan.segment, body=_dict(plan))
            )
        elif is_a(env, ev.DeliveryCompleted):
            completed = unpack(env, ev.DeliveryCompleted)
            delivery = completed.delivery
            for profile_id in completed.added_profiles:
                session.merge(PlanMemberRow(plan_id=delivery.plan_id, profile_id=profile_id))
            if completed.removed_profiles:
                session.exec(
                    delete(PlanMemberRow).where(
                        col(PlanMemberRow.plan_id) == delivery.plan_id,
                        col(PlanMemberRow.profile_id).in_(list(completed.removed_profiles)),
                    )
                )
            at = from_timestamp(delivery.at)
            session.merge(
                DeliveryRow(
                    id=delivery.id,
                    plan_id=delivery.plan_id,
                    destination_id=delivery.destination,
                    body=_dict(delivery),
                    at=at,
                )
            )
            plan_row = session.get(PlanRow, delivery.plan_id)
            if plan_row is not None:
                plan_row.delivered_through = max(plan_row.delivered_through, delivery.through_sequence)
                plan_row.deliveries += 1
                session.add(plan_row)
        session.flush()
