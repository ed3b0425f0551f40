"""The deployment's PII hash key: created once, private, read back; a service without one does
not start (unless an ephemeral key is asked for, loudly)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from cdp_kit.piikey import PiiKeyError, default_key_file, ensure_key_file, load_key, read_key_file


def test_a_created_key_is_32_random_bytes_readable_by_its_owner_only(tmp_path: Path) -> None:
    path = ensure_key_file(default_key_file(tmp_path / "data"))
    assert path == tmp_path / "data" / "secrets" / "pii-hash.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    key = read_key_file(path)
    assert len(key) == 32
    assert read_key_file(ensure_key_file(tmp_path / "other.key")) != key


def test_an_existing_key_is_kept(tmp_path: Path) -> None:
    path = ensure_key_file(tmp_path / "secrets" / "pii-hash.key")
    before = path.read_bytes()
    ensure_key_file(path)
    assert path.read_bytes() == before


@pytest.mark.parametrize(
    ("content", "problem"),
    [("", "0 bytes"), ("ab" * 16, "16 bytes"), ("not hex at all", "hex"), ("zz" * 32, "hex")],
)
def test_an_unusable_key_file_is_refused_saying_why(tmp_path: Path, content: str, problem: str) -> None:
    path = tmp_path / "key"
    path.write_text(content)
    with pytest.raises(PiiKeyError, match=problem):
        read_key_file(path)
    with pytest.raises(PiiKeyError, match=problem):
        ensure_key_file(path)


def test_a_missing_key_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(PiiKeyError, match="cannot be read"):
        read_key_file(tmp_path / "absent.key")


def test_no_key_is_refused_unless_an_ephemeral_one_is_asked_for(tmp_path: Path) -> None:
    with pytest.raises(PiiKeyError, match="CDP_PII_HASH_KEY_FILE"):
        load_key(None, ephemeral=False)
    assert load_key(None, ephemeral=True) is None
    path = ensure_key_file(tmp_path / "k")
    assert load_key(path, ephemeral=True) == read_key_file(path)


def service_start(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """``python -m cdp_ingest serve`` with a NATS URL nothing listens on: it gets as far as its key."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CDP_")}
    clean |= {"CDP_NATS_URL": "nats://127.0.0.1:1", "CDP_DATA_DIR": str(tmp_path / "data"), **env}
    return subprocess.run(
        [sys.executable, "-m", "cdp_ingest", "serve"], env=clean, capture_output=True, text=True, timeout=60
    )


def test_a_service_without_a_key_refuses_to_start_with_a_clear_message(tmp_path: Path) -> None:
    done = service_start(tmp_path)
    assert done.returncode == 2
    [line] = [json.loads(x) for x in done.stderr.splitlines() if x.startswith("{")]
    assert line["event"] == "pii_hash_key_missing"
    assert "CDP_PII_HASH_KEY_FILE" in line["reason"]


def test_a_service_with_a_bad_key_file_refuses_to_start(tmp_path: Path) -> None:
    bad = tmp_path / "bad.key"
    bad.write_text("1234")
    done = service_start(tmp_path, CDP_PII_HASH_KEY_FILE=str(bad))
    assert done.returncode == 2
    assert "pii_hash_key_missing" in done.stderr
    assert "2 bytes" in done.stderr


def test_an_ephemeral_key_is_used_only_when_asked_for_and_said_loudly(tmp_path: Path) -> None:
    """The service gets past its key (it then waits for NATS, which is not there: stopped here)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CDP_")}
    clean |= {"CDP_NATS_URL": "nats://127.0.0.1:1", "CDP_DATA_DIR": str(tmp_path), "CDP_PII_HASH_EPHEMERAL": "true"}
    child = subprocess.Popen(
        [sys.executable, "-m", "cdp_ingest", "serve"], env=clean, stderr=subprocess.PIPE, text=True
    )
    try:
        assert child.stderr is not None
        first = json.loads(child.stderr.readline())
    finally:
        child.kill()
        child.wait()
        if child.stderr is not None:
            child.stderr.close()
    assert first["event"] == "pii_hash_key_ephemeral"
    assert first["level"] == "warning"
    assert "never run a deployment like this" in first["reason"]
