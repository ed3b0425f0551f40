"""Turning files and command-line arguments into request messages."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import yaml
from google.protobuf import json_format
from google.protobuf.struct_pb2 import Struct

from cdp.common.v1 import envelope_pb2
from cdp.ingest.v1 import ingest_pb2
from cdp_cli import documents
from cdp_cli.errors import CliError
from cdp_kit.secretnames import is_secret
from cdp_kit.urlmask import has_url_credentials

CHUNK_BYTES = 256 * 1024
EVENTS_PER_CALL = 500

FORMATS: dict[str, ingest_pb2.FileFormat.ValueType] = {
    "csv": ingest_pb2.FILE_FORMAT_CSV,
    "jsonl": ingest_pb2.FILE_FORMAT_JSONL,
    "parquet": ingest_pb2.FILE_FORMAT_PARQUET,
}
_SUFFIX_FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".pq": "parquet"}


def load_document(path: Path) -> Any:
    """A JSON or YAML file (by suffix; YAML also reads JSON)."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        if path.suffix.lower() == ".json":
            return json.loads(text)
        return yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise CliError(f"{path} is not valid {'JSON' if path.suffix.lower() == '.json' else 'YAML'}: {exc}") from exc


def parse_schema(path: Path) -> ingest_pb2.Schema:
    """A ``cdp.ingest.v1.Schema`` from a JSON or YAML file (a ``kind: schema`` document, or the
    schema's fields alone), every key checked with the nearest valid one suggested."""
    document = load_document(path)
    if not isinstance(document, dict):
        raise CliError(f"{path}: expected an object holding a cdp.ingest.v1.Schema")
    if document.get("kind", "schema") != "schema":
        raise CliError(f"{path}: a {document['kind']!r} document, not a schema: use `cdp apply -f {path}`")
    body = {k: v for k, v in document.items() if k != "kind"}
    schema = documents.parse("schema", body, str(path)).message
    assert isinstance(schema, ingest_pb2.Schema)
    return schema


def file_format(path: Path, explicit: str | None) -> ingest_pb2.FileFormat.ValueType:
    suffix = Path(path.stem).suffix if path.suffix.lower() == ".gz" else path.suffix  # data.csv.gz: gzip is detected
    name = explicit or _SUFFIX_FORMATS.get(suffix.lower())
    if name is None:
        raise CliError(f"cannot tell the format of {path.name} from its suffix: pass --format csv|jsonl|parquet")
    if name not in FORMATS:
        raise CliError(f"unknown format {name!r}: use csv, jsonl or parquet")
    return FORMATS[name]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(1024 * 1024):
            digest.update(block)
    return digest.hexdigest()


def default_batch_key(path: Path) -> str:
    """File name plus the sha256 of its content: re-sending the same file is a no-op."""
    return f"{path.name}:{file_sha256(path)}"


def file_chunks(
    path: Path,
    header: ingest_pb2.IngestFileHeader,
    on_sent: Callable[[int], None] | None = None,
    chunk_bytes: int = CHUNK_BYTES,
) -> Iterator[ingest_pb2.IngestFileChunk]:
    """The IngestFile request stream: the header first, then the file in ``chunk_bytes`` pieces."""
    yield ingest_pb2.IngestFileChunk(header=header)
    with path.open("rb") as handle:
        while block := handle.read(chunk_bytes):
            yield ingest_pb2.IngestFileChunk(data=block)
            if on_sent is not None:
                on_sent(len(block))


@dataclass(frozen=True)
class EventLine:
    line: int
    event: Struct


def read_event_lines(path: Path) -> list[EventLine]:
    """A JSON-lines file of event objects; blank lines are skipped, a bad line is an error naming it."""
    events: list[EventLine] = []
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror or exc}") from exc
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        try:
            value = json.loads(text)
        except ValueError as exc:
            raise CliError(f"{path}:{number}: not valid JSON: {exc}") from exc
        if not isinstance(value, dict):
            raise CliError(f"{path}:{number}: expected a JSON object, got {type(value).__name__}")
        events.append(EventLine(number, json_format.ParseDict(value, Struct())))
    return events


def batched(items: list[EventLine], size: int = EVENTS_PER_CALL) -> Iterator[list[EventLine]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def parse_config(pairs: Iterable[str]) -> Struct:
    """``KEY=VALUE`` (a string) or ``KEY:=JSON`` (a number, boolean, list, object) into a Struct."""
    config: dict[str, Any] = {}
    for pair in pairs:
        key, value = _config_pair(pair)
        config[key] = value
    return json_format.ParseDict(config, Struct())


def _config_pair(pair: str) -> tuple[str, Any]:
    raw_key, sep, raw = pair.partition(":=")
    if sep and "=" not in raw_key:
        try:
            return _config_key(raw_key, pair), json.loads(raw)
        except ValueError as exc:
            raise CliError(f"--config {pair!r}: the value after := must be JSON ({exc})") from exc
    key, sep, value = pair.partition("=")
    if not sep:
        raise CliError(f"--config {pair!r}: expected KEY=VALUE or KEY:=JSON")
    return _config_key(key, pair), value


def _config_key(key: str, pair: str) -> str:
    if not key.strip():
        raise CliError(f"--config {pair!r}: the key is empty")
    return key.strip()


def parse_identity(text: str) -> envelope_pb2.IdentityValue:
    """``NAMESPACE:VALUE`` (e.g. ``email:ann@example.com``) into an IdentityValue."""
    namespace, sep, value = text.partition(":")
    if not sep or not namespace or not value:
        raise CliError(f"{text!r} is not an identity: expected NAMESPACE:VALUE, e.g. email:ann@example.com")
    return envelope_pb2.IdentityValue(namespace=namespace, value=value)


def split_list(text: str | None) -> list[str]:
    """``"a, b,,c"`` -> ``["a", "b", "c"]``."""
    return [item.strip() for item in (text or "").split(",") if item.strip()]


SECRET_HOWTO = "NAME=@FILE (a file), NAME=env:VAR (an environment variable) or NAME=- (standard input)"


def refuse_literal_secrets(config: Struct) -> None:
    """A secret typed on the command line is visible in ``ps`` and kept in shell history: a
    ``--config`` whose key names a credential (at any depth of a JSON value), or a URL carrying
    one, is refused."""
    for path, key, value in _settings(json_format.MessageToDict(config)):
        literal_secret = is_secret(key) and value not in ("", None)
        if literal_secret or (isinstance(value, str) and has_url_credentials(value)):
            raise CliError(
                f"--config {path}=…: a secret on the command line is visible in `ps` and shell history; "
                f"pass it with --secret {SECRET_HOWTO}"
            )


def _settings(config: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, str, Any]]:
    for key, value in config.items():
        if isinstance(value, dict) and not is_secret(key):
            yield from _settings(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", key, value


def read_secrets(specs: Iterable[str], stdin: TextIO) -> dict[str, str]:
    """``--secret`` values: ``NAME=@FILE``, ``NAME=env:VAR`` or ``NAME=-`` (stdin, once). One trailing
    newline is dropped (what ``echo`` and editors add). A literal value is refused."""
    out: dict[str, str] = {}
    used_stdin = False
    for spec in specs:
        name, sep, source = spec.partition("=")
        name = name.strip()
        if not sep or not name:
            raise CliError(f"--secret expects {SECRET_HOWTO}")
        if source == "-":
            if used_stdin:
                raise CliError("--secret: only one secret can come from standard input")
            used_stdin = True
            value = stdin.read()
        elif source.startswith("@"):
            path = Path(source[1:]).expanduser()
            try:
                value = path.read_text()
            except OSError as exc:
                raise CliError(f"--secret {name}: cannot read {path}: {exc.strerror or exc}") from None
        elif source.startswith("env:"):
            var = source[4:]
            if var not in os.environ:
                raise CliError(f"--secret {name}: the environment variable {var or '(empty name)'} is not set")
            value = os.environ[var]
        else:
            raise CliError(
                f"--secret {name}: a literal value would be visible in `ps` and shell history; use {SECRET_HOWTO}"
            )
        value = value.removesuffix("\n").removesuffix("\r")
        if not value:
            raise CliError(f"--secret {name}: the value is empty")
        out[name] = value
    return out


def with_secrets(config: Struct, secrets: dict[str, str]) -> Struct:
    """``config`` with each secret set at its name; a dotted name sets a nested setting
    (``fsspec_options.key``)."""
    merged = json_format.MessageToDict(config)
    for name, value in secrets.items():
        *parents, leaf = name.split(".")
        target = merged
        for part in parents:
            child = target.setdefault(part, {})
            if not isinstance(child, dict):
                raise CliError(f"--secret {name}: {part} is not an object setting")
            target = child
        target[leaf] = value
    return json_format.ParseDict(merged, Struct())
