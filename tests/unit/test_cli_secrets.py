"""The CLI takes secrets from files, the environment or stdin, never from argv."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from google.protobuf import json_format

from cdp_cli.errors import CliError
from cdp_cli.inputs import parse_config, read_secrets, refuse_literal_secrets, with_secrets


def test_secrets_come_from_a_file_the_environment_or_stdin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "token").write_text("from-file\n")
    monkeypatch.setenv("CDP_TEST_TOKEN", "from-env")
    got = read_secrets(
        [f"access_token=@{tmp_path / 'token'}", "api_key=env:CDP_TEST_TOKEN", "secret=-"],
        io.StringIO("from-stdin\r\n"),
    )
    assert got == {"access_token": "from-file", "api_key": "from-env", "secret": "from-stdin"}


@pytest.mark.parametrize(
    ("specs", "message"),
    [
        (["secret=plain-value"], "visible in `ps`"),
        (["secret"], "expects NAME=@FILE"),
        (["=@f"], "expects NAME=@FILE"),
        (["secret=@/no/such/file"], "cannot read"),
        (["secret=env:CDP_TEST_UNSET_VARIABLE"], "is not set"),
        (["a=-", "b=-"], "only one secret"),
        (["secret=-"], "empty"),
    ],
)
def test_bad_secret_sources_are_refused_without_echoing_a_value(specs: list[str], message: str) -> None:
    with pytest.raises(CliError, match=message) as err:
        read_secrets(specs, io.StringIO("x" if specs == ["a=-", "b=-"] else ""))
    assert "plain-value" not in str(err.value)


@pytest.mark.parametrize(
    "pair",
    [
        "secret=s3cr3t",
        "access_token=t",
        "api_key:=123",
        "base_url=https://ann:pw@host",
        "path=/x?api_key=k",
        'fsspec_options:={"client_kwargs": {"aws_secret_access_key": "s3cr3t"}}',
    ],
)
def test_a_secret_literal_in_config_is_refused_with_how_to_pass_it(pair: str) -> None:
    with pytest.raises(CliError, match="--secret NAME=@FILE") as err:
        refuse_literal_secrets(parse_config([pair]))
    assert "s3cr3t" not in str(err.value)
    assert "pw" not in str(err.value)


def test_plain_settings_pass() -> None:
    refuse_literal_secrets(parse_config(["base_url=https://host/x?page=2", "batch_size:=10", "secret="]))


def test_a_dotted_secret_name_sets_a_nested_setting() -> None:
    config = parse_config(['fsspec_options:={"client_kwargs": {"region_name": "eu"}}', "folder=x"])
    merged = with_secrets(config, {"fsspec_options.key": "k1", "fsspec_options.client_kwargs.secret": "s1"})
    assert json_format.MessageToDict(merged) == {
        "folder": "x",
        "fsspec_options": {"key": "k1", "client_kwargs": {"region_name": "eu", "secret": "s1"}},
    }
    with pytest.raises(CliError, match="folder is not an object"):
        with_secrets(config, {"folder.key": "k"})
