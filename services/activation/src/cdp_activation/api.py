"""The activation gRPC servicer."""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf import json_format
from sqlmodel import col, select

from cdp.activation.v1 import activation_pb2 as pb
from cdp.activation.v1 import activation_pb2_grpc as pb_grpc
from cdp_activation import store
from cdp_activation.handlers import ActivationHandlers, masked

Ctx = grpc.aio.ServicerContext[Any, Any]


class ActivationServicer(pb_grpc.ActivationServiceServicer):
    def __init__(self, handlers: ActivationHandlers) -> None:
        self.handlers = handlers
        self.processor = handlers.processor

    async def CreateDestination(self, request: pb.CreateDestinationRequest, context: Ctx) -> pb.Destination:
        return await self.handlers.create_destination(request.destination)

    async def ListDestinations(self, request: pb.ListDestinationsRequest, context: Ctx) -> pb.ListDestinationsResponse:
        with self.processor.read() as session:
            rows = session.exec(select(store.DestinationRow).order_by(col(store.DestinationRow.name))).all()
            return pb.ListDestinationsResponse(destinations=[masked(store.destination_of(r)) for r in rows])

    async def Activate(self, request: pb.ActivateRequest, context: Ctx) -> pb.ActivationPlan:
        return await self.handlers.activate(request)

    async def ListPlans(self, request: pb.ListPlansRequest, context: Ctx) -> pb.ListPlansResponse:
        with self.processor.read() as session:
            rows = session.exec(select(store.PlanRow).order_by(col(store.PlanRow.id))).all()
            return pb.ListPlansResponse(plans=[store.plan_of(r) for r in rows])

    async def ListDeliveries(self, request: pb.ListDeliveriesRequest, context: Ctx) -> pb.ListDeliveriesResponse:
        with self.processor.read() as session:
            query = select(store.DeliveryRow).order_by(col(store.DeliveryRow.at), col(store.DeliveryRow.id))
            if request.destination:
                dest = store.destination_by_key(session, request.destination)
                query = query.where(store.DeliveryRow.destination_id == (dest.id if dest else request.destination))
            rows = session.exec(query).all()
            deliveries = []
            for row in rows:
                delivery = pb.Delivery()
                json_format.ParseDict(row.body, delivery)
                deliveries.append(delivery)
            return pb.ListDeliveriesResponse(deliveries=deliveries)
