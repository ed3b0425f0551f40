"""The connector contract and the catalog."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from cdp_kit.errors import InvalidInput, Violation


@dataclass(frozen=True)
class Member:
    profile_id: str
    identities: dict[str, list[str]]
    attributes: dict[str, Any]


@dataclass(frozen=True)
class Audience:
    """One delivery's input: the plan's current members, and who joined or left since the last one."""

    destination: str
    segment: str
    members: list[Member]
    added: list[str]
    removed: list[str]
    identities: list[str]
    attributes: list[str]


@dataclass
class DeliveryResult:
    location: str
    delivered: int
    excluded: dict[str, int] = field(default_factory=dict)


class Connector(Protocol):
    name: str

    def validate(self, config: dict[str, Any]) -> list[Violation]: ...

    async def deliver(self, config: dict[str, Any], audience: Audience) -> DeliveryResult: ...


def connector_for(name: str, export_root: Path) -> Connector:
    from cdp_activation.connectors.file_export import FileExport

    catalog: dict[str, Connector] = {"file_export": FileExport(export_root)}
    if name not in catalog:
        known = ", ".join(sorted(catalog))
        raise InvalidInput(f"unknown connector {name!r}", [Violation("connector", "catalog", f"one of: {known}")])
    return catalog[name]
