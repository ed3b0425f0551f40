"""The gRPC bootstrap on a real grpc.aio server: errors mapped in one place, health that tells
the truth, reflection, the admin status, and trace context carried from gRPC metadata onto the log."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from opentelemetry import trace

from cdp.common.v1 import admin_pb2, admin_pb2_grpc
from cdp.common.v1.envelope_pb2 import IdentityValue
from cdp.identity.v1 import identity_pb2, identity_pb2_grpc
from cdp_kit.errors import InvalidInput, NotFound, Violation
from cdp_kit.eventlog import EventLog
from cdp_kit.grpc_server import LIVENESS, READINESS, GrpcServer, Registration
from cdp_kit.streams import INGEST
from cdp_kit.telemetry import configure_tracing, trace_headers

IDENTITY = identity_pb2.DESCRIPTOR.services_by_name["IdentityService"].full_name


class Scripted(identity_pb2_grpc.IdentityServiceServicer):
    """Resolve raises what the request's namespace names; 'trace' appends to the log under the caller's trace."""

    def __init__(self, log: EventLog | None = None) -> None:
        self.log = log

    async def Resolve(  # noqa: N802 (the proto's name)
        self, request: identity_pb2.ResolveRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> identity_pb2.ResolveResponse:
        ns = request.identity.namespace
        if ns == "invalid":
            raise InvalidInput("bad identity", [Violation("identity.value", "email", "not an address", "request 1")])
        if ns == "missing":
            raise NotFound("no profile for email h:0123")
        if ns == "boom":
            raise RuntimeError("secret internal detail jane@example.com")
        if ns == "trace" and self.log is not None:
            await self.log.append("cdp.ingest.0.records", [], msg_id="traced", headers=trace_headers())
        return identity_pb2.ResolveResponse(profile_id="p-1")


async def status() -> admin_pb2.ServiceStatus:
    return admin_pb2.ServiceStatus(service="test", ready=True)


@pytest.fixture
async def server(eventlog: EventLog) -> AsyncIterator[GrpcServer]:
    servicer = Scripted(eventlog)  # type: ignore[abstract]  # only Resolve is exercised
    registration = Registration(IDENTITY, identity_pb2_grpc.add_IdentityServiceServicer_to_server, servicer)
    srv = GrpcServer("127.0.0.1", 0, [registration], status)
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop(0.5)


@pytest.fixture
async def channel(server: GrpcServer) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.bound_port}") as ch:
        yield ch


async def resolve(channel: grpc.aio.Channel, ns: str, metadata: tuple[tuple[str, str], ...] = ()) -> str:
    stub = identity_pb2_grpc.IdentityServiceStub(channel)
    reply = await stub.Resolve(
        identity_pb2.ResolveRequest(identity=IdentityValue(namespace=ns, value="x")), metadata=metadata
    )
    return str(reply.profile_id)


@pytest.mark.parametrize(
    ("namespace", "code", "text"),
    [
        ("invalid", grpc.StatusCode.INVALID_ARGUMENT, "request 1: identity.value: email: not an address"),
        ("missing", grpc.StatusCode.NOT_FOUND, "no profile for email h:0123"),
        ("boom", grpc.StatusCode.INTERNAL, "internal error (RuntimeError)"),
    ],
)
async def test_errors_become_statuses(
    channel: grpc.aio.Channel, namespace: str, code: grpc.StatusCode, text: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await resolve(channel, namespace)
    assert caught.value.code() == code
    assert text in (caught.value.details() or "")


async def test_internal_errors_leak_nothing(channel: grpc.aio.Channel) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await resolve(channel, "boom")
    assert "jane@example.com" not in (caught.value.details() or "")
    assert "secret" not in (caught.value.details() or "")


async def test_readiness_is_not_serving_until_told(server: GrpcServer, channel: grpc.aio.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", READINESS, IDENTITY):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
    await server.set_serving(True)
    for service in ("", READINESS, IDENTITY):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_liveness_does_not_follow_readiness(server: GrpcServer, channel: grpc.aio.Channel) -> None:
    """A service that cannot do its work (not ready) is still alive: restarting it would not help."""
    health = health_pb2_grpc.HealthStub(channel)
    for serving in (False, True, False):
        await server.set_serving(serving)
        live = await health.Check(health_pb2.HealthCheckRequest(service=LIVENESS))
        ready = await health.Check(health_pb2.HealthCheckRequest(service=READINESS))
        assert live.status == health_pb2.HealthCheckResponse.SERVING
        assert (ready.status == health_pb2.HealthCheckResponse.SERVING) is serving


async def test_reflection_lists_every_service(channel: grpc.aio.Channel) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    call = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = set()
    async for reply in call:
        names |= {s.name for s in reply.list_services_response.service}
    assert {IDENTITY, "cdp.common.v1.AdminService", "grpc.health.v1.Health"} <= names


async def test_admin_status_is_served(channel: grpc.aio.Channel) -> None:
    reply = await admin_pb2_grpc.AdminServiceStub(channel).GetStatus(admin_pb2.GetStatusRequest())
    assert reply.service == "test"
    assert reply.ready


async def test_trace_context_travels_from_grpc_metadata_to_nats_headers(
    channel: grpc.aio.Channel, eventlog: EventLog
) -> None:
    configure_tracing("test")
    with trace.get_tracer("test").start_as_current_span("client") as span:
        trace_id = format(span.get_span_context().trace_id, "032x")
        metadata = tuple(trace_headers().items())
    await resolve(channel, "trace", metadata)
    [msg] = [m async for m in eventlog.read(INGEST.name, "cdp.ingest.0.records", 1)]
    assert msg.headers["traceparent"].split("-")[1] == trace_id


GARBAGE = [b"\x00", b"\xff" * 64, b"\n\xff\xff\xff\xff\x0fxx", bytes(range(256))]


async def test_bytes_that_are_not_the_request_message_are_invalid_argument(channel: grpc.aio.Channel) -> None:
    """grpc answers UNKNOWN ("Unexpected DecodeError") when a request does not decode; the kit
    answers INVALID_ARGUMENT, names the method and not the bytes, and the server goes on serving."""
    raw = channel.unary_unary(f"/{IDENTITY}/Resolve", None, None)  # no serializer: the bytes go as they are
    for garbage in GARBAGE:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await raw(garbage)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, garbage
        assert "not a valid message" in (caught.value.details() or "")
    assert await resolve(channel, "ok") == "p-1"
