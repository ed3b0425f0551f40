"""``cdp privacy …``: erase a person everywhere, suppress or unsuppress their identities, follow requests.

The ``privacy`` group: delete, suppress, unsuppress, status and list. Identities are given as
NS:VALUE; they travel in the call only: every answer names them by keyed hash.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from cdp.privacy.v1 import privacy_pb2 as pb
from cdp_cli import inputs, render
from cdp_cli.context import JsonFlag, client_of, group
from cdp_cli.errors import CliError
from cdp_kit.privacy import NOTHING_TO_APPLY

app = group("Privacy requests: erase a person everywhere, suppress their new data, and follow each request.")

MAX_IDENTITIES = 1000
Identities = Annotated[
    list[str] | None, typer.Argument(metavar="NS:VALUE...", help="Identities, e.g. email:ann@example.com.")
]
RequestId = Annotated[
    str,
    typer.Option("--id", help="Idempotency key of the request (default: derived from the mode and identities)."),
]
FileOption = Annotated[
    Path | None, typer.Option("--file", help="More identities, one NS:VALUE a line ('#' starts a comment).")
]


def _identities(values: list[str] | None, file: Path | None) -> list[str]:
    found = list(values or [])
    if file is not None:
        try:
            text = file.read_text()
        except OSError as exc:
            raise CliError(f"cannot read {file}: {exc.strerror}") from None
        found += [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    if not found:
        raise CliError("name at least one identity (NS:VALUE), or --file")
    if len(found) > MAX_IDENTITIES:
        raise CliError(f"{len(found)} identities: at most {MAX_IDENTITIES} per request (split the file)")
    return found


def _state(value: int) -> str:
    return render.enum_label(pb.PrivacyState.Name(value), "PRIVACY_STATE_")  # type: ignore[arg-type]


def _mode(value: int) -> str:
    return render.enum_label(pb.PrivacyMode.Name(value), "PRIVACY_MODE_")  # type: ignore[arg-type]


def _show(reply: pb.PrivacyRequest, as_json: bool) -> None:
    if as_json:
        render.print_message(reply)
        return
    held = "nothing held" if reply.nothing_held else f"{len(reply.profile_ids)} profile(s)"
    render.out.print(f"request {reply.request_id} — {_mode(reply.mode)}, {_state(reply.state)}, {held}")
    render.print_table(
        "services",
        ["service", "status", "at", "counts"],
        [
            (
                s.service,
                s.status or ("applied" if s.applied else "pending"),
                render.timestamp_text(s.at) if s.applied else "",
                ", ".join(f"{k}={v}" for k, v in sorted(s.counts.items())),
            )
            for s in reply.services
        ],
    )
    if reply.removals:
        render.print_table(
            "destination removals",
            ["destination", "plan", "status", "profiles"],
            [(r.destination, r.plan_id, r.status, r.profiles) for r in reply.removals],
        )
    if reply.state == pb.PRIVACY_STATE_COMPLETED:
        render.detail(f"completed {render.timestamp_text(reply.completed_at)}; keys destroyed: {reply.keys_destroyed}")


def _submit(
    ctx: typer.Context, mode: pb.PrivacyMode.ValueType, identities: list[str], request_id: str
) -> pb.PrivacyRequest:
    client = client_of(ctx)
    request = pb.SubmitPrivacyRequest(
        request_id=request_id, mode=mode, identities=[inputs.parse_identity(text) for text in identities]
    )
    reply: pb.PrivacyRequest = client.privacy.Submit(request, timeout=client.timeout)
    return reply


def _wait(ctx: typer.Context, reply: pb.PrivacyRequest, timeout_s: float) -> pb.PrivacyRequest:
    client = client_of(ctx)
    deadline = time.monotonic() + timeout_s
    while reply.state != pb.PRIVACY_STATE_COMPLETED:
        if time.monotonic() >= deadline:
            waiting = [s.service for s in reply.services if not s.applied and s.status != NOTHING_TO_APPLY]
            raise CliError(
                f"request {reply.request_id} is still {_state(reply.state)} after {timeout_s:g}s"
                + (f" (waiting for {', '.join(waiting)})" if waiting else "")
            )
        time.sleep(0.2)
        reply = client.privacy.GetRequest(
            pb.GetPrivacyRequestRequest(request_id=reply.request_id), timeout=client.timeout
        )
    return reply


@app.command("delete")
def delete(
    ctx: typer.Context,
    identities: Identities = None,
    file: FileOption = None,
    suppress: Annotated[bool, typer.Option("--suppress", help="Also drop their new data at ingest.")] = False,
    wait: Annotated[bool, typer.Option("--wait", help="Wait until every service has applied it.")] = False,
    wait_timeout: Annotated[float, typer.Option("--wait-timeout", help="Seconds --wait waits.")] = 60.0,
    request_id: RequestId = "",
    as_json: JsonFlag = False,
) -> None:
    """Erase the person each identity belongs to (the whole profile, every linked identity), everywhere.

    Example: cdp privacy delete email:ann@example.com --suppress --wait
    """
    mode = pb.PRIVACY_MODE_DELETE_AND_SUPPRESS if suppress else pb.PRIVACY_MODE_DELETE
    reply = _submit(ctx, mode, _identities(identities, file), request_id)
    if wait:
        reply = _wait(ctx, reply, wait_timeout)
    _show(reply, as_json)


@app.command("suppress")
def suppress(
    ctx: typer.Context,
    identities: Identities = None,
    file: FileOption = None,
    request_id: RequestId = "",
    as_json: JsonFlag = False,
) -> None:
    """Drop new data carrying these identities (or anyone linked to them) at ingest, counted; keep what is held.

    Example: cdp privacy suppress phone:+33612345678
    """
    _show(_submit(ctx, pb.PRIVACY_MODE_SUPPRESS, _identities(identities, file), request_id), as_json)


@app.command("unsuppress")
def unsuppress(
    ctx: typer.Context,
    identities: Identities = None,
    file: FileOption = None,
    request_id: RequestId = "",
    as_json: JsonFlag = False,
) -> None:
    """Accept these identities' data again.

    Example: cdp privacy unsuppress phone:+33612345678
    """
    _show(_submit(ctx, pb.PRIVACY_MODE_UNSUPPRESS, _identities(identities, file), request_id), as_json)


@app.command("status")
def status(
    ctx: typer.Context,
    request_id: Annotated[str, typer.Argument(metavar="ID", help="The request's id.")],
    as_json: JsonFlag = False,
) -> None:
    """Where a request stands: each service's progress and counts, destination removals, completion.

    Example: cdp privacy status pr-0123456789abcdef01234567
    """
    client = client_of(ctx)
    reply = client.privacy.GetRequest(pb.GetPrivacyRequestRequest(request_id=request_id), timeout=client.timeout)
    _show(reply, as_json)


@app.command("list")
def list_requests(
    ctx: typer.Context,
    limit: Annotated[int, typer.Option("--limit", help="At most this many, newest first.")] = 100,
    as_json: JsonFlag = False,
) -> None:
    """List privacy requests, newest first.

    Example: cdp privacy list --limit 20
    """
    client = client_of(ctx)
    reply = client.privacy.ListRequests(pb.ListPrivacyRequestsRequest(limit=limit), timeout=client.timeout)
    if as_json:
        render.print_message(reply)
        return
    render.print_table(
        "privacy requests",
        ["id", "mode", "state", "profiles", "received", "completed"],
        [
            (
                r.request_id,
                _mode(r.mode),
                _state(r.state),
                "nothing held" if r.nothing_held else len(r.profile_ids),
                render.timestamp_text(r.received_at),
                render.timestamp_text(r.completed_at) if r.state == pb.PRIVACY_STATE_COMPLETED else "",
            )
            for r in reply.requests
        ],
    )
