"""The connector contract and the catalog.

A connector turns one micro-batch of adds or removes into what one destination's public
API expects. It is a pure adapter: retries, rate limits, dead letters and the delivery
log live in the Deliverer. It raises ``DeliveryError`` (permanent or transient, with an
optional Retry-After) and never logs a credential or a raw identifier.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import aiohttp
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cdp_activation import identifiers as ids
from cdp_kit.errors import InvalidInput, Violation

Action = Literal["add", "remove", "erase"]


class DeliveryError(Exception):
    """A failed send. ``permanent`` errors are dead-lettered at once; transient ones are
    retried with backoff (``retry_after`` seconds when the destination said so)."""

    def __init__(self, reason: str, *, permanent: bool, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.permanent = permanent
        self.retry_after = retry_after


class ConnectorConfig(BaseModel):
    """Settings every destination has; connectors extend it. Unknown keys are refused."""

    model_config = ConfigDict(extra="forbid")

    base_url: str = ""
    batch_size: int = Field(default=500, ge=1, le=100_000, description="Max profiles per micro-batch")
    batch_age_s: float = Field(default=1.0, ge=0, description="Max seconds a change waits for its batch")
    rate_per_s: float = Field(default=50.0, gt=0, description="Requests per second to this destination")
    max_attempts: int = Field(default=5, ge=1, le=50)
    timeout_s: float = Field(default=30.0, gt=0, description="Seconds one send may take")
    backoff_s: float = Field(default=0.5, ge=0, description="First retry delay; doubles each attempt, with jitter")
    backoff_max_s: float = Field(default=60.0, ge=0)


@dataclass(frozen=True)
class Record:
    profile_id: str
    identities: dict[str, list[str]]
    attributes: dict[str, Any]

    def first(self, namespace: str) -> str:
        values = self.identities.get(namespace) or []
        return values[0] if values else ""

    def to_dict(self) -> dict[str, Any]:
        return {"profile_id": self.profile_id, "identities": self.identities, "attributes": self.attributes}

    @staticmethod
    def of(data: Mapping[str, Any]) -> Record:
        return Record(str(data["profile_id"]), dict(data.get("identities") or {}), dict(data.get("attributes") or {}))


@dataclass(frozen=True)
class Batch:
    id: str
    plan_id: str
    destination: str
    segment: str
    action: Action
    sequence: int
    records: list[Record]
    identities: list[str]
    attributes: list[str]
    # The plan's whole audience after this batch (for connectors that send snapshots).
    snapshot: list[Record] | None = None


@dataclass
class SendResult:
    activated: int
    location: str = ""
    rejected: dict[str, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def count_drop(rejected: dict[str, int], kind: str) -> None:
    """Count one identifier dropped because it cannot be normalised (reason has no value)."""
    reason = ids.drop_reason(kind)
    rejected[reason] = rejected.get(reason, 0) + 1


@dataclass
class SendContext:
    http: aiohttp.ClientSession
    export_root: Path
    # Profiles the destination holds after this batch (for minimum-audience warnings).
    members_after: int = 0


class Connector:
    name: ClassVar[str]
    config_model: ClassVar[type[ConnectorConfig]] = ConnectorConfig
    # Sending the same batch id twice adds nothing twice at the destination.
    idempotent: ClassVar[bool] = False
    # Identity namespaces the destination can match on (None = any); "any" = at least one.
    identity_namespaces: ClassVar[tuple[str, ...] | None] = None
    identity_rule: ClassVar[Literal["all", "any"]] = "all"
    # Records carry every identity of the profile, not only the plan's namespaces.
    all_identities: ClassVar[bool] = False
    min_audience: ClassVar[int] = 0
    # What a privacy erasure asks of the platform (``cdp_activation.privacy``): "" = the platform
    # has no removal, else what it does ("remove from the audience", "delete the user").
    erasure: ClassVar[str] = ""

    def erases(self, config: ConnectorConfig) -> bool:
        """Whether this destination, so configured, has a removal for an erased person."""
        return bool(self.erasure)

    def parse(self, config: Mapping[str, Any]) -> ConnectorConfig:
        try:
            return self.config_model.model_validate(dict(config))
        except ValidationError as exc:
            raise InvalidInput(f"{self.name} config is invalid", violations_of(exc)) from None

    def validate(self, config: Mapping[str, Any]) -> list[Violation]:
        try:
            self.parse(config)
        except InvalidInput as exc:
            return list(exc.violations)
        return []

    def wants_snapshot(self, config: ConnectorConfig) -> bool:
        return False

    def required_identities(self, plan_identities: list[str]) -> list[str]:
        """The plan's namespaces this destination needs (all, or any one per identity_rule)."""
        if self.identity_namespaces is None:
            return list(plan_identities)
        wanted = [ns for ns in plan_identities if ns in self.identity_namespaces]
        return wanted or list(self.identity_namespaces)

    def warnings(self, members_after: int) -> list[str]:
        if self.min_audience and members_after < self.min_audience:
            return [f"audience of {members_after} is below the {self.name} minimum of {self.min_audience}"]
        return []

    async def send(self, ctx: SendContext, config: ConnectorConfig, batch: Batch) -> SendResult:
        raise NotImplementedError

    def erase_identifiers(self, config: ConnectorConfig, rec: Record) -> dict[str, list[str]]:
        """What an erasure batch keeps of a record the destination was sent: only the identifiers
        the platform's removal needs, already in the form it takes (hashed where it takes hashes),
        keyed by the platform's own field names. Empty: nothing the removal could match on."""
        raise NotImplementedError

    async def erase(self, ctx: SendContext, config: ConnectorConfig, batch: Batch) -> SendResult:
        """Send an erasure batch (``action == "erase"``): records hold ``erase_identifiers``."""
        raise NotImplementedError


def violations_of(exc: ValidationError) -> list[Violation]:
    out: list[Violation] = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"])
        out.append(Violation(f"config.{where}", err["type"], err["msg"]))
    return out
