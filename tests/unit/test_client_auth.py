"""Where a `cdp` command takes its gRPC credentials from: CDP_GRPC_CA_FILE + CDP_GRPC_TOKEN_FILE,
else the stack's secrets in its data dir (the admin token, or the role asked), else none."""

from __future__ import annotations

from pathlib import Path

import pytest

from cdp_cli.client import Client, resolve_auth
from cdp_cli.errors import CliError
from cdp_kit.grpc_auth import ensure_local_secrets


def test_no_secrets_means_plaintext(tmp_path: Path) -> None:
    assert resolve_auth(tmp_path, environ={}) is None


def test_the_stack_secrets_and_the_role(tmp_path: Path) -> None:
    local = ensure_local_secrets(tmp_path)
    admin = resolve_auth(tmp_path, environ={})
    assert admin is not None
    assert admin.token == local.token("admin")
    assert admin.ca == local.pki.ca_cert.read_bytes()
    reader = Client(tmp_path, environ={}, role="reader").auth()
    assert reader is not None
    assert reader.token == local.token("reader")
    assert local.token("admin") not in repr(admin)  # a token never shows in a repr


def test_the_environment_wins(tmp_path: Path) -> None:
    local = ensure_local_secrets(tmp_path / "stack")
    token = tmp_path / "mine.token"
    token.write_text("my-token\n")
    env = {"CDP_GRPC_CA_FILE": str(local.pki.ca_cert), "CDP_GRPC_TOKEN_FILE": str(token)}
    auth = resolve_auth(tmp_path / "stack", environ=env)
    assert auth is not None
    assert auth.token == "my-token"


@pytest.mark.parametrize("var", ["CDP_GRPC_CA_FILE", "CDP_GRPC_TOKEN_FILE"])
def test_one_without_the_other_is_an_error(tmp_path: Path, var: str) -> None:
    with pytest.raises(CliError, match="set both"):
        resolve_auth(tmp_path, environ={var: str(tmp_path / "x")})


def test_an_unreadable_file_is_an_error(tmp_path: Path) -> None:
    env = {"CDP_GRPC_CA_FILE": str(tmp_path / "none.crt"), "CDP_GRPC_TOKEN_FILE": str(tmp_path / "none.token")}
    with pytest.raises(CliError, match="cannot read gRPC credentials"):
        resolve_auth(tmp_path, environ=env)
