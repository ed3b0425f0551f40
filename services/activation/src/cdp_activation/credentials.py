"""Destination secrets: sealed before they reach the log, opened only in memory to deliver.

A config value is a secret when its key says so (``is_secret``: token, secret, password, key,
credential, auth) or when it is a URL carrying credentials (``user:pass@``, ``?api_key=``). Each
is sealed on its own (``cdp_kit.keyring``, text form ``cdpenc:v1:...``) with the context
``destination:<id>:<path>``, so a ciphertext cannot be moved to another field or destination.
The sealed plaintext is the JSON of the value (a secret may be a number or an object).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from google.protobuf import json_format, struct_pb2

from cdp.activation.v1 import activation_pb2 as pb
from cdp_activation.connectors import ConnectorConfig, connector_for
from cdp_kit.keyring import Keyring, is_sealed, key_id_of
from cdp_kit.secretnames import SECRET_WORDS, is_secret
from cdp_kit.urlmask import has_url_credentials, mask_url_credentials

MASK = "****"
__all__ = ["MASK", "SECRET_WORDS", "is_secret"]


def _context(dest_id: str, path: str) -> str:
    return f"destination:{dest_id}:{path}"


def _needs_sealing(name: str, value: Any) -> bool:
    if is_sealed(value) or value is None or value == "":
        return False
    return is_secret(name) or (isinstance(value, str) and has_url_credentials(value))


def _walk(config: Mapping[str, Any], visit: Callable[[str, str, Any], Any], prefix: str = "") -> dict[str, Any]:
    """A copy of ``config`` with ``visit(name, path, value)`` applied to every leaf (a value
    under a secret key is a leaf whatever its type: it is sealed whole)."""
    out: dict[str, Any] = {}
    for name, value in config.items():
        path = f"{prefix}{name}"
        if isinstance(value, Mapping) and not is_secret(name):
            out[name] = _walk(value, visit, path + ".")
        else:
            out[name] = visit(name, path, value)
    return out


def seal_config(config: Mapping[str, Any], keyring: Keyring, dest_id: str) -> dict[str, Any]:
    """Every secret not yet sealed, sealed under the newest master key."""

    def seal(name: str, path: str, value: Any) -> Any:
        if not _needs_sealing(name, value):
            return value
        return keyring.seal_text(json.dumps(value), _context(dest_id, path))

    return _walk(config, seal)


def reseal_config(config: Mapping[str, Any], keyring: Keyring, dest_id: str) -> dict[str, Any]:
    """Every secret sealed under the newest master key (plain ones too: older versions wrote them)."""

    def reseal(name: str, path: str, value: Any) -> Any:
        if is_sealed(value):
            return value if key_id_of(value) == keyring.newest else keyring.reseal_text(value, _context(dest_id, path))
        if _needs_sealing(name, value):
            return keyring.seal_text(json.dumps(value), _context(dest_id, path))
        return value

    return _walk(config, reseal)


def open_config(config: Mapping[str, Any], keyring: Keyring, dest_id: str) -> dict[str, Any]:
    """The plain config, in memory only: for validation by the connector and for sending."""

    def open_(name: str, path: str, value: Any) -> Any:
        return json.loads(keyring.open_text(value, _context(dest_id, path))) if is_sealed(value) else value

    return _walk(config, open_)


def sealed_key_ids(config: Mapping[str, Any]) -> set[str]:
    return {key_id_of(v) for v in _leaves(config) if is_sealed(v)}


def has_plain_secrets(config: Mapping[str, Any]) -> bool:
    found: list[bool] = []
    _walk(config, lambda name, _path, value: found.append(_needs_sealing(name, value)))
    return any(found)


def _leaves(config: Mapping[str, Any]) -> Iterator[Any]:
    for value in config.values():
        if isinstance(value, Mapping):
            yield from _leaves(value)
        else:
            yield value


def config_dict(dest: pb.Destination) -> dict[str, Any]:
    return json_format.MessageToDict(dest.config)


def connector_config(dest: pb.Destination, keyring: Keyring) -> ConnectorConfig:
    """The destination's connector settings with its secrets opened (in memory, never stored)."""
    return connector_for(dest.connector).parse(open_config(config_dict(dest), keyring, dest.id))


def masked(dest: pb.Destination, keyring: Keyring | None = None) -> pb.Destination:
    """Credentials never leave the service: every answer masks them. A URL sealed because it
    carried credentials is shown with them masked (opened in memory when ``keyring`` is given)."""

    def mask(name: str, path: str, value: Any) -> Any:
        if is_secret(name):
            return MASK
        if is_sealed(value):
            if keyring is None:
                return MASK
            try:
                plain = json.loads(keyring.open_text(value, _context(dest.id, path)))
            except Exception:  # a retired key: the answer still lists the destination
                return MASK
            return mask_url_credentials(plain) if isinstance(plain, str) else MASK
        if isinstance(value, str):
            return mask_url_credentials(value)
        return value

    out = pb.Destination()
    out.CopyFrom(dest)
    out.config.Clear()
    out.config.update(_walk(config_dict(dest), mask))
    return out


def struct_of(config: Mapping[str, Any]) -> struct_pb2.Struct:
    return json_format.ParseDict(dict(config), struct_pb2.Struct())
