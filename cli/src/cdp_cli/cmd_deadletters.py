"""``cdp deadletters``: every service's dead letters in one place, and their redrive.

Three kinds, from two sources:

* ``poison`` and ``collect-reject``: the kit's dead letters, which every service serves through
  ``cdp.common.v1.DeadLetterService``. Ingest's invalid collected events are its dead letters
  of consumer ``ingest-collect`` with error class ``Rejected``; anything else there is poison.
* ``delivery``: activation's batches that failed for good (its own ``ListDeadLetters`` and
  ``Redrive``).

Nothing personal is printed: excerpts are the kit's masked shapes, and reasons (which may quote
what a destination or a converter said) have email- and phone-like text masked.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Annotated, Any, Literal

import grpc
import typer

from cdp.activation.v1 import activation_pb2
from cdp.common.v1 import deadletter_pb2 as dl
from cdp.common.v1 import deadletter_pb2_grpc
from cdp_cli import render
from cdp_cli.client import SERVICES, Client, ServiceName, describe_rpc_error, rpc_code
from cdp_cli.context import client_of
from cdp_cli.errors import CliError
from cdp_kit.telemetry import scrub

Kind = Literal["poison", "collect-reject", "delivery"]
KINDS: tuple[Kind, ...] = ("poison", "collect-reject", "delivery")
COLLECT_CONSUMER = "ingest-collect"
REJECTED = "Rejected"
COLLECT_PREFIX = "cdp.collect."
# Enough for honest counts on any stack that is not on fire; beyond it the counts say so.
FETCH_LIMIT = 10_000

app = typer.Typer(
    help="Dead letters of every service (poison, collect rejects, failed deliveries), and their redrive.\n\n"
    "Example: cdp deadletters --service ingest --kind collect-reject",
    add_completion=False,
)
JsonFlag = Annotated[bool, typer.Option("--json", help="Print the answer as JSON.")]
ServiceOpt = Annotated[ServiceName | None, typer.Option("--service", help="Only this service.")]
KindOpt = Annotated[Kind | None, typer.Option("--kind", help="Only this kind.")]
ConsumerOpt = Annotated[str, typer.Option("--consumer", help="Only this consumer's poison, e.g. identity-ingest.")]
DatasetOpt = Annotated[str, typer.Option("--dataset", help="Only this dataset's collect rejects.")]
DestinationOpt = Annotated[str, typer.Option("--destination", help="Only this destination's failed deliveries.")]


@dataclass(frozen=True)
class Letter:
    """One dead letter of any kind, as shown (never carrying raw personal data)."""

    service: str
    kind: Kind
    where: str
    reason: str
    state: str
    redrives: int = 0
    when: str = ""
    consumer: str = ""
    stream: str = ""
    sequence: int = 0
    dataset: str = ""
    destination: str = ""
    batch_id: str = ""
    plan_id: str = ""
    attempts: int = 0
    permanent: bool = False
    excerpt: str = ""
    size_bytes: int = 0


@dataclass(frozen=True)
class Filters:
    service: str = ""
    kind: str = ""
    consumer: str = ""
    dataset: str = ""
    destination: str = ""

    def check(self) -> None:
        if self.service and self.service not in SERVICES:
            raise CliError(f"--service {self.service!r}: one of {', '.join(SERVICES)}")
        if self.kind and self.kind not in KINDS:
            raise CliError(f"--kind {self.kind!r}: one of {', '.join(KINDS)}")

    def wants_kind(self, kind: Kind) -> bool:
        """A filter that names one kind's field (dataset, destination, consumer) rules out the others."""
        if self.kind and self.kind != kind:
            return False
        if self.dataset and kind != "collect-reject":
            return False
        if self.destination and kind != "delivery":
            return False
        return not (self.consumer and kind == "delivery")

    def keeps(self, letter: Letter) -> bool:
        if self.service and letter.service != self.service:
            return False
        if not self.wants_kind(letter.kind):
            return False
        if self.consumer and letter.consumer != self.consumer:
            return False
        return not (self.dataset and letter.dataset != self.dataset)


# --------------------------------------------------------------------------- shaping


def kit_letter(service: str, letter: dl.DeadLetter) -> Letter:
    reject = service == "ingest" and letter.consumer == COLLECT_CONSUMER and letter.error_class == REJECTED
    kind: Kind = "collect-reject" if reject else "poison"
    position = f"{letter.stream}#{letter.sequence}"
    dataset = letter.subject.removeprefix(COLLECT_PREFIX) if reject else ""
    return Letter(
        service=service,
        kind=kind,
        where=f"dataset {dataset} ({position})" if reject else f"{letter.consumer} {position}",
        reason=scrub(letter.error if reject else f"{letter.error_class}: {letter.error}"),
        state=letter.state,
        redrives=letter.redrives,
        when=render.timestamp_text(letter.stored_at),
        consumer=letter.consumer,
        stream=letter.stream,
        sequence=letter.sequence,
        dataset=dataset,
        excerpt=letter.excerpt,
        size_bytes=letter.size_bytes,
    )


def delivery_letter(letter: activation_pb2.DeadLetter) -> Letter:
    return Letter(
        service="activation",
        kind="delivery",
        where=f"{letter.destination} batch {letter.batch_id}",
        reason=scrub(letter.reason),  # permanent or not, and the attempts, are fields of their own
        state="dead",
        when=render.timestamp_text(letter.at),
        destination=letter.destination,
        batch_id=letter.batch_id,
        plan_id=letter.plan_id,
        attempts=letter.attempts,
        permanent=letter.permanent,
    )


def counts(letters: Iterable[Letter]) -> dict[str, dict[str, int]]:
    """Per service, per kind."""
    tally = Counter((x.service, x.kind) for x in letters)
    out: dict[str, dict[str, int]] = {}
    for (service, kind), n in sorted(tally.items(), key=lambda item: (SERVICES.index(item[0][0]), item[0][1])):
        out.setdefault(service, {})[kind] = n
    return out


def rows(letters: Iterable[Letter]) -> list[tuple[Any, ...]]:
    return [(x.service, x.kind, x.where, x.reason, x.state, x.redrives, x.when) for x in letters]


COLUMNS = ["service", "kind", "where", "reason", "state", "redrives", "when"]


def print_listing(letters: Sequence[Letter], shown: int, tally: dict[str, dict[str, int]]) -> None:
    render.print_table("dead letters", COLUMNS, rows(letters[:shown]))
    if len(letters) > shown:
        render.out.print(f"{shown} of {len(letters)} shown (--limit)")
    summary = [(service, kind, n) for service, kinds in tally.items() for kind, n in kinds.items()]
    render.print_table("per service and kind", ["service", "kind", "dead letters"], summary)


# --------------------------------------------------------------------------- fetching


_client = client_of


def _stub(client: Client, service: str) -> deadletter_pb2_grpc.DeadLetterServiceStub:
    return deadletter_pb2_grpc.DeadLetterServiceStub(client.channel(service))


def _services(filters: Filters) -> list[str]:
    return [filters.service] if filters.service else list(SERVICES)


def gather(client: Client, filters: Filters, *, include_redriven: bool) -> tuple[list[Letter], list[str]]:
    """Every dead letter the filters keep, and the services that could not be asked (named, not fatal:
    the others' letters are still worth seeing)."""
    letters: list[Letter] = []
    unreachable: list[str] = []
    kit_kinds = filters.wants_kind("poison") or filters.wants_kind("collect-reject")
    for service in _services(filters):
        try:
            if kit_kinds:
                request = dl.ListDeadLettersRequest(
                    consumer=filters.consumer, include_redriven=include_redriven, limit=FETCH_LIMIT
                )
                reply = _stub(client, service).ListDeadLetters(request, timeout=client.timeout)
                letters += [kit_letter(service, x) for x in reply.dead_letters]
            if service == "activation" and filters.wants_kind("delivery"):
                request_d = activation_pb2.ListDeadLettersRequest(destination=filters.destination)
                reply_d = client.activation.ListDeadLetters(request_d, timeout=client.timeout)
                letters += [delivery_letter(x) for x in reply_d.dead_letters]
        except grpc.RpcError as exc:
            if rpc_code(exc) != grpc.StatusCode.UNAVAILABLE:
                raise
            unreachable.append(service)
            render.warn(f"{service}: {describe_rpc_error(exc)}; its dead letters are not listed")
        except CliError as exc:  # no address for this service
            unreachable.append(service)
            render.warn(f"{service}: {exc.message.splitlines()[0]}")
    return [x for x in letters if filters.keeps(x)], unreachable


# --------------------------------------------------------------------------- list


@app.callback(invoke_without_command=True)
def listing(
    ctx: typer.Context,
    service: ServiceOpt = None,
    kind: KindOpt = None,
    consumer: ConsumerOpt = "",
    dataset: DatasetOpt = "",
    destination: DestinationOpt = "",
    include_redriven: Annotated[
        bool, typer.Option("--all", help="Include letters already redriven (default: dead or waiting).")
    ] = False,
    limit: Annotated[int, typer.Option("--limit", help="At most this many rows (counts cover all).")] = 100,
    as_json: JsonFlag = False,
) -> None:
    """List every service's dead letters: consumers' poison, ingest's collect rejects, activation's failed
    deliveries, with where, why, state and when; counts per service and kind at the bottom.

    Example: cdp deadletters --service ingest --kind collect-reject
    """
    if ctx.invoked_subcommand is not None:
        return
    list_letters(
        ctx, Filters(service or "", kind or "", consumer, dataset, destination), include_redriven, limit, as_json
    )


def list_letters(ctx: typer.Context, filters: Filters, include_redriven: bool, limit: int, as_json: bool) -> None:
    filters.check()
    letters, unreachable = gather(_client(ctx), filters, include_redriven=include_redriven)
    tally = counts(letters)
    if as_json:
        render.print_json(
            {
                "dead_letters": [asdict(x) for x in letters[:limit]],
                "counts": tally,
                "total": len(letters),
                "unreachable": unreachable,
            }
        )
        return
    print_listing(letters, limit, tally)


# --------------------------------------------------------------------------- redrive


@dataclass(frozen=True)
class Requested:
    """What one redrive asked for: kit letters by (service, consumer, sequence), delivery batch ids."""

    kit: list[Letter]
    batches: list[str]


@app.command("redrive")
def redrive(
    ctx: typer.Context,
    service: ServiceOpt = None,
    kind: KindOpt = None,
    consumer: ConsumerOpt = "",
    sequences: Annotated[
        list[int] | None, typer.Option("--sequence", help="Only these stream sequences (repeatable).")
    ] = None,
    dataset: DatasetOpt = "",
    destination: DestinationOpt = "",
    batches: Annotated[list[str] | None, typer.Option("--batch", help="Only these delivery batch ids.")] = None,
    request_id: Annotated[
        str, typer.Option("--request-id", help="Makes a repeated request harmless (default: a new one).")
    ] = "",
    wait: Annotated[
        bool, typer.Option("--wait/--no-wait", help="Wait for poison and collect rejects to be applied again.")
    ] = True,
    wait_s: Annotated[float, typer.Option("--wait-s", help="How long --wait waits.")] = 30.0,
    as_json: JsonFlag = False,
) -> None:
    """Re-drive dead letters (every one the filters keep; all of them without filters): poison and collect
    rejects are applied again by their service (still invalid: dead again, one redrive more); failed
    deliveries are sent again with the same batch ids.

    Example: cdp deadletters redrive --kind delivery --destination crm_file_drop
    """
    filters = narrowed(
        Filters(service or "", kind or "", consumer, dataset, destination), sequences or [], batches or []
    )
    client = _client(ctx)
    letters, _ = gather(client, filters, include_redriven=False)
    chosen = [x for x in letters if redrivable(x) and named(x, sequences or [], batches or [])]
    rid = request_id or uuid.uuid4().hex
    requested = request(client, chosen, rid)
    outcome = (
        await_outcome(client, requested.kit, wait_s)
        if wait and requested.kit
        else [replace(x, state="redrive_requested") for x in requested.kit]
    )
    if as_json:
        render.print_json(
            {"request_id": rid, "letters": [asdict(x) for x in outcome], "delivery_batches": requested.batches}
        )
        return
    print_outcome(rid, outcome, requested.batches)


def narrowed(filters: Filters, sequences: Sequence[int], batches: Sequence[str]) -> Filters:
    """The filters a redrive's --sequence / --batch imply (sequences are positions on one consumer's stream)."""
    filters.check()
    if sequences and batches:
        raise CliError("--sequence names poison or collect rejects, --batch deliveries: pass one of them")
    if batches:
        if not filters.wants_kind("delivery"):
            raise CliError("--batch names failed deliveries: it does not go with filters of other kinds")
        return replace(filters, kind="delivery")
    if sequences and not (filters.consumer or filters.dataset):
        raise CliError("--sequence needs --consumer (or --dataset for collect rejects): sequences are per stream")
    return filters


def redrivable(letter: Letter) -> bool:
    """Dead, and not a message set aside from a service's own log: bytes it never wrote (a forgery on
    its subject) have nothing to be applied again."""
    return letter.state == "dead" and not letter.consumer.startswith("own:")


def named(letter: Letter, sequences: Sequence[int], batches: Sequence[str]) -> bool:
    if sequences:
        return letter.kind != "delivery" and letter.sequence in sequences
    if batches:
        return letter.batch_id in batches
    return True


def request(client: Client, chosen: Sequence[Letter], rid: str) -> Requested:
    """One kit request per (service, consumer), each with its own id derived from ``rid`` (a request id
    names one command on a service's log); one activation Redrive for the delivery batches."""
    per_consumer: dict[tuple[str, str], list[int]] = {}
    for x in chosen:
        if x.kind != "delivery":
            per_consumer.setdefault((x.service, x.consumer), []).append(x.sequence)
    for (service, consumer), seqs in per_consumer.items():
        call = dl.RedriveDeadLettersRequest(consumer=consumer, sequences=seqs, request_id=f"{rid}:{consumer}")
        _stub(client, service).RedriveDeadLetters(call, timeout=client.timeout)
    batch_ids = [x.batch_id for x in chosen if x.kind == "delivery"]
    redriven: list[str] = []
    if batch_ids:
        reply = client.activation.Redrive(activation_pb2.RedriveRequest(batch_ids=batch_ids), timeout=client.timeout)
        redriven = list(reply.batch_ids)
    return Requested([x for x in chosen if x.kind != "delivery"], redriven)


def await_outcome(client: Client, wanted: Sequence[Letter], wait_s: float) -> list[Letter]:
    """Poll the services until no requested letter is still waiting for its redrive (or ``wait_s``)."""
    keys = {(x.service, x.consumer, x.sequence) for x in wanted}
    deadline = time.monotonic() + wait_s
    latest: dict[tuple[str, str, int], Letter] = {}
    while True:
        for service in sorted({x.service for x in wanted}):
            reply = _stub(client, service).ListDeadLetters(
                dl.ListDeadLettersRequest(include_redriven=True, limit=FETCH_LIMIT), timeout=client.timeout
            )
            for item in reply.dead_letters:
                letter = kit_letter(service, item)
                key = (service, letter.consumer, letter.sequence)
                if key in keys:
                    latest[key] = letter
        waiting = [k for k in keys if k not in latest or latest[k].state == "redrive_requested"]
        if not waiting or time.monotonic() >= deadline:
            return [latest.get((x.service, x.consumer, x.sequence), x) for x in wanted]
        time.sleep(0.2)


def outcome_text(letter: Letter) -> str:
    if letter.state == "redriven":
        return "redriven: applied"
    if letter.state == "redrive_requested":
        return "requested: not applied yet"
    return f"dead again (redrive {letter.redrives})"


def print_outcome(rid: str, letters: Sequence[Letter], batches: Sequence[str]) -> None:
    render.print_table(
        f"redrive {rid}",
        ["service", "kind", "where", "outcome", "reason"],
        [(x.service, x.kind, x.where, outcome_text(x), x.reason if x.state == "dead" else "") for x in letters],
    )
    if batches:
        render.success(f"{len(batches)} batch(es) queued again (failed deliveries): {', '.join(batches)}")
    if not letters and not batches:
        render.success("nothing to redrive")
