"""cdp_kit.keyring (envelope encryption under versioned master keys) and cdp_kit.urlmask."""

from __future__ import annotations

import base64
import json
import stat
from pathlib import Path

import pytest
import structlog

from cdp_kit.keyring import (
    TEXT_PREFIX,
    DecryptionFailed,
    Keyring,
    KeyringError,
    UnknownKey,
    add_key,
    ensure_key_file,
    is_sealed,
    key_id_of,
    load_keyring,
    open_with_key,
    parse_key_file,
    retire_keys,
    seal_with_key,
)
from cdp_kit.telemetry import configure_logging, get_logger
from cdp_kit.urlmask import has_url_credentials, mask_url_credentials

K1 = Keyring({"k1": b"\x01" * 32}, "k1")


def test_a_sealed_value_opens_only_in_its_context_and_is_fresh_each_time() -> None:
    a = K1.seal(b"tok", b"destination:d1:secret")
    b = K1.seal(b"tok", b"destination:d1:secret")
    assert a != b  # a random data key and nonces per value
    assert b"tok" not in a
    assert K1.open(a, b"destination:d1:secret") == b"tok"
    for context in (b"destination:d2:secret", b"destination:d1:other", b""):
        with pytest.raises(DecryptionFailed):
            K1.open(a, context)


def test_any_altered_byte_is_refused() -> None:
    blob = K1.seal(b"tok", b"c")
    for i in range(len(blob)):
        altered = bytearray(blob)
        altered[i] ^= 0x01
        with pytest.raises(KeyringError):
            K1.open(bytes(altered), b"c")


def test_format_version_key_id_and_text_form() -> None:
    blob = K1.seal(b"x", b"c")
    assert blob[0] == 1
    assert blob[1:4] == b"\x02k1"
    token = K1.seal_text("x", "c")
    assert token.startswith(TEXT_PREFIX)
    assert is_sealed(token)
    assert not is_sealed("x")
    assert key_id_of(token) == "k1"
    assert K1.open_text(token, "c") == "x"


def test_the_newest_key_seals_every_key_opens_and_a_missing_key_is_named() -> None:
    old = K1.seal_text("x", "c")
    both = Keyring({"k1": b"\x01" * 32, "k2": b"\x02" * 32}, "k2")
    assert both.open_text(old, "c") == "x"
    new = both.reseal_text(old, "c")
    assert key_id_of(new) == "k2"
    with pytest.raises(UnknownKey, match="k2"):
        K1.open_text(new, "c")
    swapped = Keyring({"k1": b"\x03" * 32}, "k1")  # same id, other key
    with pytest.raises(DecryptionFailed):
        swapped.open_text(old, "c")


def test_kept_data_keys_wrap_and_seal_records() -> None:
    identity_key = b"\x07" * 32
    wrapped = K1.wrap_key(identity_key, b"identity:email:h1")
    assert K1.unwrap_key(wrapped, b"identity:email:h1") == identity_key
    record = seal_with_key(identity_key, b"ann@example.com", b"rec-1")
    assert open_with_key(identity_key, record, b"rec-1") == b"ann@example.com"
    with pytest.raises(DecryptionFailed):
        open_with_key(b"\x08" * 32, record, b"rec-1")


def test_key_files_are_private_versioned_and_retired(tmp_path: Path) -> None:
    path = tmp_path / "secrets" / "master.key"
    assert ensure_key_file(path)
    assert not ensure_key_file(path)  # idempotent: the key is kept
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    first = load_keyring(path)
    token = first.seal_text("x", "c")
    second_id = add_key(path)
    second = load_keyring(path)
    assert second.key_ids == (first.newest, second_id)
    assert second.newest == second_id
    assert second.open_text(token, "c") == "x"
    assert retire_keys(path, second_id) == [first.newest]
    assert load_keyring(path).key_ids == (second_id,)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert "Keyring(newest=" in repr(second)
    assert base64.b64encode(b"\x01" * 32).decode() not in repr(K1)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "holds no master key"),
        ("# only a comment\n", "holds no master key"),
        ("k1\n", "expected"),
        ("k1 not-base64!\n", "not valid base64"),
        (f"k1 {base64.b64encode(b'short').decode()}\n", "is 32 bytes"),
        (f"k1 {base64.b64encode(bytes(32)).decode()}\nk1 {base64.b64encode(bytes(32)).decode()}\n", "twice"),
        (f"bad/id {base64.b64encode(bytes(32)).decode()}\n", "expected"),
    ],
)
def test_bad_key_files_are_refused_with_a_reason(text: str, message: str) -> None:
    with pytest.raises(KeyringError, match=message):
        parse_key_file(text)


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        ("https://ann:pw@host/x", "https://****@host/x"),
        ("sftp://bob@host:22/in", "sftp://****@host:22/in"),
        ("http://host/x?api_key=abc&page=2", "http://host/x?api_key=****&page=2"),
        ("http://host/x?page=2&token=abc#s", "http://host/x?page=2&token=****#s"),
        ("http://host/x?X-Amz-Signature=ff&a=1", "http://host/x?X-Amz-Signature=****&a=1"),
        ("POST http://u:p@h/?access_token=t failed", "POST http://****@h/?access_token=**** failed"),
        ("http://host/x?page=2", "http://host/x?page=2"),
        ("no url here: a=b", "no url here: a=b"),
        ("mailto ann@example.com", "mailto ann@example.com"),
    ],
)
def test_url_credentials_are_masked(text: str, masked: str) -> None:
    assert mask_url_credentials(text) == masked
    assert has_url_credentials(text) == (text != masked)


def test_url_masking_is_linear_on_hostile_text() -> None:
    for text in ("a" * 200_000 + "://" + "b" * 200_000, "?" + "k" * 400_000, "&x=" * 100_000):
        assert mask_url_credentials(text)  # returns at once (a quadratic scan would hang the test)


def test_a_log_line_never_carries_url_credentials(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("demo", "json", "info")
    try:
        get_logger("test").warning("send_failed", url="https://ann:pw1@host/x?api_key=k3y&page=2")
        [line] = [json.loads(x) for x in capsys.readouterr().err.splitlines() if x.strip()]
    finally:
        structlog.reset_defaults()
    assert line["url"] == "https://****@host/x?api_key=****&page=2"
