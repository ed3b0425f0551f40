"""Finding the services and talking gRPC to them.

An address is taken, in this order, from an explicit mapping (``--addr SERVICE=HOST:PORT``),
from the environment (``CDP_<SERVICE>_ADDR``) or from ``<data_dir>/stack.json`` that
``cdp up`` writes.

Credentials (docs/security.md) are taken from ``CDP_GRPC_CA_FILE`` and ``CDP_GRPC_TOKEN_FILE``
when set, else from the secrets ``cdp up`` wrote under ``<data_dir>/secrets`` (the admin token);
with neither, channels are plaintext (a service run with CDP_GRPC_INSECURE=true).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Literal, get_args

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cdp.activation.v1 import activation_pb2_grpc
from cdp.common.v1 import admin_pb2_grpc
from cdp.identity.v1 import identity_pb2_grpc
from cdp.ingest.v1 import ingest_pb2_grpc
from cdp.privacy.v1 import privacy_pb2_grpc
from cdp.segmentation.v1 import segmentation_pb2_grpc
from cdp_cli.errors import CliError
from cdp_kit.grpc_auth import ClientAuth, secrets_of
from cdp_kit.natsauth import NatsAuth, password_file, stack_auth
from cdp_kit.roles import Role

ServiceName = Literal["ingest", "identity", "segmentation", "activation"]
SERVICES: tuple[ServiceName, ...] = get_args(ServiceName)
# Marketing actions a destination serves and a policy denies (activation's consent gate reads
# consents.<action>).
MarketingAction = Literal["email_marketing", "sms_marketing", "ad_targeting", "data_sharing"]
STACK_FILE = "stack.json"
DEFAULT_TIMEOUT_S = 30.0
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
UNREACHABLE = "UNREACHABLE"


def env_var(service: str) -> str:
    """The environment variable that holds a service's address, e.g. ``CDP_INGEST_ADDR``."""
    return f"CDP_{service.upper()}_ADDR"


def nats_auth(data_dir: Path, user: str, environ: Mapping[str, str] | None = None) -> NatsAuth:
    """How a ``cdp`` command connects to NATS as ``user``: ``CDP_NATS_USER`` (with ``CDP_NATS_PASSWORD_FILE``,
    ``CDP_NATS_CA_FILE``...) when set, else that user's credentials ``cdp up`` wrote in ``<data_dir>/secrets``."""
    env = os.environ if environ is None else environ
    secrets_dir = Path(data_dir) / "secrets"
    if not env.get("CDP_NATS_USER") and password_file(secrets_dir / "nats", user).exists():
        return stack_auth(secrets_dir, user)
    return NatsAuth.from_env(env)


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class StackInfo:
    """What ``cdp up`` records in ``<data_dir>/stack.json``."""

    path: Path
    nats_url: str
    services: dict[str, str]
    pid: int
    # Each NATS node: (client address, monitoring port); one entry "nats" for a single server.
    nats_nodes: dict[str, tuple[str, int]] = field(default_factory=dict)

    @property
    def running(self) -> bool:
        return pid_alive(self.pid)


def read_stack_file(data_dir: Path) -> StackInfo | None:
    """The stack recorded in ``data_dir``, or None when there is none."""
    path = Path(data_dir) / STACK_FILE
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise CliError(f"cannot read {path}: {exc}") from exc
    if not isinstance(raw, dict) or not isinstance(raw.get("services"), dict):
        raise CliError(f"{path} is not a stack file (no 'services' object)")
    services = {str(name): str(addr) for name, addr in raw["services"].items()}
    nodes = raw.get("nats_nodes")
    nats_nodes = (
        {str(n): (str(v.get("address", "")), int(v.get("monitor_port", 0))) for n, v in nodes.items()}
        if isinstance(nodes, dict)
        else {}
    )
    return StackInfo(
        path=path,
        nats_url=str(raw.get("nats_url", "")),
        services=services,
        pid=int(raw.get("pid", 0)),
        nats_nodes=nats_nodes,
    )


def _from_stack_file(service: str, data_dir: Path) -> str:
    info = read_stack_file(data_dir)
    hint = f"run `cdp up --data-dir {data_dir}`, set {env_var(service)} or pass --addr {service}=HOST:PORT"
    if info is None:
        raise CliError(f"no address for {service}: {Path(data_dir) / STACK_FILE} does not exist; {hint}")
    if not info.running:
        raise CliError(f"{info.path} is stale: the stack (pid {info.pid}) is not running; {hint}")
    if service not in info.services:
        raise CliError(f"no address for {service}: the stack in {info.path} runs without it; {hint}")
    return info.services[service]


def resolve_address(
    service: str,
    data_dir: Path,
    explicit: Mapping[str, str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> str:
    """One service's address: explicit, else ``CDP_<SERVICE>_ADDR``, else ``stack.json``."""
    if explicit and explicit.get(service):
        return explicit[service]
    env = os.environ if environ is None else environ
    if env.get(env_var(service)):
        return env[env_var(service)]
    return _from_stack_file(service, data_dir)


def resolve_addresses(
    data_dir: Path,
    explicit: Mapping[str, str] | None = None,
    environ: Mapping[str, str] | None = None,
    services: Iterable[str] = SERVICES,
) -> dict[str, str]:
    """The addresses of every service that has one; an error when none has."""
    found: dict[str, str] = {}
    first_error: CliError | None = None
    for service in services:
        try:
            found[service] = resolve_address(service, data_dir, explicit, environ)
        except CliError as exc:
            first_error = first_error or exc
    if not found and first_error is not None:
        if read_stack_file(Path(data_dir)) is None:
            raise CliError(
                f"no stack found: {Path(data_dir) / STACK_FILE} does not exist; start one with "
                f"`cdp up --data-dir {data_dir}` or set CDP_<SERVICE>_ADDR"
            )
        raise first_error
    return found


def parse_addr_option(values: Iterable[str]) -> dict[str, str]:
    """``["ingest=127.0.0.1:50051", ...]`` -> ``{"ingest": "127.0.0.1:50051"}``."""
    parsed: dict[str, str] = {}
    for value in values:
        service, sep, address = value.partition("=")
        if not sep or service not in SERVICES or not address:
            raise CliError(f"--addr {value!r}: expected SERVICE=HOST:PORT with SERVICE one of {', '.join(SERVICES)}")
        parsed[service] = address
    return parsed


def _one_line(text: str) -> str:
    return " ".join(text.split())


def describe_rpc_error(err: grpc.RpcError) -> str:
    """``CODE: details`` on one line, whatever kind of RpcError it is."""
    code_of = getattr(err, "code", None)
    details_of = getattr(err, "details", None)
    code = code_of() if callable(code_of) else None
    details = details_of() if callable(details_of) else None
    name = code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"
    text = _one_line(str(details if details is not None else err))
    return f"{name}: {text}" if text else name


def rpc_code(err: grpc.RpcError) -> grpc.StatusCode | None:
    code_of = getattr(err, "code", None)
    code = code_of() if callable(code_of) else None
    return code if isinstance(code, grpc.StatusCode) else None


CA_FILE_VAR = "CDP_GRPC_CA_FILE"
TOKEN_FILE_VAR = "CDP_GRPC_TOKEN_FILE"
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]


def resolve_auth(data_dir: Path, environ: Mapping[str, str] | None = None, role: Role = "admin") -> ClientAuth | None:
    """A client's credentials: ``CDP_GRPC_CA_FILE`` + ``CDP_GRPC_TOKEN_FILE``, else the stack's
    own under ``<data_dir>/secrets`` (the token of ``role``), else None (plaintext)."""
    env = os.environ if environ is None else environ
    ca_file, token_file = env.get(CA_FILE_VAR), env.get(TOKEN_FILE_VAR)
    if ca_file or token_file:
        if not (ca_file and token_file):
            raise CliError(f"set both {CA_FILE_VAR} and {TOKEN_FILE_VAR} (or neither)")
        try:
            return ClientAuth(Path(ca_file).read_bytes(), Path(token_file).read_text().strip())
        except OSError as exc:
            raise CliError(f"cannot read gRPC credentials: {exc.strerror or exc} ({exc.filename})") from None
    local = secrets_of(data_dir)
    if not local.exists():
        return None
    try:
        return local.client(role)
    except OSError as exc:
        raise CliError(f"cannot read gRPC credentials: {exc.strerror or exc} ({exc.filename})") from None


def open_channel(address: str, auth: ClientAuth | None) -> grpc.Channel:
    """A blocking channel: TLS + bearer token with ``auth``, plaintext without."""
    if auth is None:
        return grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
    return grpc.secure_channel(address, auth.channel_credentials(), options=CHANNEL_OPTIONS)


def open_aio_channel(address: str, auth: ClientAuth | None) -> grpc.aio.Channel:
    """An asyncio channel: TLS + bearer token with ``auth``, plaintext without."""
    if auth is None:
        return grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
    return grpc.aio.secure_channel(address, auth.channel_credentials(), options=CHANNEL_OPTIONS)


def stack_channel(data_dir: Path, address: str, role: Role = "admin") -> grpc.aio.Channel:
    """An asyncio channel to ``address`` with the credentials of ``role`` from a stack's data dir
    (tests and tools: ``async with stack_channel(stack.data_dir, addr, "reader") as ch``)."""
    return open_aio_channel(address, secrets_of(data_dir).client(role))


def check_health(address: str, timeout: float = 1.0, service: str = "", auth: ClientAuth | None = None) -> str:
    """The health status name of ``service`` ("" = the whole server) at ``address``, or UNREACHABLE.

    Health needs no token, only TLS when the server has it (``auth`` gives the authority)."""
    channel = grpc.secure_channel(address, auth.tls_only()) if auth is not None else grpc.insecure_channel(address)
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError:
            return UNREACHABLE
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


class Client:
    """Channels to the services, opened on first use, with typed stubs."""

    def __init__(
        self,
        data_dir: Path = Path(".cdp"),
        addresses: Mapping[str, str] | None = None,
        environ: Mapping[str, str] | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
        role: Role = "admin",
    ) -> None:
        self.data_dir = Path(data_dir)
        self.role = role
        self._auth: ClientAuth | bool | None = False  # False: not resolved yet
        self.timeout = timeout
        self._explicit = dict(addresses or {})
        self._environ = environ
        self._channels: dict[str, grpc.Channel] = {}
        self.last_service: str | None = None

    def address(self, service: str) -> str:
        return resolve_address(service, self.data_dir, self._explicit, self._environ)

    def addresses(self) -> dict[str, str]:
        return resolve_addresses(self.data_dir, self._explicit, self._environ)

    def channel(self, service: str) -> grpc.Channel:
        self.last_service = service
        if service not in self._channels:
            self._channels[service] = open_channel(self.address(service), self.auth())
        return self._channels[service]

    def auth(self) -> ClientAuth | None:
        """The credentials every channel of this client uses (see the module docstring)."""
        if self._auth is False:
            self._auth = resolve_auth(self.data_dir, self._environ, self.role)
        return self._auth if isinstance(self._auth, ClientAuth) else None

    @property
    def ingest(self) -> ingest_pb2_grpc.IngestServiceStub:
        return ingest_pb2_grpc.IngestServiceStub(self.channel("ingest"))

    @property
    def identity(self) -> identity_pb2_grpc.IdentityServiceStub:
        return identity_pb2_grpc.IdentityServiceStub(self.channel("identity"))

    @property
    def privacy(self) -> privacy_pb2_grpc.PrivacyServiceStub:
        """Privacy requests: served by the identity service."""
        return privacy_pb2_grpc.PrivacyServiceStub(self.channel("identity"))

    @property
    def segmentation(self) -> segmentation_pb2_grpc.SegmentationServiceStub:
        return segmentation_pb2_grpc.SegmentationServiceStub(self.channel("segmentation"))

    @property
    def activation(self) -> activation_pb2_grpc.ActivationServiceStub:
        return activation_pb2_grpc.ActivationServiceStub(self.channel("activation"))

    def admin(self, service: str) -> admin_pb2_grpc.AdminServiceStub:
        return admin_pb2_grpc.AdminServiceStub(self.channel(service))

    def health(self, service: str) -> health_pb2_grpc.HealthStub:
        return health_pb2_grpc.HealthStub(self.channel(service))

    def describe_failure(self, err: grpc.RpcError) -> str:
        """The one-line message for a failed call, naming the service it went to."""
        text = describe_rpc_error(err)
        service = self.last_service
        if service is None:
            return text
        where = service
        with contextlib.suppress(CliError):
            where = f"{service} at {self.address(service)}"
        hint = ""
        if rpc_code(err) == grpc.StatusCode.UNAVAILABLE:
            hint = " (is the stack running? start it with `cdp up`)"
            if self.auth() is None:
                hint = (
                    f" (is the stack running? no gRPC credentials were found in {self.data_dir / 'secrets'}"
                    f" nor {CA_FILE_VAR}/{TOKEN_FILE_VAR}: a server with TLS refuses plaintext)"
                )
        elif rpc_code(err) in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
            hint = f" (credentials: {TOKEN_FILE_VAR} or the {self.role} token of {self.data_dir / 'secrets'})"
        return f"{where}: {text}{hint}"

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()
        self._channels.clear()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
