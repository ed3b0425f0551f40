"""``cdp admin``: operator tasks: NATS streams and credentials (as the NATS ``admin`` user), and the
master key that encrypts destination secrets at rest."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cdp.activation.v1 import activation_pb2
from cdp_cli import render
from cdp_cli.client import nats_auth
from cdp_cli.cmd_publish import nats_url_of
from cdp_cli.context import client_of, state_of
from cdp_cli.errors import CliError
from cdp_cli.stack import run_async
from cdp_kit.errors import Unavailable
from cdp_kit.keyring import KeyringError, add_key, ensure_key_file, load_keyring, retire_keys
from cdp_kit.natsauth import (
    ADMIN,
    USERS,
    ensure_secrets,
    password_env,
    server_config,
    write_password_env,
)
from cdp_kit.provision import provision_streams
from cdp_kit.streams import ALL_STREAMS, KEYS, parse_max_ages

app = typer.Typer(
    help="Operator tasks: provision the streams, NATS configuration and secrets, master key rotation.",
    no_args_is_help=True,
    add_completion=False,
)


def _state_key_file(ctx: typer.Context) -> Path:

    return state_of(ctx).data_dir / "secrets" / "master.key"


@app.command("rotate-master-key")
def rotate_master_key(
    ctx: typer.Context,
    key_file: Annotated[
        Path | None,
        typer.Option(
            "--key-file",
            help="The master key file activation reads (CDP_MASTER_KEY_FILE); default: the local stack's "
            "<data-dir>/secrets/master.key.",
            show_default=False,
        ),
    ] = None,
    new_key: Annotated[
        bool,
        typer.Option(
            "--new-key/--no-new-key",
            help="Append a new key version first; --no-new-key when the file was updated elsewhere "
            "(a Kubernetes Secret).",
        ),
    ] = True,
    retire: Annotated[
        bool, typer.Option("--retire", help="Then remove from the file every key version no secret needs.")
    ] = False,
) -> None:
    """Re-encrypt every destination secret under the newest master key, through the log.

    Appends a new key version to the key file, asks activation to re-read it and re-encrypt
    (RotateSecrets), and with --retire drops the versions no stored secret needs any more.

    Example: cdp admin rotate-master-key --retire
    """

    path = key_file or _state_key_file(ctx)
    local = new_key or retire or key_file is not None  # else: the key file is the service's (a Secret)
    newest = ""
    if local:
        try:
            newest = add_key(path) if new_key else load_keyring(path).newest
        except (OSError, KeyringError) as exc:
            raise CliError(f"master key file {path}: {exc}") from None
    if new_key:
        render.success(f"key version {newest} added to {path}")
    client = client_of(ctx)
    reply = client.activation.RotateSecrets(activation_pb2.RotateSecretsRequest(), timeout=client.timeout)
    if newest and reply.key_id != newest:
        raise CliError(
            f"activation encrypts with key {reply.key_id}, not {newest}: does its CDP_MASTER_KEY_FILE point at {path}?"
        )
    render.success(f"{reply.destinations} destination(s) re-encrypted under key {reply.key_id}")
    if not retire:
        if reply.retirable_key_ids:
            unused = ", ".join(reply.retirable_key_ids)
            render.err.print(f"no secret needs key(s) {unused} any more: --retire drops them")
        return
    still_needed = [k for k in load_keyring(path).key_ids if k != newest and k not in reply.retirable_key_ids]
    if still_needed:
        raise CliError(f"not retiring: secrets still need key(s) {', '.join(still_needed)}")
    retired = retire_keys(path, newest)
    render.success(f"retired key(s) {', '.join(retired) or '(none)'}; {path} holds {newest} only")


@app.command("new-master-key")
def new_master_key(
    ctx: typer.Context,
    key_file: Annotated[
        Path | None,
        typer.Option(
            "--key-file", help="Where to write it; default: <data-dir>/secrets/master.key.", show_default=False
        ),
    ] = None,
    append: Annotated[
        bool, typer.Option("--append", help="Add a new version to an existing file (the first step of a rotation).")
    ] = False,
) -> None:
    """Make a master key file (0600, one new key) for CDP_MASTER_KEY_FILE; an existing one is kept
    unless --append adds a version to it.

    Example: cdp admin new-master-key --key-file secrets/master.key
    """
    path = key_file or _state_key_file(ctx)
    try:
        if append and path.exists():
            render.success(f"master key version {add_key(path)} appended to {path}")
        elif ensure_key_file(path):
            render.success(f"master key {load_keyring(path).newest} written to {path} (keep it secret, back it up)")
        else:
            render.err.print(f"{path} exists: kept (rotate with `cdp admin rotate-master-key`)")
    except (OSError, KeyringError) as exc:
        raise CliError(f"master key file {path}: {exc}") from None


@app.command("provision")
def provision(
    ctx: typer.Context,
    nats_url: Annotated[
        str | None, typer.Option("--nats-url", help="NATS server (default: CDP_NATS_URL, else the stack's).")
    ] = None,
    replicas: Annotated[
        int, typer.Option("--replicas", min=1, max=5, envvar="CDP_STREAM_REPLICAS", help="JetStream replicas.")
    ] = 1,
    max_age: Annotated[
        str,
        typer.Option(
            "--max-age",
            envvar="CDP_STREAM_MAX_AGE",
            help="Retention overrides, STREAM=duration comma-separated (e.g. CDP_COLLECT=6h,CDP_DEADLETTER=90d; "
            "0 keeps for ever). Defaults: CDP_COLLECT 1d, CDP_DEADLETTER 30d, the others for ever.",
        ),
    ] = "",
) -> None:
    """Create or update every stream, as the NATS admin user (CDP_NATS_USER=admin, or the stack's
    credentials). Services never create streams: run this once per deployment and after an upgrade.

    Example: cdp admin provision --replicas 3 --max-age CDP_COLLECT=6h
    """
    try:
        max_ages = parse_max_ages(max_age)
    except ValueError as exc:
        raise CliError(f"--max-age: {exc}") from None
    client = client_of(ctx)
    url = nats_url_of(client, nats_url)
    auth = nats_auth(client.data_dir, ADMIN)
    try:
        run_async(provision_streams(url, auth, replicas=replicas, max_ages=max_ages))
    except Unavailable as exc:
        raise CliError(f"provisioning the streams at {url} failed: {exc.message}") from None
    names = ", ".join(s.name for s in ALL_STREAMS)
    render.out.print(f"provisioned {len(ALL_STREAMS)} streams and the key bucket {KEYS.name}: {names}")


@app.command("nats-config")
def nats_config() -> None:
    """Print the users and permissions part of nats-server's configuration (passwords as environment
    references, CDP_NATS_<USER>_PASSWORD) for a deployment's own server.

    Example: cdp admin nats-config > auth.conf
    """
    typer.echo(f"# passwords from the environment: {', '.join(password_env(u) for u in USERS)}")
    typer.echo(server_config(), nl=False)


@app.command("secrets")
def make_secrets(
    directory: Annotated[Path, typer.Argument(help="Where to write them (0700), e.g. deploy/compose/secrets.")],
    hosts: Annotated[list[str] | None, typer.Option("--host", help="A name clients dial NATS by (repeatable).")] = None,
) -> None:
    """Make what a deployment's NATS needs, unless present: a CA and NATS' certificate (pki/), one
    password per user (nats/<user>.password) and nats.env for nats-server. Every file 0600.

    Example: cdp admin secrets deploy/compose/secrets --host nats
    """
    names = tuple(hosts or ["nats", "localhost", "127.0.0.1"])
    ensure_secrets(directory, names)
    env = write_password_env(directory)
    render.out.print(f"wrote {directory}/pki (ca.crt, nats.crt, nats.key), {directory}/nats/*.password and {env}")
