"""One error tree for every service, mapped to gRPC status codes in one place.

    CdpError
    ├── InvalidInput        INVALID_ARGUMENT   bad request or record; names the field and the rule
    ├── NotFound            NOT_FOUND
    ├── AlreadyExists       ALREADY_EXISTS
    ├── Conflict            ABORTED            optimistic-concurrency guard tripped; retry
    ├── FailedPrecondition  FAILED_PRECONDITION
    ├── Unavailable         UNAVAILABLE        a dependency (NATS, the store) is down; retry
    └── PermissionDenied    PERMISSION_DENIED  the caller's role does not allow it (cdp_kit.access)

Messages never carry raw PII: name records by id or row number, values by hash.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import grpc


@dataclass(frozen=True)
class Violation:
    """One broken rule: which record, which field, which rule, and a human message."""

    field: str
    rule: str
    message: str
    record: str = ""


class CdpError(Exception):
    """Base of every error the services raise on purpose."""

    status: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str, violations: list[Violation] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.violations: list[Violation] = list(violations or [])

    def details(self) -> str:
        if not self.violations:
            return self.message
        lines = [self.message]
        for v in self.violations:
            where = f"{v.record}: " if v.record else ""
            lines.append(f"  - {where}{v.field}: {v.rule}: {v.message}")
        return "\n".join(lines)


class InvalidInput(CdpError):
    status = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(CdpError):
    status = grpc.StatusCode.NOT_FOUND


class AlreadyExists(CdpError):
    status = grpc.StatusCode.ALREADY_EXISTS


class Conflict(CdpError):
    status = grpc.StatusCode.ABORTED


class FailedPrecondition(CdpError):
    status = grpc.StatusCode.FAILED_PRECONDITION


class Unavailable(CdpError):
    status = grpc.StatusCode.UNAVAILABLE


class PermissionDenied(CdpError):
    """The caller may not do this (e.g. read raw rejected values without the operator role)."""

    status = grpc.StatusCode.PERMISSION_DENIED


@dataclass(frozen=True)
class GrpcStatus:
    code: grpc.StatusCode
    details: str
    violations: list[Violation] = field(default_factory=list)


# gRPC carries a status's details in a trailer, and a peer refuses metadata over 16 KiB: an error
# that quotes a huge input (a 1 MB id) would reach the caller as RESOURCE_EXHAUSTED, not as itself.
MAX_DETAILS_CHARS = 4000


def _bounded(details: str) -> str:
    if len(details) <= MAX_DETAILS_CHARS:
        return details
    return details[:MAX_DETAILS_CHARS] + f"... ({len(details)} characters)"


def to_grpc_status(exc: BaseException) -> GrpcStatus:
    """The one place errors become gRPC statuses."""
    if isinstance(exc, CdpError):
        return GrpcStatus(exc.status, _bounded(exc.details()), exc.violations)
    return GrpcStatus(grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__})")
