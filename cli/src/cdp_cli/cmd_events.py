"""`cdp events send|publish`: online events, over gRPC or published on NATS as a website would."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer

from cdp.ingest.v1 import ingest_pb2
from cdp_cli import (
    cmd_publish,
    inputs,
    render,
)
from cdp_cli.context import JsonFlag, client_of, group, state_of

events_app = group("Online events, published to a dataset.")
events_app.command("publish")(cmd_publish.events_publish)
_client = client_of
_state = state_of


@dataclass
class SendTotals:
    accepted: int = 0
    duplicate: int = 0
    rejected: int = 0
    rejections: list[dict[str, Any]] = field(default_factory=list)

    def add(self, result: ingest_pb2.EventResult, line: int) -> None:
        if result.status == ingest_pb2.EVENT_STATUS_ACCEPTED:
            self.accepted += 1
        elif result.status == ingest_pb2.EVENT_STATUS_DUPLICATE:
            self.duplicate += 1
        else:
            self.rejected += 1
            errors = [render.message_dict(e) for e in result.errors]
            self.rejections.append({"line": line, "event_id": result.event_id, "errors": errors})


@events_app.command("send")
def events_send(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(help="JSON lines, one event object per line.")],
    dataset: Annotated[str, typer.Option("--dataset", help="The event dataset they land in.")],
    as_json: JsonFlag = False,
) -> None:
    """Publish events from a JSON-lines file, in calls of 500.

    Example: cdp events send web.jsonl --dataset web
    """
    events = inputs.read_event_lines(file)
    client = _client(ctx)
    totals = SendTotals()
    for batch in inputs.batched(events):
        request = ingest_pb2.PublishEventsRequest(dataset=dataset, events=[e.event for e in batch])
        reply = client.ingest.PublishEvents(request, timeout=client.timeout)
        for result in reply.results:
            totals.add(result, batch[result.index].line if result.index < len(batch) else 0)
    if as_json:
        render.print_json(
            {
                "accepted": totals.accepted,
                "duplicate": totals.duplicate,
                "rejected": totals.rejected,
                "rejections": totals.rejections,
            }
        )
        return
    render.print_table(
        f"events from {file.name}",
        ["accepted", "duplicate", "rejected"],
        [(totals.accepted, totals.duplicate, totals.rejected)],
    )
    _print_rejections(totals.rejections)


def _print_rejections(rejections: list[dict[str, Any]], limit: int = 20) -> None:
    rows = [
        (r["line"], e.get("field", ""), e.get("rule", ""), e.get("message", ""))
        for r in rejections[:limit]
        for e in (r["errors"] or [{}])
    ]
    if rows:
        render.print_table("rejected events", ["line", "field", "rule", "message"], rows)
    if len(rejections) > limit:
        render.warn(f"{len(rejections) - limit} more rejected events not shown (use --json)")
