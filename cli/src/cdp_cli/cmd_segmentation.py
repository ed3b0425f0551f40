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
        """Streaming or batch, why, what it reads, and how many profiles match now (nothing is saved).

        Example: cdp segment explain 'count(page_view) >= 3 within 7d'
        """
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
        """Evaluate a segment in the store (SQL) now and emit the membership changes, with a progress bar.

        Example: cdp segment evaluate nightly_vip_review
        """
        client = client_of(ctx)
        request = segmentation_pb2.EvaluateSegmentRequest(segment=segment)
        last = segmentation_pb2.EvaluationProgress()
        with typer.progressbar(length=1, label=f"evaluating {segment}") as bar:
            for progress in client.segmentation.EvaluateSegment(request, timeout=max(client.timeout, 600)):
                bar.length = max(progress.profiles_total, 1)
                bar.update(progress.profiles_done - last.profiles_done)
                last = progress
        render.success(f"{segment}: {last.profiles_done} profiles, +{last.realized} realized, -{last.exited} exited")


def computed_app(client_of: Callable[[typer.Context], Any]) -> typer.Typer:
    """`cdp computed create|list`: computed attributes, usable in segments by name."""
    group = typer.Typer(
        help="Computed attributes: count/sum/min/max/most_recent of an event field over a window, per profile.",
        no_args_is_help=True,
        add_completion=False,
    )

    @group.command("create")
    def computed_create(
        ctx: typer.Context,
        name: Annotated[str, typer.Argument(help="lower_snake_case, e.g. orders_90d.")],
        function: Annotated[
            list[str], typer.Argument(help="e.g. 'sum(store_order.amount) within 90d' (words may be separate).")
        ],
        as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    ) -> None:
        """Define a computed attribute; every profile's value is kept up to date from then on.

        Example: cdp computed create orders_90d 'count(store_order) within 90d'
        """
        client = client_of(ctx)
        request = segmentation_pb2.CreateComputedAttributeRequest(name=name, definition=" ".join(function))
        reply = client.segmentation.CreateComputedAttribute(request, timeout=client.timeout)
        if as_json:
            render.print_message(reply)
            return
        render.success(f"computed attribute {reply.name} = {reply.definition} created (id {reply.id})")

    @group.command("list")
    def computed_list(
        ctx: typer.Context, as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False
    ) -> None:
        """List the computed attributes.

        Example: cdp computed list --json
        """
        client = client_of(ctx)
        reply = client.segmentation.ListComputedAttributes(
            segmentation_pb2.ListComputedAttributesRequest(), timeout=client.timeout
        )
        if as_json:
            render.print_message(reply)
            return
        render.print_table(
            "computed attributes",
            ["name", "definition", "created"],
            [(a.name, a.definition, a.created_at) for a in reply.attributes],
        )

    return group


def computed_rows(profile: segmentation_pb2.Profile) -> list[tuple[str, str, str]]:
    """(name, value, definition) of a profile's computed attributes, for `cdp profile get`."""
    return [(c.name, render.json_value(c.value) if c.HasField("value") else "", c.definition) for c in profile.computed]
