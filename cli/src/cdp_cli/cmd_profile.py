"""`cdp profile get`: a unified profile by any of its identities or its id."""

from __future__ import annotations

from typing import Annotated

import grpc
import typer

from cdp.segmentation.v1 import segmentation_pb2
from cdp_cli import (
    cmd_computed,
    inputs,
    render,
)
from cdp_cli.client import (
    describe_rpc_error,
    rpc_code,
)
from cdp_cli.context import JsonFlag, client_of, group, state_of
from cdp_cli.errors import CliError

profile_app = group("Unified profiles.")
_client = client_of
_state = state_of


@profile_app.command("get")
def profile_get(
    ctx: typer.Context,
    key: Annotated[
        str,
        typer.Argument(
            metavar="NS:VALUE|PROFILE_ID",
            help="An identity (e.g. email:ann@example.com) or a profile id (as `segment members --json` lists).",
        ),
    ],
    as_json: JsonFlag = False,
) -> None:
    """Look up a unified profile by one of its identities or by its profile id.

    Example: cdp profile get email:ada@example.com
    """
    if ":" in key:
        request = segmentation_pb2.GetProfileRequest(identity=inputs.parse_identity(key), with_history=True)
    else:
        request = segmentation_pb2.GetProfileRequest(profile_id=key.strip(), with_history=True)
    client = _client(ctx)
    try:
        reply = client.segmentation.GetProfile(request, timeout=client.timeout)
    except grpc.RpcError as exc:
        if rpc_code(exc) == grpc.StatusCode.NOT_FOUND:
            # The server never repeats the value asked for; what the user typed is theirs to see.
            raise CliError(f"no profile for {key}: {describe_rpc_error(exc)}") from exc
        raise
    if as_json:
        render.print_message(reply)
        return
    render.out.print(
        f"profile {reply.profile_id} — {reply.events} events, segments: {', '.join(reply.segments) or 'none'}"
    )
    render.print_table("identities", ["namespace", "value"], [(i.namespace, i.value) for i in reply.identities])
    render.print_table(
        "attributes",
        ["name", "value", "dataset", "updated"],
        [(a.name, render.json_value(a.value), a.source_dataset, a.updated_at) for a in reply.attributes],
    )
    render.print_table("computed", ["name", "value", "definition"], cmd_computed.computed_rows(reply))
