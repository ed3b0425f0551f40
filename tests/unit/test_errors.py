"""The error tree and its one mapping to gRPC status codes."""

from __future__ import annotations

import grpc
import pytest

from cdp_kit.errors import (
    AlreadyExists,
    CdpError,
    Conflict,
    FailedPrecondition,
    InvalidInput,
    NotFound,
    PermissionDenied,
    Unavailable,
    Violation,
    to_grpc_status,
)


@pytest.mark.parametrize(
    ("cls", "code"),
    [
        (CdpError, grpc.StatusCode.UNKNOWN),
        (InvalidInput, grpc.StatusCode.INVALID_ARGUMENT),
        (NotFound, grpc.StatusCode.NOT_FOUND),
        (AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
        (Conflict, grpc.StatusCode.ABORTED),
        (FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
        (Unavailable, grpc.StatusCode.UNAVAILABLE),
        (PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    ],
)
def test_every_error_maps_to_its_documented_code(cls: type[CdpError], code: grpc.StatusCode) -> None:
    status = to_grpc_status(cls("it went wrong"))
    assert status.code == code
    assert status.details == "it went wrong"
    assert status.violations == []


def test_every_cdp_error_subclass_is_covered() -> None:
    documented = {InvalidInput, NotFound, AlreadyExists, Conflict, FailedPrecondition, Unavailable, PermissionDenied}
    in_kit = {cls for cls in CdpError.__subclasses__() if cls.__module__ == "cdp_kit.errors"}
    assert in_kit == documented


def test_subclass_of_a_subclass_keeps_the_code() -> None:
    class SegmentMissing(NotFound):
        pass

    assert to_grpc_status(SegmentMissing("segment s1")).code == grpc.StatusCode.NOT_FOUND


def test_details_list_violations_with_record_field_and_rule() -> None:
    violations = [
        Violation(field="email", rule="format", message="not an email (h:0123456789ab)", record="row 3"),
        Violation(field="age", rule="minimum", message="must be >= 0"),
    ]
    exc = InvalidInput("2 rows rejected", violations)

    assert exc.details().splitlines() == [
        "2 rows rejected",
        "  - row 3: email: format: not an email (h:0123456789ab)",
        "  - age: minimum: must be >= 0",
    ]
    status = to_grpc_status(exc)
    assert status.code == grpc.StatusCode.INVALID_ARGUMENT
    assert status.details == exc.details()
    assert status.violations == violations


def test_details_without_violations_is_the_message() -> None:
    exc = FailedPrecondition("dataset d1 has no schema")
    assert exc.details() == "dataset d1 has no schema"
    assert exc.message == "dataset d1 has no schema"
    assert str(exc) == "dataset d1 has no schema"


def test_violations_are_copied() -> None:
    given = [Violation(field="f", rule="r", message="m")]
    exc = InvalidInput("bad", given)
    given.append(Violation(field="g", rule="r", message="m"))
    assert len(exc.violations) == 1


@pytest.mark.parametrize(
    "exc",
    [
        ValueError("secret: alice@example.com"),
        KeyError("+4915112345678"),
        RuntimeError("password=hunter2"),
        ZeroDivisionError("division by zero"),
    ],
)
def test_other_exceptions_map_to_internal_without_their_message(exc: Exception) -> None:
    status = to_grpc_status(exc)
    assert status.code == grpc.StatusCode.INTERNAL
    assert status.details == f"internal error ({type(exc).__name__})"
    for leak in ("alice", "example.com", "4915112345678", "hunter2", "division by zero"):
        assert leak not in status.details
    assert status.violations == []


def test_cdp_errors_are_exceptions_that_can_be_caught_as_base() -> None:
    with pytest.raises(CdpError) as info:
        raise Conflict("expected sequence 3")
    assert info.value.status == grpc.StatusCode.ABORTED


def test_details_quoting_a_huge_input_stay_within_what_grpc_carries() -> None:
    """A peer refuses metadata over 16 KiB: an error quoting a 1 MB id must still arrive as itself."""
    status = to_grpc_status(NotFound(f"profile {'x' * 1_000_000!r} not found"))
    assert status.code == grpc.StatusCode.NOT_FOUND
    assert len(status.details) < 4_100
    assert status.details.endswith("characters)")
