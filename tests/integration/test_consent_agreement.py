"""One consent, read alike: segmentation's `consent A = "…"` (streaming, and SQL on SQLite and
PostgreSQL) and activation's consent gate agree on every profile, whether consent came as a flat
column a schema marks `consent_for` (normalised by ingest), as nested `consents.<A>` data or as a
legacy `consent_<A>` attribute, whatever its spelling."""

from __future__ import annotations

from typing import Any

import pytest
from google.protobuf import json_format

from cdp.ingest.v1 import ingest_pb2
from cdp_activation import delivery
from cdp_ingest.domain import Validator
from cdp_kit.store import create_tables, make_engine, transaction
from cdp_segmentation.evaluate import ProfileData, compile_ast, matches
from cdp_segmentation.language import parse
from cdp_segmentation.sql import matching
from cdp_segmentation.store import TABLES, ProfileRow

ACTION = "email_marketing"
CRM = json_format.ParseDict(
    {
        "name": "crm",
        "schema_class": "SCHEMA_CLASS_PROFILE",
        "fields": [
            {"name": "crm_id", "type": "FIELD_TYPE_STRING", "identity_namespace": "crm_id", "required": True},
            {"name": "email_consent", "type": "FIELD_TYPE_STRING", "consent_for": ACTION},
        ],
    },
    ingest_pb2.Schema(),
)


def from_csv(value: str) -> dict[str, Any]:
    """A CRM CSV row's attributes as ingest appends them."""
    result = Validator(CRM, textual=True, drop_unknown=False, max_bytes=10_000).validate(
        {"crm_id": "c1", "email_consent": value}, 40, "row 1"
    )
    assert result.ok, result.violations
    return result.values


PROFILES: dict[str, dict[str, Any]] = {
    "flat_y": from_csv("Y"),
    "flat_yes": from_csv(" yes"),
    "flat_n": from_csv("N"),
    "flat_u": from_csv("u"),
    "flat_true": from_csv("TRUE"),
    "flat_blank": from_csv(""),
    "nested_y": {"consents": {ACTION: "y"}},
    "nested_upper": {"consents": {ACTION: "Y"}},
    "nested_bool": {"consents": {ACTION: True}},
    "nested_false": {"consents": {ACTION: False}},
    "nested_one": {"consents": {ACTION: 1}},
    "nested_no": {"consents": {ACTION: "no"}},
    "nested_other": {"consents": {ACTION: "Pending"}},
    "nested_other_action": {"consents": {"sms_marketing": "y"}},
    "legacy_flat": {"consent_email_marketing": "YES"},
    "both_canonical_wins": {"consent_email_marketing": "n", "consents": {ACTION: "y"}},
    "none": {"first_name": "ann"},
}


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Any) -> Any:
    url = f"sqlite:///{tmp_path / 'seg.db'}"
    if request.param == "postgres":
        url = request.getfixturevalue("postgres_url")
    engine = make_engine(url)
    create_tables(engine, TABLES)
    with transaction(engine) as session:
        for pid, attributes in PROFILES.items():
            session.add(ProfileRow(profile_id=pid, attributes=attributes))
    yield engine
    engine.dispose()


@pytest.mark.postgres
@pytest.mark.parametrize("value", ["y", "n", "u", "Yes", "pending"])
def test_segmentation_and_activation_read_one_consent(store: Any, value: str) -> None:
    ast = parse(f'consent {ACTION} = "{value}"')
    test = compile_ast(ast)
    streamed = {pid for pid, attrs in PROFILES.items() if test(ProfileData(attrs, set(), set()), 0)}
    walked = {pid for pid, attrs in PROFILES.items() if matches(ast, ProfileData(attrs, set(), set()), 0)}
    with store.connect() as conn:
        in_sql = matching(conn, ast, 0, {})
    assert streamed == walked == in_sql
    if value in ("y", "Yes"):
        # Activation sends exactly these (with CDP_UNKNOWN_CONSENT=n; =y adds those with none).
        sent = {pid for pid, attrs in PROFILES.items() if delivery.consent_of(attrs, ACTION) == "y"}
        assert (
            streamed
            == sent
            == {
                "flat_y",
                "flat_yes",
                "flat_true",
                "nested_y",
                "nested_upper",
                "nested_bool",
                "nested_one",
                "legacy_flat",
            }
        )
    if value == "n":
        assert streamed == {"flat_n", "nested_false", "nested_no", "both_canonical_wins"}
    if value == "pending":
        assert streamed == {"nested_other"}
    unknown = {pid for pid, attrs in PROFILES.items() if delivery.consent_of(attrs, ACTION) == "unknown"}
    assert unknown == {"flat_blank", "nested_other_action", "none"}
