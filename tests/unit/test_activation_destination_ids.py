"""Exact destination identifiers, platform by platform: what each platform documents for
phone validity, US state, country, MAIDs, pre-hashed values, names, gender and dates of
birth. A value that cannot be normalised is dropped and counted by reason, never sent
wrong and never guessed (see docs/activation.md, "Identity normalisation")."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import date
from typing import Any

import pytest

from cdp_activation import identifiers as ids
from cdp_activation.connectors import Batch, Record, connector_for
from cdp_activation.connectors.ads import (
    GoogleConfig,
    GoogleCustomerMatch,
    LinkedInAudience,
    MetaConfig,
    MetaCustomAudience,
    SnapAudience,
    SnapConfig,
    TikTokAudience,
    TikTokConfig,
)
from cdp_activation.connectors.crm import TradeDeskConfig, TradeDeskCrm
from cdp_activation.connectors.email import braze_attributes

IDFA = "AECE52E7-03EE-455A-B3C4-E57283966239"
GAID = "38400000-8cf0-11bd-b23e-10b96e40000d"
ZEROED = "00000000-0000-0000-0000-000000000000"
BAD_PHONE = "phone dropped: not a valid phone number"
BAD_COUNTRY = "country dropped: not an ISO 3166 country"
BAD_MAID = "maid dropped: not a mobile advertising id (or a zeroed, tracking-limited one)"

META = MetaConfig(audience_id="1", access_token="t")
GOOGLE = GoogleConfig(customer_id="1234567890", user_list_id="1", developer_token="d", access_token="t")
TIKTOK = TikTokConfig(advertiser_id="a", audience_id="aud", access_token="t")
SNAP = SnapConfig(segment_id="s", access_token="t")


def batch(records: list[Record], identities: list[str], attributes: Sequence[str] = ()) -> Batch:
    return Batch("b", "plan", "dest", "seg", "add", 1, records, identities, list(attributes))


# ---------------------------------------------------------------- normalisers, one table


NORMALISED: list[tuple[str, Callable[[str], str | None], str, str | None]] = [
    # US state: letters a-z only, lower-cased (Meta's SDK); US state names become their code.
    ("state-digits", ids.state, "123abc ", "abc"),
    ("state-code", ids.state, " CA ", "ca"),
    ("state-name", ids.state, "New York", "ny"),
    ("state-name-punct", ids.state, "new-york", "ny"),
    ("state-none", ids.state, "123", None),
    # Phones: only numbers phonenumbers holds valid; no "+<digits>" fallback.
    ("phone-invalid-us", ids.canonical_phone, "9112340375", None),
    ("phone-invalid-plus", ids.canonical_phone, "+1 911 234 0375", None),
    ("phone-too-short", ids.canonical_phone, "12345", None),
    ("phone-unknown-cc", ids.canonical_phone, "+999 1234 5678", None),
    ("phone-valid-us", ids.canonical_phone, "(201) 555-0142", "+12015550142"),
    ("phone-intl-digits", ids.canonical_phone, "442071234567", "+442071234567"),
    # Country: ISO 3166-1 alpha-2 through pycountry, never the first two letters.
    ("country-IRL", ids.country, "IRL", "ie"),
    ("country-PRT", ids.country, "PRT", "pt"),
    ("country-SWE", ids.country, "SWE", "se"),
    ("country-usa", ids.country, "usa", "us"),
    ("country-name", ids.country, "Ireland", "ie"),
    ("country-official-name", ids.country, "United States of America", "us"),
    ("country-alias-uk", ids.country, "U.K.", "gb"),
    ("country-alias-turkey", ids.country, "Turkey", "tr"),
    ("country-alpha2", ids.country, " de ", "de"),
    ("country-unassigned", ids.country, "XX", None),
    ("country-unknown-name", ids.country, "Atlantis", None),
    ("country-not-first-letters", ids.country, "Swaziland Kingdom", None),
    ("country-upper", ids.country_upper, "PRT", "PT"),
    # MAIDs: a UUID, lower case with hyphens; the zeroed (tracking-limited) id is no id.
    ("maid-idfa", ids.madid, IDFA, IDFA.lower()),
    ("maid-zeroed", ids.madid, ZEROED, None),
    ("maid-junk", ids.madid, "not-an-id", None),
    # Meta DOB: years 1900 to this year.
    ("doby-1899", ids.dob_year, "1899", None),
    ("doby-future", lambda v: ids.dob_year(v, this_year=2026), "2031", None),
    ("doby-ok", lambda v: ids.dob_year(v, this_year=2026), "1990", "1990"),
    # Braze: gender M/F/O/N/P, dob YYYY-MM-DD.
    ("braze-gender-female", ids.braze_gender, "Female", "F"),
    ("braze-gender-pnts", ids.braze_gender, "prefer not to say", "P"),
    ("braze-gender-unknown", ids.braze_gender, "x", None),
    ("braze-dob-slashes", ids.iso_date, "1990/5/7", "1990-05-07"),
    ("braze-dob-timestamp", ids.iso_date, "1990-05-07T00:00:00Z", "1990-05-07"),
    ("braze-dob-impossible", ids.iso_date, "1990-02-30", None),
    ("braze-dob-future", lambda v: ids.iso_date(v, today=date(2026, 1, 1)), "2026-06-01", None),
]


@pytest.mark.parametrize(("name", "normalise", "raw", "expected"), NORMALISED, ids=[v[0] for v in NORMALISED])
def test_activation_identifier_normalised_or_dropped(
    name: str, normalise: Callable[[str], str | None], raw: str, expected: str | None
) -> None:
    assert normalise(raw) == expected


def test_activation_prehashed_sha256_becomes_base64_not_hashed_again() -> None:
    # UID2's published vectors: the hex digest and its Base64 are the same 32 bytes.
    email_hex = "b4c9a289323b21a01c3e940f150eb9b8c542587f1abfd8f0e1cc1ffc5e475514"
    phone_hex = "10e6f0b47054a83359477dcb35231db6de5c69fb1816e1a6b98e192de9e5b9ee"
    assert ids.hash_or_none(email_hex, ids.sha256_b64) == "tMmiiTI7IaAcPpQPFQ65uMVCWH8av9jw4cwf/F5HVRQ="
    assert ids.hashed(phone_hex.upper(), ids.canonical_phone, ids.sha256_b64) == (
        "EObwtHBUqDNZR33LNSMdtt5cafsYFuGmuY4ZLenlue4="
    )
    assert ids.hash_or_none(email_hex, ids.md5_hex) is None  # no MD5 can be made from a SHA-256


# ------------------------------------------------------------------------- per platform


def meta_row(record: Record, identities: list[str], attributes: list[str]) -> tuple[dict[str, str], dict[str, int]]:
    schema, rows, rejected = MetaCustomAudience().payload(META, batch([record], identities, attributes))
    return (dict(zip(schema, rows[0], strict=True)) if rows else {}), rejected


META_CASES: list[tuple[str, dict[str, list[str]], dict[str, Any], dict[str, str], dict[str, int]]] = [
    ("state-letters-only", {"email": ["a@example.com"]}, {"state": "123abc "},
     {"ST": ids.sha256_hex("abc")}, {}),
    ("country-alpha3", {"email": ["a@example.com"]}, {"country": "IRL"},
     {"COUNTRY": ids.sha256_hex("ie")}, {}),
    ("country-unknown-blank", {"email": ["a@example.com"]}, {"country": "Atlantis"},
     {"COUNTRY": ""}, {BAD_COUNTRY: 1}),
    ("phone-invalid-blank", {"email": ["a@example.com"], "phone": ["9112340375"]}, {},
     {"PHONE": ""}, {BAD_PHONE: 1}),
    ("phone-second-valid", {"phone": ["9112340375", "+44 844 412 4653"]}, {},
     {"PHONE": ids.sha256_hex("448444124653")}, {BAD_PHONE: 1}),
    ("madid-from-idfa", {"idfa": [IDFA]}, {}, {"MADID": IDFA.lower()}, {}),
    ("madid-from-gaid", {"gaid": [GAID]}, {}, {"MADID": GAID}, {}),
    ("madid-zeroed", {"email": ["a@example.com"], "idfa": [ZEROED]}, {}, {"MADID": ""}, {BAD_MAID: 1}),
    ("doby-range", {"email": ["a@example.com"]}, {"birth_year": "1066"},
     {"DOBY": ""}, {"dob dropped: not a valid date of birth": 1}),
    ("zip-from-postal-code", {"email": ["a@example.com"]}, {"postal_code": "94303-5300"},
     {"ZIP": ids.sha256_hex("94303")}, {}),
    ("only-invalid-phone", {"phone": ["9112340375"]}, {}, {}, {BAD_PHONE: 1, "no valid identifier": 1}),
]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "identities", "attributes", "cells", "rejected"), META_CASES, ids=[c[0] for c in META_CASES]
)
def test_activation_meta_identifiers(
    name: str, identities: dict[str, list[str]], attributes: dict[str, Any], cells: dict[str, str], rejected: Any
) -> None:
    namespaces = ["email", "phone", "idfa", "gaid"]
    row, dropped = meta_row(Record("p", identities, attributes), namespaces, list(attributes))
    assert {key: row[key] for key in cells} == cells if row else cells == {}
    assert dropped == rejected
    if row:
        assert list(row).count("MADID") == 1  # idfa and gaid share one MADID column


GOOGLE_CASES: list[tuple[str, Record, list[dict[str, Any]], dict[str, int]]] = [
    ("phone-invalid-dropped", Record("p", {"email": ["a@example.com"], "phone": ["9112340375"]}, {}),
     [{"hashedEmail": ids.sha256_hex("a@example.com")}], {BAD_PHONE: 1}),
    ("address-country-alpha3", Record("p", {}, {"first_name": "Alex", "last_name": "Quinn", "country": "PRT",
                                                "postal_code": "1100-148"}),
     [{"addressInfo": {"hashedFirstName": ids.sha256_hex("alex"), "hashedLastName": ids.sha256_hex("quinn"),
                       "countryCode": "PT", "postalCode": "1100-148"}}], {}),
    ("address-country-unknown", Record("p", {"email": ["a@example.com"]},
                                       {"first_name": "Alex", "last_name": "Quinn", "country": "Narnia",
                                        "zip": "94045"}),
     [{"hashedEmail": ids.sha256_hex("a@example.com")}], {BAD_COUNTRY: 1}),
]  # fmt: skip


@pytest.mark.parametrize(("name", "record", "expected", "rejected"), GOOGLE_CASES, ids=[c[0] for c in GOOGLE_CASES])
def test_activation_google_identifiers(
    name: str, record: Record, expected: list[dict[str, Any]], rejected: dict[str, int]
) -> None:
    dropped: dict[str, int] = {}
    assert GoogleCustomerMatch().user_identifiers(GOOGLE, record, dropped) == expected
    assert dropped == rejected


TIKTOK_CASES: list[tuple[str, dict[str, list[str]], list[str], list[str], list[str | None], dict[str, int]]] = [
    ("maids-sent", {"email": ["Jo.Ann+x@Example.com"], "idfa": [IDFA], "gaid": [GAID.upper()]},
     ["email", "phone", "idfa", "gaid"], ["EMAIL_SHA256", "PHONE_SHA256", "IDFA_SHA256", "AAID_SHA256"],
     [ids.sha256_hex("joann@example.com"), None, ids.sha256_hex(IDFA.lower()), ids.sha256_hex(GAID)], {}),
    ("maid-only-member", {"gaid": [GAID]}, ["email", "gaid"], ["EMAIL_SHA256", "AAID_SHA256"],
     [None, ids.sha256_hex(GAID)], {}),
    ("phone-invalid", {"email": ["a@example.com"], "phone": ["9112340375"]}, ["email", "phone"],
     ["EMAIL_SHA256", "PHONE_SHA256"], [ids.sha256_hex("a@example.com"), None], {BAD_PHONE: 1}),
    ("phone-digits", {"phone": ["(657)777-0000"]}, ["phone"], ["PHONE_SHA256"],
     ["8d7bdaaf75196f351d22942fc0dd79304ffabc3eaf3339460ef9da0773e3aec2"], {}),
    ("zeroed-idfa", {"email": ["a@example.com"], "idfa": [ZEROED]}, ["email", "idfa"],
     ["EMAIL_SHA256", "IDFA_SHA256"], [ids.sha256_hex("a@example.com"), None], {BAD_MAID: 1}),
]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "identities", "namespaces", "schema", "digests", "rejected"),
    TIKTOK_CASES,
    ids=[c[0] for c in TIKTOK_CASES],
)
def test_activation_tiktok_identifiers(
    name: str,
    identities: dict[str, list[str]],
    namespaces: list[str],
    schema: list[str],
    digests: list[str | None],
    rejected: dict[str, int],
) -> None:
    dropped: dict[str, int] = {}
    id_schema, users = TikTokAudience().users(TIKTOK, batch([Record("p", identities, {})], namespaces), dropped)
    assert id_schema == schema
    assert [item.get("id") for item in users[0]] == digests
    assert all(item["audience_ids"] == ["aud"] for item in users[0] if item)
    assert dropped == rejected


def test_activation_tiktok_plans_may_name_maid_namespaces() -> None:
    assert {"idfa", "gaid"} <= set(connector_for("tiktok_audience").identity_namespaces or ())


def test_activation_snap_maids_and_invalid_phones() -> None:
    records = [
        Record("a", {"phone": ["9112340375"], "idfa": [IDFA]}, {}),
        Record("b", {"phone": ["+44 844 412 4653"], "gaid": [GAID]}, {}),
    ]
    dropped: dict[str, int] = {}
    hashes = SnapAudience().hashes(SNAP, batch(records, ["phone", "idfa", "gaid"]), dropped)
    assert hashes == {
        "PHONE_SHA256": ["dc008fda46e2e64002cf2f82a4906236282d431c4f75e5b60bfe79fc48546383"],
        "MOBILE_AD_ID_SHA256": sorted([ids.sha256_hex(IDFA.lower()), ids.sha256_hex(GAID)]),
    }
    assert dropped == {BAD_PHONE: 1}


def test_activation_linkedin_google_aid_from_gaid() -> None:
    dropped: dict[str, int] = {}
    rec = Record("p", {"email": [" Jane.Doe@Example.com "], "gaid": [ZEROED, GAID.upper()]}, {})
    assert LinkedInAudience.user_ids(rec, dropped) == [
        {"idType": "SHA256_EMAIL", "idValue": "86e0b9e56c17cc4d12387e1949b85053fbe73bc3ce5a1188713a9d300cc6133d"},
        {"idType": "GOOGLE_AID", "idValue": GAID},
    ]
    assert dropped == {BAD_MAID: 1}


TTD_CASES: list[tuple[str, str, dict[str, list[str]], str | None, dict[str, int]]] = [
    ("email", "EmailHashedUnifiedId2", {"email": ["user@example.com"]},
     "tMmiiTI7IaAcPpQPFQ65uMVCWH8av9jw4cwf/F5HVRQ=", {}),
    ("email-sha256-namespace", "EmailHashedUnifiedId2",
     {"email_sha256": ["b4c9a289323b21a01c3e940f150eb9b8c542587f1abfd8f0e1cc1ffc5e475514"]},
     "tMmiiTI7IaAcPpQPFQ65uMVCWH8av9jw4cwf/F5HVRQ=", {}),
    ("email-already-hex", "EmailHashedUnifiedId2",
     {"email": ["B4C9A289323B21A01C3E940F150EB9B8C542587F1ABFD8F0E1CC1FFC5E475514"]},
     "tMmiiTI7IaAcPpQPFQ65uMVCWH8av9jw4cwf/F5HVRQ=", {}),
    ("phone", "PhoneNumberHashedUnifiedId2", {"phone": ["1 (234) 567-8901"]},
     "EObwtHBUqDNZR33LNSMdtt5cafsYFuGmuY4ZLenlue4=", {}),
    ("phone-sha256-namespace", "PhoneNumberHashedUnifiedId2",
     {"phone_sha256": ["10e6f0b47054a83359477dcb35231db6de5c69fb1816e1a6b98e192de9e5b9ee"]},
     "EObwtHBUqDNZR33LNSMdtt5cafsYFuGmuY4ZLenlue4=", {}),
    ("phone-invalid", "PhoneNumberHashedUnifiedId2", {"phone": ["9112340375"]}, None, {BAD_PHONE: 1}),
    ("hash-namespace-junk", "EmailHashedUnifiedId2", {"email_sha256": ["user@example.com"]}, None,
     {"hash dropped: not a SHA-256 hex digest": 1}),
]  # fmt: skip


@pytest.mark.parametrize(("name", "pii", "identities", "line", "rejected"), TTD_CASES, ids=[c[0] for c in TTD_CASES])
def test_activation_trade_desk_identifiers(
    name: str, pii: str, identities: dict[str, list[str]], line: str | None, rejected: dict[str, int]
) -> None:
    cfg = TradeDeskConfig(advertiser_id="a", crm_data_id="c", auth_token="t", pii_type=pii)
    dropped: dict[str, int] = {}
    assert TradeDeskCrm.identifier(cfg, Record("p", identities, {}), dropped) == line
    assert dropped == rejected


def test_activation_braze_standard_fields_in_braze_format() -> None:
    rec = Record("p", {}, {"country": "SWE", "gender": "female", "dob": "1990/5/7", "tier": "gold"})
    dropped: dict[str, int] = {}
    out = braze_attributes(rec, ["country", "gender", "dob", "tier"], dropped)
    assert out == {"country": "SE", "gender": "F", "dob": "1990-05-07", "tier": "gold"}
    bad = Record("p", {}, {"country": "Atlantis", "gender": "x", "dob": "1990-13-01"})
    assert braze_attributes(bad, ["country", "gender", "dob"], dropped) == {}
    assert dropped == {
        BAD_COUNTRY: 1,
        "gender dropped: not a recognised gender": 1,
        "dob dropped: not a valid date of birth": 1,
    }


def test_activation_drop_reasons_never_quote_the_value() -> None:
    secret = "9112340375"
    row, dropped = meta_row(Record("p", {"phone": [secret], "email": ["a@example.com"]}, {}), ["email", "phone"], [])
    assert row["PHONE"] == ""
    assert all(secret not in reason and "911" not in reason for reason in dropped)
