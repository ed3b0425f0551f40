"""`cdp governance label|policy|show`: data-usage labels on fields and datasets, and policies."""

from __future__ import annotations

from typing import Annotated

import typer

from cdp.activation.v1 import activation_pb2
from cdp_cli import render
from cdp_cli.client import MarketingAction
from cdp_cli.context import JsonFlag, client_of

app = typer.Typer(
    help="Data-usage governance: labels on fields and datasets, policies.", no_args_is_help=True, add_completion=False
)
_client = client_of


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
