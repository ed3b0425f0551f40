"""The gRPC server bootstrap: health checking, reflection, the admin status service,
TLS and per-RPC authorisation (``cdp_kit.grpc_auth``), error mapping in one interceptor, trace
context from metadata, graceful shutdown.

Health answers two questions under separate grpc.health.v1 service names, so a probe can ask
the one it means:

* ``liveness``: the process is worth keeping. SERVING as soon as the server runs: the answer
  comes from the event loop, so a check that gets one proves the loop still turns. Restarting
  cannot cure a stuck consumer or a NATS outage, so neither touches it.
* ``readiness``, ``""`` and every registered service's own name: the service can do its work
  (recovered, NATS connected, no consumer stuck). ``""`` keeps this meaning because it is what
  gRPC clients and load balancers ask by default before they route to a server.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection as reflection_module
from opentelemetry import context as otel_context

from cdp.common.v1 import admin_pb2, admin_pb2_grpc
from cdp_kit.errors import CdpError, InvalidInput, Unavailable, to_grpc_status
from cdp_kit.grpc_auth import AuthInterceptor, Reflection, ServerTls, TokenTable
from cdp_kit.telemetry import context_from, get_logger

log = get_logger(__name__)
if TYPE_CHECKING:  # generic only in the type stubs
    Handler = grpc.RpcMethodHandler[Any, Any]
else:
    Handler = grpc.RpcMethodHandler


@dataclass(frozen=True)
class Registration:
    """A servicer and the generated function that adds it to a server."""

    full_name: str
    add: Callable[[Any, grpc.aio.Server], None]
    servicer: Any
    # Methods that only read the store: a standby (cdp_kit.lease) serves them too, from its store
    # as far as it has followed the log (a read replica, CDP_FOLLOW_INTERVAL_S behind at most).
    replica_reads: frozenset[str] = frozenset()


LOGGED_ERROR_CHARS = 300


def _status_of(exc: BaseException, method: str) -> tuple[grpc.StatusCode, str]:
    status = to_grpc_status(exc)
    if isinstance(exc, CdpError):
        # Bounded: a refusal may quote what the caller sent (a 100 KB name), which a log need not hold.
        error = exc.message if len(exc.message) <= LOGGED_ERROR_CHARS else exc.message[:LOGGED_ERROR_CHARS] + "..."
        log.info("rpc_refused", method=method, code=status.code.name, error=error)
    else:
        log.error("rpc_failed", method=method, exc_info=exc)
    return status.code, status.details


def _metadata(context: grpc.aio.ServicerContext[Any, Any]) -> dict[str, str]:
    return {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}


class _Undecodable:
    """What a request that is not the method's message decodes to: refused with INVALID_ARGUMENT by
    the wrapped behavior (a deserializer that raises makes grpc answer UNKNOWN, "Unexpected ...")."""

    def __init__(self, error: Exception) -> None:
        self.error = error


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def decode(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:  # DecodeError, or whatever the message class raises on bad bytes
            return _Undecodable(exc)

    return decode


def _undecodable(request: Any, method: str) -> InvalidInput | None:
    if isinstance(request, _Undecodable):
        kind = type(request.error).__name__
        return InvalidInput(f"the request is not a valid message of {method} ({kind})")
    return None


async def _checked(requests: AsyncIterator[Any], method: str) -> AsyncIterator[Any]:
    """A request stream whose undecodable message ends the call with INVALID_ARGUMENT."""
    async for request in requests:
        refused = _undecodable(request, method)
        if refused is not None:
            raise refused
        yield request


Refusal = Callable[[str], "str | None"]
"""Why a method is refused right now (None: it is served): a standby refuses its service's RPCs."""


class ErrorInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Turns every exception into a gRPC status (via ``errors.to_grpc_status``), a request that is
    not the method's message into INVALID_ARGUMENT, and joins the caller's trace. With ``refusal``,
    a method it names a reason for is answered UNAVAILABLE with that reason."""

    def __init__(self, refusal: Refusal | None = None) -> None:
        self.refusal = refusal

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        kinds = (
            (handler.unary_unary, grpc.unary_unary_rpc_method_handler, False, False),
            (handler.stream_unary, grpc.stream_unary_rpc_method_handler, True, False),
            (handler.unary_stream, grpc.unary_stream_rpc_method_handler, False, True),
            (handler.stream_stream, grpc.stream_stream_rpc_method_handler, True, True),
        )
        for behavior, make, streamed_in, streamed_out in kinds:
            if behavior is None:
                continue
            wrap = _wrap_stream if streamed_out else _wrap_unary
            return make(
                wrap(behavior, method, streamed_in, self.refusal),
                request_deserializer=_tolerant(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        return handler


def _refused(refusal: Refusal | None, method: str) -> None:
    reason = refusal(method) if refusal is not None else None
    if reason is not None:
        raise Unavailable(reason)


def _wrap_unary(
    behavior: Callable[..., Any], method: str, streamed_in: bool, refusal: Refusal | None = None
) -> Callable[..., Awaitable[Any]]:
    async def call(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        token = otel_context.attach(context_from(_metadata(context)))
        try:
            _refused(refusal, method)
            refused = None if streamed_in else _undecodable(request, method)
            if refused is not None:
                raise refused
            return await behavior(_checked(request, method) if streamed_in else request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            code, details = _status_of(exc, method)
            await context.abort(code, details)
        finally:
            otel_context.detach(token)

    return call


def _wrap_stream(
    behavior: Callable[..., Any], method: str, streamed_in: bool, refusal: Refusal | None = None
) -> Callable[..., AsyncIterator[Any]]:
    async def call(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        try:
            _refused(refusal, method)
            refused = None if streamed_in else _undecodable(request, method)
            if refused is not None:
                raise refused
            async for item in behavior(_checked(request, method) if streamed_in else request, context):
                yield item
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            code, details = _status_of(exc, method)
            await context.abort(code, details)

    return call


LIVENESS = "liveness"
READINESS = "readiness"

StatusProvider = Callable[[], Awaitable[admin_pb2.ServiceStatus]]


class AdminServicer(admin_pb2_grpc.AdminServiceServicer):
    def __init__(self, status: StatusProvider) -> None:
        self._status = status

    async def GetStatus(
        self, request: admin_pb2.GetStatusRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> admin_pb2.ServiceStatus:
        return await self._status()


SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
    ("grpc.max_send_message_length", 16 * 1024 * 1024),
    ("grpc.so_reuseport", 0),
]


class GrpcServer:
    """The services' gRPC server.

    With ``tls`` it serves TLS only; with ``tokens`` every call but health needs a bearer token
    whose role the method allows (``cdp_kit.roles``). Both None: plaintext, everyone an admin
    (in-process tests and benches on loopback). ``health_port`` adds a plaintext listener that
    serves nothing but grpc.health.v1 (kubelet gRPC probes cannot speak TLS).
    """

    def __init__(
        self,
        host: str,
        port: int,
        registrations: Sequence[Registration],
        status: StatusProvider,
        *,
        tls: ServerTls | None = None,
        tokens: TokenTable | None = None,
        reflection: Reflection = "admin",
        health_port: int | None = None,
        refusal: Refusal | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.tls = tls
        self.registrations = list(registrations)
        self.health = health.aio.HealthServicer()  # type: ignore[attr-defined]
        self.auth = AuthInterceptor(tokens, reflection)
        self.server = grpc.aio.server(interceptors=[self.auth, ErrorInterceptor(refusal)], options=SERVER_OPTIONS)
        self.health_port = health_port
        self.health_server: grpc.aio.Server | None = None
        if health_port is not None:
            self.health_server = grpc.aio.server(options=SERVER_OPTIONS)
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self.health_server)
        for reg in self.registrations:
            reg.add(reg.servicer, self.server)
        admin_pb2_grpc.add_AdminServiceServicer_to_server(AdminServicer(status), self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        names = [
            *(r.full_name for r in self.registrations),
            admin_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection_module.SERVICE_NAME,
        ]
        if reflection != "off":
            reflection_module.enable_server_reflection(names, self.server)
        self.bound_port = 0
        self.bound_health_port = 0

    async def start(self) -> int:
        address = f"{self.host}:{self.port}"
        if self.tls is not None:
            self.bound_port = self.server.add_secure_port(address, self.tls.credentials())
        else:
            self.bound_port = self.server.add_insecure_port(address)
        if self.bound_port == 0:
            raise OSError(f"cannot bind gRPC on {address}")
        if self.health_server is not None:
            self.bound_health_port = self.health_server.add_insecure_port(f"{self.host}:{self.health_port}")
            if self.bound_health_port == 0:
                raise OSError(f"cannot bind the gRPC health port on {self.host}:{self.health_port}")
        await self.health.set(LIVENESS, health_pb2.HealthCheckResponse.SERVING)
        await self.set_serving(False)
        await self.server.start()
        if self.health_server is not None:
            await self.health_server.start()
        return self.bound_port

    def readiness_names(self) -> list[str]:
        """Every health service name that answers readiness."""
        return ["", READINESS, *(reg.full_name for reg in self.registrations)]

    async def set_serving(self, serving: bool) -> None:
        """Readiness: SERVING when the service can do its work. Liveness is left alone."""
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in self.readiness_names():
            await self.health.set(name, status)

    async def stop(self, grace: float) -> None:
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
        if self.health_server is not None:
            await self.health_server.stop(0)
