"""`cdp segment create|get|list|members|explain|evaluate`: audiences, their definition and members."""

from __future__ import annotations

from typing import Annotated

import typer

from cdp.segmentation.v1 import segmentation_pb2
from cdp_cli import (
    render,
)
from cdp_cli.context import JsonFlag, client_of, group, state_of

segment_app = group("Segments: audiences defined over profiles and events.")
_client = client_of
_state = state_of


def _evaluation(segment: segmentation_pb2.Segment) -> str:
    return render.enum_label(segmentation_pb2.Evaluation.Name(segment.evaluation), "EVALUATION_")


@segment_app.command("create")
def segment_create(
    ctx: typer.Context,
    name: str,
    query: Annotated[str, typer.Argument(help='The definition, e.g. loyalty.tier = "gold".')],
    as_json: JsonFlag = False,
) -> None:
    """Define a segment; the answer says whether it is evaluated streaming or batch, and why.

    Example: cdp segment create regulars 'count(store_order) >= 2 within 90d'
    """
    client = _client(ctx)
    request = segmentation_pb2.CreateSegmentRequest(name=name, query=query)
    reply = client.segmentation.CreateSegment(request, timeout=client.timeout)
    if as_json:
        render.print_message(reply)
        return
    render.success(f"segment {reply.name} created (id {reply.id})")
    render.out.print(f"evaluation: {_evaluation(reply)} — {reply.evaluation_reason}", soft_wrap=True)


@segment_app.command("get")
def segment_get(ctx: typer.Context, segment: str, as_json: JsonFlag = False) -> None:
    """Show one segment (by name or id).

    Example: cdp segment get gold_members
    """
    client = _client(ctx)
    reply = client.segmentation.GetSegment(segmentation_pb2.GetSegmentRequest(segment=segment), timeout=client.timeout)
    if as_json:
        render.print_message(reply)
        return
    _print_segments([reply])


@segment_app.command("list")
def segment_list(ctx: typer.Context, as_json: JsonFlag = False) -> None:
    """List the segments with their size and evaluation mode.

    Example: cdp segment list
    """
    client = _client(ctx)
    reply = client.segmentation.ListSegments(segmentation_pb2.ListSegmentsRequest(), timeout=client.timeout)
    if as_json:
        render.print_message(reply)
        return
    _print_segments(list(reply.segments))


def _print_segments(segments: list[segmentation_pb2.Segment]) -> None:
    render.print_table(
        "segments",
        ["name", "id", "size", "evaluation", "query", "created"],
        [(s.name, s.id, s.size, _evaluation(s), s.query, s.created_at) for s in segments],
    )


@segment_app.command("members")
def segment_members(
    ctx: typer.Context,
    segment: Annotated[str, typer.Argument(help="Segment name or id.")],
    limit: Annotated[
        int, typer.Option("--limit", help="At most this many profile ids (0 = the server's default).")
    ] = 0,
    as_json: JsonFlag = False,
) -> None:
    """List the profile ids currently realized in a segment.

    Example: cdp segment members gold_members --limit 20
    """
    client = _client(ctx)
    request = segmentation_pb2.ListMembersRequest(segment=segment, limit=limit)
    reply = client.segmentation.ListMembers(request, timeout=client.timeout)
    if as_json:
        render.print_message(reply)
        return
    render.out.print(f"{len(reply.profile_ids)} members in segment {segment}", soft_wrap=True)
    if reply.profile_ids:
        render.print_table(None, ["profile id"], [(p,) for p in reply.profile_ids])


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
