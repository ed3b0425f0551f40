"""Pure identity rules: normalisation and how graphs are joined. No I/O, no clock."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

BLOCKLIST = frozenset({"", "null", "none", "nan", "undefined", "anonymous", "unknown", "n/a", "test@test.com"})


def normalise(namespace: str, value: str) -> str | None:
    """The canonical form of an identity value, or None when it must not link anyone."""
    text = value.strip()
    if namespace == "email":
        text = text.lower()
        if "@" not in text or text.startswith("@") or text.endswith("@"):
            return None
    if text.lower() in BLOCKLIST:
        return None
    return text


def profile_id_for(namespace: str, value: str) -> str:
    """A new profile's id: derived from the identity that founded it, so a replay finds the same id."""
    return "p-" + hashlib.sha256(f"{namespace}\x1f{value}".encode()).hexdigest()[:24]


@dataclass(frozen=True)
class Known:
    """A profile an incoming record touches, with its creation ordinal (lower = older)."""

    profile_id: str
    ordinal: int


@dataclass(frozen=True)
class Resolution:
    profile_id: str
    absorbed: tuple[str, ...]
    created: bool


def resolve(identities: list[tuple[str, str]], known: Iterable[Known]) -> Resolution:
    """Which profile a record belongs to. Several profiles are merged into the OLDEST one
    (lowest creation ordinal; ties broken by id), so the survivor never depends on which
    record happened to join them."""
    touched = sorted(set(known), key=lambda k: (k.ordinal, k.profile_id))
    if not touched:
        ns, value = identities[0]
        return Resolution(profile_id_for(ns, value), (), True)
    survivor = touched[0].profile_id
    return Resolution(survivor, tuple(k.profile_id for k in touched[1:]), False)
