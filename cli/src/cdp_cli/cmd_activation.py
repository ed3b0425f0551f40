"""Activation commands beyond the basic ones in app.py: delivery monitoring, dead letters,
redrive, and data-usage governance (labels and policies)."""

from __future__ import annotations

from typing import Annotated

import typer

from cdp.activation.v1 import activation_pb2
from cdp_cli import cmd_deadletters, render
from cdp_cli.client import MarketingAction
from cdp_cli.context import JsonFlag, client_of

deliveries_app = typer.Typer(
    help="Deliveries and their monitoring (failed ones: `cdp deadletters`).\n\n"
    "Example: cdp deliveries --destination crm_file_drop",
    add_completion=False,
)
app = typer.Typer(
    help="Data-usage governance: labels on fields and datasets, policies.", no_args_is_help=True, add_completion=False
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


@app.command("label")
def label(
    ctx: typer.Context,
    name: str,
    data_label: Annotated[str, typer.Option("--label", help="Data-usage label, e.g. C2.")],
    dataset: Annotated[bool, typer.Option("--dataset", help="NAME is a dataset (default: a field).")] = False,
) -> None:
    """Put a data-usage label on a field (attribute or identity namespace) or a dataset.

    Example: cdp governance label email --label C2
    """
    client = _client(ctx)
    request = activation_pb2.LabelDataRequest(
        label=activation_pb2.DataLabel(kind="dataset" if dataset else "field", name=name, label=data_label)
    )
    reply = client.activation.LabelData(request, timeout=client.timeout)
    render.success(f"{reply.kind} {reply.name} labelled {reply.label}")


@app.command("policy")
def policy(
    ctx: typer.Context,
    name: str,
    deny: Annotated[str, typer.Option("--deny", help="The label whose data is denied …")],
    action: Annotated[MarketingAction, typer.Option("--action", help="… for this marketing action.")],
) -> None:
    """Create a policy: data with a label must not be used for a marketing action.

    Example: cdp governance policy no_c2_ads --deny C2 --action ad_targeting
    """
    client = _client(ctx)
    request = activation_pb2.CreatePolicyRequest(policy=activation_pb2.Policy(name=name, label=deny, action=action))
    reply = client.activation.CreatePolicy(request, timeout=client.timeout)
    render.success(f"policy {reply.name}: {reply.label} denied for {reply.action}")


@app.command("show")
def show(ctx: typer.Context, as_json: JsonFlag = False) -> None:
    """List labels and policies.

    Example: cdp governance show
    """
    client = _client(ctx)
    reply = client.activation.ListGovernance(activation_pb2.ListGovernanceRequest(), timeout=client.timeout)
    if as_json:
        render.print_message(reply)
        return
    render.print_table("labels", ["kind", "name", "label"], [(x.kind, x.name, x.label) for x in reply.labels])
    render.print_table("policies", ["name", "label", "action"], [(p.name, p.label, p.action) for p in reply.policies])


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
