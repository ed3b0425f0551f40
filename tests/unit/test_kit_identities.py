"""The one identity normaliser (cdp_kit.identities), and ingest judging rows with several
identity fields by it: a row needs one usable identity value; junk passes (identity drops it)."""

from __future__ import annotations

import pytest
from google.protobuf import json_format

from cdp.identity.v1 import identity_pb2 as ipb
from cdp.ingest.v1 import ingest_pb2 as pb
from cdp_identity.domain import Namespace, Rules
from cdp_ingest.domain import IdentityRules, Validator, schema_violations, unknown_namespaces
from cdp_kit.identities import CUSTOM_TYPE, EMAIL_TYPE, PHONE_TYPE, STANDARD_TYPES, Normaliser, type_of_name

KIT = Normaliser.make()


@pytest.mark.parametrize(
    ("namespace", "raw", "canonical"),
    [
        ("email", "  Ann.Smith@Example.COM ", "ann.smith@example.com"),
        ("phone", "(201) 555-0142", "+12015550142"),
        ("phone", "+1 201-555-0142", "+12015550142"),
        ("phone", "+44 20 7946 0958", "+442079460958"),
        ("email_sha256", "A" * 64, "a" * 64),
        ("loyalty_id", " L-001 ", "L-001"),
        ("cookie", "ck-9", "ck-9"),
    ],
)
def test_values_normalise_by_their_namespace_type(namespace: str, raw: str, canonical: str) -> None:
    assert KIT.normalise(namespace, raw) == (canonical, "", "")
    assert KIT.lookup(namespace, raw) == canonical
    assert KIT.check(namespace, raw) == ("", "")


@pytest.mark.parametrize(
    ("namespace", "raw", "rule"),
    [
        ("email", "not-an-email", "invalid"),
        ("phone", "12", "invalid"),
        ("phone", "call me", "invalid"),
        ("email_sha256", "abc", "invalid"),
        ("email", "test@test.com", "blocklist"),
        ("crm_id", "NULL", "blocklist"),
        ("phone", "0000000000", "blocklist"),
        ("shoe_size", "42", "unknown_namespace"),
    ],
)
def test_unusable_values_say_why(namespace: str, raw: str, rule: str) -> None:
    value, why, _ = KIT.normalise(namespace, raw)
    assert (value, why) == (None, rule)
    assert KIT.lookup(namespace, raw) is None


def test_the_ingest_check_lets_junk_through_for_identity_to_count_but_not_invalid_values() -> None:
    assert KIT.check("email", "NULL") == ("", "")  # blocklisted: passes ingest, identity drops it
    assert KIT.check("email", "unknown") == ("", "")
    assert KIT.check("email", "not-an-email")[0] == "invalid"
    assert KIT.check("phone", "555")[0] == "invalid"
    assert KIT.check("crm_id", "   ")[0] == "missing"
    assert KIT.check("shoe_size", "42")[0] == "unknown_namespace"


def test_the_phone_region_reads_numbers_without_a_plus() -> None:
    assert Normaliser.make(phone_region="GB").lookup("phone", "020 7946 0958") == "+442079460958"
    assert KIT.lookup("phone", "020 7946 0958") is None  # not a US number


def test_custom_namespaces_normalise_by_their_type() -> None:
    custom = Normaliser.make({"work_email": EMAIL_TYPE, "member_no": CUSTOM_TYPE})
    assert custom.lookup("work_email", "Bob@Corp.Example.com") == "bob@corp.example.com"
    assert custom.lookup("member_no", " M1 ") == "M1"
    assert type_of_name("NAMESPACE_TYPE_PHONE") == PHONE_TYPE
    assert type_of_name("NAMESPACE_TYPE_NONSENSE") == 0


def test_identity_normalises_with_the_kit() -> None:
    rules = Rules.make([Namespace("work_email", int(ipb.NAMESPACE_TYPE_EMAIL))], default_phone_region="US")
    for namespace, raw in [("email", "A@B.com"), ("phone", "(201) 555-0142"), ("work_email", "X@Y.org"), ("c", "1")]:
        assert rules.normalise(namespace, raw) == rules.normaliser.normalise(namespace, raw)
    assert rules.normaliser.types["work_email"] == EMAIL_TYPE
    assert {ns: rules.type_of(ns) for ns in STANDARD_TYPES} == STANDARD_TYPES


# ----------------------------------------------------------------------------- ingest rows

ORDERS = json_format.ParseDict(
    {
        "name": "pos_order",
        "schema_class": "SCHEMA_CLASS_EVENT",
        "event_id_field": "order_id",
        "timestamp_field": "ts",
        "fields": [
            {"name": "order_id", "type": "FIELD_TYPE_STRING", "required": True},
            {"name": "ts", "type": "FIELD_TYPE_TIMESTAMP", "required": True},
            {"name": "phone", "type": "FIELD_TYPE_STRING", "identity_namespace": "phone"},
            {"name": "loyalty_id", "type": "FIELD_TYPE_STRING", "identity_namespace": "loyalty_id"},
            {"name": "crm_id", "type": "FIELD_TYPE_STRING", "identity_namespace": "crm_id"},
            {"name": "amount", "type": "FIELD_TYPE_NUMBER"},
        ],
    },
    pb.Schema(),
)


def judge(row: dict[str, str], *, anonymous: bool = False) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    validator = Validator(
        ORDERS,
        textual=True,
        drop_unknown=False,
        max_bytes=10_000,
        identity=IdentityRules.of(STANDARD_TYPES, "US", allow_anonymous=anonymous),
    )
    base = {"order_id": "o1", "ts": "2026-01-01T10:00:00Z", "amount": "12.5"}
    result = validator.validate({**base, **row}, 100, "row 7")
    return result.identities, [(v.field, v.rule) for v in result.violations]


def test_a_row_keyed_by_either_id_or_both_is_accepted_with_every_identity() -> None:
    assert judge({"loyalty_id": "L1"}) == ([("loyalty_id", "L1")], [])
    assert judge({"crm_id": "C1"}) == ([("crm_id", "C1")], [])
    assert judge({"loyalty_id": "L1", "crm_id": "C1"}) == ([("loyalty_id", "L1"), ("crm_id", "C1")], [])


def test_a_row_with_no_identity_is_rejected_naming_every_identity_field() -> None:
    identities, violations = judge({})
    assert identities == []
    assert violations == [("loyalty_id", "identity"), ("crm_id", "identity"), ("phone", "identity")]


def test_a_row_whose_only_identity_is_invalid_is_rejected_but_one_valid_value_is_enough() -> None:
    assert judge({"phone": "555"})[1] == [("loyalty_id", "identity"), ("crm_id", "identity"), ("phone", "identity")]
    # an invalid phone beside a usable loyalty id still travels: identity drops it and counts it
    assert judge({"phone": "555", "loyalty_id": "L1"}) == ([("phone", "555"), ("loyalty_id", "L1")], [])
    assert judge({"phone": "(201) 555-0142"}) == ([("phone", "(201) 555-0142")], [])


def test_junk_values_pass_ingest_for_identity_to_count() -> None:
    assert judge({"crm_id": "NULL"}) == ([("crm_id", "NULL")], [])
    assert judge({"phone": "0000000000"}) == ([("phone", "0000000000")], [])


def test_the_dataset_setting_keeps_rows_with_no_identity() -> None:
    assert judge({}, anonymous=True) == ([], [])
    assert judge({"phone": "555"}, anonymous=True) == ([("phone", "555")], [])


def test_the_violation_says_what_was_wrong_and_names_the_record_never_the_value() -> None:
    validator = Validator(ORDERS, textual=True, drop_unknown=False, max_bytes=10_000)
    row = {"order_id": "o1", "ts": "2026-01-01T10:00:00Z", "phone": "555-0199"}
    by_field = {v.field: v for v in validator.validate(row, 100, "row 7").violations}
    assert by_field["phone"].record == "row 7"
    assert "not a valid phone number" in by_field["phone"].message
    assert "missing" in by_field["crm_id"].message
    assert "555" not in str([v.message for v in by_field.values()])


def test_an_unknown_namespace_is_not_a_usable_identity_and_is_named_at_schema_creation() -> None:
    schema = pb.Schema()
    schema.CopyFrom(ORDERS)
    schema.fields.add(name="member_no", type=pb.FIELD_TYPE_STRING, identity_namespace="member_no")
    [problem] = unknown_namespaces(schema, STANDARD_TYPES)
    assert (problem.field, problem.rule) == ("member_no", "identity")
    assert "member_no" in problem.message
    assert "not defined" in problem.message
    assert unknown_namespaces(schema, {**STANDARD_TYPES, "member_no": CUSTOM_TYPE}) == []


def test_primary_identity_is_refused_not_ignored_and_any_number_of_identities_is_fine() -> None:
    assert schema_violations(ORDERS) == []
    schema = pb.Schema()
    schema.CopyFrom(ORDERS)
    schema.fields[2].primary_identity = True
    assert [(v.field, v.rule) for v in schema_violations(schema)] == [("phone", "primary_identity")]
