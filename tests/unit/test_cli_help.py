"""`cdp --help` reads like a manual: every command's help ends with an example of itself, a flag
shows no type (no `<bool>`), and an option that takes one of a few values lists them."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any, get_args

import pytest
import typer.main
from typer.testing import CliRunner

from cdp_cli.app import app
from cdp_cli.cmd_stack import Durability
from cdp_kit.natsserver import DURABILITIES


def commands() -> Iterator[tuple[str, ...]]:
    def walk(command: Any, path: tuple[str, ...]) -> Iterator[tuple[str, ...]]:
        if command.callback is not None and path:
            yield path
        for name, sub in sorted(getattr(command, "commands", {}).items()):
            yield from walk(sub, (*path, name))

    yield from walk(typer.main.get_command(app), ())


def help_of(path: tuple[str, ...]) -> str:
    result = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    return result.output


def test_every_command_is_listed() -> None:
    found = set(commands())
    assert {("apply",), ("up",), ("ingest",), ("deadletters",), ("identity", "namespace", "create")} <= found
    assert len(found) >= 40


@pytest.mark.parametrize("path", sorted(commands()), ids=" ".join)
def test_a_command_shows_an_example_of_itself_and_no_bool_type(path: tuple[str, ...]) -> None:
    text = help_of(path)
    examples = re.findall(r"Example: (cdp [^\n│]*)", text)
    assert examples, f"cdp {' '.join(path)} --help has no 'Example: cdp …' line"
    assert examples[0].split()[1 : 1 + len(path)] == list(path), examples[0]
    assert "<bool>" not in text


@pytest.mark.parametrize(
    ("path", "choices"),
    [
        (("demo",), "<ingest|identity|segmentation|activation>"),
        (("dataset", "create"), "<reject|drop>"),
        (("ingest",), "<csv|jsonl|parquet>"),
        (("destination", "create"), "<email_marketing|sms_marketing|ad_targeting|data_sharing>"),
        (("identity", "namespace", "create"), "<email|phone|cross_device|cookie|device|hashed|custom>"),
        (("deadletters",), "<poison|collect-reject|delivery>"),
        (("up",), "<default|always>"),
    ],
)
def test_an_option_of_a_few_values_lists_them(path: tuple[str, ...], choices: str) -> None:
    assert choices in help_of(path)


def test_a_value_not_among_them_is_refused_before_anything_runs() -> None:
    result = CliRunner().invoke(app, ["demo", "--kill", "identiy"])
    assert result.exit_code == 2
    assert "identity" in result.output


def test_each_command_group_lives_in_a_module_of_its_own() -> None:
    """app.py is the root and the registrations; each group's commands come from cmd_*.py modules
    (a big command may have its own, as `events publish` has cmd_publish), and no module serves two
    groups."""
    root = typer.main.get_command(app)
    modules_of: dict[str, set[str]] = {}

    def walk(command: Any, top: str) -> None:
        if command.callback is not None:
            modules_of.setdefault(top, set()).add(command.callback.__module__)
        for sub in getattr(command, "commands", {}).values():
            walk(sub, top)

    for name, command in getattr(root, "commands", {}).items():
        if getattr(command, "commands", None):
            walk(command, name)
    groups_of: dict[str, list[str]] = {}
    for group_name, modules in modules_of.items():
        for module in modules:
            assert module.startswith("cdp_cli.cmd_"), (group_name, module)
            groups_of.setdefault(module, []).append(group_name)
    assert all(len(groups) == 1 for groups in groups_of.values()), groups_of


def test_up_offers_every_durability_profile_the_kit_knows() -> None:
    assert get_args(Durability) == DURABILITIES
