"""gRPC security on a real grpc.aio server over TLS on loopback: no credentials is UNAUTHENTICATED,
a role that does not cover the method is PERMISSION_DENIED, health stays open, reflection is
for admins, and a servicer can ask whether its caller has a role."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from cdp.activation.v1 import activation_pb2 as act
from cdp.activation.v1 import activation_pb2_grpc as act_grpc
from cdp.common.v1 import admin_pb2, admin_pb2_grpc
from cdp.segmentation.v1 import segmentation_pb2 as seg
from cdp.segmentation.v1 import segmentation_pb2_grpc as seg_grpc
from cdp_cli.client import open_aio_channel, stack_channel
from cdp_kit import grpc_auth
from cdp_kit.access import require_role
from cdp_kit.errors import PermissionDenied
from cdp_kit.grpc_auth import ClientAuth, LocalSecrets, ServerTls, TokenTable, ensure_local_secrets
from cdp_kit.grpc_server import GrpcServer, Registration
from cdp_kit.roles import OPERATOR, Role

ACTIVATION = act.DESCRIPTOR.services_by_name["ActivationService"].full_name
SEGMENTATION = seg.DESCRIPTOR.services_by_name["SegmentationService"].full_name


class Activation(act_grpc.ActivationServiceServicer):
    """A stand-in servicer: the server, TLS and interceptors around it are the real ones."""

    async def CreateDestination(  # noqa: N802 (the proto's name)
        self, request: act.CreateDestinationRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> act.Destination:
        return act.Destination(name=request.destination.name)

    async def ListDeadLetters(  # noqa: N802
        self, request: act.ListDeadLettersRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> act.ListDeadLettersResponse:
        # what the masking asks: raw rejected values for operators only
        who = grpc_auth.caller()
        reason = f"{who.name if who else '-'}:{'raw' if may(OPERATOR) else 'masked'}"
        return act.ListDeadLettersResponse(dead_letters=[act.DeadLetter(reason=reason)])


def may(role: Role) -> bool:
    """What a servicer's guard says for the current caller (no deployment setting)."""
    try:
        require_role(None, role, allowed_by_setting=False)
    except PermissionDenied:
        return False
    return True


class Segmentation(seg_grpc.SegmentationServiceServicer):
    async def EvaluateSegment(  # noqa: N802
        self, request: seg.EvaluateSegmentRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[seg.EvaluationProgress]:
        yield seg.EvaluationProgress(profiles_done=1)
        yield seg.EvaluationProgress(profiles_done=2, done=may(OPERATOR))


async def status() -> admin_pb2.ServiceStatus:
    return admin_pb2.ServiceStatus(service="test", ready=True)


@pytest.fixture
def local(tmp_path: Path) -> LocalSecrets:
    return ensure_local_secrets(tmp_path / "data")


@pytest.fixture
async def server(local: LocalSecrets) -> AsyncIterator[GrpcServer]:
    leaf = local.pki.leaf(grpc_auth.GRPC_LEAF)
    registrations = [
        Registration(ACTIVATION, act_grpc.add_ActivationServiceServicer_to_server, Activation()),  # type: ignore[abstract]
        Registration(SEGMENTATION, seg_grpc.add_SegmentationServiceServicer_to_server, Segmentation()),  # type: ignore[abstract]
    ]
    srv = GrpcServer(
        "127.0.0.1",
        0,
        registrations,
        status,
        tls=ServerTls.load(leaf.cert, leaf.key),
        tokens=TokenTable.load(local.tokens_file),
        health_port=0,
    )
    await srv.start()
    await srv.set_serving(True)
    try:
        yield srv
    finally:
        await srv.stop(0.5)


def address(server: GrpcServer) -> str:
    return f"127.0.0.1:{server.bound_port}"


def tls_only(local: LocalSecrets, server: GrpcServer) -> grpc.aio.Channel:
    ca = local.pki.ca_cert.read_bytes()
    return grpc.aio.secure_channel(address(server), grpc.ssl_channel_credentials(root_certificates=ca))


def destination() -> act.CreateDestinationRequest:
    return act.CreateDestinationRequest(destination=act.Destination(name="hook", connector="webhook"))


async def code_of(call: Any) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value.code()


async def test_a_call_without_credentials_is_unauthenticated(local: LocalSecrets, server: GrpcServer) -> None:
    async with tls_only(local, server) as channel:
        stub = act_grpc.ActivationServiceStub(channel)
        assert await code_of(stub.CreateDestination(destination())) == grpc.StatusCode.UNAUTHENTICATED
        admin = admin_pb2_grpc.AdminServiceStub(channel)
        assert await code_of(admin.GetStatus(admin_pb2.GetStatusRequest())) == grpc.StatusCode.UNAUTHENTICATED
        evaluate = seg_grpc.SegmentationServiceStub(channel).EvaluateSegment(seg.EvaluateSegmentRequest())
        assert await code_of(evaluate.read()) == grpc.StatusCode.UNAUTHENTICATED


async def test_garbage_without_credentials_is_unauthenticated_not_decoded(
    local: LocalSecrets, server: GrpcServer
) -> None:
    """A stranger's bytes are refused before they are read: UNAUTHENTICATED, not a decode error
    naming the request's message type."""
    async with tls_only(local, server) as channel:
        raw = channel.unary_unary(f"/{ACTIVATION}/CreateDestination", None, None)
        for garbage in (b"\x00", b"\xff" * 64):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await raw(garbage)
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "CreateDestination" not in (caught.value.details() or "")


async def test_an_unknown_or_malformed_token_is_unauthenticated(local: LocalSecrets, server: GrpcServer) -> None:
    async with tls_only(local, server) as channel:
        stub = act_grpc.ActivationServiceStub(channel)
        for value in ["Bearer not-a-token", "Basic YWRtaW46YWRtaW4=", f"Bearer {local.token('admin')}x"]:
            call = stub.CreateDestination(destination(), metadata=(("authorization", value),))
            assert await code_of(call) == grpc.StatusCode.UNAUTHENTICATED, value


async def test_a_reader_creating_a_destination_is_permission_denied(local: LocalSecrets, server: GrpcServer) -> None:
    async with stack_channel(local.root.parent, address(server), "reader") as channel:
        stub = act_grpc.ActivationServiceStub(channel)
        assert await code_of(stub.CreateDestination(destination())) == grpc.StatusCode.PERMISSION_DENIED
        # what a reader may do, it does
        status_reply = await admin_pb2_grpc.AdminServiceStub(channel).GetStatus(admin_pb2.GetStatusRequest())
        assert status_reply.service == "test"


@pytest.mark.parametrize(
    ("role", "allowed"), [("admin", True), ("operator", False), ("reader", False), ("publisher", False)]
)
async def test_creating_a_destination_needs_admin(
    local: LocalSecrets, server: GrpcServer, role: Role, allowed: bool
) -> None:
    async with stack_channel(local.root.parent, address(server), role) as channel:
        call = act_grpc.ActivationServiceStub(channel).CreateDestination(destination())
        if allowed:
            assert (await call).name == "hook"
        else:
            assert await code_of(call) == grpc.StatusCode.PERMISSION_DENIED


@pytest.mark.parametrize(("role", "allowed"), [("operator", True), ("admin", True), ("reader", False)])
async def test_a_streaming_rpc_is_checked_too(
    local: LocalSecrets, server: GrpcServer, role: Role, allowed: bool
) -> None:
    async with stack_channel(local.root.parent, address(server), role) as channel:
        call = seg_grpc.SegmentationServiceStub(channel).EvaluateSegment(seg.EvaluateSegmentRequest())
        if allowed:
            replies = [reply async for reply in call]
            assert [r.profiles_done for r in replies] == [1, 2]
            assert replies[-1].done
        else:
            assert await code_of(call.read()) == grpc.StatusCode.PERMISSION_DENIED


@pytest.mark.parametrize(
    ("role", "seen"), [("reader", "cdp-reader:masked"), ("operator", "cdp-operator:raw"), ("admin", "cdp-admin:raw")]
)
async def test_a_servicer_can_ask_the_callers_role(
    local: LocalSecrets, server: GrpcServer, role: Role, seen: str
) -> None:
    async with stack_channel(local.root.parent, address(server), role) as channel:
        reply = await act_grpc.ActivationServiceStub(channel).ListDeadLetters(act.ListDeadLettersRequest())
        assert [d.reason for d in reply.dead_letters] == [seen]


async def test_health_is_open_without_a_token_on_tls_and_on_the_plaintext_health_port(
    local: LocalSecrets, server: GrpcServer
) -> None:
    async with tls_only(local, server) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="readiness"))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.bound_health_port}") as plain:
        reply = await health_pb2_grpc.HealthStub(plain).Check(health_pb2.HealthCheckRequest(service="liveness"))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        # the health port serves health only
        call = act_grpc.ActivationServiceStub(plain).CreateDestination(destination())
        assert await code_of(call) == grpc.StatusCode.UNIMPLEMENTED


async def test_plaintext_to_the_tls_port_gets_nothing(server: GrpcServer) -> None:
    async with grpc.aio.insecure_channel(address(server)) as channel:
        call = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert await code_of(call) == grpc.StatusCode.UNAVAILABLE


async def test_a_client_trusting_another_authority_is_refused(tmp_path: Path, server: GrpcServer) -> None:
    other = ensure_local_secrets(tmp_path / "other")
    async with open_aio_channel(address(server), other.client("admin")) as channel:
        call = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert await code_of(call) == grpc.StatusCode.UNAVAILABLE


async def list_services(channel: grpc.aio.Channel) -> list[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    async for reply in stub.ServerReflectionInfo(iter([request])):
        return [s.name for s in reply.list_services_response.service]
    return []


@pytest.mark.parametrize(("role", "allowed"), [("admin", True), ("reader", False), ("publisher", False)])
async def test_reflection_is_for_admins(local: LocalSecrets, server: GrpcServer, role: Role, allowed: bool) -> None:
    async with stack_channel(local.root.parent, address(server), role) as channel:
        if allowed:
            assert ACTIVATION in await list_services(channel)
        else:
            assert await code_of(list_services(channel)) == grpc.StatusCode.PERMISSION_DENIED


async def test_a_method_missing_from_the_table_is_denied_to_every_role(local: LocalSecrets) -> None:
    interceptor = grpc_auth.AuthInterceptor(TokenTable.load(local.tokens_file))
    metadata = (("authorization", f"Bearer {local.token('admin')}"),)
    refused = interceptor.decide("/cdp.activation.v1.ActivationService/DropEverything", metadata)
    assert isinstance(refused, grpc_auth.Refusal)
    assert refused.code == grpc.StatusCode.PERMISSION_DENIED
    allowed = interceptor.decide("/cdp.activation.v1.ActivationService/CreateDestination", metadata)
    assert allowed == grpc_auth.Principal("cdp-admin", "admin")


def test_client_auth_reads_the_stack_secrets(local: LocalSecrets) -> None:
    auth = local.client("publisher")
    assert isinstance(auth, ClientAuth)
    assert auth.token == local.token("publisher")
    assert auth.ca == local.pki.ca_cert.read_bytes()
