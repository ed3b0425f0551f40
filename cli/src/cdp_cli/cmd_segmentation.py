"""`cdp segment explain|evaluate`: classify a definition before saving it, evaluate a segment in SQL now."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

import typer

from cdp.segmentation.v1 import segmentation_pb2
from cdp_cli import render


def register(segment_app: typer.Typer, client_of: Callable[[typer.Context], Any]) -> None:
    @segment_app.command("explain")
    def segment_explain(
        ctx: typer.Context,
        query: Annotated[str, typer.Argument(help="A definition, e.g. 'count(order) >= 2 within 90d'.")],
        schedule: Annotated[str, typer.Option("--schedule", help="A cron schedule (makes it batch).")] = "",
        as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    ) -> None:
        """Streaming or batch, why, what it reads, and how many profiles match now (nothing is saved)."""
        client = client_of(ctx)
        request = segmentation_pb2.ExplainQueryRequest(query=query, schedule=schedule)
        reply = client.segmentation.ExplainQuery(request, timeout=client.timeout)
        if as_json:
            render.print_message(reply)
            return
        mode = render.enum_label(segmentation_pb2.Evaluation.Name(reply.evaluation), "EVALUATION_")
        render.out.print(f"evaluation: {mode} — {reply.evaluation_reason}", soft_wrap=True)
        render.out.print(f"reads: {', '.join(reply.reads) or 'nothing'}", soft_wrap=True)
        render.out.print(f"estimated size: {reply.estimated_size} of {reply.profiles} profiles", soft_wrap=True)

    @segment_app.command("evaluate")
    def segment_evaluate(
        ctx: typer.Context,
        segment: Annotated[str, typer.Argument(help="Segment name or id.")],
    ) -> None:
        """Evaluate a segment in the store (SQL) now and emit the membership changes, with a progress bar."""
        client = client_of(ctx)
        request = segmentation_pb2.EvaluateSegmentRequest(segment=segment)
        last = segmentation_pb2.EvaluationProgress()
        with typer.progressbar(length=1, label=f"evaluating {segment}") as bar:
            for progress in client.segmentation.EvaluateSegment(request, timeout=max(client.timeout, 600)):
                bar.length = max(progress.profiles_total, 1)
                bar.update(progress.profiles_done - last.profiles_done)
                last = progress
        render.success(f"{segment}: {last.profiles_done} profiles, +{last.realized} realized, -{last.exited} exited")
