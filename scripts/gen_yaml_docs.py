"""Generate docs/yaml.md: every kind of YAML definition ``cdp apply`` reads, with every field.

Usage: python scripts/gen_yaml_docs.py [--check]

The fields, their types and their comments come from the .proto files (protoc with source
info), the kinds from cdp_cli.documents, so the page cannot drift from what the services take.
--check exits 1 if docs/yaml.md is not what this script writes (run by `make gen-check`).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from google.protobuf import descriptor_pb2
from grpc_tools import protoc

from cdp_cli.documents import FREE_FORM, KINDS, enum_prefix

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
OUT = ROOT / "docs" / "yaml.md"

TYPE_NAMES = {
    descriptor_pb2.FieldDescriptorProto.TYPE_STRING: "string",
    descriptor_pb2.FieldDescriptorProto.TYPE_BOOL: "true/false",
    descriptor_pb2.FieldDescriptorProto.TYPE_INT32: "integer",
    descriptor_pb2.FieldDescriptorProto.TYPE_INT64: "integer",
    descriptor_pb2.FieldDescriptorProto.TYPE_UINT32: "integer ≥ 0",
    descriptor_pb2.FieldDescriptorProto.TYPE_UINT64: "integer ≥ 0",
    descriptor_pb2.FieldDescriptorProto.TYPE_DOUBLE: "number",
    descriptor_pb2.FieldDescriptorProto.TYPE_FLOAT: "number",
    descriptor_pb2.FieldDescriptorProto.TYPE_BYTES: "base64 bytes",
}


def descriptor_set() -> descriptor_pb2.FileDescriptorSet:
    include = Path(protoc.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "set.pb"
        args = [
            "protoc",
            f"-I{PROTOS}",
            f"-I{include}",
            f"--descriptor_set_out={out}",
            "--include_source_info",
            "--include_imports",
            *[str(p.relative_to(PROTOS)) for p in sorted(PROTOS.rglob("*.proto"))],
        ]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
        return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())


class Index:
    """Messages and enums by full name, with the comment of each message, field and enum value."""

    def __init__(self, files: descriptor_pb2.FileDescriptorSet) -> None:
        self.messages: dict[str, descriptor_pb2.DescriptorProto] = {}
        self.enums: dict[str, descriptor_pb2.EnumDescriptorProto] = {}
        self.comments: dict[tuple[str, ...], str] = {}
        for file in files.file:
            by_path = {
                tuple(loc.path): " ".join(loc.leading_comments.split()) for loc in file.source_code_info.location
            }
            for i, message in enumerate(file.message_type):
                self._message(file.package, message, (4, i), by_path)
            for i, enum in enumerate(file.enum_type):
                self._enum(file.package, enum, (5, i), by_path)

    def _message(
        self,
        scope: str,
        message: descriptor_pb2.DescriptorProto,
        path: tuple[int, ...],
        by_path: dict[tuple[int, ...], str],
    ) -> None:
        name = f"{scope}.{message.name}"
        self.messages[name] = message
        self.comments[(name,)] = by_path.get(path, "")
        for i, field in enumerate(message.field):
            self.comments[(name, field.name)] = by_path.get((*path, 2, i), "")
        for i, nested in enumerate(message.nested_type):
            self._message(name, nested, (*path, 3, i), by_path)
        for i, enum in enumerate(message.enum_type):
            self._enum(name, enum, (*path, 4, i), by_path)

    def _enum(
        self,
        scope: str,
        enum: descriptor_pb2.EnumDescriptorProto,
        path: tuple[int, ...],
        by_path: dict[tuple[int, ...], str],
    ) -> None:
        name = f"{scope}.{enum.name}"
        self.enums[name] = enum
        self.comments[(name,)] = by_path.get(path, "")
        for i, value in enumerate(enum.value):
            self.comments[(name, value.name)] = by_path.get((*path, 2, i), "")


def cell(text: str) -> str:
    return text.replace("|", "\\|")


def short_enum(index: Index, full: str) -> list[tuple[str, str]]:
    enum = index.enums[full]
    prefix = enum_prefix(enum.name)
    return [
        (value.name.removeprefix(prefix).lower(), index.comments.get((full, value.name), ""))
        for value in enum.value
        if not (value.number == 0 and value.name.endswith("UNSPECIFIED"))
    ]


def field_type(index: Index, field: descriptor_pb2.FieldDescriptorProto, nested: list[str]) -> str:
    repeated = field.label == descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED
    if field.type == descriptor_pb2.FieldDescriptorProto.TYPE_MESSAGE:
        full = field.type_name.lstrip(".")
        if full in FREE_FORM:
            kind = "mapping (free-form)"
        elif full == "google.protobuf.Timestamp":
            kind = "RFC 3339 time"
        else:
            if full not in nested:
                nested.append(full)
            kind = f"[{full.rsplit('.', 1)[-1]}](#{full.rsplit('.', 1)[-1].lower()})"
    elif field.type == descriptor_pb2.FieldDescriptorProto.TYPE_ENUM:
        full = field.type_name.lstrip(".")
        kind = "one of " + ", ".join(f"`{v}`" for v, _ in short_enum(index, full))
    else:
        kind = TYPE_NAMES.get(field.type, "value")
    return f"list of {kind}" if repeated else kind


def message_table(
    index: Index, full: str, skip: frozenset[str], nested: list[str], renames: dict[str, str] | None = None
) -> list[str]:
    lines = ["| key | type | meaning |", "|---|---|---|"]
    shown = {field: key for key, field in (renames or {}).items()}
    for field in index.messages[full].field:
        if field.name in skip or field.options.deprecated:
            continue
        comment = index.comments.get((full, field.name), "")
        key = shown.get(field.name, field.name)
        lines.append(f"| `{key}` | {cell(field_type(index, field, nested))} | {cell(comment)} |")
    return lines


def render() -> str:
    index = Index(descriptor_set())
    out = [
        "# YAML definitions",
        "",
        "<!-- Generated by scripts/gen_yaml_docs.py from the .proto files; `make gen` rewrites it. -->",
        "",
        "`cdp apply -f FILE_OR_FOLDER` creates what YAML documents define; [examples/](../examples) holds the",
        "demo's. A file holds one or more documents separated by `---`. Each document names its `kind`;",
        "its other keys are the fields below (the protobuf field name, or its camelCase JSON name).",
        "",
        "* Every key is checked before anything is sent: an unknown key is refused with the file, the",
        "  path of the key and the nearest valid key (`fields[1]: unknown key 'identity_namspace'; did",
        "  you mean 'identity_namespace'?`).",
        "* Enum values are written short and in lower case, as listed (`profile`); the full protobuf",
        "  name (`SCHEMA_CLASS_PROFILE`) is accepted too.",
        "* Fields the service sets itself (ids, versions, creation times) are not part of a definition.",
        "* `cdp apply` creates kinds in the order of this page, whatever the files' order, and reports",
        "  what the service already holds under that name as `exists: <its reason>` (it changes",
        "  nothing then): applying the same files twice is safe, and an edited definition shows.",
        "* `cdp apply --dry-run -f ...` only reads and checks.",
        "",
    ]
    nested: list[str] = []
    for kind in KINDS.values():
        full = kind.message.DESCRIPTOR.full_name
        out += [f"## kind: {kind.name}", "", kind.summary, ""]
        comment = index.comments.get((full,), "")
        if comment:
            out += [comment, ""]
        out += [f"Sent to {kind.service}'s `{kind.method}` (`{full}`).", ""]
        out += message_table(index, full, kind.output_only, nested, dict(kind.renames))
        out.append("")
    done: set[str] = set()
    while nested:
        full = nested.pop(0)
        if full in done:
            continue
        done.add(full)
        short = full.rsplit(".", 1)[-1]
        out += [f"### {short}", ""]
        comment = index.comments.get((full,), "")
        if comment:
            out += [comment, ""]
        out += message_table(index, full, frozenset(), nested)
        out.append("")
    enums = sorted(
        {
            f.type_name.lstrip(".")
            for full in [k.message.DESCRIPTOR.full_name for k in KINDS.values()] + sorted(done)
            for f in index.messages[full].field
            if f.type == descriptor_pb2.FieldDescriptorProto.TYPE_ENUM
        }
    )
    out += ["## Values", ""]
    for full in enums:
        out += [f"### {full.rsplit('.', 1)[-1]}", "", "| value | meaning |", "|---|---|"]
        out += [f"| `{value}` | {cell(comment)} |" for value, comment in short_enum(index, full)]
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--check", action="store_true")
    opts = parser.parse_args()
    text = render()
    if opts.check:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT.relative_to(ROOT)} is stale: run `make gen` and commit the result", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
