"""A deployment's own certificate authority, for TLS on NATS and gRPC (``cdp up``, tests, benches).

Production deployments bring certificates of their own (cert-manager writes ``tls.crt``,
``tls.key`` and ``ca.crt`` into a mounted Secret); the embedded stack and the tests make them
here. Everything is done by ``cryptography`` (ECDSA P-256, SHA-256), nothing by hand.

Layout of a PKI directory (every file 0600, the directory 0700)::

    ca.crt ca.key                 the authority (self-signed, 10 years)
    <name>.crt <name>.key         one leaf per name, signed by the authority

A leaf may serve (its SANs are the hosts clients dial), authenticate a client (mTLS), or both.
``ensure`` is idempotent: existing files are kept, so a restarted stack keeps its certificates
and every client that trusted the authority still does.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from cdp_kit.private import write_private

CA_NAME = "ca"
CA_DAYS = 3650
LEAF_DAYS = 825  # the longest a public CA may issue; rotate by deleting the pair and re-running
DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class Leaf:
    """Paths of one issued certificate and its key, with the authority that signed it."""

    cert: Path
    key: Path
    ca: Path

    def read(self) -> tuple[bytes, bytes, bytes]:
        """(certificate chain PEM, private key PEM, authority PEM), as grpc's credentials want them."""
        return self.cert.read_bytes(), self.key.read_bytes(), self.ca.read_bytes()


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


class Pki:
    """A directory holding one authority and the leaves it issued."""

    def __init__(self, directory: Path) -> None:
        self.dir = Path(directory)

    @property
    def ca_cert(self) -> Path:
        return self.dir / f"{CA_NAME}.crt"

    def ensure_ca(self) -> None:
        """Create the authority unless it exists."""
        if self.ca_cert.exists() and (self.dir / f"{CA_NAME}.key").exists():
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cdp deployment CA")])
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=True,
                    crl_sign=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        write_private(self.dir / f"{CA_NAME}.key", _key_pem(key))
        write_private(self.ca_cert, cert.public_bytes(serialization.Encoding.PEM))

    def leaf(self, name: str) -> Leaf:
        return Leaf(self.dir / f"{name}.crt", self.dir / f"{name}.key", self.ca_cert)

    def ensure(
        self, name: str, hosts: tuple[str, ...] = DEFAULT_HOSTS, *, server: bool = True, client: bool = True
    ) -> Leaf:
        """The leaf called ``name`` (its common name too), issued unless it exists.

        ``hosts`` become its subject alternative names (what a client checks when it dials a
        server); ``server``/``client`` set its extended key usages.
        """
        if not name or "/" in name or name == CA_NAME:
            raise ValueError(f"not a certificate name: {name!r}")
        leaf = self.leaf(name)
        if leaf.cert.exists() and leaf.key.exists():
            return leaf
        self.ensure_ca()
        ca_key = serialization.load_pem_private_key((self.dir / f"{CA_NAME}.key").read_bytes(), password=None)
        if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{self.dir / CA_NAME}.key is not an EC key")
        ca_cert = x509.load_pem_x509_certificate(self.ca_cert.read_bytes())
        key = ec.generate_private_key(ec.SECP256R1())
        usages = ([ExtendedKeyUsageOID.SERVER_AUTH] if server else []) + (
            [ExtendedKeyUsageOID.CLIENT_AUTH] if client else []
        )
        now = _now()
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=LEAF_DAYS))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        )
        if hosts:
            builder = builder.add_extension(x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        write_private(leaf.key, _key_pem(key))
        write_private(leaf.cert, cert.public_bytes(serialization.Encoding.PEM))
        return leaf
