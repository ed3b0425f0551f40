"""`cdp schema create|get|list`: the typed fields that datasets are validated against."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cdp.ingest.v1 import ingest_pb2
from cdp_cli import (
    inputs,
    render,
)
from cdp_cli.context import JsonFlag, client_of, group, state_of

schema_app = group("Schemas: the typed fields that datasets are validated against.")
_client = client_of
_state = state_of


def _field_identities(schema: ingest_pb2.Schema) -> list[str]:
    return [f"{f.name}→{f.identity_namespace}" for f in schema.fields if f.identity_namespace]


def _schema_class(schema: ingest_pb2.Schema) -> str:
    return render.enum_label(ingest_pb2.SchemaClass.Name(schema.schema_class), "SCHEMA_CLASS_")


@schema_app.command("create")
def schema_create(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(help="JSON or YAML file holding a cdp.ingest.v1.Schema.")],
    as_json: JsonFlag = False,
) -> None:
    """Register a schema (or a compatible new version of one).

    Example: cdp schema create crm_person.yaml
    """
    schema = inputs.parse_schema(file)
    client = _client(ctx)
    reply = client.ingest.CreateSchema(ingest_pb2.CreateSchemaRequest(schema=schema), timeout=client.timeout)
    if as_json:
        render.print_message(reply)
        return
    render.success(
        f"schema {reply.name} v{reply.version} registered ({_schema_class(reply)}, {len(reply.fields)} fields)"
    )


@schema_app.command("get")
def schema_get(
    ctx: typer.Context,
    name: str,
    version: Annotated[int, typer.Option("--version", help="0 = the latest.")] = 0,
    as_json: JsonFlag = False,
) -> None:
    """Show one schema and its fields.

    Example: cdp schema get crm_person
    """
    client = _client(ctx)
    reply = client.ingest.GetSchema(ingest_pb2.GetSchemaRequest(name=name, version=version), timeout=client.timeout)
    if as_json:
        render.print_message(reply)
        return
    render.print_table(
        f"{reply.name} v{reply.version} ({_schema_class(reply)})",
        ["field", "type", "required", "identity"],
        [
            (
                f.name,
                render.enum_label(ingest_pb2.FieldType.Name(f.type), "FIELD_TYPE_"),
                f.required,
                f.identity_namespace,
            )
            for f in reply.fields
        ],
    )


@schema_app.command("list")
def schema_list(ctx: typer.Context, as_json: JsonFlag = False) -> None:
    """List the schemas (latest versions).

    Example: cdp schema list
    """
    client = _client(ctx)
    reply = client.ingest.ListSchemas(ingest_pb2.ListSchemasRequest(), timeout=client.timeout)
    if as_json:
        render.print_message(reply)
        return
    render.print_table(
        "schemas",
        ["name", "version", "class", "fields", "identities"],
        [(s.name, s.version, _schema_class(s), len(s.fields), _field_identities(s)) for s in reply.schemas],
    )
