"""Definitions as YAML documents: what ``cdp apply -f FILE`` reads (and the demo, from ``examples/``).

A file holds one or more documents (``---`` between them). Each names its ``kind``; the other keys
are the fields of the message the service takes for it (protobuf field names, or their JSON
camelCase form)::

    kind: schema
    name: crm_person
    schema_class: profile          # or the full enum name, SCHEMA_CLASS_PROFILE
    fields:
      - {name: crm_id, type: string, required: true, identity_namespace: crm_id}

Every key is checked against the message before anything is sent: an unknown key is refused with
its path and the nearest valid key (``fields[2]: unknown key 'identity_namspace'; did you mean
'identity_namespace'?``), and so is an unknown enum value. Enum values may be written short and in
lower case (``profile`` for ``SCHEMA_CLASS_PROFILE``). Fields only the service sets (ids, creation
times, sizes) are refused too. ``google.protobuf.Struct`` fields (a destination's ``config``) are
free-form here: the service checks them against the connector's settings.

docs/yaml.md lists every kind and field (generated from the protos by scripts/gen_yaml_docs.py).
"""

from __future__ import annotations

import difflib
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml
from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor
from google.protobuf.message import Message

from cdp.activation.v1 import activation_pb2 as act
from cdp.identity.v1 import identity_pb2 as idn
from cdp.ingest.v1 import ingest_pb2 as ing
from cdp.segmentation.v1 import segmentation_pb2 as seg
from cdp_cli.errors import CliError

# The demo's definitions, shipped with the CLI (the repository's examples/ links here).
EXAMPLES_DIR = Path(__file__).resolve().parent / "examples"
M = TypeVar("M", bound=Message)
FREE_FORM = frozenset({"google.protobuf.Struct", "google.protobuf.Value", "google.protobuf.ListValue"})


@dataclass(frozen=True)
class Kind:
    """One kind of document: the message it holds, how it becomes a request, and where it goes."""

    name: str
    message: type[Message]
    service: str  # the Client attribute: ingest, identity, segmentation, activation
    method: str
    request: Callable[[Any], Message]
    # Fields of ``message`` the service sets itself: refused in a document.
    output_only: frozenset[str] = frozenset()
    summary: str = ""
    # Document keys that stand for a message field another name: a field called ``kind`` (the
    # merge policy's) is written ``policy``, since ``kind`` names the document's kind.
    renames: tuple[tuple[str, str], ...] = ()


KINDS: dict[str, Kind] = {
    kind.name: kind
    for kind in (
        Kind(
            "namespace",
            idn.CreateNamespaceRequest,
            "identity",
            "CreateNamespace",
            lambda m: m,
            summary="An identity namespace (a kind of id): how identity links and ranks it.",
        ),
        Kind(
            "schema",
            ing.Schema,
            "ingest",
            "CreateSchema",
            lambda m: ing.CreateSchemaRequest(schema=m),
            summary="The fields of a profile or event dataset, their types, rules and identities.",
        ),
        Kind(
            "dataset",
            ing.Dataset,
            "ingest",
            "CreateDataset",
            lambda m: ing.CreateDatasetRequest(dataset=m),
            summary="A named input of one schema: files and events are ingested into a dataset.",
        ),
        Kind(
            "merge_policy",
            seg.MergePolicy,
            "segmentation",
            "SetMergePolicy",
            lambda m: seg.SetMergePolicyRequest(policy=m),
            summary="Which value of an attribute a profile shows when its datasets disagree.",
            renames=(("policy", "kind"),),
        ),
        Kind(
            "computed_attribute",
            seg.CreateComputedAttributeRequest,
            "segmentation",
            "CreateComputedAttribute",
            lambda m: m,
            summary="An attribute kept up to date from a profile's events (count, sum, min, max, most_recent).",
        ),
        Kind(
            "segment",
            seg.CreateSegmentRequest,
            "segmentation",
            "CreateSegment",
            lambda m: m,
            summary="An audience: a query over attributes and events, streaming or on a schedule.",
        ),
        Kind(
            "destination",
            act.Destination,
            "activation",
            "CreateDestination",
            lambda m: act.CreateDestinationRequest(destination=m),
            frozenset({"id"}),
            "Where audiences go: a connector and its settings.",
        ),
        Kind(
            "activation",
            act.ActivateRequest,
            "activation",
            "Activate",
            lambda m: m,
            summary="A segment activated to a destination: which attributes and identities it sends.",
        ),
    )
}
# The order ``cdp apply`` creates kinds in: what a document names must exist first.
APPLY_ORDER = tuple(KINDS)


@dataclass(frozen=True)
class Document:
    """One checked document: where it came from, its kind and the message it became."""

    source: str
    kind: Kind
    message: Message

    @property
    def name(self) -> str:
        for field in ("name", "segment", "destination"):
            value = getattr(self.message, field, "")
            if value:
                return str(value)
        return self.kind.name


class DocumentError(CliError):
    pass


def suggest(word: str, choices: list[str]) -> str:
    """``; did you mean 'x'?`` for the nearest choice, or a list of the valid ones."""
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    if close:
        return f"; did you mean {close[0]!r}?"
    return f"; valid: {', '.join(sorted(choices))}" if len(choices) <= 12 else ""


def enum_prefix(enum_name: str) -> str:
    """``SCHEMA_CLASS_`` for ``SchemaClass``: what the short spelling of a value leaves out."""
    out = "".join(f"_{c}" if c.isupper() and i else c for i, c in enumerate(enum_name)).upper()
    return out + "_"


def short_values(enum: EnumDescriptor) -> list[str]:
    """The values one may write: short and lower case, the unspecified zero value left out."""
    prefix = enum_prefix(enum.name)
    out = []
    for value in enum.values:
        if value.number == 0 and value.name.endswith("UNSPECIFIED"):
            continue
        out.append(value.name.removeprefix(prefix).lower())
    return out


def _enum_value(enum: EnumDescriptor, value: Any, path: str) -> str:
    valid = {v.name for v in enum.values}
    if isinstance(value, str):
        if value in valid:
            return value
        full = enum_prefix(enum.name) + value.upper()
        if full in valid:
            return full
    shorts = short_values(enum)
    probe = str(value).lower().removeprefix(enum_prefix(enum.name).lower())
    raise DocumentError(f"{path}: {value!r} is not a {enum.name}{suggest(probe, shorts)}")


def _field_of(descriptor: Descriptor, key: str) -> FieldDescriptor | None:
    found = descriptor.fields_by_name.get(key)
    if found is not None:
        return found
    return next((f for f in descriptor.fields if f.json_name == key), None)


def normalise(descriptor: Descriptor, value: Any, path: str, output_only: frozenset[str] = frozenset()) -> Any:
    """``value`` checked against ``descriptor`` (unknown keys and enum values refused, with the
    nearest valid one), enum values spelled out in full for ``json_format``."""
    if descriptor.full_name in FREE_FORM:
        return value
    if not isinstance(value, dict):
        raise DocumentError(f"{path or 'the document'}: expected a mapping of {descriptor.name} fields, got {value!r}")
    out: dict[str, Any] = {}
    names = [f.name for f in descriptor.fields if f.name not in output_only and not _deprecated(f)]
    for key, item in value.items():
        where = f"{path}.{key}" if path else str(key)
        field = _field_of(descriptor, str(key))
        if field is None:
            where_in = f"{path}: " if path else ""
            raise DocumentError(f"{where_in}unknown key {key!r}{suggest(str(key), names)}")
        if field.name in output_only:
            raise DocumentError(f"{where}: set by the service, not by a definition")
        out[field.name] = _normalise_field(field, item, where)
    return out


def _deprecated(field: FieldDescriptor) -> bool:
    return bool(field.GetOptions().deprecated)


def _normalise_field(field: FieldDescriptor, value: Any, path: str) -> Any:
    if _is_map(field):
        if not isinstance(value, dict):
            raise DocumentError(f"{path}: expected a mapping")
        entry = field.message_type
        assert entry is not None
        value_field = entry.fields_by_name["value"]
        return {k: _normalise_single(value_field, v, f"{path}.{k}") for k, v in value.items()}
    if field.is_repeated:
        if not isinstance(value, list):
            raise DocumentError(f"{path}: expected a list")
        return [_normalise_single(field, item, f"{path}[{i}]") for i, item in enumerate(value)]
    return _normalise_single(field, value, path)


def _is_map(field: FieldDescriptor) -> bool:
    entry = field.message_type
    return field.is_repeated and entry is not None and bool(entry.GetOptions().map_entry)


def _normalise_single(field: FieldDescriptor, value: Any, path: str) -> Any:
    if field.message_type is not None:
        return normalise(field.message_type, value, path)
    if field.enum_type is not None:
        return _enum_value(field.enum_type, value, path)
    return value


def parse(kind_name: Any, body: dict[str, Any], source: str) -> Document:
    """One document's body (without ``kind``) as the message of its kind."""
    if not isinstance(kind_name, str) or kind_name not in KINDS:
        raise DocumentError(f"{source}: unknown kind {kind_name!r}{suggest(str(kind_name), list(KINDS))}")
    kind = KINDS[kind_name]
    try:
        descriptor: Descriptor = kind.message.DESCRIPTOR  # type: ignore[assignment]  # upb's is the same API
        renamed = dict(kind.renames)
        body = {renamed.get(k, k): v for k, v in body.items()}
        checked = normalise(descriptor, body, "", kind.output_only)
    except DocumentError as exc:
        raise DocumentError(f"{source} ({kind.name}): {exc}") from None
    try:
        message = json_format.ParseDict(checked, kind.message())
    except json_format.ParseError as exc:  # a value of the wrong type: json_format says which field
        raise DocumentError(f"{source} ({kind.name}): {exc}") from None
    return Document(source, kind, message)


def load(path: Path) -> list[Document]:
    """Every document of a YAML (or JSON) file, checked."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise DocumentError(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        raw = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        raise DocumentError(f"{path} is not valid YAML: {exc}") from exc
    out = []
    for number, doc in enumerate(raw, start=1):
        source = f"{path}" if len(raw) == 1 else f"{path} document {number}"
        if not isinstance(doc, dict) or "kind" not in doc:
            raise DocumentError(f"{source}: a document is a mapping with a 'kind' ({', '.join(KINDS)})")
        body = {k: v for k, v in doc.items() if k != "kind"}
        out.append(parse(doc["kind"], body, source))
    return out


def files(paths: list[Path]) -> Iterator[Path]:
    """The files named, a directory's *.yaml/*.yml/*.json in name order."""
    for path in paths:
        if path.is_dir():
            yield from sorted(p for p in path.iterdir() if p.suffix.lower() in {".yaml", ".yml", ".json"})
        else:
            yield path


def load_all(paths: list[Path]) -> list[Document]:
    """Every document of every file, in the order ``cdp apply`` creates them (stable within a kind)."""
    documents = [d for path in files(paths) for d in load(path)]
    return sorted(documents, key=lambda d: APPLY_ORDER.index(d.kind.name))


@functools.cache
def _examples() -> tuple[Document, ...]:
    return tuple(load_all([EXAMPLES_DIR]))


def example(kind: str, name: str) -> Message:
    """The shipped example of ``kind`` called ``name`` (the demo's one source of its definitions;
    read once, callers get copies through ``example_of`` or ``example_dict``)."""
    for document in _examples():
        if document.kind.name == kind and document.name == name:
            return document.message
    raise KeyError(f"no {kind} {name!r} in {EXAMPLES_DIR}")


def example_of(kind: str, name: str, cls: type[M]) -> M:
    """``example`` as the message class the caller expects (a copy: callers may change it)."""
    found = example(kind, name)
    if not isinstance(found, cls):
        raise TypeError(f"the {kind} example {name!r} is a {type(found).__name__}, not a {cls.__name__}")
    copy = cls()
    copy.CopyFrom(found)
    return copy


def example_dict(kind: str, name: str) -> dict[str, Any]:
    """``example`` in protobuf JSON form (field names as in the protos)."""
    return json_format.MessageToDict(example(kind, name), preserving_proto_field_name=True)
