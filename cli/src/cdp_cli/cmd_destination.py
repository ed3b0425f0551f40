"""`cdp destination create|list`, `cdp activate`, `cdp plans`: where audiences go, and what is sent."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from cdp.activation.v1 import activation_pb2
from cdp_cli import (
    inputs,
    render,
)
from cdp_cli.client import (
    MarketingAction,
)
from cdp_cli.context import JsonFlag, client_of, group, state_of

destination_app = group("Destinations that audiences are activated to.")
_client = client_of
_state = state_of


@destination_app.command("create")
def destination_create(
    ctx: typer.Context,
    name: str,
    connector: Annotated[str, typer.Option("--connector", help="Connector type, e.g. file_export.")],
    action: Annotated[
        MarketingAction, typer.Option("--action", help="The marketing action it serves: who consented to it is sent.")
    ],
    config: Annotated[
        list[str] | None,
        typer.Option("--config", metavar="KEY=VALUE", help="Connector setting; KEY:=JSON for numbers, lists …"),
    ] = None,
    secret: Annotated[
        list[str] | None,
        typer.Option(
            "--secret",
            metavar="NAME=@FILE|NAME=env:VAR|NAME=-",
            help="A secret setting (token, password, key, URL with credentials) from a file, an environment "
            "variable or stdin; never typed on the command line. NAME may be dotted (fsspec_options.key).",
        ),
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Create a destination: a connector, its settings and the marketing action it serves.

    Secrets are encrypted by the service before they are stored and masked in every answer.

    Example: cdp destination create drop --connector file_export --action email_marketing --config folder=drop
    """
    settings = inputs.parse_config(config or [])
    inputs.refuse_literal_secrets(settings)
    settings = inputs.with_secrets(settings, inputs.read_secrets(secret or [], sys.stdin))
    destination = activation_pb2.Destination(name=name, connector=connector, config=settings, marketing_action=action)
    client = _client(ctx)
    request = activation_pb2.CreateDestinationRequest(destination=destination)
    reply = client.activation.CreateDestination(request, timeout=client.timeout)
    if as_json:
        render.print_message(reply)
        return
    render.success(f"destination {reply.name} created (id {reply.id}, {reply.connector}, {reply.marketing_action})")


@destination_app.command("list")
def destination_list(ctx: typer.Context, as_json: JsonFlag = False) -> None:
    """List the destinations (secrets masked).

    Example: cdp destination list --json
    """
    client = _client(ctx)
    reply = client.activation.ListDestinations(activation_pb2.ListDestinationsRequest(), timeout=client.timeout)
    if as_json:
        render.print_message(reply)
        return
    render.print_table(
        "destinations",
        ["name", "id", "connector", "action", "config"],
        [(d.name, d.id, d.connector, d.marketing_action, render.json_value(d.config)) for d in reply.destinations],
    )


def activate(
    ctx: typer.Context,
    destination: Annotated[str, typer.Option("--destination", help="Destination name or id.")],
    segment: Annotated[str, typer.Option("--segment", help="Segment name or id.")],
    attributes: Annotated[str, typer.Option("--attributes", help="Comma-separated profile attributes.")] = "",
    identities: Annotated[str, typer.Option("--identities", help="Comma-separated identity namespaces.")] = "",
    schedule: Annotated[str, typer.Option("--schedule", help='"streaming" or a cron expression.')] = "streaming",
    as_json: JsonFlag = False,
) -> None:
    """Activate a segment to a destination.

    Example: cdp activate --destination crm_file_drop --segment gold_members --identities email --attributes first_name
    """
    request = activation_pb2.ActivateRequest(
        destination=destination,
        segment=segment,
        attributes=inputs.split_list(attributes),
        identities=inputs.split_list(identities),
        schedule=schedule,
    )
    client = _client(ctx)
    reply = client.activation.Activate(request, timeout=client.timeout)
    if as_json:
        render.print_message(reply)
        return
    render.success(f"plan {reply.id}: segment {reply.segment} → {reply.destination} ({reply.schedule})")


def plans(ctx: typer.Context, as_json: JsonFlag = False) -> None:
    """List the activation plans.

    Example: cdp plans --json
    """
    client = _client(ctx)
    reply = client.activation.ListPlans(activation_pb2.ListPlansRequest(), timeout=client.timeout)
    if as_json:
        render.print_message(reply)
        return
    render.print_table(
        "activation plans",
        ["id", "destination", "segment", "attributes", "identities", "schedule"],
        [(p.id, p.destination, p.segment, list(p.attributes), list(p.identities), p.schedule) for p in reply.plans],
    )
