"""Pure parts of activation's privacy erasure: removal batch ids, chunking to the log's message
size, and what each platform's erasure record keeps of a record the destination was sent."""

from __future__ import annotations

import json

from cdp.activation.v1 import activation_pb2 as pb
from cdp_activation import identifiers as ids
from cdp_activation.connectors import Record, catalog, http
from cdp_activation.connectors.crm import klaviyo_error
from cdp_activation.privacy import fit, removal_batch_id, request_of
from cdp_kit.eventlog import MAX_MESSAGE_BYTES

SENT = Record(
    "p1",
    {"email": [" Jo.Ann+x@Gmail.com "], "phone": ["+1 650 555 0199"], "gaid": ["38400000-8CF0-11BD-B23E-10B96E40000D"]},
    {"first_name": "Jo", "last_name": "Ann", "country": "us", "zip": "94040"},
)


def config(name: str) -> object:
    connector = catalog()[name]
    return connector.config_model.model_construct()


def test_removal_batch_ids_name_their_request() -> None:
    batch_id = removal_batch_id("req-1.a_b", "plan-9")
    assert batch_id == "privacy:req-1.a_b:plan-9"
    assert request_of(batch_id) == "req-1.a_b"
    assert request_of(batch_id + ":2") == "req-1.a_b"
    assert request_of("5a7c2b1e-0000-8000-8000-000000000000") is None
    assert request_of("privacy:no-plan") is None


def test_fit_keeps_order_and_each_chunk_within_half_a_message() -> None:
    records = [pb.Record(profile_id=f"p{i}") for i in range(30_000)]
    for rec in records:
        rec.identities["EMAIL"].values.append(ids.sha256_hex(rec.profile_id))
    chunks = fit(records)
    assert len(chunks) > 1
    assert [r.profile_id for chunk in chunks for r in chunk] == [r.profile_id for r in records]
    for chunk in chunks:
        assert sum(r.ByteSize() + 8 for r in chunk) <= MAX_MESSAGE_BYTES // 2
    assert fit([]) == [[]]


def test_erasure_records_hold_only_what_each_platform_needs_in_its_form() -> None:
    forms = {
        name: connector.erase_identifiers(config(name), SENT)  # type: ignore[arg-type]
        for name, connector in catalog().items()
        if connector.erasure
    }
    email_meta = ids.sha256_hex("jo.ann+x@gmail.com")
    assert forms["meta_custom_audience"] == {
        "EMAIL": [email_meta],
        "PHONE": [ids.sha256_hex("16505550199")],
        "MADID": ["38400000-8cf0-11bd-b23e-10b96e40000d"],
    }
    assert forms["google_customer_match"] == {
        "hashedEmail": [ids.sha256_hex("joann@gmail.com")],
        "hashedPhoneNumber": [ids.sha256_hex("+16505550199")],
    }
    assert forms["klaviyo"] == {"email": ["jo.ann+x@gmail.com"], "phone_number": ["+16505550199"]}
    assert forms["braze"] == {"external_id": ["p1"]}
    assert forms["mailchimp"] == {"subscriber_hash": [ids.md5_hex("jo.ann+x@gmail.com")]}
    assert forms["linkedin_audience"]["gaid"] == ["38400000-8cf0-11bd-b23e-10b96e40000d"]
    for name in ("snap_audience", "tiktok_audience"):
        assert all(ids.is_prehashed(v) for values in forms[name].values() for v in values), name
    # No attribute, and no plain identifier but where the platform takes it so.
    for name, found in forms.items():
        text = repr(found)
        assert "Jo" not in text.replace("jo.ann", ""), name
        assert "94040" not in text, name
    assert set(forms) == {
        "meta_custom_audience",
        "google_customer_match",
        "snap_audience",
        "tiktok_audience",
        "linkedin_audience",
        "klaviyo",
        "braze",
        "mailchimp",
        "file_export",  # a full export's snapshot is written again; an incremental one has no removal
    }
    assert forms["file_export"] == {"profile_id": ["p1"]}
    exports = catalog()["file_export"]
    assert exports.erases(exports.parse({"folder": "f", "mode": "full"}))
    assert not exports.erases(exports.parse({"folder": "f", "mode": "incremental"}))


def test_klaviyo_deletion_errors_never_repeat_the_identifier() -> None:
    body = {"errors": [{"code": "invalid", "detail": "erin@example.com is not a valid email"}]}
    error = klaviyo_error(http.Response(400, {}, body, json.dumps(body)))
    assert error is not None
    assert error.permanent
    assert error.reason == "HTTP 400: Klaviyo invalid"
    retry = klaviyo_error(http.Response(429, {"Retry-After": "2"}, {}, "erin@example.com"))
    assert retry is not None
    assert not retry.permanent
    assert "erin" not in retry.reason
    assert klaviyo_error(http.Response(202, {}, None, "")) is None
