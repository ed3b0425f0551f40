"""Who may do what on NATS: one user per service, a ``publisher`` and an ``admin``, with subject
permissions derived from ``cdp_kit.streams``, and the nats-server configuration made from them.

The server enforces everything here (``accounts``/``users``/``permissions`` in its configuration);
nothing in this module checks a message itself. Each service may

* publish only the subjects of its own logs (``SERVICE_LOGS``), so a consumer that reads a
  subject reads what its one owner wrote: another user's publish there is refused by the server;
* create, read, acknowledge and delete only consumers of its own, by name, on its own logs and
  its inputs. The consumer-create subject carries the filter
  (``$JS.API.CONSUMER.CREATE.<stream>.<name>.<filter>``) and the server checks the filter against
  it, so a service cannot make a consumer that reads a subject it has no right to;
* look up the last message of a subject it reads (``$JS.API.DIRECT.GET.<stream>.<subject>``) and
  stream info. It may not create, update, delete or purge a stream, nor get a message by
  sequence (that request does not name a subject), nor list consumers;
* erase messages by sequence only on the streams its ``ServiceLogs.erases`` names
  (``$JS.API.STREAM.MSG.DELETE.<stream>``): ingest, on CDP_COLLECT, for privacy erasure.

The per-identity key bucket of crypto-shredding (``cdp_kit.vault``, stream ``KV_CDP_KEYS``) is made
by provisioning (admin). Every service may read keys (direct get by key and batch get, stream
info); only the ``KEY_MAKERS`` (ingest; activation, for privacy removal batches) may create them, only the
``KEY_DESTROYERS`` (identity; activation, the keys of its removal batches)
may erase them (a key block written again without them, its previous message deleted by
sequence). No service may purge or delete the bucket.

Replies come back on a per-user inbox prefix (``_INBOX_<user>``): no user may subscribe to
another's replies. ``publisher`` may publish ``cdp.collect.>`` only; ``admin`` may do everything
(``cdp up``, ``cdp admin provision``, operators). A connection without a user is refused.
"""

from __future__ import annotations

import json
import os
import secrets
import ssl
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cdp_kit.certs import DEFAULT_HOSTS, Pki
from cdp_kit.private import private_dir, write_private
from cdp_kit.streams import (
    KEY_STREAM,
    KEY_SUBJECT_PREFIX,
    LEASE_STREAM,
    LEASE_SUBJECT_PREFIX,
    SERVICE_LOGS,
    SERVICES,
    ConsumerSpec,
    OwnLog,
    StreamSpec,
)

ADMIN = "admin"
PUBLISHER = "publisher"
USERS: tuple[str, ...] = (ADMIN, PUBLISHER, *SERVICES)
ACCOUNT = "CDP"
API = "$JS.API"
KEY_MAKERS: tuple[str, ...] = ("ingest", "activation")
KEY_DESTROYERS: tuple[str, ...] = ("identity", "activation")


def inbox_prefix(user: str) -> str:
    """Where ``user``'s replies arrive (nats-py's ``inbox_prefix``); only ``user`` may subscribe there."""
    return f"_INBOX_{user}"


def reader_name(log_name: str) -> str:
    """The consumer a service reads one of its own logs, or an input to its end, through (no acks)."""
    return f"{log_name}-read"


def standby_reader_name(log_name: str) -> str:
    """The reader a standby instance follows one of its own logs or inputs through (``cdp_kit.lease``),
    so it never replaces the active instance's reader of the same log."""
    return f"{log_name}-sby"


def getter_name(consumer: str) -> str:
    """The consumer through which a service reads one input message back by sequence (a redrive)."""
    return f"{consumer}-get"


@dataclass(frozen=True)
class Permissions:
    publish: tuple[str, ...]
    subscribe: tuple[str, ...]


def consumer_subjects(stream: str, name: str, filter_subject: str, *, acks: bool) -> list[str]:
    """What a user needs to create, bind, pull, inspect and delete one named consumer."""
    subjects = [
        f"{API}.CONSUMER.CREATE.{stream}.{name}.{filter_subject}",
        f"{API}.CONSUMER.DELETE.{stream}.{name}",
        f"{API}.CONSUMER.INFO.{stream}.{name}",
        f"{API}.CONSUMER.MSG.NEXT.{stream}.{name}",
    ]
    if acks:  # v1 and v2 (domain, account hash) reply subjects of JetStream deliveries
        subjects += [f"$JS.ACK.{stream}.{name}.>", f"$JS.ACK.*.*.{stream}.{name}.>"]
    return subjects


def _streams(own_logs: Iterable[OwnLog], inputs: Iterable[ConsumerSpec]) -> list[StreamSpec]:
    found = [own.stream for own in own_logs] + [spec.stream for spec in inputs]
    return list(dict.fromkeys(found))


def service_permissions(service: str) -> Permissions:
    logs = SERVICE_LOGS[service]
    publish: list[str] = []
    for own in logs.own_logs:
        publish.append(own.subject)
        publish.append(f"{API}.DIRECT.GET.{own.stream.name}.{own.subject}")
        publish += consumer_subjects(own.stream.name, reader_name(own.name), own.subject, acks=False)
        publish += consumer_subjects(own.stream.name, standby_reader_name(own.name), own.subject, acks=False)
    for spec in logs.inputs:
        publish.append(f"{API}.DIRECT.GET.{spec.stream.name}.{spec.filter_subject}")
        publish += consumer_subjects(spec.stream.name, spec.name, spec.filter_subject, acks=True)
        publish += consumer_subjects(spec.stream.name, reader_name(spec.name), spec.filter_subject, acks=False)
        publish += consumer_subjects(spec.stream.name, standby_reader_name(spec.name), spec.filter_subject, acks=False)
        publish += consumer_subjects(spec.stream.name, getter_name(spec.name), spec.filter_subject, acks=False)
    publish += [f"{API}.STREAM.INFO.{stream.name}" for stream in _streams(logs.own_logs, logs.inputs)]
    publish += [f"{API}.STREAM.MSG.DELETE.{stream.name}" for stream in logs.erases]
    publish += key_permissions(service)
    publish += lease_permissions(service)
    return Permissions(tuple(dict.fromkeys(publish)), (f"{inbox_prefix(service)}.>",))


def key_permissions(service: str) -> list[str]:
    """What a service may do with the per-identity key bucket."""
    subjects = [
        f"{API}.STREAM.INFO.{KEY_STREAM}",
        f"{API}.DIRECT.GET.{KEY_STREAM}.{KEY_SUBJECT_PREFIX}>",
        f"{API}.DIRECT.GET.{KEY_STREAM}",  # batch get (multi_last): the keys of many refs at once
    ]
    if service in KEY_MAKERS or service in KEY_DESTROYERS:  # a destroy writes a block again without the keys
        subjects.append(f"{KEY_SUBJECT_PREFIX}>")
    if service in KEY_DESTROYERS:
        subjects.append(f"{API}.STREAM.MSG.DELETE.{KEY_STREAM}")
    return subjects


def lease_permissions(service: str) -> list[str]:
    """A service reads and compare-and-sets its own key of the lease bucket (``cdp_kit.lease``)."""
    return [
        f"{API}.STREAM.INFO.{LEASE_STREAM}",
        f"{API}.DIRECT.GET.{LEASE_STREAM}.{LEASE_SUBJECT_PREFIX}{service}",
        f"{LEASE_SUBJECT_PREFIX}{service}",
    ]


def permissions(user: str) -> Permissions:
    """The permission table: what each user may publish and subscribe to."""
    if user == ADMIN:
        return Permissions((">",), (">",))
    if user == PUBLISHER:
        return Permissions(("cdp.collect.>",), (f"{inbox_prefix(PUBLISHER)}.>",))
    if user in SERVICE_LOGS:
        return service_permissions(user)
    raise ValueError(f"unknown NATS user {user!r}; one of {', '.join(USERS)}")


# ----------------------------------------------------------------------------- server configuration


@dataclass(frozen=True)
class ServerTls:
    """The server's certificate, key and the authority clients' certificates (if any) chain to."""

    cert_file: str
    key_file: str
    ca_file: str


def password_env(user: str) -> str:
    """The environment variable a deployed nats-server reads ``user``'s password from."""
    return f"CDP_NATS_{user.upper()}_PASSWORD"


def _quote(value: str) -> str:
    return json.dumps(value)


def server_config(
    passwords: Mapping[str, str] | None = None,
    *,
    tls: ServerTls | None = None,
    max_payload: int | None = None,
) -> str:
    """The authorization (and TLS) part of nats-server's configuration.

    ``passwords`` maps each user to its password; without it each password is a reference to an
    environment variable (``$CDP_NATS_<USER>_PASSWORD``) the server resolves at start, so the
    file holds no secret (compose, Kubernetes)."""
    lines: list[str] = []
    if max_payload is not None:
        lines.append(f"max_payload: {max_payload}")
    if tls is not None:
        lines += _tls_block("tls", tls)
    lines.append("accounts {")
    lines.append(f"  {ACCOUNT} {{")
    lines.append("    jetstream: enabled")
    lines.append("    users: [")
    for user in USERS:
        perms = permissions(user)
        secret = _quote(passwords[user]) if passwords is not None else f"${password_env(user)}"
        lines.append(f"      {{user: {_quote(user)}, password: {secret}, permissions: {{")
        lines.append(f"        publish: {{allow: {_list(perms.publish)}}}")
        lines.append(f"        subscribe: {{allow: {_list(perms.subscribe)}}}")
        lines.append("      }}")
    lines.append("    ]")
    lines.append("  }")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _list(subjects: Iterable[str]) -> str:
    return "[" + ", ".join(_quote(s) for s in subjects) + "]"


def _tls_block(name: str, tls: ServerTls, indent: str = "") -> list[str]:
    return [
        f"{indent}{name} {{",
        f"{indent}  cert_file: {_quote(tls.cert_file)}",
        f"{indent}  key_file: {_quote(tls.key_file)}",
        f"{indent}  ca_file: {_quote(tls.ca_file)}",
        f"{indent}  timeout: 5",
        f"{indent}}}",
    ]


def cluster_tls_block(tls: ServerTls, indent: str = "  ") -> str:
    """``tls { ... }`` for a cluster block: routes verify each other's certificates (mTLS)."""
    lines = _tls_block("tls", tls, indent)
    lines.insert(-1, f"{indent}  verify: true")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- credentials on disk


def password_file(nats_dir: Path, user: str) -> Path:
    return Path(nats_dir) / f"{user}.password"


def ensure_passwords(nats_dir: Path) -> dict[str, str]:
    """Every user's password, generated (``secrets``, 256 bits) unless its file exists; files 0600."""
    private_dir(Path(nats_dir))
    found: dict[str, str] = {}
    for user in USERS:
        path = password_file(nats_dir, user)
        if not path.exists():
            write_private(path, secrets.token_urlsafe(32) + "\n")
        found[user] = path.read_text().strip()
    return found


def ensure_secrets(secrets_dir: Path, hosts: tuple[str, ...] = DEFAULT_HOSTS) -> str:
    """What a local nats-server needs to run secured, made unless present under ``secrets_dir``
    (0700): the authority and the server's certificate in ``pki/``, every user's password in
    ``nats/``. Returns the authorization and TLS part of the server's configuration."""
    secrets_dir = private_dir(Path(secrets_dir))
    leaf = Pki(secrets_dir / "pki").ensure("nats", hosts, server=True, client=False)
    passwords = ensure_passwords(secrets_dir / "nats")
    return server_config(passwords, tls=ServerTls(str(leaf.cert), str(leaf.key), str(leaf.ca)))


def write_password_env(secrets_dir: Path) -> Path:
    """``<secrets_dir>/nats.env`` (0600): ``CDP_NATS_<USER>_PASSWORD=...`` for every user, the env
    file a deployed nats-server reads the passwords of ``server_config()`` from (compose)."""
    passwords = ensure_passwords(Path(secrets_dir) / "nats")
    text = "".join(f"{password_env(user)}={passwords[user]}\n" for user in USERS)
    return write_private(Path(secrets_dir) / "nats.env", text)


# ----------------------------------------------------------------------------- client side


@dataclass(frozen=True)
class NatsAuth:
    """How a client authenticates: a user and password, the authority to trust for TLS, and
    optionally a client certificate (when the server asks for one)."""

    user: str = ""
    password: str = field(default="", repr=False)  # never in a log or a traceback's locals repr
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""

    @classmethod
    def from_files(
        cls,
        user: str,
        password_file: str | Path = "",
        ca_file: str | Path = "",
        cert_file: str = "",
        key_file: str = "",
    ) -> NatsAuth:
        password = Path(password_file).read_text().strip() if password_file else ""
        return cls(user, password, str(ca_file or ""), cert_file, key_file)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> NatsAuth:
        """From ``CDP_NATS_USER``, ``CDP_NATS_PASSWORD_FILE``, ``CDP_NATS_CA_FILE``, ``CDP_NATS_CERT_FILE``,
        ``CDP_NATS_KEY_FILE`` (all empty: anonymous, plain TCP)."""
        env = os.environ if environ is None else environ
        return cls.from_files(
            env.get("CDP_NATS_USER", ""),
            env.get("CDP_NATS_PASSWORD_FILE", ""),
            env.get("CDP_NATS_CA_FILE", ""),
            env.get("CDP_NATS_CERT_FILE", ""),
            env.get("CDP_NATS_KEY_FILE", ""),
        )

    def tls_context(self) -> ssl.SSLContext | None:
        if not self.ca_file:
            return None
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.ca_file)
        if self.cert_file:
            context.load_cert_chain(self.cert_file, self.key_file or None)
        return context

    def connect_options(self) -> dict[str, Any]:
        """Keyword arguments for ``nats.connect`` / ``Client.connect``."""
        options: dict[str, Any] = {}
        if self.user:
            options.update(user=self.user, password=self.password, inbox_prefix=inbox_prefix(self.user))
        context = self.tls_context()
        if context is not None:
            options["tls"] = context
        return options


def stack_auth(secrets_dir: Path, user: str) -> NatsAuth:
    """The credentials of ``user`` in a stack's ``<data_dir>/secrets`` (what ``cdp up`` wrote)."""
    nats_dir = Path(secrets_dir) / "nats"
    return NatsAuth.from_files(user, password_file(nats_dir, user), Path(secrets_dir) / "pki" / "ca.crt")


def stack_env(secrets_dir: Path, user: str) -> dict[str, str]:
    """``CDP_NATS_*`` variables that make a process connect as ``user`` of a stack."""
    nats_dir = Path(secrets_dir) / "nats"
    return {
        "CDP_NATS_USER": user,
        "CDP_NATS_PASSWORD_FILE": str(password_file(nats_dir, user)),
        "CDP_NATS_CA_FILE": str(Path(secrets_dir) / "pki" / "ca.crt"),
    }
