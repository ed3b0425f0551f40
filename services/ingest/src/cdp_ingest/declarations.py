"""What a schema declares beyond its fields' types: the event types an event schema carries and
the fields that hold a person's consent to a marketing action. Pure rules, checked when a schema
is created and applied to each row."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from cdp.ingest.v1 import ingest_pb2 as pb
from cdp_kit.consent import MARKETING_ACTIONS, NESTED, attribute_of, normalise_consent
from cdp_kit.errors import Violation

FT = pb.FieldType
# An event type the audience language can name (count(order) ..., order.amount).
EVENT_TYPE_RE = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
NOT_CONSENT = "not a consent value (y/n/u, yes/no, true/false, 1/0)"
CONSENT_TYPES = (FT.FIELD_TYPE_STRING, FT.FIELD_TYPE_BOOLEAN, FT.FIELD_TYPE_INTEGER)


# ----------------------------------------------------------------------------- event types


def event_types_violations(schema: pb.Schema) -> list[Violation]:
    """A list of event types: only on event schemas naming their event-type field, each a name
    the audience language can use, once, and within the field's enum when it has one."""
    if not schema.event_types:
        return []
    if schema.schema_class != pb.SCHEMA_CLASS_EVENT:
        return [Violation("event_types", "event_types", "only event schemas declare event types")]
    if not schema.event_type_field:
        return [Violation("event_types", "event_types", "declaring event types needs an event_type_field")]
    out: list[Violation] = []
    seen: set[str] = set()
    for name in schema.event_types:
        if not EVENT_TYPE_RE.match(name):
            out.append(Violation("event_types", "pattern", f"{name!r}: event types are lower_snake_case"))
        elif name in seen:
            out.append(Violation("event_types", "unique", f"{name!r} is listed twice"))
        seen.add(name)
    type_field = next((f for f in schema.fields if f.name == schema.event_type_field), None)
    if type_field is not None and type_field.enum_values:
        outside = sorted(seen - set(type_field.enum_values))
        if outside:
            hint = f"not among the enum values of {type_field.name}: {', '.join(outside)}"
            out.append(Violation("event_types", "enum", hint))
    return out


def event_types_compat(old: pb.Schema, new: pb.Schema) -> list[Violation]:
    """Event types may be added, not removed; a schema for any type cannot be narrowed to some."""
    if not old.event_types:
        if new.event_types:
            return [Violation("event_types", "compatible", "a schema for any event type cannot list event types")]
        return []
    if not new.event_types:
        return []  # widened to any type
    removed = sorted(set(old.event_types) - set(new.event_types))
    if removed:
        return [Violation("event_types", "compatible", f"event types cannot be removed: {', '.join(removed)}")]
    return []


def event_type_check(schema: pb.Schema) -> Callable[[str], Violation | None] | None:
    """For a schema listing its event types: the check of an event's type (rule event_type)."""
    if not schema.event_types:
        return None
    declared = frozenset(schema.event_types)
    hint = f"not one of the {len(declared)} event types the schema declares"
    name = schema.event_type_field

    def check(event_type: str) -> Violation | None:
        if event_type in declared:
            return None
        return Violation(name, "event_type", "missing" if not event_type else hint)

    return check


# ----------------------------------------------------------------------------- consent


def consent_violations(schema: pb.Schema) -> list[Violation]:
    """``consent_for`` names a marketing action, on a top-level field of a profile schema, at most
    one field per action, and never beside another field that would hold the same consent."""
    out = _nested_consent_for(schema.fields)
    roles = [f for f in schema.fields if f.consent_for]
    if not roles:
        return out
    if schema.schema_class != pb.SCHEMA_CLASS_PROFILE:
        return [*out, Violation("fields", "consent_for", "consent is read from profile schemas only")]
    names = {f.name for f in schema.fields}
    nested = next((f for f in schema.fields if f.name == NESTED), None)
    nested_actions = {s.name for s in nested.fields} if nested is not None else set()
    seen: dict[str, str] = {}
    for f in roles:
        action = f.consent_for
        canonical = attribute_of(action)
        if action not in MARKETING_ACTIONS:
            out.append(Violation(f.name, "consent_for", f"one of {', '.join(MARKETING_ACTIONS)}"))
            continue
        if f.type not in CONSENT_TYPES:
            out.append(Violation(f.name, "consent_for", "a consent field is a string, boolean or integer"))
        if f.identity_namespace:
            out.append(Violation(f.name, "consent_for", "an identity field cannot hold consent"))
        if action in seen:
            out.append(Violation(f.name, "consent_for", f"{seen[action]} already holds consent to {action}"))
        seen[action] = f.name
        if f.name != canonical and canonical in names:
            out.append(Violation(f.name, "consent_for", f"field {canonical} would hold consent to {action} too"))
        if action in nested_actions:
            out.append(Violation(f.name, "consent_for", f"field {NESTED}.{action} would hold consent to {action} too"))
    for f in schema.fields:
        if f.name.startswith("consent_") and not f.consent_for and f.name[len("consent_") :] in seen:
            action = f.name[len("consent_") :]
            out.append(Violation(f.name, "consent_for", f"{seen[action]} holds consent to {action}; {f.name} too"))
    return out


def _nested_consent_for(fields: Any, prefix: str = "") -> list[Violation]:
    out: list[Violation] = []
    for f in fields:
        if prefix and f.consent_for:
            out.append(Violation(prefix + f.name, "consent_for", "consent_for is set on top-level fields"))
        out += _nested_consent_for(f.fields, f"{prefix}{f.name}.")
    return out


def consent_roles(schema: pb.Schema) -> tuple[tuple[str, str], ...]:
    """(field, canonical attribute) of every field holding consent."""
    return tuple((f.name, attribute_of(f.consent_for)) for f in schema.fields if f.consent_for)


def apply_consents(
    values: dict[str, Any], roles: tuple[tuple[str, str], ...], violations: list[Violation], record: str
) -> None:
    """Write each consent field's value, normalised to y/n/u, to its canonical attribute; a value
    that reads as none of them is rule ``consent``."""
    for name, canonical in roles:
        raw = values.get(name)
        if raw is None:
            continue
        value = normalise_consent(raw)
        if value is None:
            violations.append(Violation(name, "consent", NOT_CONSENT, record))
            continue
        values[canonical] = value
