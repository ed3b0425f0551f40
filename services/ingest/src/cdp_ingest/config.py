"""Datasets with their schemas and compiled validators, cached until the config changes."""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlmodel import Session

from cdp.ingest.v1 import ingest_pb2 as pb
from cdp_ingest import store
from cdp_ingest.domain import IdentityRules, Validator
from cdp_ingest.settings import IngestSettings
from cdp_kit.errors import NotFound
from cdp_kit.namespaces import known_types


@dataclass
class Target:
    """Where rows land: a dataset, the latest version of its schema, its size limit and the
    deepest nesting a row may have."""

    dataset: pb.Dataset
    schema: pb.Schema
    max_bytes: int
    max_depth: int
    identity: IdentityRules = field(default_factory=IdentityRules)
    _validators: dict[bool, Validator] = field(default_factory=dict)

    @property
    def is_event(self) -> bool:
        return self.schema.schema_class == pb.SCHEMA_CLASS_EVENT

    def validator(self, *, textual: bool) -> Validator:
        if textual not in self._validators:
            drop = self.dataset.unknown_fields == pb.UNKNOWN_FIELDS_DROP
            self._validators[textual] = Validator(
                self.schema,
                textual=textual,
                drop_unknown=drop,
                max_bytes=self.max_bytes,
                max_depth=self.max_depth,
                identity=self.identity,
            )
        return self._validators[textual]


class ConfigCache:
    """Cleared by the projection whenever a schema or dataset is folded, and when identity's
    namespaces change."""

    def __init__(self, settings: IngestSettings) -> None:
        self.settings = settings
        self._targets: dict[str, Target] = {}

    def clear(self) -> None:
        self._targets.clear()

    def target(self, session: Session, name: str) -> Target:
        found = self._targets.get(name)
        if found is None:
            found = self._load(session, name)
            self._targets[name] = found
        return found

    def _load(self, session: Session, name: str) -> Target:
        ds = store.dataset(session, name)
        if ds is None:
            raise NotFound(f"dataset {name!r} not found")
        schema = store.latest_schema(session, ds.schema_name)
        if schema is None:
            raise NotFound(f"schema {ds.schema_name!r} of dataset {name!r} not found")
        event = schema.schema_class == pb.SCHEMA_CLASS_EVENT
        limit = self.settings.max_event_bytes if event else self.settings.max_profile_record_bytes
        identity = IdentityRules.of(
            known_types(session), self.settings.default_phone_region, allow_anonymous=ds.allow_anonymous_rows
        )
        return Target(ds, schema, limit, self.settings.max_json_depth, identity)
