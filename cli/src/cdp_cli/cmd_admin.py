"""Administration: the master key that encrypts destination secrets at rest."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cdp.activation.v1 import activation_pb2
from cdp_cli import render
from cdp_cli.context import client_of, state_of
from cdp_cli.errors import CliError
from cdp_kit.keyring import KeyringError, add_key, ensure_key_file, load_keyring, retire_keys

app = typer.Typer(help="Administration: master key rotation.", no_args_is_help=True, add_completion=False)


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
