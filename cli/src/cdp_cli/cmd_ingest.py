"""Ingest commands beyond the basics in app.py: batch errors (listed or exported as CSV)
and the file upload with a live progress bar (rows, rows/s, rejects)."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Literal

import grpc
import typer
from google.protobuf import json_format
from rich.progress import BarColumn, DownloadColumn, Progress, ProgressColumn, Task, TextColumn, TimeElapsedColumn
from rich.text import Text

from cdp.ingest.v1 import ingest_pb2
from cdp_cli import inputs, render
from cdp_cli.client import Client, describe_rpc_error, rpc_code
from cdp_cli.context import JsonFlag, client_of
from cdp_cli.errors import CliError
from cdp_cli.wait import wait_downstream

batch_app = typer.Typer(help="Batches: their reports and rejected rows.", no_args_is_help=True, add_completion=False)
PAGE = 1000


RAW_REFUSED = (
    "raw rejected values need the operator role (a deployment running gRPC without security grants "
    "them with CDP_ALLOW_RAW_REJECTS=true on ingest)"
)


_client = client_of


class RowsColumn(ProgressColumn):
    """rows read · rows/s · rejects, from the server's progress messages."""

    def render(self, task: Task) -> Text:
        rows = int(task.fields.get("rows", 0))
        rejects = int(task.fields.get("rejects", 0))
        elapsed = task.elapsed or 0.0
        rate = rows / elapsed if elapsed > 0 else 0.0
        style = "red" if rejects else "green"
        return Text(f"{rows:,} rows · {rate:,.0f} rows/s · ", style="cyan") + Text(f"{rejects:,} rejects", style=style)


def upload(client: Client, path: Path, header: ingest_pb2.IngestFileHeader) -> ingest_pb2.BatchReport:
    """Stream the file in chunks and follow the server's progress; answer the batch report."""
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), RowsColumn(), TimeElapsedColumn())
    with Progress(*columns, console=render.err, transient=True) as progress:
        task = progress.add_task(f"ingesting {path.name}", total=path.stat().st_size, rows=0, rejects=0)
        chunks = inputs.file_chunks(path, header)
        report: ingest_pb2.BatchReport | None = None
        try:
            for message in client.ingest.IngestFileWithProgress(chunks):
                progress.update(
                    task, completed=message.bytes_received, rows=message.rows_read, rejects=message.rows_rejected
                )
                if message.HasField("report"):
                    report = message.report
        except grpc.RpcError as exc:
            if rpc_code(exc) != grpc.StatusCode.UNIMPLEMENTED:
                raise
            # An ingest service from before progress streaming: bytes sent are all we can show.
            sent = inputs.file_chunks(path, header, on_sent=lambda n: progress.advance(task, n))
            report = client.ingest.IngestFile(sent, timeout=None)
    if report is None:
        raise CliError("the ingest service ended the upload without a report")
    return report


def _errors(client: Client, batch_id: str, *, raw: bool) -> Iterator[ingest_pb2.BatchError]:
    after = 0
    while True:
        request = ingest_pb2.ListBatchErrorsRequest(batch_id=batch_id, after_row=after, limit=PAGE, raw=raw)
        try:
            reply = client.ingest.ListBatchErrors(request, timeout=client.timeout)
        except grpc.RpcError as exc:
            if rpc_code(exc) == grpc.StatusCode.PERMISSION_DENIED:
                raise CliError(f"{RAW_REFUSED}\n{describe_rpc_error(exc)}") from None
            raise
        yield from reply.errors
        if not reply.next_after_row:
            return
        after = reply.next_after_row


def _error_text(item: ingest_pb2.BatchError) -> str:
    return "; ".join(f"{e.field}: {e.rule}: {e.message}" for e in item.errors)


def _shown(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


@batch_app.command("errors")
def batch_errors(
    ctx: typer.Context,
    batch_id: Annotated[str, typer.Argument(help="The batch id from the batch report.")],
    to_csv: Annotated[
        Path | None, typer.Option("--csv", help="Export every rejected row (masked unless --raw) to this CSV file.")
    ] = None,
    limit: Annotated[int, typer.Option("--limit", help="Rows shown (not exported).")] = 50,
    raw: Annotated[
        bool, typer.Option("--raw", help="Values as read instead of masked (the operator role; to fix and re-send).")
    ] = False,
) -> None:
    """List a batch's rejected rows, or export them as CSV. Values are masked by the service
    (identity values as keyed hashes, others as their shape) unless --raw asks for them as read.

    Example: cdp batch errors BATCH_ID --raw --csv rejects.csv
    """
    client = _client(ctx)
    if to_csv is not None:
        count = _export(client, batch_id, to_csv, raw=raw)
        render.success(f"{count} rejected rows written to {to_csv}" + ("" if raw else " (values masked)"))
        return
    rows = []
    for item in _errors(client, batch_id, raw=raw):
        values = json_format.MessageToDict(item.values)
        shown = ", ".join(f"{k}={_shown(v)}" for k, v in values.items())
        rows.append((item.row, _error_text(item), shown))
        if len(rows) >= limit:
            break
    render.print_table(f"rejected rows of batch {batch_id}", ["row", "errors", "values"], rows)


def _export(client: Client, batch_id: str, path: Path, *, raw: bool) -> int:
    """Two passes (columns, then rows) keep memory bounded whatever the number of rows."""
    columns: dict[str, None] = {}
    for item in _errors(client, batch_id, raw=raw):
        columns.update(dict.fromkeys(item.values.keys()))
    count = 0
    # Raw rejected values are personal data: the file is the caller's alone (0600 from creation).
    mode = 0o600 if raw else 0o644
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode), "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["row", *columns, "errors"])
        for item in _errors(client, batch_id, raw=raw):
            values = json_format.MessageToDict(item.values)
            cells = [_shown(v) for v in (values.get(c, "") for c in columns)]
            writer.writerow([item.row, *cells, _error_text(item)])
            count += 1
    return count


def ingest(
    ctx: typer.Context,
    path: Annotated[Path, typer.Argument(help="The file to ingest.", exists=True, dir_okay=False, readable=True)],
    dataset: Annotated[str, typer.Option("--dataset", help="The dataset it lands in.")],
    batch_key: Annotated[
        str | None, typer.Option("--batch-key", help="Idempotency key (default: file name + sha256).")
    ] = None,
    fmt: Annotated[
        Literal["csv", "jsonl", "parquet"] | None,
        typer.Option("--format", help="The file's format (default: from the suffix, .gz allowed)."),
    ] = None,
    error_threshold: Annotated[
        float | None, typer.Option("--error-threshold", help="Share of rejected rows that fails the batch.")
    ] = None,
    wait: Annotated[
        bool,
        typer.Option(
            "--wait", help="Then wait until identity, segmentation and activation have applied what the batch caused."
        ),
    ] = False,
    wait_timeout: Annotated[
        float, typer.Option("--wait-timeout", help="Seconds --wait may take before it fails.")
    ] = 300.0,
    as_json: JsonFlag = False,
) -> None:
    """Upload a batch file to a dataset and print its report; exit code 1 when the batch failed, or
    with --wait when a downstream stage is stuck or does not finish in time.

    Example: cdp ingest crm.csv --dataset crm --wait
    """
    header = ingest_pb2.IngestFileHeader(
        dataset=dataset,
        batch_key=batch_key or inputs.default_batch_key(path),
        format=inputs.file_format(path, fmt),
        file_name=path.name,
    )
    if error_threshold is not None:
        header.error_threshold = error_threshold
    report = _upload(_client(ctx), path, header)
    if as_json:
        render.print_message(report)
    else:
        _print_batch_report(report)
    if report.status == ingest_pb2.BATCH_STATUS_FAILED:
        raise typer.Exit(1)
    if wait:
        wait_downstream(_client(ctx), wait_timeout)


def _upload(client: Client, path: Path, header: ingest_pb2.IngestFileHeader) -> ingest_pb2.BatchReport:
    return upload(client, path, header)


def _print_batch_report(report: ingest_pb2.BatchReport) -> None:
    state = render.enum_label(ingest_pb2.BatchStatus.Name(report.status), "BATCH_STATUS_")
    render.print_table(
        f"batch {report.batch_id}",
        ["dataset", "status", "read", "accepted", "rejected", "duplicate rows", "batch re-sent"],
        [
            (
                report.dataset,
                state,
                report.rows_read,
                report.rows_accepted,
                report.rows_rejected,
                report.rows_duplicate,
                report.duplicate,
            )
        ],
    )
    if report.rejects:
        render.print_table(
            "rejected rows",
            ["field", "rule", "count", "first rows"],
            [(g.field, g.rule, g.count, list(g.first_rows)) for g in report.rejects],
        )
    if report.failure:
        render.error(f"batch failed: {report.failure}")
