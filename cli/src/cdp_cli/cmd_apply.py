"""``cdp apply -f PATH``: create what YAML documents define (namespaces, schemas, datasets, merge
policy, computed attributes, segments, destinations, activations), in that order.

Every document is read and checked before the first call (an unknown key stops the run naming
the file, the path of the key and the nearest valid one), so a typo never leaves half a setup.
What already exists is left as it is and reported "exists": applying the same files twice is
safe. The first other failure stops the run: later documents may depend on it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import grpc
import typer

from cdp_cli import render
from cdp_cli.client import Client, describe_rpc_error, rpc_code
from cdp_cli.documents import Document, load_all
from cdp_cli.errors import CliError

# Codes meaning "already so": the thing exists (schemas: an identical one; activations: the plan).
EXISTS = (grpc.StatusCode.ALREADY_EXISTS,)


def apply_document(client: Client, document: Document) -> str:
    """Send one document: "applied" (created, or the same definition again, which the services
    take as a no-op), or "exists: <why>" when the service holds another one under that name."""
    stub: Any = getattr(client, document.kind.service)
    call = getattr(stub, document.kind.method)
    try:
        call(document.kind.request(document.message), timeout=client.timeout)
    except grpc.RpcError as err:
        if rpc_code(err) in EXISTS:  # the service's words: the same one, or one "with other settings"
            return f"exists: {err.details() if isinstance(err, grpc.Call) else ''}"
        raise CliError(f"{document.source} ({document.kind.name} {document.name}): {describe_rpc_error(err)}") from None
    return "applied"


def apply(client: Client | None, paths: list[Path]) -> list[tuple[Document, str]]:
    """Every document of ``paths``, checked, then sent in dependency order (``client`` None: only
    checked); what became of each."""
    documents = load_all(paths)
    return [(d, apply_document(client, d) if client is not None else "valid") for d in documents]


def register(app: typer.Typer, client_of: Callable[[typer.Context], Client]) -> None:
    @app.command("apply")
    def apply_command(
        ctx: typer.Context,
        file: Annotated[
            list[Path],
            typer.Option(
                "--file",
                "-f",
                help="A YAML file of definitions, or a folder of them (*.yaml, *.yml, *.json). Repeatable.",
                exists=True,
            ),
        ],
        dry_run: Annotated[bool, typer.Option("--dry-run", help="Only read and check the documents.")] = False,
    ) -> None:
        """Create what YAML files define: namespaces, schemas, datasets, segments, destinations, activations.

        Example: cdp apply -f examples/
        """
        done = apply(None if dry_run else client_of(ctx), file)
        rows = [(d.kind.name, d.name, outcome, d.source) for d, outcome in done]
        render.print_table(None, ("kind", "name", "result", "from"), rows)
