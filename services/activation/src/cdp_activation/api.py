"""The activation gRPC servicer."""

from __future__ import annotations

from typing import Any

import grpc
import sqlalchemy as sa
from google.protobuf import json_format
from sqlmodel import Session, col, func, select

from cdp.activation.v1 import activation_pb2 as pb
from cdp.activation.v1 import activation_pb2_grpc as pb_grpc
from cdp_activation import credentials, store
from cdp_activation.connectors import connector_for
from cdp_activation.credentials import masked
from cdp_activation.handlers import ActivationHandlers
from cdp_kit.envelope import to_timestamp
from cdp_kit.errors import CdpError
from cdp_kit.keyring import KeyringError

Ctx = grpc.aio.ServicerContext[Any, Any]


def plan_stats(session: Session, plan: store.PlanRow, dest: store.DestinationRow) -> pb.DeliveryStats:
    stats = pb.DeliveryStats(destination=dest.id, destination_name=dest.name, plan_id=plan.id)
    latencies: list[float] = []
    table = store.BatchRow.__table__  # type: ignore[attr-defined]
    names = ("action", "status", "profiles", "retried", "activated", "latency_ms", "rejected")
    columns = sa.select(*(table.c[n] for n in names)).where(table.c.plan_id == plan.id)
    for action, status, profiles, retried, activated, latency, rejected in session.execute(columns):
        stats.retried += retried
        if action == "add":
            stats.received += profiles
        if status == "delivered":
            stats.batches_delivered += 1
            stats.activated += activated
            latencies.append(latency)
            for reason, n in rejected.items():
                stats.excluded[f"rejected: {reason}"] += int(n)
        elif status == "dead":
            stats.batches_dead += 1
            stats.failed += profiles
        else:
            stats.batches_pending += 1
    for reason in session.exec(select(store.ExclusionRow.reason).where(store.ExclusionRow.plan_id == plan.id)):
        stats.excluded[reason] += 1
        stats.received += 1
    if latencies:
        stats.latency_ms_avg = sum(latencies) / len(latencies)
        stats.latency_ms_max = max(latencies)
    stats.members = int(
        session.exec(
            select(func.count()).select_from(store.PlanMemberRow).where(store.PlanMemberRow.plan_id == plan.id)
        ).one()
    )
    connector = connector_for(store.destination_of(dest).connector)
    stats.warnings.extend(connector.warnings(stats.members) if stats.batches_delivered else [])
    return stats


def destination_total(dest: store.DestinationRow, plans: list[pb.DeliveryStats]) -> pb.DeliveryStats:
    total = pb.DeliveryStats(destination=dest.id, destination_name=dest.name)
    for s in plans:
        for name in (
            "received",
            "activated",
            "failed",
            "retried",
            "batches_delivered",
            "batches_pending",
            "batches_dead",
            "members",
        ):
            setattr(total, name, getattr(total, name) + getattr(s, name))
        for reason, n in s.excluded.items():
            total.excluded[reason] += n
        total.latency_ms_max = max(total.latency_ms_max, s.latency_ms_max)
        total.warnings.extend(s.warnings)
    delivered = [s for s in plans if s.batches_delivered]
    if delivered:
        weight = sum(s.batches_delivered for s in delivered)
        total.latency_ms_avg = sum(s.latency_ms_avg * s.batches_delivered for s in delivered) / weight
    return total


class ActivationServicer(pb_grpc.ActivationServiceServicer):
    def __init__(self, handlers: ActivationHandlers) -> None:
        self.handlers = handlers
        self.processor = handlers.processor

    async def CreateDestination(self, request: pb.CreateDestinationRequest, context: Ctx) -> pb.Destination:
        return await self.handlers.create_destination(request.destination)

    async def ListDestinations(self, request: pb.ListDestinationsRequest, context: Ctx) -> pb.ListDestinationsResponse:
        with self.processor.read() as session:
            rows = session.exec(select(store.DestinationRow).order_by(col(store.DestinationRow.name))).all()
            return pb.ListDestinationsResponse(
                destinations=[masked(store.destination_of(r), self.handlers.keyring) for r in rows]
            )

    async def Activate(self, request: pb.ActivateRequest, context: Ctx) -> pb.ActivationPlan:
        return await self.handlers.activate(request)

    async def ListPlans(self, request: pb.ListPlansRequest, context: Ctx) -> pb.ListPlansResponse:
        with self.processor.read() as session:
            rows = session.exec(select(store.PlanRow).order_by(col(store.PlanRow.id))).all()
            return pb.ListPlansResponse(plans=[store.plan_of(r) for r in rows])

    async def ListDeliveries(self, request: pb.ListDeliveriesRequest, context: Ctx) -> pb.ListDeliveriesResponse:
        with self.processor.read() as session:
            query = select(store.DeliveryRow).order_by(col(store.DeliveryRow.at), col(store.DeliveryRow.id))
            dest_filter = None
            if request.destination:
                dest = store.destination_by_key(session, request.destination)
                dest_filter = dest.id if dest else request.destination
                query = query.where(store.DeliveryRow.destination_id == dest_filter)
            deliveries = []
            for row in session.exec(query).all():
                delivery = pb.Delivery()
                json_format.ParseDict(row.body, delivery)
                deliveries.append(delivery)
            stats: list[pb.DeliveryStats] = []
            for dest_row in session.exec(select(store.DestinationRow).order_by(col(store.DestinationRow.name))):
                if dest_filter and dest_row.id != dest_filter:
                    continue
                plans = session.exec(
                    select(store.PlanRow)
                    .where(store.PlanRow.destination_id == dest_row.id)
                    .order_by(col(store.PlanRow.id))
                ).all()
                per_plan = [plan_stats(session, p, dest_row) for p in plans]
                total = destination_total(dest_row, per_plan)
                if problem := self._unreadable(dest_row):
                    total.warnings.append(problem)
                stats.append(total)
                stats.extend(per_plan)
            return pb.ListDeliveriesResponse(deliveries=deliveries, stats=stats)

    def _unreadable(self, row: store.DestinationRow) -> str:
        """Why this destination's secrets cannot be decrypted (so nothing is sent to it), or ""."""
        try:
            credentials.connector_config(store.destination_of(row), self.handlers.keyring)
        except KeyringError as exc:
            return f"secrets cannot be decrypted, deliveries wait: {exc}"
        except CdpError:
            return ""
        return ""

    async def ListDeadLetters(self, request: pb.ListDeadLettersRequest, context: Ctx) -> pb.ListDeadLettersResponse:
        with self.processor.read() as session:
            query = select(store.BatchRow).where(store.BatchRow.status == "dead")
            if request.destination:
                dest = store.destination_by_key(session, request.destination)
                query = query.where(store.BatchRow.destination_id == (dest.id if dest else request.destination))
            out = []
            for row in session.exec(query.order_by(col(store.BatchRow.prepared_at), col(store.BatchRow.id))):
                letter = pb.DeadLetter(
                    batch_id=row.id,
                    plan_id=row.plan_id,
                    destination=row.destination_id,
                    action=row.action,
                    profiles=row.profiles,
                    attempts=row.attempts,
                    reason=row.reason,
                    permanent=row.permanent,
                )
                if row.finished_at is not None:
                    letter.at.CopyFrom(to_timestamp(row.finished_at))
                out.append(letter)
            return pb.ListDeadLettersResponse(dead_letters=out)

    async def Redrive(self, request: pb.RedriveRequest, context: Ctx) -> pb.RedriveResponse:
        return await self.handlers.redrive(request)

    async def LabelData(self, request: pb.LabelDataRequest, context: Ctx) -> pb.DataLabel:
        return await self.handlers.label_data(request.label)

    async def CreatePolicy(self, request: pb.CreatePolicyRequest, context: Ctx) -> pb.Policy:
        return await self.handlers.create_policy(request.policy)

    async def RotateSecrets(self, request: pb.RotateSecretsRequest, context: Ctx) -> pb.RotateSecretsResponse:
        return await self.handlers.rotate_secrets()

    async def ListGovernance(self, request: pb.ListGovernanceRequest, context: Ctx) -> pb.ListGovernanceResponse:
        with self.processor.read() as session:
            labels = [
                pb.DataLabel(kind=r.kind, name=r.name, label=r.label)
                for r in session.exec(
                    select(store.LabelRow).order_by(col(store.LabelRow.kind), col(store.LabelRow.name))
                )
            ]
            policies = [
                pb.Policy(id=r.id, name=r.name, label=r.label, action=r.action)
                for r in session.exec(select(store.PolicyRow).order_by(col(store.PolicyRow.name)))
            ]
            return pb.ListGovernanceResponse(labels=labels, policies=policies)
