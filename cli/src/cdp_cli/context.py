"""The global options of a `cdp` invocation and the client built from them: what every command
group needs, in a module of its own so that no group imports the root (``cdp_cli.app``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import grpc
import typer

from cdp_cli.client import DEFAULT_TIMEOUT_S, Client, describe_rpc_error


@dataclass
class AppState:
    """Global options, and the client built from them on first use."""

    data_dir: Path
    addresses: dict[str, str]
    timeout: float
    _client: Client | None = field(default=None, repr=False)

    def use_data_dir(self, override: Path | None) -> None:
        if override is not None:
            self.data_dir = override

    def client(self) -> Client:
        if self._client is None:
            self._client = Client(self.data_dir, self.addresses, timeout=self.timeout)
        return self._client

    def describe(self, err: grpc.RpcError) -> str:
        return self._client.describe_failure(err) if self._client else describe_rpc_error(err)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


def state_of(ctx: typer.Context) -> AppState:
    """The invocation's options (set by the root callback; defaults for a group run on its own)."""
    state = ctx.find_object(AppState)
    if state is None:  # a sub-command invoked on its own, without the root callback
        state = AppState(Path(".cdp"), {}, DEFAULT_TIMEOUT_S)
        ctx.obj = state
    return state


def client_of(ctx: typer.Context) -> Client:
    """The client of this invocation, built on first use."""
    return state_of(ctx).client()


JsonFlag = Annotated[bool, typer.Option("--json", help="Print the answer as JSON.")]
DataDirOverride = Annotated[
    Path | None, typer.Option("--data-dir", help="Data folder (overrides the global --data-dir).", show_default=False)
]


def group(help_text: str) -> typer.Typer:
    """A command group: no arguments shows its help."""
    return typer.Typer(help=help_text, no_args_is_help=True, add_completion=False)
