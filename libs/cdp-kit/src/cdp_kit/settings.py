"""Typed settings read once from ``CDP_``-prefixed environment variables."""

from __future__ import annotations

import os
import secrets
import socket
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from cdp_kit.natsauth import NatsAuth
from cdp_kit.store import SQLITE_MMAP_MIB, sqlite_url
from cdp_kit.streams import parse_max_ages

LogFormat = Literal["json", "console"]
LogLevel = Literal["debug", "info", "warning", "error"]
TraceExporter = Literal["none", "console"]
GrpcReflection = Literal["admin", "open", "off"]


class ServiceSettings(BaseSettings):
    """What every service reads. Each service subclasses it with its own defaults."""

    model_config = SettingsConfigDict(env_prefix="CDP_", extra="ignore", frozen=True)

    service: ClassVar[str] = "service"
    default_port: ClassVar[int] = 50050

    nats_url: str = Field(default="nats://127.0.0.1:4222", description="NATS server URL (JetStream enabled)")
    nats_user: str = Field(default="", description="NATS user (empty: anonymous, for a server without auth)")
    nats_password_file: str = Field(default="", description="File holding the NATS user's password")
    nats_ca_file: str = Field(default="", description="CA certificate to verify NATS' TLS certificate (empty: no TLS)")
    nats_cert_file: str = Field(default="", description="Client certificate for NATS, when the server asks for one")
    nats_key_file: str = Field(default="", description="Key of the NATS client certificate")
    data_dir: Path = Field(default=Path(".cdp"), description="Folder for SQLite stores and file exports")
    store_url: str = Field(default="", description="SQLAlchemy URL of the store; empty = SQLite in data_dir")
    sqlite_mmap_mib: int = Field(
        default=SQLITE_MMAP_MIB, ge=0, description="MiB of a SQLite store read through a memory map; 0 = off"
    )
    grpc_host: str = Field(default="127.0.0.1", description="Address the gRPC server binds")
    grpc_port: int = Field(default=0, description="gRPC port; 0 = the service's default port")
    # gRPC security (docs/security.md): TLS and bearer tokens, unless explicitly turned off.
    grpc_tls_cert_file: Path | None = Field(default=None, description="PEM certificate chain gRPC serves (tls.crt)")
    grpc_tls_key_file: Path | None = Field(default=None, description="PEM private key of that certificate (tls.key)")
    grpc_tokens_file: Path | None = Field(
        default=None, description="JSON of accepted token hashes: {sha256 hex: {principal, role}}"
    )
    grpc_insecure: bool = Field(
        default=False, description="Serve gRPC without TLS or authentication (a trusted loopback only)"
    )
    grpc_health_port: int = Field(
        default=0, ge=0, description="Extra plaintext port serving only grpc.health.v1 (kubelet probes); 0 = none"
    )
    grpc_reflection: GrpcReflection = Field(
        default="admin", description="Server reflection: admin (callers with the admin role), open or off"
    )
    log_format: LogFormat = Field(default="json", description="json (production) or console (terminal)")
    log_level: LogLevel = Field(default="info", description="Lowest log level written")
    trace_exporter: TraceExporter = Field(default="none", description="OpenTelemetry span exporter")
    stream_replicas: int = Field(
        default=1,
        ge=1,
        le=5,
        description="JetStream replicas of the streams provisioning creates (cdp admin provision)",
    )
    stream_max_age: str = Field(
        default="",
        description="Retention overrides provisioning applies, STREAM=duration comma-separated "
        "(CDP_COLLECT=6h,CDP_DELIVERY=400d; 0 = for ever); defaults: docs/operations.md",
    )

    @field_validator("stream_max_age")
    @classmethod
    def _max_ages_parse(cls, value: str) -> str:
        parse_max_ages(value)
        return value

    batch_size: int = Field(default=256, ge=1, le=10_000, description="Messages applied per store transaction")
    shutdown_grace_s: float = Field(default=5.0, ge=0, description="Seconds in-flight RPCs get on shutdown")
    # Above the longest batch a healthy consumer applies: a 256-message batch of packed ingest
    # records (~1,700 each) takes identity some 50 s on a 2-core machine, so 60 s would cry wolf.
    stall_after_s: float = Field(
        default=120.0,
        gt=0,
        description="Seconds a consumer may go without progress before it counts as stuck (service not ready)",
    )
    # Every service normalises identities alike (cdp_kit.identities): identity before it links a
    # phone, ingest when it checks a row, segmentation when it looks a profile up.
    default_phone_region: str = Field(
        default="US", description="Region assumed for phone numbers without + (set it alike for every service)"
    )

    # The deployment's secret behind cdp_kit.telemetry.pii_hash (cdp_kit.piikey): the same file
    # for every service, so a value carries the same tag in every service's logs and reports.
    pii_hash_key_file: Path | None = Field(
        default=None, description="File holding the deployment's PII hash key (hex, 32 bytes); required"
    )
    pii_hash_ephemeral: bool = Field(
        default=False,
        description="Without a key file, hash PII with a random key held in memory (development only)",
    )

    # Crypto-shredding (cdp_kit.vault, docs/privacy.md): personal data on the log is sealed under
    # per-identity keys a privacy delete destroys. Off only to measure its cost (bench): data
    # written while it is off cannot be erased from the log by destroying keys.
    seal_personal_data: bool = Field(
        default=True, description="Seal identities and personal attributes on the log (off: benches only)"
    )

    # Active/standby (cdp_kit.lease, docs/operations.md): with a TTL, several instances may run,
    # each with a store of its own; one is active, the others follow the log and take over.
    lease_ttl_s: float = Field(
        default=0.0,
        ge=0,
        description="Run under a lease with this TTL (active/standby; a standby takes over after it); 0 = one instance",
    )
    instance: str = Field(
        default="", max_length=128, description="This instance's name under a lease; empty = host name and process id"
    )
    follow_interval_s: float = Field(
        default=2.0, gt=0, description="How often a standby replays the log to keep its store current"
    )

    def resolved_instance(self) -> str:
        if self.instance:
            return self.instance
        # With a nonce: two containers on the host network share a host name and are both pid 1.
        return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"

    def grpc_security_problem(self) -> str | None:
        """Why gRPC security is not configured (None when it is, or is explicitly off)."""
        if self.grpc_insecure:
            return None
        missing = [
            f"CDP_{name.upper()}"
            for name in ("grpc_tls_cert_file", "grpc_tls_key_file", "grpc_tokens_file")
            if getattr(self, name) is None
        ]
        if missing:
            return (
                f"gRPC security is not configured: set {', '.join(missing)} "
                "(or CDP_GRPC_INSECURE=true on a trusted loopback only)"
            )
        return None

    def nats_auth(self) -> NatsAuth:
        return NatsAuth.from_files(
            self.nats_user, self.nats_password_file, self.nats_ca_file, self.nats_cert_file, self.nats_key_file
        )

    def resolved_store_url(self) -> str:
        if self.store_url:
            return self.store_url
        self.data_dir.mkdir(parents=True, exist_ok=True)
        return sqlite_url(self.data_dir / f"{self.service}.db")

    def resolved_port(self) -> int:
        return self.grpc_port or self.default_port

    def address(self) -> str:
        return f"{self.grpc_host}:{self.resolved_port()}"
