"""``cdp demo``: the whole blueprint on generated data. Starts the embedded stack and local
stand-ins for the destination platforms; brings in offline files (CRM CSV, loyalty JSON
Lines, in-store orders Parquet) and online events (published on NATS); stitches profiles;
evaluates streaming and batch audiences; activates them to a file drop, a webhook, an ad
platform and an email provider; prints what the running services report; stops."""

from __future__ import annotations

import shutil
import threading
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from rich.panel import Panel
from rich.table import Table

from cdp.activation.v1 import activation_pb2 as act
from cdp.common.v1.envelope_pb2 import IdentityValue
from cdp.segmentation.v1 import segmentation_pb2 as seg
from cdp_activation.settings import ActivationSettings
from cdp_cli.blueprint import (
    ACTIVATIONS,
    BlueprintData,
    BlueprintReport,
    activate_blueprint,
    create_blueprint_segments,
    dead_letters,
    generate_blueprint,
    run_blueprint,
)
from cdp_cli.client import Client
from cdp_cli.platforms import local_platforms
from cdp_cli.render import out
from cdp_cli.skeleton import ACTIVATED_SEGMENT, DESTINATION, lag, retrying
from cdp_cli.stack import Stack

DEFAULT_DIR = Path(".cdp-demo")


@dataclass(frozen=True)
class Settled:
    stats: dict[str, act.DeliveryStats]
    file_rows: int


def run_demo(data_dir: Path | None = None, *, people: int = 200, kill: str | None = None) -> Settled:
    workdir = Path(data_dir) if data_dir else DEFAULT_DIR
    if data_dir is None:
        shutil.rmtree(workdir, ignore_errors=True)  # every demo starts from an empty log
    data = generate_blueprint(people=people)
    started = time.monotonic()
    out.rule("[bold]CDP demo: offline + online data in, one profile per person, audiences out")
    with local_platforms() as platforms, Stack(workdir) as stack:
        out.print(f"stack up in {time.monotonic() - started:.1f}s: nats {stack.nats_url}; platforms {platforms.url}")
        for name, address in stack.addresses.items():
            out.print(f"  {name:<13} {address}")
        if stack.secrets is not None:
            out.print(f"  gRPC: TLS and role tokens (admin for this demo) from {stack.secrets.root}")
        with Client(workdir, addresses=stack.addresses) as client:
            chaos = _kill_later(stack, kill) if kill else None
            with out.status("ingesting, resolving identities, evaluating audiences, activating…"):
                report = run_blueprint(client, stack.nats_url, data)
                create_blueprint_segments(client)
                activate_blueprint(client, platforms)
                if chaos is not None and kill is not None:
                    chaos.join()
                    stack.wait_serving(kill)
                settled = wait_settled(client, workdir / "exports")
            _summary(client, data, report, settled, platforms.members, stack, time.monotonic() - started)
    out.print(f"the log, the stores and the file drop stay in {workdir} for a look")
    return settled


def _kill_later(stack: Stack, service: str) -> threading.Thread:
    def kill() -> None:
        time.sleep(1.0)
        out.print(f"[yellow]kill -9 {service} (the supervisor restarts it)[/]")
        stack.kill(service)

    thread = threading.Thread(target=kill, daemon=True)
    thread.start()
    return thread


def _destination_stats(client: Client) -> dict[str, act.DeliveryStats]:
    reply = retrying(partial(client.activation.ListDeliveries, act.ListDeliveriesRequest()))
    return {s.destination_name: s for s in reply.stats if not s.plan_id}


def _file_rows(export_dir: Path) -> int:
    path = export_dir / DESTINATION / f"{ACTIVATED_SEGMENT}.csv"
    return sum(1 for _ in path.open()) - 1 if path.exists() else -1


def wait_settled(client: Client, export_dir: Path, timeout_s: float = 180.0) -> Settled:
    """Until every consumer has caught up, no batch is pending and two looks agree."""
    deadline = time.monotonic() + timeout_s
    previous: tuple[object, ...] | None = None
    while time.monotonic() < deadline:
        if lag(client) == 0:
            stats = _destination_stats(client)
            pending = sum(s.batches_pending for s in stats.values())
            look = (
                tuple(sorted((k, s.SerializeToString(deterministic=True)) for k, s in stats.items())),
                _file_rows(export_dir),
            )
            names = {a.destination for a in ACTIVATIONS} | {DESTINATION}
            if pending == 0 and names <= set(stats) and look == previous:
                return Settled(stats, _file_rows(export_dir))
            previous = look
        time.sleep(0.5)
    raise TimeoutError(f"the platform did not settle in {timeout_s}s")


def _table(title: str, *columns: str) -> Table:
    """A summary table that wraps long cells and never cuts them (a log file has no terminal width)."""
    grid = Table(title=title, show_edge=False)
    for column in columns:
        grid.add_column(column, overflow="fold")
    return grid


def _summary(
    client: Client,
    data: BlueprintData,
    report: BlueprintReport,
    settled: Settled,
    held: dict[str, set[str]],
    stack: Stack,
    elapsed: float,
) -> None:
    ingest = _table("Ingested", "source", "read", "accepted", "rejected", "rejects (field / rule / rows)")
    for name, batch in report.batches.items():
        rejects = "; ".join(f"{g.field} / {g.rule} / {list(g.first_rows)}" for g in batch.rejects) or "-"
        ingest.add_row(
            f"{name} (offline)", str(batch.rows_read), str(batch.rows_accepted), str(batch.rows_rejected), rejects
        )
    dead = dead_letters(client, "web")
    accepted_events = report.nats_published - len(dead)
    ingest.add_row(
        "web events on NATS cdp.collect.web (online)",
        str(report.nats_published),
        str(accepted_events),
        str(len(dead)),
        "dead-lettered, listed below" if dead else "-",
    )
    out.print(ingest)
    if dead:
        letters = _table("Dead letters (cdp deadletters)", "where", "reason")
        for letter in dead:
            letters.add_row(letter.where, letter.reason)
        out.print(letters)

    stats = retrying(partial(client.segmentation.GetStats, seg.GetStatsRequest()))
    out.print(
        f"[bold]{stats.profiles}[/] unified profiles holding {stats.identities} identities, from "
        f"{data.skeleton.people} CRM people, {data.members} loyalty members, {data.orders} store orders and "
        f"{accepted_events} web events"
    )

    segments = _table("Audiences", "segment", "definition", "mode", "why", "members")
    listed = retrying(partial(client.segmentation.ListSegments, seg.ListSegmentsRequest()))
    for s in listed.segments:
        mode = seg.Evaluation.Name(s.evaluation).removeprefix("EVALUATION_").lower()
        segments.add_row(s.name, s.query, mode, s.evaluation_reason, str(s.size))
    out.print(segments)

    activation = _table(
        "Activation",
        "destination",
        "segment",
        "received",
        "activated",
        "excluded (reason: n)",
        "failed",
        "retried",
        "platform holds",
    )
    plans = {a.destination: a for a in ACTIVATIONS}
    for name, st in sorted(settled.stats.items()):
        plan = plans.get(name)
        excluded = ", ".join(f"{k}: {v}" for k, v in sorted(st.excluded.items())) or "0"
        holds = (
            str(len(next((v for k, v in held.items() if k.startswith(plan.connector.split("_")[0])), set())))
            if plan
            else f"{settled.file_rows} rows"
        )
        activation.add_row(
            name,
            plan.segment if plan else ACTIVATED_SEGMENT,
            str(st.received),
            str(st.activated),
            excluded,
            str(st.failed),
            str(st.retried),
            holds,
        )
    out.print(activation)
    if any(k.startswith("consent") for st in settled.stats.values() for k in st.excluded):
        unknown = ActivationSettings().unknown_consent
        out.print(
            "Excluded for consent: the profile's consent for the destination's marketing action is "
            f'"n"{" or unknown" if unknown == "n" else ""}; unknown consent counts as '
            f"{'yes' if unknown == 'y' else 'no'} (CDP_UNKNOWN_CONSENT={unknown})."
        )

    person = retrying(
        partial(
            client.segmentation.GetProfile,
            seg.GetProfileRequest(identity=IdentityValue(namespace="email", value="person.3@example.com")),
        )
    )
    idents = ", ".join(sorted({i.namespace for i in person.identities}))
    out.print(
        Panel(
            f"profile {person.profile_id}\nidentities: {idents}\nevents kept: {person.events}\n"
            f"segments: {', '.join(person.segments) or '-'}",
            title="one person, stitched from a CRM row, a loyalty record, a cookie and a login",
        )
    )
    restarts = {k: v for k, v in stack.restarts.items() if v}
    out.print(f"done in {elapsed:.1f}s" + (f"; services restarted after a crash: {restarts}" if restarts else ""))
