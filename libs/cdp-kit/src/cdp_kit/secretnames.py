"""Which settings hold secrets, by name: one rule for activation (which seals and masks them) and
the CLI (which refuses them typed on the command line). The CLI imports it from the kit, not from
the activation service: a client must not load a service's code to know what to keep off argv."""

from __future__ import annotations

SECRET_WORDS = ("secret", "token", "password", "key", "credential", "auth")


def is_secret(name: str) -> bool:
    """Whether a setting called ``name`` (e.g. ``access_token``, ``s3_secret_access_key``) is a secret."""
    return any(word in name.lower() for word in SECRET_WORDS)
