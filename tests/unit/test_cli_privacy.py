"""``cdp privacy`` checks its identities before any call: a file of them, the 1,000 limit, NS:VALUE."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner, Result

from cdp_cli.app import app
from cdp_kit.natsserver import free_port


def invoke(tmp_path: Path, *args: str) -> Result:
    # Nothing listens at the identity address: a request that got as far as a call fails UNAVAILABLE.
    env = {"CDP_IDENTITY_ADDR": f"127.0.0.1:{free_port()}", "CDP_DATA_DIR": None, "COLUMNS": "200"}
    return CliRunner().invoke(app, ["--data-dir", str(tmp_path), "privacy", *args], env=env)


def test_identities_are_required_and_checked_before_any_call(tmp_path: Path) -> None:
    result = invoke(tmp_path, "delete")
    assert result.exit_code == 1
    assert "name at least one identity" in result.stderr
    result = invoke(tmp_path, "suppress", "ann@example.com")
    assert result.exit_code == 1
    assert "expected NAMESPACE:VALUE" in result.stderr


def test_a_file_adds_identities_and_more_than_1000_are_refused(tmp_path: Path) -> None:
    many = tmp_path / "people.txt"
    many.write_text("# erasure requests\n" + "".join(f"email:p{i}@example.com\n" for i in range(1001)))
    result = invoke(tmp_path, "delete", "--file", str(many))
    assert result.exit_code == 1
    assert "1001 identities: at most 1000" in result.stderr
    few = tmp_path / "few.txt"
    few.write_text("# one\n\nemail:p1@example.com\n")
    result = invoke(tmp_path, "delete", "--file", str(few), "--suppress")
    assert result.exit_code == 1
    assert "UNAVAILABLE" in result.stderr  # it got as far as calling identity
    assert "p1@example.com" not in result.stderr
