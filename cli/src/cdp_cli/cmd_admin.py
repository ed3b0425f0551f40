"""``cdp admin``: operator tasks that need the NATS ``admin`` user."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from cdp_cli import render
from cdp_cli.client import Client, nats_auth
from cdp_cli.cmd_publish import nats_url_of
from cdp_cli.errors import CliError
from cdp_cli.stack import run_async
from cdp_kit.errors import Unavailable
from cdp_kit.natsauth import (
    ADMIN,
    USERS,
    ensure_secrets,
    password_env,
    server_config,
    write_compose_env,
    write_password_env,
)
from cdp_kit.provision import provision_streams
from cdp_kit.streams import ALL_STREAMS

app = typer.Typer(help="Operator tasks: provision the streams, print the NATS configuration.", no_args_is_help=True)


@app.command("provision")
def provision(
    ctx: typer.Context,
    nats_url: Annotated[
        str | None, typer.Option("--nats-url", help="NATS server (default: CDP_NATS_URL, else the stack's).")
    ] = None,
    replicas: Annotated[
        int, typer.Option("--replicas", min=1, max=5, envvar="CDP_STREAM_REPLICAS", help="JetStream replicas.")
    ] = 1,
) -> None:
    """Create or update every stream, as the NATS admin user (CDP_NATS_USER=admin, or the stack's
    credentials). Services never create streams: run this once per deployment and after an upgrade."""
    state: Any = ctx.obj
    client: Client = state.client() if state is not None else Client(Path(".cdp"))
    url = nats_url_of(client, nats_url)
    auth = nats_auth(client.data_dir, ADMIN)
    try:
        run_async(provision_streams(url, auth, replicas=replicas))
    except Unavailable as exc:
        raise CliError(f"provisioning the streams at {url} failed: {exc.message}") from None
    render.out.print(f"provisioned {len(ALL_STREAMS)} streams: {', '.join(s.name for s in ALL_STREAMS)}")


@app.command("nats-config")
def nats_config() -> None:
    """Print the users and permissions part of nats-server's configuration (passwords as environment
    references, CDP_NATS_<USER>_PASSWORD) for a deployment's own server."""
    typer.echo(f"# passwords from the environment: {', '.join(password_env(u) for u in USERS)}")
    typer.echo(server_config(), nl=False)


@app.command("secrets")
def make_secrets(
    directory: Annotated[Path, typer.Argument(help="Where to write them (0700), e.g. deploy/compose/secrets.")],
    hosts: Annotated[list[str] | None, typer.Option("--host", help="A name clients dial NATS by (repeatable).")] = None,
) -> None:
    """Make what a deployment's NATS needs, unless present: a CA and NATS' certificate (pki/), one
    password per user (nats/<user>.password) and nats.env for nats-server. Every file 0600."""
    names = tuple(hosts or ["nats", "localhost", "127.0.0.1"])
    ensure_secrets(directory, names)
    env = write_password_env(directory)
    compose_env = write_compose_env(directory)
    render.out.print(
        f"wrote {directory}/pki (ca.crt, nats.crt, nats.key), {directory}/nats/*.password, {env} and {compose_env}"
    )
