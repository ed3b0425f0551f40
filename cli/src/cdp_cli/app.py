"""``cdp``: run the embedded stack and drive the services over gRPC.

Every read command takes ``--json`` and prints the protobuf answer in its canonical JSON
form. Failed calls print one line, ``error: <service> at <address>: <CODE>: <details>``,
and exit with code 1.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import grpc
import typer
from typer.core import TyperGroup, TyperOption

from cdp_cli import (
    cmd_admin,
    cmd_apply,
    cmd_computed,
    cmd_dataset,
    cmd_deadletters,
    cmd_deliveries,
    cmd_destination,
    cmd_events,
    cmd_governance,
    cmd_identity,
    cmd_ingest,
    cmd_privacy,
    cmd_profile,
    cmd_schema,
    cmd_segment,
    cmd_stack,
    render,
)
from cdp_cli.client import (
    DEFAULT_TIMEOUT_S,
    describe_rpc_error,
    parse_addr_option,
)
from cdp_cli.context import AppState, client_of
from cdp_cli.errors import CliError

# typer (0.29) shows a type beside every option, "<bool>" beside a flag too, which reads as if
# the flag took a value (`--json <bool>`). A flag shows none; every other option keeps its type.
_option_type = TyperOption.display_type_rich


def _flag_shows_no_type(self: TyperOption, ctx: Any) -> str | None:
    return None if self.is_flag else _option_type(self, ctx)


TyperOption.display_type_rich = _flag_shows_no_type  # type: ignore[method-assign]


class CdpGroup(TyperGroup):
    """Renders expected failures (gRPC errors, bad input) as one line and exit code 1."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except grpc.RpcError as exc:
            state = ctx.obj if isinstance(ctx.obj, AppState) else None
            render.error(state.describe(exc) if state else describe_rpc_error(exc))
            raise typer.Exit(1) from None
        except CliError as exc:
            headline, _, detail = exc.message.partition("\n")
            render.error(headline)
            if detail:
                render.detail(detail)
            raise typer.Exit(1) from None
        finally:
            if isinstance(ctx.obj, AppState):
                ctx.obj.close()


app = typer.Typer(
    cls=CdpGroup,
    help="The customer data platform from the command line: run the stack, define data, audiences, activations.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def root(
    ctx: typer.Context,
    data_dir: Annotated[
        Path, typer.Option("--data-dir", envvar="CDP_DATA_DIR", help="Data folder of the local stack (stack.json).")
    ] = Path(".cdp"),
    addr: Annotated[
        list[str] | None,
        typer.Option("--addr", metavar="SERVICE=HOST:PORT", help="A service address; beats CDP_<SERVICE>_ADDR."),
    ] = None,
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds each call may take.")] = DEFAULT_TIMEOUT_S,
) -> None:
    """The customer data platform from the command line."""
    ctx.obj = AppState(data_dir=data_dir, addresses=parse_addr_option(addr or []), timeout=timeout)


# The root's own commands, then one group per module (cdp_cli/cmd_*.py); none imports this one.
app.command()(cmd_stack.up)
app.command()(cmd_stack.status)
app.command()(cmd_ingest.ingest)
app.command()(cmd_destination.activate)
app.command()(cmd_destination.plans)
app.command()(cmd_stack.demo)
cmd_apply.register(app, client_of)
app.add_typer(cmd_schema.schema_app, name="schema")
app.add_typer(cmd_dataset.dataset_app, name="dataset")
app.add_typer(cmd_events.events_app, name="events")
app.add_typer(cmd_segment.segment_app, name="segment")
app.add_typer(cmd_computed.computed_app, name="computed")
app.add_typer(cmd_profile.profile_app, name="profile")
app.add_typer(cmd_identity.identity_app, name="identity")
app.add_typer(cmd_privacy.app, name="privacy")
app.add_typer(cmd_destination.destination_app, name="destination")
app.add_typer(cmd_deliveries.deliveries_app, name="deliveries")
app.add_typer(cmd_governance.app, name="governance")
app.add_typer(cmd_ingest.batch_app, name="batch")
app.add_typer(cmd_deadletters.app, name="deadletters")
app.add_typer(cmd_admin.app, name="admin")


def main() -> None:
    """Entry point of the ``cdp`` console script."""
    render.use_page_width()
    app()
