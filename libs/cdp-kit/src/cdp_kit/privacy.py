"""Privacy requests (cdp.privacy.v1): what every service shares to apply them.

Identity records a request (``PrivacyRequested`` on ``cdp.privacy.requests``) with the keyed hash
of every identity of the person's graph; every other service applies it to its store and records
that it did (``PrivacyApplied`` on ``cdp.privacy.applied.<service>``); identity completes it once
every applier has (``cdp_kit.streams.privacy_appliers``), destroying the person's keys last.

Identities travel as ``identity_hash(namespace, normalised value)`` (``cdp_kit.telemetry.pii_hash``
of ``"namespace:value"``): never a plain value on the log, in a store's privacy tables or a log line.

Key destruction (crypto-shredding) belongs to the vault: services take a :class:`KeyVault` in their
composition roots. :class:`NoKeyVault` stands in until a real vault is wired.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Protocol

from sqlmodel import Field, Session, SQLModel, col, select

from cdp.common.v1.envelope_pb2 import Envelope
from cdp.privacy.v1 import privacy_pb2 as pb
from cdp_kit.envelope import unpack
from cdp_kit.errors import InvalidInput, Violation
from cdp_kit.eventlog import AppendConflict
from cdp_kit.sealing import valid_ref
from cdp_kit.store import tables_of
from cdp_kit.telemetry import get_logger, pii_hash

log = get_logger(__name__)

MAX_IDENTITIES = 1000
# ServiceProgress.status of a service that has not acknowledged a request that held nothing.
NOTHING_TO_APPLY = "nothing held: nothing to apply"
REQUEST_ID_RE = re.compile(r"\A[A-Za-z0-9._-]{1,64}\Z")  # \Z: "$" would let a final newline through
DELETE_MODES = frozenset({pb.PRIVACY_MODE_DELETE, pb.PRIVACY_MODE_DELETE_AND_SUPPRESS})
SUPPRESS_MODES = frozenset({pb.PRIVACY_MODE_SUPPRESS, pb.PRIVACY_MODE_DELETE_AND_SUPPRESS})
MODE_NAMES: dict[int, str] = {
    pb.PRIVACY_MODE_DELETE: "delete",
    pb.PRIVACY_MODE_SUPPRESS: "suppress",
    pb.PRIVACY_MODE_DELETE_AND_SUPPRESS: "delete+suppress",
    pb.PRIVACY_MODE_UNSUPPRESS: "unsuppress",
}


MAX_PROFILE_ID_CHARS = 256
HASH_RE = re.compile(r"\A(k:)?[0-9a-f]{16,64}\Z")  # cdp_kit.telemetry.pii_hash


def checked_request(env: Envelope) -> pb.PrivacyRequested:
    """A ``PrivacyRequested`` read from the log, refused (``InvalidInput``, so the reader sets it
    aside as poison with the reason) when it is not one identity could have recorded: a request id
    off the pattern, an unknown mode, hashes or key refs of another shape. Applying such a request
    could never succeed (e.g. a 100 KB id does not fit the header it is acknowledged with) and
    would hold up every request after it."""
    req = unpack(env, pb.PrivacyRequested)
    problems: list[Violation] = []
    if not REQUEST_ID_RE.match(req.request_id):
        problems.append(Violation("request_id", "pattern", "letters, digits, '-', '_', '.', at most 64"))
    if req.mode not in MODE_NAMES:
        problems.append(Violation("mode", "enum", "delete, suppress, delete+suppress or unsuppress"))
    for name, values in (
        ("identity_hashes", req.identity_hashes),
        ("graph_identity_hashes", req.graph_identity_hashes),
    ):
        if len(values) > MAX_IDENTITIES * 10:
            problems.append(Violation(name, "maximum", f"at most {MAX_IDENTITIES * 10}"))
        elif not all(HASH_RE.match(h) for h in values):
            problems.append(Violation(name, "pattern", "keyed hashes (hex)"))
    if any(not pid or len(pid) > MAX_PROFILE_ID_CHARS for pid in req.profile_ids):
        problems.append(Violation("profile_ids", "max_length", f"1 to {MAX_PROFILE_ID_CHARS} characters"))
    if not all(valid_ref(ref) for ref in req.key_refs):
        problems.append(Violation("key_refs", "pattern", "key refs as the vault makes them"))
    if problems:
        broken = "; ".join(f"{v.field}: {v.rule} ({v.message})" for v in problems)
        raise InvalidInput(f"privacy request event {env.id[:64]!r} cannot be applied: {broken}", problems)
    return req


class KeyVault(Protocol):
    """The per-identity keys of crypto-shredding. ``revoke`` forgets keys in this process (a service
    applying a request stops decrypting the person at once); ``destroy`` erases them for good and
    returns how many it destroyed (identity, when the request completes)."""

    def revoke(self, key_refs: Sequence[str]) -> None: ...

    async def destroy(self, key_refs: Sequence[str]) -> int: ...


class NoKeyVault:
    """No vault: nothing is encrypted yet, so there is nothing to revoke or destroy.

    A placeholder until the crypto-shredding vault lands; the composition roots take a ``KeyVault``
    and the integrator replaces this one there."""

    def revoke(self, key_refs: Sequence[str]) -> None:
        return None

    async def destroy(self, key_refs: Sequence[str]) -> int:
        return 0


class RevokedKeyRow(SQLModel, table=True):
    """A key ref a privacy request revoked in this service (``revoke``): revoked again in the vault
    whenever the service starts (``restore_revocations``), so a restart between a request and its
    completion (the keys destroyed) does not open the person's records again meanwhile."""

    __tablename__ = "kit_revoked_key"

    key_ref: str = Field(primary_key=True)


REVOKED_TABLES = tables_of(RevokedKeyRow)


def revoke(session: Session, vault: KeyVault, key_refs: Sequence[str]) -> None:
    """Revoke the keys in this process (``KeyVault.revoke``) and remember it in the store, in the
    transaction that applies the request (so on every replay too)."""
    refs = sorted(set(key_refs))
    if not refs:
        return
    vault.revoke(refs)
    for start in range(0, len(refs), 500):
        part = refs[start : start + 500]
        known = set(session.exec(select(RevokedKeyRow.key_ref).where(col(RevokedKeyRow.key_ref).in_(part))).all())
        session.add_all(RevokedKeyRow(key_ref=ref) for ref in part if ref not in known)
    session.flush()


def restore_revocations(session: Session, vault: KeyVault) -> int:
    """Revoke in the vault every key ref the store remembers as revoked (a service starting)."""
    refs = list(session.exec(select(RevokedKeyRow.key_ref)).all())
    if refs:
        vault.revoke(refs)
    return len(refs)


def identity_hash(namespace: str, value: str) -> str:
    """The keyed hash of a normalised identity, as requests and suppression lists carry it."""
    return pii_hash(f"{namespace}:{value}")


def is_delete(mode: int) -> bool:
    return mode in DELETE_MODES


def is_suppress(mode: int) -> bool:
    return mode in SUPPRESS_MODES


def derived_request_id(mode: int, identity_hashes: Iterable[str]) -> str:
    """The id of a request submitted without one: the same mode and identities give the same id."""
    text = "\x1f".join([MODE_NAMES.get(mode, str(mode)), *sorted(set(identity_hashes))])
    return "pr-" + hashlib.sha256(text.encode()).hexdigest()[:24]


async def keep_applying(
    ready: asyncio.Event,
    step: Callable[[], Awaitable[object]],
    *,
    what: str,
    changed: asyncio.Event | None = None,
    recover: Callable[[], Awaitable[object]] | None = None,
    interval_s: float = 1.0,
) -> None:
    """A service's privacy background task: once the service is ready, run ``step`` whenever
    ``changed`` is set, and every ``interval_s`` anyway. A failure is logged (by class only: no
    personal data) and retried at the next turn, the work staying pending in the store; an append
    conflict first folds what the log holds (``recover``), and a failure of that is retried at the
    next turn too: nothing ends the loop but cancellation."""
    await ready.wait()
    while True:
        if changed is not None:
            changed.clear()
        try:
            try:
                await step()
            except AppendConflict:
                if recover is None:
                    raise
                await recover()
        except Exception as exc:
            log.warning(f"{what}_failed", error_class=type(exc).__name__)
        if changed is None:
            await asyncio.sleep(interval_s)
        else:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), timeout=interval_s)
