"""`cdp deliveries [dead-letters|redrive]`: what activation delivered, per destination and plan,
and its failed deliveries."""

from __future__ import annotations

from typing import Annotated

import typer

from cdp.activation.v1 import activation_pb2
from cdp_cli import cmd_deadletters, render
from cdp_cli.context import JsonFlag, client_of

deliveries_app = typer.Typer(
    help="Deliveries and their monitoring (failed ones: `cdp deadletters`).\n\n"
    "Example: cdp deliveries --destination crm_file_drop",
    add_completion=False,
)


_client = client_of


def print_stats(reply: activation_pb2.ListDeliveriesResponse) -> None:
    render.print_table(
        "per destination (plan empty) and plan",
        [
            "destination",
            "plan",
            "members",
            "received",
            "activated",
            "excluded",
            "failed",
            "retried",
            "pending",
            "dead",
            "latency ms avg/max",
            "warnings",
        ],
        [
            (
                s.destination_name,
                s.plan_id,
                s.members,
                s.received,
                s.activated,
                ", ".join(f"{k}: {v}" for k, v in sorted(s.excluded.items())),
                s.failed,
                s.retried,
                s.batches_pending,
                s.batches_dead,
                f"{s.latency_ms_avg:.0f}/{s.latency_ms_max:.0f}",
                "; ".join(s.warnings),
            )
            for s in reply.stats
        ],
    )


@deliveries_app.command("dead-letters")
def dead_letters(
    ctx: typer.Context,
    destination: Annotated[str, typer.Option("--destination", help="Only this destination (name or id).")] = "",
    as_json: JsonFlag = False,
) -> None:
    """Failed deliveries: the same as `cdp deadletters --kind delivery`.

    Example: cdp deliveries dead-letters
    """
    filters = cmd_deadletters.Filters(kind="delivery", destination=destination)
    cmd_deadletters.list_letters(ctx, filters, include_redriven=False, limit=10_000, as_json=as_json)


@deliveries_app.command("redrive")
def redrive(
    ctx: typer.Context,
    batch_ids: Annotated[list[str] | None, typer.Argument(help="Batch ids; none = every dead letter.")] = None,
    destination: Annotated[str, typer.Option("--destination", help="Only this destination (name or id).")] = "",
    as_json: JsonFlag = False,
) -> None:
    """Send failed deliveries again, with the same batch ids: the same as `cdp deadletters redrive --kind delivery`.

    Example: cdp deliveries redrive
    """
    cmd_deadletters.redrive(
        ctx, kind="delivery", destination=destination, batches=batch_ids or None, wait=False, as_json=as_json
    )


@deliveries_app.callback(invoke_without_command=True)
def deliveries(
    ctx: typer.Context,
    destination: Annotated[str, typer.Option("--destination", help="Only this destination (name or id).")] = "",
    as_json: JsonFlag = False,
) -> None:
    """List deliveries: what went to each destination, and where; monitoring per destination and plan.

    Example: cdp deliveries --destination crm_file_drop
    """
    if ctx.invoked_subcommand:
        return
    client = _client(ctx)
    request = activation_pb2.ListDeliveriesRequest(destination=destination)
    reply = client.activation.ListDeliveries(request, timeout=client.timeout)
    if as_json:
        render.print_message(reply)
        return
    render.print_table(
        "deliveries",
        ["id", "destination", "plan", "members", "added", "removed", "location", "at", "through seq"],
        [
            (d.id, d.destination, d.plan_id, d.members, d.added, d.removed, d.location, d.at, d.through_sequence)
            for d in reply.deliveries
        ],
    )
    print_stats(reply)
