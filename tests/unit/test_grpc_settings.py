"""A service refuses to serve gRPC half-configured: TLS and tokens, or an explicit CDP_GRPC_INSECURE."""

from __future__ import annotations

from pathlib import Path

import pytest

from cdp_kit.grpc_auth import GRPC_LEAF, ensure_local_secrets
from cdp_kit.runtime import grpc_security
from cdp_kit.settings import ServiceSettings


@pytest.fixture(autouse=True)
def _no_cdp_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for key in list(os.environ):
        if key.upper().startswith("CDP_"):
            monkeypatch.delenv(key)


def test_nothing_configured_refuses_to_start() -> None:
    with pytest.raises(SystemExit, match="CDP_GRPC_TLS_CERT_FILE, CDP_GRPC_TLS_KEY_FILE, CDP_GRPC_TOKENS_FILE"):
        grpc_security(ServiceSettings())


def test_a_missing_file_refuses_to_start(tmp_path: Path) -> None:
    local = ensure_local_secrets(tmp_path)
    env = local.server_env()
    settings = ServiceSettings(
        grpc_tls_cert_file=Path(env["CDP_GRPC_TLS_CERT_FILE"]),
        grpc_tls_key_file=Path(env["CDP_GRPC_TLS_KEY_FILE"]),
        grpc_tokens_file=tmp_path / "missing.json",
    )
    with pytest.raises(SystemExit, match="cannot read the gRPC tokens file"):
        grpc_security(settings)


def test_configured_gives_tls_and_tokens(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    local = ensure_local_secrets(tmp_path)
    for key, value in local.server_env().items():
        monkeypatch.setenv(key, value)
    kwargs = grpc_security(ServiceSettings())
    assert kwargs["tls"].cert == local.pki.leaf(GRPC_LEAF).cert.read_bytes()
    assert len(kwargs["tokens"]) == 4
    assert kwargs["reflection"] == "admin"


def test_insecure_must_be_explicit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CDP_GRPC_INSECURE", "true")
    kwargs = grpc_security(ServiceSettings())
    assert "tls" not in kwargs
    assert "tokens" not in kwargs
