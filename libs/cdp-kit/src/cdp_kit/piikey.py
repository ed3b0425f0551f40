"""The deployment's PII hash key: where it lives, who may use it, and how a process gets it.

``cdp_kit.telemetry.pii_hash`` is HMAC-SHA256 keyed by this secret, so a tag in a log line, a
batch report or an identity event cannot be reversed by hashing a dictionary of emails or phones.

* **Where it lives.** One file per deployment, its key as hex text (at least 64 hex digits, 32
  bytes; ``openssl rand -hex 32``), named by ``CDP_PII_HASH_KEY_FILE``. ``cdp up`` creates it at
  ``<data_dir>/secrets/pii-hash.key`` (0600, folder 0700) and keeps it across restarts; Kubernetes
  and compose mount it from a Secret.
* **Who may use it.** The services only (every one gets the same file, so the same value carries
  the same tag in every service's logs and reports). Clients, the CLI included, never hold it:
  they show the tags the services send.
* **Without it** a service refuses to start (``PiiKeyError``, exit code 2), unless
  ``CDP_PII_HASH_EPHEMERAL=true`` asks for a random key held in memory (development and tests:
  its tags change at every start and differ between services, and a loud warning says so).
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from cdp_kit.private import write_private

KEY_BYTES = 32
KEY_FILE_NAME = "pii-hash.key"
SECRETS_DIR = "secrets"


class PiiKeyError(RuntimeError):
    """No usable PII hash key: the process must not start."""


def default_key_file(data_dir: Path) -> Path:
    """Where ``cdp up`` keeps the key of the stack it runs from ``data_dir``."""
    return data_dir / SECRETS_DIR / KEY_FILE_NAME


def ensure_key_file(path: Path) -> Path:
    """Create a random key at ``path`` (0600, its folder 0700) unless one is there already."""
    path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    if path.exists():
        read_key_file(path)  # an unusable file is an error now, not when a service starts
        return path
    return write_private(path, secrets.token_hex(KEY_BYTES) + "\n")


def read_key_file(path: Path) -> bytes:
    """The key held in ``path``: hex text of at least ``KEY_BYTES`` bytes (surrounding blanks ignored)."""
    try:
        text = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise PiiKeyError(f"PII hash key file {path} cannot be read ({type(exc).__name__})") from None
    try:
        key = bytes.fromhex(text)
    except ValueError:
        raise PiiKeyError(f"PII hash key file {path} does not hold hex text (make one: openssl rand -hex 32)") from None
    if len(key) < KEY_BYTES:
        raise PiiKeyError(f"PII hash key in {path} is {len(key)} bytes; at least {KEY_BYTES} are needed")
    return key


def ephemeral_key() -> bytes:
    return secrets.token_bytes(KEY_BYTES)


def load_key(key_file: Path | None, *, ephemeral: bool) -> bytes | None:
    """The configured key; ``None`` when an ephemeral one was asked for and no file is named."""
    if key_file is not None:
        return read_key_file(key_file)
    if ephemeral:
        return None
    raise PiiKeyError(
        "no PII hash key: set CDP_PII_HASH_KEY_FILE to the deployment's key file (hex, 32 bytes: "
        "openssl rand -hex 32), or CDP_PII_HASH_EPHEMERAL=true for a throwaway key in development"
    )
