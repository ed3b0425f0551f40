"""Output helpers: rich tables for people, plain JSON for scripts, one-line errors on stderr."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable, Sequence
from typing import Any

from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from rich.console import Console
from rich.table import Table
from rich.text import Text

# Output that is not a terminal (`make demo > log`, a pipe) has no width to fit: rich would assume 80
# columns and squeeze tables. ``use_page_width`` gives it a wide page instead (COLUMNS still wins),
# and table cells fold rather than being cut.
PIPED_WIDTH = 160


def use_page_width() -> None:
    """Called once by the console script: rich reads COLUMNS at each print when it is not a terminal."""
    if not sys.stdout.isatty() and not os.environ.get("COLUMNS"):
        os.environ["COLUMNS"] = str(PIPED_WIDTH)


# Both resolve sys.stdout / sys.stderr when printing, so test runners that swap them see the output.
out = Console(highlight=False)
err = Console(stderr=True, highlight=False)


_INT64_TYPES = {
    FieldDescriptor.TYPE_INT64,
    FieldDescriptor.TYPE_UINT64,
    FieldDescriptor.TYPE_SINT64,
    FieldDescriptor.TYPE_FIXED64,
    FieldDescriptor.TYPE_SFIXED64,
}


def message_dict(message: Message, *, int64_as_number: bool = False) -> dict[str, Any]:
    """A protobuf message as its canonical JSON form, field names as in the .proto.

    The canonical form writes 64-bit integers as strings (JavaScript numbers stop being exact
    at 2**53); ``int64_as_number`` writes them as numbers, for output where they are counts and
    sequences that scripts compare (``cdp status``)."""
    data = json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    return _int64_numbers(message, data) if int64_as_number else data


def _int64_numbers(message: Message, data: dict[str, Any]) -> dict[str, Any]:
    """``data`` (``message`` as canonical JSON) with its 64-bit integer fields as numbers again."""
    for field in message.DESCRIPTOR.fields:
        if field.name not in data:
            continue
        value = getattr(message, field.name)
        repeated = field.is_repeated
        if field.type in _INT64_TYPES:
            data[field.name] = [int(v) for v in value] if repeated else int(value)
        elif field.type == FieldDescriptor.TYPE_MESSAGE and field.message_type is not None:
            if field.message_type.GetOptions().map_entry or field.message_type.full_name.startswith("google.protobuf."):
                continue  # maps and well-known types (timestamps, structs) keep their own JSON forms
            if repeated:
                data[field.name] = [_int64_numbers(m, d) for m, d in zip(value, data[field.name], strict=True)]
            else:
                data[field.name] = _int64_numbers(value, data[field.name])
    return data


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
