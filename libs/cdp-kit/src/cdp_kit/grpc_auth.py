"""gRPC authentication and authorisation: bearer tokens checked, and roles enforced, in one interceptor.

A token is ``secrets.token_urlsafe(32)`` (256 random bits). Servers never hold tokens, only their
SHA-256 (a plain hash suffices for a high-entropy token: there is nothing to guess), in a JSON
file named by ``CDP_GRPC_TOKENS_FILE``::

    {"<sha256 hex of the token>": {"principal": "cdp-admin", "role": "admin"}, ...}

A client sends ``authorization: Bearer <token>``; the interceptor hashes it, looks the hash up
(``hmac.compare_digest`` against every stored hash, so the lookup leaks nothing a timing
could use) and checks the caller's role against :data:`cdp_kit.roles.METHOD_ROLES`. Missing or
unknown credentials give UNAUTHENTICATED; a known caller without the role, PERMISSION_DENIED.

Servicers ask about the caller with :func:`caller`, and guard an operation with
:func:`cdp_kit.access.require_role` (e.g. raw rejected values for operators only).

The embedded stack's secrets (``<data_dir>/secrets``, 0700) are made by
:func:`ensure_local_secrets`: a PKI (``secrets/pki``, via :mod:`cdp_kit.certs`) whose ``grpc``
leaf serves every service, and one token file per role in ``secrets/tokens`` with the table
the services load.
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import json
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import grpc

from cdp_kit.certs import DEFAULT_HOSTS, Pki
from cdp_kit.private import private_dir, write_private
from cdp_kit.roles import METHOD_ROLES, OPEN_SERVICES, REFLECTION_SERVICES, ROLES, Role, grants, service_of
from cdp_kit.telemetry import get_logger

if TYPE_CHECKING:
    Handler = grpc.RpcMethodHandler[Any, Any]
else:
    Handler = grpc.RpcMethodHandler

log = get_logger(__name__)

Reflection = Literal["admin", "open", "off"]
GRPC_LEAF = "grpc"
TOKENS_TABLE = "tokens.json"
TOKEN_SUFFIX = ".token"


@dataclass(frozen=True)
class Principal:
    """Who calls: a name for logs and audit, and the role the token was issued for."""

    name: str
    role: Role


# Set for the duration of each RPC by the interceptor; None outside an RPC.
_CALLER: contextvars.ContextVar[Principal | None] = contextvars.ContextVar("cdp_grpc_caller", default=None)
# Security off (a trusted loopback, e.g. in-process tests): every caller counts as this.
ANONYMOUS = Principal("anonymous", "admin")


def caller() -> Principal | None:
    """The authenticated caller of the current RPC (None outside an RPC)."""
    return _CALLER.get()


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class TokenTable:
    """The hashes of the tokens a server accepts, with their principals and roles."""

    def __init__(self, entries: Mapping[str, Principal]) -> None:
        self._entries = dict(entries)

    def __len__(self) -> int:
        return len(self._entries)

    @classmethod
    def load(cls, path: Path) -> TokenTable:
        try:
            raw = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot read the gRPC tokens file {path}: {exc}") from exc
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: expected an object of sha256 hex -> {{principal, role}}")
        entries: dict[str, Principal] = {}
        for digest, entry in raw.items():
            if not isinstance(digest, str) or len(digest) != 64 or not isinstance(entry, dict):
                raise ValueError(f"{path}: every key is a sha256 hex digest and every value an object")
            role = entry.get("role")
            name = entry.get("principal")
            if role not in ROLES or not isinstance(name, str) or not name:
                raise ValueError(f"{path}: entry for principal {name!r} has no valid role (one of {', '.join(ROLES)})")
            entries[digest.lower()] = Principal(name, role)
        return cls(entries)

    def verify(self, token: str) -> Principal | None:
        """The principal of ``token``, or None. Compares against every entry with
        ``hmac.compare_digest`` and no early exit (a table holds a handful of tokens)."""
        digest = token_hash(token).encode()
        found: Principal | None = None
        for key, principal in self._entries.items():
            if hmac.compare_digest(digest, key.encode()):
                found = principal
        return found


def _bearer(metadata: Any) -> str | None:
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str):
            scheme, _, token = value.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
            return None
    return None


@dataclass(frozen=True)
class Refusal:
    code: grpc.StatusCode
    details: str


class AuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Authenticates every call by bearer token and authorises it by :data:`METHOD_ROLES`.

    ``tokens=None`` turns security off: every caller is :data:`ANONYMOUS` (an admin).
    """

    def __init__(self, tokens: TokenTable | None, reflection: Reflection = "admin") -> None:
        self.tokens = tokens
        self.reflection = reflection

    def decide(self, method: str, metadata: Any) -> Principal | Refusal | None:
        """The caller (allowed), a refusal, or None for an open method."""
        service = service_of(method)
        if service in OPEN_SERVICES:
            return None
        if service in REFLECTION_SERVICES:
            if self.reflection == "off":
                return Refusal(grpc.StatusCode.PERMISSION_DENIED, "server reflection is off")
            if self.reflection == "open":
                return None
            needed: Role | None = "admin"
        else:
            needed = METHOD_ROLES.get(method)
        if self.tokens is None:
            who: Principal = ANONYMOUS
        else:
            token = _bearer(metadata)
            if token is None:
                return Refusal(
                    grpc.StatusCode.UNAUTHENTICATED, "missing credentials: send 'authorization: Bearer <token>'"
                )
            found = self.tokens.verify(token)
            if found is None:
                return Refusal(grpc.StatusCode.UNAUTHENTICATED, "unknown token")
            who = found
        if needed is None:
            log.warning("rpc_denied", method=method, principal=who.name, reason="method not in the role table")
            return Refusal(grpc.StatusCode.PERMISSION_DENIED, f"{method} is not open to any role")
        if not grants(who.role, needed):
            log.info("rpc_denied", method=method, principal=who.name, role=who.role, needed=needed)
            return Refusal(grpc.StatusCode.PERMISSION_DENIED, f"{method} needs the {needed} role ({who.role} has not)")
        return who

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        decision = self.decide(handler_call_details.method, handler_call_details.invocation_metadata)
        if decision is None:
            return handler
        return _rewrap(handler, decision)


def _rewrap(handler: Handler, decision: Principal | Refusal) -> Handler:
    kinds = (
        (handler.unary_unary, grpc.unary_unary_rpc_method_handler, False),
        (handler.stream_unary, grpc.stream_unary_rpc_method_handler, False),
        (handler.unary_stream, grpc.unary_stream_rpc_method_handler, True),
        (handler.stream_stream, grpc.stream_stream_rpc_method_handler, True),
    )
    for behavior, make, streaming in kinds:
        if behavior is None:
            continue
        if isinstance(decision, Refusal):
            # A refused call never reads its request: left as bytes, it is refused as such (a
            # stranger's garbage gets UNAUTHENTICATED, not a decode error naming the message).
            refuse = _refuse_stream(decision) if streaming else _refuse_unary(decision)
            return make(refuse, request_deserializer=None, response_serializer=handler.response_serializer)
        wrapped = _as_stream(behavior, decision) if streaming else _as_unary(behavior, decision)
        return make(
            wrapped,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    return handler


def _as_unary(behavior: Callable[..., Any], who: Principal) -> Callable[..., Awaitable[Any]]:
    async def call(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        _CALLER.set(who)  # each RPC runs in its own task, with its own copy of the context
        return await behavior(request, context)

    return call


def _as_stream(behavior: Callable[..., Any], who: Principal) -> Callable[..., AsyncIterator[Any]]:
    async def call(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        _CALLER.set(who)
        async for item in behavior(request, context):
            yield item

    return call


def _refuse_unary(refusal: Refusal) -> Callable[..., Awaitable[Any]]:
    async def call(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(refusal.code, refusal.details)

    return call


def _refuse_stream(refusal: Refusal) -> Callable[..., AsyncIterator[Any]]:
    async def call(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        await context.abort(refusal.code, refusal.details)
        yield  # pragma: no cover - makes this an async generator

    return call


# ----------------------------------------------------------------------------- TLS material


@dataclass(frozen=True)
class ServerTls:
    """PEM bytes a server needs: its certificate chain and key."""

    cert: bytes
    key: bytes

    @classmethod
    def load(cls, cert_file: Path, key_file: Path) -> ServerTls:
        return cls(Path(cert_file).read_bytes(), Path(key_file).read_bytes())

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials([(self.key, self.cert)])


@dataclass(frozen=True)
class ClientAuth:
    """What a client needs: the authority that signed the servers' certificates, and a token."""

    ca: bytes = field(repr=False)
    token: str = field(repr=False)  # never in a log or a traceback's locals repr

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.composite_channel_credentials(
            grpc.ssl_channel_credentials(root_certificates=self.ca),
            grpc.access_token_call_credentials(self.token),
        )

    def tls_only(self) -> grpc.ChannelCredentials:
        """TLS without a token (health checks)."""
        return grpc.ssl_channel_credentials(root_certificates=self.ca)


# ----------------------------------------------------------------------------- local secrets


@dataclass(frozen=True)
class LocalSecrets:
    """The gRPC secrets of an embedded stack under ``<data_dir>/secrets``."""

    root: Path

    @property
    def pki(self) -> Pki:
        return Pki(self.root / "pki")

    @property
    def tokens_dir(self) -> Path:
        return self.root / "tokens"

    @property
    def tokens_file(self) -> Path:
        return self.tokens_dir / TOKENS_TABLE

    def token_file(self, role: Role) -> Path:
        return self.tokens_dir / f"{role}{TOKEN_SUFFIX}"

    def token(self, role: Role) -> str:
        return self.token_file(role).read_text().strip()

    def client(self, role: Role = "admin") -> ClientAuth:
        return ClientAuth(self.pki.ca_cert.read_bytes(), self.token(role))

    def server_env(self) -> dict[str, str]:
        """The CDP_GRPC_* settings a service of this stack runs with."""
        leaf = self.pki.leaf(GRPC_LEAF)
        return {
            "CDP_GRPC_TLS_CERT_FILE": str(leaf.cert),
            "CDP_GRPC_TLS_KEY_FILE": str(leaf.key),
            "CDP_GRPC_TOKENS_FILE": str(self.tokens_file),
            "CDP_GRPC_INSECURE": "false",
        }

    def exists(self) -> bool:
        return self.pki.ca_cert.exists() and self.tokens_file.exists()


def secrets_of(data_dir: Path) -> LocalSecrets:
    return LocalSecrets(Path(data_dir) / "secrets")


def ensure_local_secrets(data_dir: Path, hosts: tuple[str, ...] = DEFAULT_HOSTS) -> LocalSecrets:
    """Create (once; later calls keep what exists) the CA, the ``grpc`` serving certificate and a
    token per role under ``<data_dir>/secrets``: directories 0700, files 0600."""
    local = secrets_of(data_dir)
    private_dir(local.root)
    private_dir(local.pki.dir)
    local.pki.ensure(GRPC_LEAF, hosts, server=True, client=False)
    private_dir(local.tokens_dir)
    table: dict[str, dict[str, str]] = {}
    if local.tokens_file.exists():
        table = json.loads(local.tokens_file.read_text())
    known = {entry.get("principal") for entry in table.values()}
    for role in ROLES:
        principal = f"cdp-{role}"
        path = local.token_file(role)
        if path.exists() and principal in known:
            continue
        token = secrets.token_urlsafe(32)
        table = {k: v for k, v in table.items() if v.get("principal") != principal}
        table[token_hash(token)] = {"principal": principal, "role": role}
        write_private(path, token + "\n")
    write_private(local.tokens_file, json.dumps(table, indent=2, sort_keys=True) + "\n")
    return local
