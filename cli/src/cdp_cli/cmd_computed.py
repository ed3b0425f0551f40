"""`cdp computed create|list`: computed attributes, usable in segments by name."""

from __future__ import annotations

from typing import Annotated

import typer

from cdp.segmentation.v1 import segmentation_pb2
from cdp_cli import render
from cdp_cli.context import client_of

computed_app = typer.Typer(
    help="Computed attributes: count/sum/min/max/most_recent of an event field over a window, per profile.",
    no_args_is_help=True,
    add_completion=False,
)


@computed_app.command("create")
def computed_create(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="lower_snake_case, e.g. orders_90d.")],
    function: Annotated[
        list[str], typer.Argument(help="e.g. 'sum(store_order.amount) within 90d' (words may be separate).")
    ],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Define a computed attribute; every profile's value is kept up to date from then on.

    Example: cdp computed create orders_90d 'count(store_order) within 90d'
    """
    client = client_of(ctx)
    request = segmentation_pb2.CreateComputedAttributeRequest(name=name, definition=" ".join(function))
    reply = client.segmentation.CreateComputedAttribute(request, timeout=client.timeout)
    if as_json:
        render.print_message(reply)
        return
    render.success(f"computed attribute {reply.name} = {reply.definition} created (id {reply.id})")


@computed_app.command("list")
def computed_list(
    ctx: typer.Context, as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False
) -> None:
    """List the computed attributes.

    Example: cdp computed list --json
    """
    client = client_of(ctx)
    reply = client.segmentation.ListComputedAttributes(
        segmentation_pb2.ListComputedAttributesRequest(), timeout=client.timeout
    )
    if as_json:
        render.print_message(reply)
        return
    render.print_table(
        "computed attributes",
        ["name", "definition", "created"],
        [(a.name, a.definition, a.created_at) for a in reply.attributes],
    )


def computed_rows(profile: segmentation_pb2.Profile) -> list[tuple[str, str, str]]:
    """(name, value, definition) of a profile's computed attributes, for `cdp profile get`."""
    return [(c.name, render.json_value(c.value) if c.HasField("value") else "", c.definition) for c in profile.computed]
