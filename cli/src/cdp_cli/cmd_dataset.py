"""`cdp dataset create|list`: where batches and events land, each bound to a schema."""

from __future__ import annotations

from typing import Annotated, Literal

import typer

from cdp.ingest.v1 import ingest_pb2
from cdp_cli import (
    render,
)
from cdp_cli.context import JsonFlag, client_of, group, state_of

dataset_app = group("Datasets: where batches and events land, each bound to a schema.")
_client = client_of
_state = state_of


@dataset_app.command("create")
def dataset_create(
    ctx: typer.Context,
    name: str,
    schema: Annotated[str, typer.Option("--schema", help="Name of the schema rows are validated against.")],
    profile_enabled: Annotated[
        bool,
        typer.Option(
            "--profile-enabled", help="Recorded on the dataset (every dataset's records feed unified profiles today)."
        ),
    ] = False,
    retention_days: Annotated[
        int, typer.Option("--retention-days", help="Event datasets: days events count (0 = forever).")
    ] = 0,
    unknown_fields: Annotated[
        Literal["reject", "drop"],
        typer.Option("--unknown-fields", help="Reject a row with a field the schema does not know, or drop the field."),
    ] = "reject",
    allow_anonymous_rows: Annotated[
        bool,
        typer.Option(
            "--allow-anonymous-rows",
            help="Keep rows with no usable identity value (they link to no one) instead of rejecting them.",
        ),
    ] = False,
    as_json: JsonFlag = False,
) -> None:
    """Create a dataset bound to a schema.

    Example: cdp dataset create crm --schema crm_person
    """
    policies = {"reject": ingest_pb2.UNKNOWN_FIELDS_REJECT, "drop": ingest_pb2.UNKNOWN_FIELDS_DROP}
    dataset = ingest_pb2.Dataset(
        name=name,
        schema_name=schema,
        profile_enabled=profile_enabled,
        retention_seconds=retention_days * 86_400,
        unknown_fields=policies[unknown_fields],
        allow_anonymous_rows=allow_anonymous_rows,
    )
    client = _client(ctx)
    reply = client.ingest.CreateDataset(ingest_pb2.CreateDatasetRequest(dataset=dataset), timeout=client.timeout)
    if as_json:
        render.print_message(reply)
        return
    profile = ", profile-enabled" if reply.profile_enabled else ""
    render.success(f"dataset {reply.name} created (schema {reply.schema_name}{profile})")


@dataset_app.command("list")
def dataset_list(ctx: typer.Context, as_json: JsonFlag = False) -> None:
    """List the datasets.

    Example: cdp dataset list
    """
    client = _client(ctx)
    reply = client.ingest.ListDatasets(ingest_pb2.ListDatasetsRequest(), timeout=client.timeout)
    if as_json:
        render.print_message(reply)
        return
    render.print_table(
        "datasets",
        ["name", "schema", "profile", "retention (days)", "unknown fields", "anonymous rows"],
        [
            (
                d.name,
                d.schema_name,
                d.profile_enabled,
                d.retention_seconds // 86_400 if d.retention_seconds else "forever",
                render.enum_label(ingest_pb2.UnknownFields.Name(d.unknown_fields), "UNKNOWN_FIELDS_"),
                "kept" if d.allow_anonymous_rows else "rejected",
            )
            for d in reply.datasets
        ],
    )
