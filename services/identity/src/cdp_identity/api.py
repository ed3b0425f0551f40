"""The identity gRPC servicer."""

from __future__ import annotations

from typing import Any

import grpc

from cdp.common.v1.envelope_pb2 import IdentityValue
from cdp.identity.v1 import identity_pb2 as pb
from cdp.identity.v1 import identity_pb2_grpc as pb_grpc
from cdp_identity import store
from cdp_identity.domain import normalise
from cdp_kit.errors import InvalidInput, NotFound, Violation
from cdp_kit.processor import Processor
from cdp_kit.telemetry import pii_hash

Ctx = grpc.aio.ServicerContext[Any, Any]


class IdentityServicer(pb_grpc.IdentityServiceServicer):
    def __init__(self, processor: Processor) -> None:
        self.processor = processor

    async def Resolve(self, request: pb.ResolveRequest, context: Ctx) -> pb.ResolveResponse:
        ns = request.identity.namespace
        value = normalise(ns, request.identity.value)
        if not ns or value is None:
            raise InvalidInput("invalid identity", [Violation("identity", "valid", "namespace and a valid value")])
        with self.processor.read() as session:
            row = session.get(store.IdentityRow, (ns, value))
            if row is None:
                raise NotFound(f"no profile for {ns} {pii_hash(value)}")
            idents = store.identities_of(session, row.profile_id)
        return pb.ResolveResponse(
            profile_id=row.profile_id,
            identities=[IdentityValue(namespace=i.namespace, value=i.value) for i in idents],
        )
