"""``cdp demo``: start the embedded stack, run the walking skeleton on generated data,
print what the running services report, stop the stack."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

from rich.panel import Panel
from rich.table import Table

from cdp.activation.v1 import activation_pb2 as act
from cdp.common.v1.envelope_pb2 import IdentityValue
from cdp.ingest.v1 import ingest_pb2 as ing
from cdp.segmentation.v1 import segmentation_pb2 as seg
from cdp_cli.client import Client
from cdp_cli.render import out
from cdp_cli.skeleton import (
    ACTIVATED_SEGMENT,
    DemoData,
    FlowReport,
    Outcome,
    generate,
    retrying,
    run_flow,
    wait_settled,
)
from cdp_cli.stack import Stack

DEFAULT_DIR = Path(".cdp-demo")


def run_demo(
    data_dir: Path | None = None, *, people: int = 200, kill: str | None = None, keep: bool = False
) -> Outcome:
    workdir = Path(data_dir) if data_dir else DEFAULT_DIR
    if data_dir is None:
        shutil.rmtree(workdir, ignore_errors=True)  # every demo starts from an empty log
    data = generate(people=people, anonymous=max(1, people // 10))
    started = time.monotonic()
    out.rule("[bold]CDP demo: offline + online data in, one profile per person, an audience out")
    with Stack(workdir) as stack:
        out.print(f"stack up in {time.monotonic() - started:.1f}s: nats {stack.nats_url}")
        for name, address in stack.addresses.items():
            out.print(f"  {name:<13} {address}")
        with Client(workdir, addresses=stack.addresses) as client:
            chaos = _kill_later(stack, kill) if kill else None
            with out.status("ingesting, resolving identities, evaluating segments, delivering…"):
                report = run_flow(client, data)
                if chaos is not None:
                    chaos.join()
                    stack.wait_serving(kill or "")
                outcome = wait_settled(client, workdir / "exports", data)
            _summary(client, data, report, outcome, stack, time.monotonic() - started)
    out.print(f"the log, the stores and the file drop stay in {workdir} for a look")
    return outcome


def _kill_later(stack: Stack, service: str) -> threading.Thread:
    def kill() -> None:
        time.sleep(0.5)
        out.print(f"[yellow]kill -9 {service} (the supervisor restarts it)[/]")
        stack.kill(service)

    thread = threading.Thread(target=kill, daemon=True)
    thread.start()
    return thread


def _summary(
    client: Client, data: DemoData, report: FlowReport, outcome: Outcome, stack: Stack, elapsed: float
) -> None:
    batch = report.batch or ing.BatchReport()
    ingest = Table(title="Ingested", show_edge=False)
    for col in ("source", "read", "accepted", "rejected", "rejects (field / rule / rows)"):
        ingest.add_column(col)
    rejects = "; ".join(f"{g.field} / {g.rule} / {list(g.first_rows)}" for g in batch.rejects) or "-"
    ingest.add_row(
        "CRM export (CSV, offline)", str(batch.rows_read), str(batch.rows_accepted), str(batch.rows_rejected), rejects
    )
    ingest.add_row(
        "web events (online)", str(len(data.events)), str(report.events_accepted), str(report.events_rejected), "-"
    )
    out.print(ingest)

    stats = retrying(lambda: client.segmentation.GetStats(seg.GetStatsRequest()))
    out.print(
        f"[bold]{stats.profiles}[/] unified profiles holding {stats.identities} identities "
        f"({data.people} CRM people, {len(data.events)} events, {data.anonymous_cookies} never-identified cookies)"
    )

    segments = Table(title="Audiences", show_edge=False)
    for col in ("segment", "definition", "mode", "members"):
        segments.add_column(col)
    listed = retrying(lambda: client.segmentation.ListSegments(seg.ListSegmentsRequest()))
    for s in listed.segments:
        segments.add_row(
            s.name, s.query, seg.Evaluation.Name(s.evaluation).removeprefix("EVALUATION_").lower(), str(s.size)
        )
    out.print(segments)

    deliveries = Table(title="Activation", show_edge=False)
    for col in ("destination", "segment", "members sent", "excluded", "file"):
        deliveries.add_column(col)
    listed_d = retrying(lambda: client.activation.ListDeliveries(act.ListDeliveriesRequest()))
    last = listed_d.deliveries[-1] if listed_d.deliveries else act.Delivery()
    excluded = ", ".join(f"{k}: {v}" for k, v in sorted(last.excluded.items())) or "0"
    deliveries.add_row(
        "crm_file_drop (file_export)", ACTIVATED_SEGMENT, str(len(outcome.file_rows) - 1), excluded, outcome.file_path
    )
    out.print(deliveries)

    person = retrying(
        lambda: client.segmentation.GetProfile(
            seg.GetProfileRequest(identity=IdentityValue(namespace="email", value="person.1@example.com"))
        )
    )
    idents = ", ".join(f"{i.namespace}" for i in person.identities)
    out.print(
        Panel(
            f"profile {person.profile_id}\nidentities: {idents}\nevents: {person.events}\n"
            f"segments: {', '.join(person.segments) or '-'}",
            title="one person, stitched from the CRM row, a cookie and a login",
        )
    )
    restarts = {k: v for k, v in stack.restarts.items() if v}
    out.print(f"done in {elapsed:.1f}s" + (f"; services restarted after a crash: {restarts}" if restarts else ""))
