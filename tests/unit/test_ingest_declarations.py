"""What a schema declares besides its fields' types: the event types of an event schema (checked
at CreateSchema, enforced on every event) and the fields holding consent (normalised into the
canonical consent_<action> attribute)."""

from __future__ import annotations

from typing import Any

import pytest
from google.protobuf import json_format

from cdp.ingest.v1 import ingest_pb2 as pb
from cdp_ingest.domain import Validator, compatibility_violations, schema_violations
from cdp_kit.consent import SPELLINGS, consent_of, consent_text, normalise_consent, spellings_of


def schema(**spec: Any) -> pb.Schema:
    return json_format.ParseDict(spec, pb.Schema())


def events(types: list[str], **extra: Any) -> pb.Schema:
    return schema(
        name="web",
        schema_class="SCHEMA_CLASS_EVENT",
        fields=[
            {"name": "event_id", "type": "FIELD_TYPE_STRING"},
            {"name": "ts", "type": "FIELD_TYPE_TIMESTAMP"},
            {"name": "type", "type": "FIELD_TYPE_STRING", **extra},
            {"name": "amount", "type": "FIELD_TYPE_STRING"},
            {"name": "cookie_id", "type": "FIELD_TYPE_STRING", "identity_namespace": "cookie"},
        ],
        event_id_field="event_id",
        timestamp_field="ts",
        event_type_field="type",
        event_types=types,
    )


def crm(*consent_fields: dict[str, Any]) -> pb.Schema:
    return schema(
        name="crm",
        schema_class="SCHEMA_CLASS_PROFILE",
        fields=[
            {"name": "crm_id", "type": "FIELD_TYPE_STRING", "identity_namespace": "crm_id", "required": True},
            *consent_fields,
        ],
    )


def rules(violations: list[Any]) -> list[tuple[str, str]]:
    return sorted((v.field, v.rule) for v in violations)


def test_event_types_are_checked_when_a_schema_is_created() -> None:
    assert schema_violations(events(["page_view", "order"])) == []
    assert rules(schema_violations(events(["Page View", "order", "order"]))) == [
        ("event_types", "pattern"),
        ("event_types", "unique"),
    ]
    assert rules(schema_violations(events(["order", "refund"], enum_values=["order"]))) == [("event_types", "enum")]
    no_field = events(["order"])
    no_field.event_type_field = ""
    assert ("event_types", "event_types") in rules(schema_violations(no_field))
    profile = crm()
    profile.event_types.append("order")
    assert rules(schema_violations(profile)) == [("event_types", "event_types")]


def test_event_types_may_be_added_never_removed_and_a_schema_for_any_type_is_not_narrowed() -> None:
    assert compatibility_violations(events(["order"]), events(["order", "refund"])) == []
    assert compatibility_violations(events(["order"]), events([])) == []
    assert rules(compatibility_violations(events(["order", "refund"]), events(["order"]))) == [
        ("event_types", "compatible")
    ]
    assert rules(compatibility_violations(events([]), events(["order"]))) == [("event_types", "compatible")]


@pytest.mark.parametrize("textual", [True, False])
def test_an_event_of_a_type_its_schema_does_not_declare_is_rejected(textual: bool) -> None:
    validator = Validator(events(["page_view", "order"]), textual=textual, drop_unknown=False, max_bytes=10_000)
    row = {"event_id": "e1", "ts": "2026-01-01T10:00:00Z", "type": "order", "amount": "12.50", "cookie_id": "c1"}
    accepted = validator.validate(row, 80, "row 1")
    assert accepted.ok
    assert accepted.event_type == "order"
    refused = validator.validate({**row, "type": "refund"}, 80, "row 2")
    assert rules(refused.violations) == [("type", "event_type")]
    missing = validator.validate({k: v for k, v in row.items() if k != "type"}, 80, "row 3")
    assert [(v.field, v.rule, v.message) for v in missing.violations] == [("type", "event_type", "missing")]
    # Without a list the type is free, as before.
    free = Validator(events([]), textual=textual, drop_unknown=False, max_bytes=10_000)
    assert free.validate({**row, "type": "refund"}, 80, "row 4").ok


def test_consent_fields_are_checked_when_a_schema_is_created() -> None:
    flat = {"name": "email_consent", "type": "FIELD_TYPE_STRING", "consent_for": "email_marketing"}
    assert schema_violations(crm(flat)) == []
    assert schema_violations(crm({**flat, "type": "FIELD_TYPE_BOOLEAN"})) == []
    assert rules(schema_violations(crm({**flat, "consent_for": "emails"}))) == [("email_consent", "consent_for")]
    assert rules(schema_violations(crm({**flat, "type": "FIELD_TYPE_DATE"}))) == [("email_consent", "consent_for")]
    twice = {"name": "optin", "type": "FIELD_TYPE_STRING", "consent_for": "email_marketing"}
    assert rules(schema_violations(crm(flat, twice))) == [("optin", "consent_for")]
    canonical = {"name": "consent_email_marketing", "type": "FIELD_TYPE_STRING"}
    assert rules(schema_violations(crm(flat, canonical))) == [
        ("consent_email_marketing", "consent_for"),
        ("email_consent", "consent_for"),
    ]
    nested = {
        "name": "consents",
        "type": "FIELD_TYPE_OBJECT",
        "fields": [{"name": "email_marketing", "type": "FIELD_TYPE_STRING"}],
    }
    assert rules(schema_violations(crm(flat, nested))) == [("email_consent", "consent_for")]
    deep = {**nested, "fields": [{"name": "sms", "type": "FIELD_TYPE_STRING", "consent_for": "sms_marketing"}]}
    assert rules(schema_violations(crm(deep))) == [("consents.sms", "consent_for")]
    on_events = events([])
    on_events.fields.append(json_format.ParseDict(flat, pb.Field()))
    assert rules(schema_violations(on_events)) == [("fields", "consent_for")]


@pytest.mark.parametrize("textual", [True, False])
def test_a_consent_column_is_normalised_into_the_canonical_attribute(textual: bool) -> None:
    flat = {"name": "email_consent", "type": "FIELD_TYPE_STRING", "consent_for": "email_marketing"}
    sms = {"name": "sms_ok", "type": "FIELD_TYPE_BOOLEAN", "consent_for": "sms_marketing"}
    validator = Validator(crm(flat, sms), textual=textual, drop_unknown=False, max_bytes=10_000)
    expected = {"Y": "y", " yes ": "y", "N": "n", "no": "n", "u": "u", "Unknown": "u", "1": "y", "0": "n"}
    for raw, canonical in expected.items():
        result = validator.validate({"crm_id": "c1", "email_consent": raw}, 40, "row 1")
        assert result.ok, raw
        assert result.values == {"crm_id": "c1", "email_consent": raw, "consent_email_marketing": canonical}
    boolean = validator.validate({"crm_id": "c1", "sms_ok": "false" if textual else False}, 40, "row 2")
    assert boolean.values["consent_sms_marketing"] == "n"
    refused = validator.validate({"crm_id": "c1", "email_consent": "maybe"}, 40, "row 3")
    assert rules(refused.violations) == [("email_consent", "consent")]
    blank = validator.validate({"crm_id": "c1", "email_consent": ""} if textual else {"crm_id": "c1"}, 40, "row 4")
    assert blank.ok
    assert "consent_email_marketing" not in blank.values


def test_every_spelling_reads_as_its_value_and_sql_compares_the_same_spellings() -> None:
    for value, spellings in SPELLINGS.items():
        for spelling in spellings:
            assert normalise_consent(spelling.upper()) == value
        assert spellings_of(value.upper()) == spellings
    assert (normalise_consent(True), normalise_consent(0), normalise_consent(2), normalise_consent(None)) == (
        "y",
        "n",
        None,
        None,
    )
    assert spellings_of(" Pending ") == {"pending"}
    assert consent_text("Pending ") == "pending"


def test_the_canonical_attribute_comes_before_the_nested_one_and_no_value_is_unknown() -> None:
    assert consent_of({"consent_email_marketing": "n", "consents": {"email_marketing": "y"}}, "email_marketing") == "n"
    assert consent_of({"consents": {"email_marketing": "Yes"}}, "email_marketing") == "y"
    assert consent_of({"consents": "y"}, "email_marketing") == "unknown"
    assert consent_of({}, "email_marketing") == "unknown"
