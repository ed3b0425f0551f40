"""The ``DeadLetterService`` every service serves: list its poison messages, and re-drive them."""

from __future__ import annotations

from typing import Any

import grpc

from cdp.common.v1 import deadletter_pb2 as dl
from cdp.common.v1 import deadletter_pb2_grpc
from cdp_kit import deadletters
from cdp_kit.errors import InvalidInput
from cdp_kit.grpc_server import Registration
from cdp_kit.processor import Processor

DEFAULT_LIMIT = 1000


class DeadLetterServicer(deadletter_pb2_grpc.DeadLetterServiceServicer):
    def __init__(self, processor: Processor) -> None:
        self.processor = processor

    async def ListDeadLetters(
        self, request: dl.ListDeadLettersRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> dl.ListDeadLettersResponse:
        with self.processor.read() as session:
            rows = deadletters.listed(
                session,
                request.consumer,
                include_redriven=request.include_redriven,
                limit=request.limit or DEFAULT_LIMIT,
            )
            counts = deadletters.counts(session)
        return dl.ListDeadLettersResponse(dead_letters=[deadletters.to_proto(row) for row in rows], counts=counts)

    async def RedriveDeadLetters(
        self, request: dl.RedriveDeadLettersRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> dl.RedriveDeadLettersResponse:
        if not request.request_id:
            raise InvalidInput("request_id is required: it makes a repeated redrive request harmless")
        with self.processor.read() as session:
            earlier = deadletters.earlier_request(session, request.request_id)
        if earlier is not None:
            # Idempotent per request id for all time, not only within JetStream's dedupe window:
            # a repeat would otherwise re-drive what the first request's redrive dead-lettered again.
            return dl.RedriveDeadLettersResponse(requested=earlier)
        known = {inp.spec.name for inp in self.processor.inputs}
        if request.consumer and request.consumer not in known:
            raise InvalidInput(f"no consumer {request.consumer!r} here (known: {', '.join(sorted(known))})")
        requested = await self.processor.request_redrive(request.consumer, list(request.sequences), request.request_id)
        return dl.RedriveDeadLettersResponse(requested=requested)


def registration(processor: Processor) -> Registration:
    name = dl.DESCRIPTOR.services_by_name["DeadLetterService"].full_name
    return Registration(
        name, deadletter_pb2_grpc.add_DeadLetterServiceServicer_to_server, DeadLetterServicer(processor)
    )
