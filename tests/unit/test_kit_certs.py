"""The deployment's own certificate authority: real TLS handshakes on loopback with what it
issues (server verified by the authority, client certificates required), files readable by their
owner only, idempotent, and a certificate from another authority refused."""

from __future__ import annotations

import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest

from cdp_kit.certs import Pki


def handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, host: str = "127.0.0.1") -> str:
    """Connect a TLS client to a TLS server on loopback; the server's view of the client's name."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    seen: list[str] = []
    failures: list[BaseException] = []

    def serve() -> None:
        conn, _ = listener.accept()
        try:
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                peer: dict[str, object] = dict(tls.getpeercert() or {})
                subject = peer.get("subject", ())
                assert isinstance(subject, tuple)
                seen.extend(str(pair[1]) for rdn in subject for pair in rdn if pair[0] == "commonName")
                tls.sendall(b"ok")
        except (ssl.SSLError, OSError) as exc:
            failures.append(exc)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
            client_ctx.wrap_socket(raw, server_hostname=host) as tls,
        ):
            assert tls.recv(2) == b"ok"
    finally:
        thread.join(5)
        listener.close()
    if failures:
        raise failures[0]
    return seen[0] if seen else ""


def server_context(pki: Pki, name: str) -> ssl.SSLContext:
    leaf = pki.leaf(name)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(leaf.ca))
    ctx.load_cert_chain(leaf.cert, leaf.key)
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_context(pki: Pki, name: str | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki.ca_cert))
    if name is not None:
        leaf = pki.leaf(name)
        ctx.load_cert_chain(leaf.cert, leaf.key)
    return ctx


def test_a_leaf_serves_tls_and_authenticates_its_client(tmp_path: Path) -> None:
    pki = Pki(tmp_path / "pki")
    pki.ensure("nats", server=True, client=False)
    pki.ensure("identity", hosts=(), server=False, client=True)
    assert handshake(server_context(pki, "nats"), client_context(pki, "identity")) == "identity"
    assert handshake(server_context(pki, "nats"), client_context(pki, "identity"), host="localhost") == "identity"


def test_a_client_without_a_certificate_or_from_another_authority_is_refused(tmp_path: Path) -> None:
    pki, other = Pki(tmp_path / "pki"), Pki(tmp_path / "other")
    pki.ensure("nats", server=True, client=False)
    other.ensure("intruder", hosts=(), server=False, client=True)
    intruder = ssl.create_default_context(cafile=str(pki.ca_cert))  # trusts the server, but its own CA signed it
    intruder.load_cert_chain(other.leaf("intruder").cert, other.leaf("intruder").key)
    for ctx in (client_context(pki, None), intruder):
        with pytest.raises((ssl.SSLError, OSError)):
            handshake(server_context(pki, "nats"), ctx)


def test_a_server_is_checked_against_its_names_and_its_authority(tmp_path: Path) -> None:
    pki, other = Pki(tmp_path / "pki"), Pki(tmp_path / "other")
    pki.ensure("nats", hosts=("nats.cdp.svc",), server=True, client=False)
    pki.ensure("identity", hosts=(), server=False, client=True)
    with pytest.raises(ssl.SSLCertVerificationError):  # 127.0.0.1 is not among its names
        handshake(server_context(pki, "nats"), client_context(pki, "identity"))
    other.ensure("nats", server=True, client=False)
    with pytest.raises(ssl.SSLCertVerificationError):  # signed by an authority the client does not trust
        handshake(server_context(other, "nats"), client_context(pki, "identity"))


def test_files_are_private_and_ensure_keeps_what_exists(tmp_path: Path) -> None:
    pki = Pki(tmp_path / "pki")
    leaf = pki.ensure("ingest")
    before = leaf.read()
    assert Pki(tmp_path / "pki").ensure("ingest").read() == before
    assert stat.S_IMODE(pki.dir.stat().st_mode) == 0o700
    for path in pki.dir.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    with pytest.raises(ValueError, match="not a certificate name"):
        pki.ensure("../escape")
