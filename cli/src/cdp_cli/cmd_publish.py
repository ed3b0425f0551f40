"""``cdp events publish FILE --dataset NAME``: JSON Lines published on NATS as an online publisher
would, to ``cdp.collect.<dataset>``, then what ingest made of them.

The file is read line by line (memory stays bounded whatever its size); a line that is not a
JSON object is not published and is reported by its line number (never its text). Each event
goes out as the line's own bytes, one message each, with ``Nats-Msg-Id: <dataset>:<event id>``
when the line has the dataset's event id field (JetStream then stores a publish retried after a
lost acknowledgement once; ingest de-duplicates event ids for all time anyway). At most
``--window`` publishes await their acknowledgement at a time, and one JetStream refuses as overloaded
(429) is published again after a backoff (``cdp_kit.publishing``).

Once every message is stored, the command waits (bounded) until ingest's collect consumer has
applied the last of them, and counts the dead letters among this run's stream sequences: the
invalid events, each with its reason (masked: no personal data).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import nats
import typer
from nats.js.api import PubAck
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn

from cdp.common.v1 import admin_pb2
from cdp.ingest.v1 import ingest_pb2
from cdp_cli import render
from cdp_cli.client import Client, nats_auth, read_stack_file
from cdp_cli.errors import CliError
from cdp_cli.wait import wait_downstream
from cdp_kit.natsauth import PUBLISHER, NatsAuth
from cdp_kit.natsserver import cluster_urls
from cdp_kit.publishing import Outgoing, PublishFailed, publish_bounded
from cdp_kit.streams import INGEST_READS_COLLECT, collect_subject

BAD_LINES_SHOWN = 20
DEAD_LETTER_PAGE = 1000
REASONS_SHOWN = 5


@dataclass
class BadLine:
    line: int
    reason: str


@dataclass
class Published:
    """What one run published: counts, its stream sequences and the lines it did not send."""

    lines: int = 0
    published: int = 0
    duplicates: int = 0
    bad: list[BadLine] = field(default_factory=list)
    bad_count: int = 0
    sequences: set[int] = field(default_factory=set)

    def refuse(self, line: int, reason: str) -> None:
        self.bad_count += 1
        if len(self.bad) < BAD_LINES_SHOWN:
            self.bad.append(BadLine(line, reason))

    def acknowledged(self, ack: PubAck) -> None:
        if ack.duplicate:
            self.duplicates += 1
        else:
            self.published += 1
            self.sequences.add(int(ack.seq))


@dataclass
class Outcome:
    applied: bool
    dead_lettered: int = 0
    reasons: dict[str, int] = field(default_factory=dict)


def nats_url_of(client: Client, explicit: str | None) -> str:
    """``--nats-url``, else ``CDP_NATS_URL``, else the running stack's (``stack.json``)."""
    if explicit:
        return explicit
    if os.environ.get("CDP_NATS_URL"):
        return os.environ["CDP_NATS_URL"]
    info = read_stack_file(client.data_dir)
    if info is None or not info.nats_url:
        raise CliError(f"no NATS URL: pass --nats-url, set CDP_NATS_URL or run `cdp up --data-dir {client.data_dir}`")
    return info.nats_url


def event_id_field(client: Client, dataset: str) -> str:
    """The dataset's event id field (its schema's), or an error when it is not an event dataset."""
    datasets = client.ingest.ListDatasets(ingest_pb2.ListDatasetsRequest(), timeout=client.timeout).datasets
    found = next((d for d in datasets if d.name == dataset), None)
    if found is None:
        raise CliError(f"dataset {dataset!r} not found")
    request = ingest_pb2.GetSchemaRequest(name=found.schema_name)
    schema = client.ingest.GetSchema(request, timeout=client.timeout)
    if schema.schema_class != ingest_pb2.SCHEMA_CLASS_EVENT:
        raise CliError(f"dataset {dataset!r} holds profile records: use `cdp ingest FILE --dataset {dataset}`")
    return schema.event_id_field


def judge_line(text: bytes) -> tuple[dict[str, Any] | None, str]:
    """The event of one line, or why it is not one (no value quoted)."""
    try:
        value = json.loads(text)
    except ValueError as exc:
        reason = exc.msg if isinstance(exc, json.JSONDecodeError) else "invalid UTF-8"
        return None, f"not JSON ({reason})"
    except RecursionError:  # json's decoder recurses per level: a line thousands deep
        return None, "not JSON that can be read (nested thousands deep)"
    if not isinstance(value, dict):
        return None, f"not a JSON object (a {type(value).__name__})"
    return value, ""


async def publish_file(
    path: Path,
    dataset: str,
    url: str,
    id_field: str,
    window: int,
    progress: Progress | None,
    auth: NatsAuth | None = None,
) -> Published:
    """Publish every event line of ``path``, read line by line (a local file: reads are short)."""
    out = Published()
    size = await asyncio.to_thread(lambda: path.stat().st_size)
    subject = collect_subject(dataset)
    options = auth.connect_options() if auth is not None else {}
    nc = await nats.connect(
        cluster_urls(url), connect_timeout=5, max_reconnect_attempts=5, name="cdp-events-publish", **options
    )
    try:
        js = nc.jetstream()
        task = progress.add_task(f"publishing {path.name}", total=size) if progress else None

        def events() -> Iterator[Outgoing]:
            with path.open("rb") as lines:
                for number, text in enumerate(lines, start=1):
                    out.lines = number
                    if progress is not None and task is not None:
                        progress.advance(task, len(text))
                    body = text.rstrip(b"\r\n")
                    if not body.strip():
                        continue
                    event, reason = judge_line(body)
                    if event is None:
                        out.refuse(number, reason)
                        continue
                    if len(body) > nc.max_payload:
                        out.refuse(number, f"larger than the server's {nc.max_payload}-byte message limit")
                        continue
                    msg_id = _msg_id(dataset, event, id_field)
                    yield Outgoing(subject, body, {"Nats-Msg-Id": msg_id} if msg_id is not None else None)

        # At most ``window`` awaiting their ack; a 429 (JetStream overloaded) is published again after a backoff.
        try:
            await publish_bounded(js, events(), window=window, on_ack=out.acknowledged)
        except PublishFailed as exc:
            raise CliError(f"publishing {path.name} stopped at line {out.lines}: {exc}") from None
    finally:
        await nc.close()
    return out


def _msg_id(dataset: str, event: dict[str, Any], id_field: str) -> str | None:
    """``<dataset>:<event id>``, or None (no header) when the event has no id or one a NATS header
    would not carry as it is: a header value is a line of printable ASCII whose ends the server and
    clients strip, so a CR/LF would split the header (or forge another) and other ids would be
    stored altered, de-duplicating events that differ. Without the header ingest still de-duplicates
    the event by its id."""
    value = event.get(id_field) if id_field else None
    if not isinstance(value, str | int) or isinstance(value, bool):
        return None
    text = str(value)
    if not text or text != text.strip() or not all(" " <= char <= "~" for char in text):
        return None
    return f"{dataset}:{text}"


def collect_applied(client: Client) -> int:
    """How far ingest's collect consumer has applied ``CDP_COLLECT``."""
    reply: admin_pb2.ServiceStatus = client.admin("ingest").GetStatus(
        admin_pb2.GetStatusRequest(), timeout=client.timeout
    )
    consumer = next((c for c in reply.consumers if c.name == INGEST_READS_COLLECT.name), None)
    return int(consumer.applied_sequence) if consumer is not None else 0


def wait_applied(client: Client, last: int, timeout_s: float, interval_s: float = 0.25) -> bool:
    """Whether ingest applied every message up to ``last`` within the time allowed."""
    deadline = time.monotonic() + timeout_s
    while collect_applied(client) < last:
        if time.monotonic() > deadline:
            return False
        time.sleep(interval_s)
    return True


def dead_letters_of(client: Client, dataset: str, sequences: set[int]) -> Outcome:
    """Dead letters of ``dataset`` among ``sequences``, counted by reason."""
    outcome = Outcome(applied=True)
    after, last = min(sequences) - 1, max(sequences)
    while True:
        request = ingest_pb2.ListDeadLettersRequest(dataset=dataset, after_sequence=after, limit=DEAD_LETTER_PAGE)
        reply = client.ingest.ListDeadLetters(request, timeout=client.timeout)
        for letter in reply.dead_letters:
            if letter.sequence in sequences:
                outcome.dead_lettered += 1
                outcome.reasons[letter.reason] = outcome.reasons.get(letter.reason, 0) + 1
        after = reply.next_after_sequence
        if not reply.dead_letters or not after or after >= last:
            return outcome


def events_publish(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(help="JSON Lines, one event object per line.", exists=True, dir_okay=False)],
    dataset: Annotated[str, typer.Option("--dataset", help="The event dataset: subject cdp.collect.<dataset>.")],
    nats_url: Annotated[
        str | None, typer.Option("--nats-url", help="NATS server (default: CDP_NATS_URL, else the stack's).")
    ] = None,
    window: Annotated[int, typer.Option("--window", min=1, help="Publishes awaiting their ack at most.")] = 1000,
    wait: Annotated[
        bool,
        typer.Option(
            "--wait", help="Then wait until identity, segmentation and activation have applied what the events caused."
        ),
    ] = False,
    wait_timeout: Annotated[
        float, typer.Option("--wait-timeout", help="Seconds each wait may take (then exit 1).")
    ] = 300.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the answer as JSON.")] = False,
) -> None:
    """Publish events from a JSON Lines file to NATS as an online publisher would, then count
    what ingest dead-lettered (beside `events send`, which calls PublishEvents over gRPC).

    Example: cdp events publish web.jsonl --dataset web --wait
    """
    state: Any = ctx.obj
    if state is None:
        raise CliError("run this through the `cdp` command")
    client: Client = state.client()
    id_field = event_id_field(client, dataset)
    url = nats_url_of(client, nats_url)
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TimeElapsedColumn())
    with Progress(*columns, console=render.err, transient=True) as progress:
        try:
            auth = nats_auth(client.data_dir, PUBLISHER)
            published = asyncio.run(publish_file(file, dataset, url, id_field, window, progress, auth))
        except (OSError, nats.errors.Error) as exc:
            raise CliError(f"publishing to {url}: {exc}") from exc
        outcome = Outcome(applied=True)
        if published.sequences:
            waiting = progress.add_task("waiting for ingest to apply them", total=None)
            outcome.applied = wait_applied(client, max(published.sequences), wait_timeout)
            progress.remove_task(waiting)
            if outcome.applied:
                outcome = dead_letters_of(client, dataset, published.sequences)
    _report(file, published, outcome, as_json)
    if not outcome.applied:
        raise CliError(
            f"ingest did not apply the published events within {wait_timeout:g} s "
            f"(it applied cdp.collect up to sequence {collect_applied(client)}, the last published is "
            f"{max(published.sequences)}): dead letters not counted; see `cdp status`"
        )
    if wait:
        wait_downstream(client, wait_timeout)


def _report(file: Path, published: Published, outcome: Outcome, as_json: bool) -> None:
    bad = [{"line": b.line, "reason": b.reason} for b in published.bad]
    if as_json:
        render.print_json(
            {
                "lines": published.lines,
                "published": published.published,
                "duplicates": published.duplicates,
                "bad_lines": published.bad_count,
                "bad": bad,
                "dead_lettered": outcome.dead_lettered if outcome.applied else None,
                "dead_letter_reasons": outcome.reasons,
            }
        )
        return
    dead = outcome.dead_lettered if outcome.applied else "not counted"
    render.print_table(
        f"events from {file.name}",
        ["published", "duplicates (not stored again)", "bad lines (not sent)", "dead-lettered by ingest"],
        [(published.published, published.duplicates, published.bad_count, dead)],
    )
    for b in published.bad:
        render.err.print(f"line {b.line}: {b.reason}")
    if published.bad_count > len(published.bad):
        render.err.print(f"… and {published.bad_count - len(published.bad)} more bad lines")
    top = sorted(outcome.reasons.items(), key=lambda kv: (-kv[1], kv[0]))[:REASONS_SHOWN]
    for reason, count in top:
        render.err.print(f"dead-lettered ×{count}: {reason}")
    if outcome.dead_lettered:
        render.err.print("list them with `cdp deadletters --dataset <dataset>`")
