"""Output helpers: rich tables for people, plain JSON for scripts, one-line errors on stderr."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Sequence
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from rich.console import Console
from rich.table import Table
from rich.text import Text

# Both resolve sys.stdout / sys.stderr when printing, so test runners that swap them see the output.
out = Console(highlight=False)
err = Console(stderr=True, highlight=False)


def message_dict(message: Message) -> dict[str, Any]:
    """A protobuf message as its canonical JSON form, field names as in the .proto."""
    return json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def json_value(message: Message) -> str:
    """A Struct or Value as compact JSON (a string value as itself)."""
    value: Any = json_format.MessageToDict(message)
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def print_json(data: Any) -> None:
    """Plain JSON on stdout (no colours, no wrapping) for scripts and `jq`."""
    sys.stdout.write(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def print_message(message: Message) -> None:
    print_json(message_dict(message))


def error(message: str) -> None:
    """``error: <message>`` on stderr, on one line whatever the terminal width."""
    err.print(Text("error: ", style="bold red") + Text(" ".join(message.split())), soft_wrap=True)


def detail(text: str) -> None:
    """Supporting lines under an error (e.g. the tail of a log), printed as they are."""
    err.print(Text(text, style="dim"), soft_wrap=True)


def warn(message: str) -> None:
    err.print(Text("warning: ", style="bold yellow") + Text(message), soft_wrap=True)


def success(message: str) -> None:
    out.print(Text("✓ ", style="bold green") + Text(message), soft_wrap=True)


def table(title: str | None, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> Table:
    """A table with string cells; numbers are right-aligned."""
    materialised = [[cell_text(cell) for cell in row] for row in rows]
    grid = Table(title=title, title_justify="left", header_style="bold")
    for index, column in enumerate(columns):
        numeric = bool(materialised) and all(_is_number(row[index]) for row in materialised)
        grid.add_column(column, justify="right" if numeric else "left", overflow="fold")
    for row in materialised:
        grid.add_row(*row)
    return grid


def print_table(title: str | None, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    out.print(table(title, columns, rows))


def cell_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, Timestamp):
        return timestamp_text(value)
    if isinstance(value, list | tuple):
        return ", ".join(cell_text(v) for v in value)
    return str(value)


def timestamp_text(value: Timestamp) -> str:
    if value.seconds == 0 and value.nanos == 0:
        return ""
    return value.ToDatetime().strftime("%Y-%m-%d %H:%M:%S")


def enum_label(name: str, prefix: str) -> str:
    """``SCHEMA_CLASS_PROFILE`` -> ``profile``."""
    return name.removeprefix(prefix).lower() if name.startswith(prefix) else name.lower()


def _is_number(text: str) -> bool:
    return text.replace(".", "", 1).isdigit()
