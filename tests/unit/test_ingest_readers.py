"""CSV read by reader processes: the same rows, numbers, reports and staged chunks as reading in
the service process, whatever the file holds; a dead reader fails the batch, not the service;
readers never outlive the service."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cdp.ingest.v1 import ingest_pb2 as pb
from cdp_ingest import batches
from cdp_ingest.batches import BatchRun
from cdp_ingest.limits import Limits
from cdp_ingest.parsing import CsvParser
from cdp_ingest.readers import ReaderDied, ReaderPool, count_rows
from cdp_ingest.records import RecordBuilder
from tests.unit.test_ingest_rows import COLUMNS, SCHEMA, cell

T0 = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.fixture(scope="module")
def pool() -> Iterator[ReaderPool]:
    readers = ReaderPool(2)
    yield readers
    readers.close()


def new_run(tmp_path: Path, pool: ReaderPool | None, limits: Limits | None = None) -> BatchRun:
    return BatchRun(
        header=pb.IngestFileHeader(dataset="people", batch_key="k", format=pb.FILE_FORMAT_CSV),
        dataset=pb.Dataset(name="people", schema_name="people", unknown_fields=pb.UNKNOWN_FIELDS_REJECT),
        schema=SCHEMA,
        staging=tmp_path,
        max_bytes=2000,
        max_kept_rejects=7,
        builder=RecordBuilder("people", pb.SCHEMA_CLASS_PROFILE, "b", T0),
        pool=pool,
        limits=limits or Limits(),
    )


def read(tmp_path: Path, data: bytes, pool: ReaderPool | None, piece: int, limits: Limits | None = None) -> BatchRun:
    run = new_run(tmp_path, pool, limits)
    for start in range(0, len(data), piece):
        run.feed(data[start : start + piece])
    run.finish()
    return run


def outcome(run: BatchRun) -> tuple[pb.BatchReport, list[object], list[object]]:
    try:
        return run.report, list(run.accepted), list(run.rejected)
    finally:
        run.close()


def assert_pool_reads_the_same(
    tmp_path: Path, data: bytes, pool: ReaderPool, piece: int, limits: Limits | None = None
) -> BatchRun:
    alone = outcome(read(tmp_path, data, None, piece, limits))
    pooled_run = read(tmp_path, data, pool, piece, limits)
    pooled = outcome(pooled_run)
    assert pooled[0] == alone[0]
    assert pooled[1] == alone[1]
    assert pooled[2] == alone[2]
    return pooled_run


MESSY = (
    "\ufeffid,age,score,member,tier\r\n"  # a BOM and CRLF line ends
    "1,5,1.5,true,a\r\n"
    '"2",6,"2,5",no,b\r\n'  # a quoted comma: not a number
    '"multi\nline",7,3,yes,a\n'  # a quoted newline inside a row
    "\n\n"  # blank lines are not rows
    "4,x,1,true,a\n"  # a bad integer
    "5,6,7\n"  # a ragged row
    "6,200,1,true,c\n"  # above the maximum, not in the enum
    "7,1,1,true,a,extra\n"
)
UNCLOSED = b'8,"unclosed,1,true,a\n9,1,1,true,a\n'  # runs on to the end of the file


def test_a_messy_csv_reads_the_same_in_reader_processes(
    tmp_path: Path, pool: ReaderPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(batches, "POOL_FROM_BYTES", 0)
    body = "".join(f"{i},{i % 120},{i / 3},{'true' if i % 2 else 'no'},{'ab'[i % 2]}\n" for i in range(10, 3000))
    data = MESSY.encode() + body.encode() + b"bad\xff,1,1,true,a\n" + b"nul\x00,1,1,true,a\n" + UNCLOSED
    run = assert_pool_reads_the_same(tmp_path, data, pool, piece=997)
    assert run._blocks is not None  # the readers really read it
    assert run.report.rows_read == 3000
    assert run.report.rows_rejected == 7


def test_rows_over_the_limits_read_the_same_in_reader_processes(
    tmp_path: Path, pool: ReaderPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows refused unread (too large) keep their place among the blocks the readers judge."""
    monkeypatch.setattr(batches, "POOL_FROM_BYTES", 0)
    limits = Limits(field_bytes=300, row_bytes=1000)
    lines = [f"{i},{i % 120},1,true,a\n".encode() for i in range(1, 400)]
    lines[20] = b"21," + b"9" * 5000 + b",1,true,a\n"  # a field over both limits, unquoted
    lines[90] = b'91,1,"' + b"x\n" * 2000 + b'",true,a\n'  # a quoted one over both, spanning lines
    lines[150] = b"151,1,1,true," + b"b" * 400 + b"\n"  # a field over its limit in a row within its own
    lines[200] = b"201," + b",".join([b"7" * 250] * 6) + b"\n"  # fields within, the row over
    data = b"id,age,score,member,tier\n" + b"".join(lines)
    for piece in (97, 4096, len(data)):
        run = assert_pool_reads_the_same(tmp_path, data, pool, piece, limits)
        found = {(g.field, g.rule): list(g.first_rows) for g in run.report.rejects}
        assert found[("age", "field_size")] == [21]
        assert found[("score", "field_size")] == [91]
        assert found[("tier", "field_size")] == [151]
        assert found[("*", "row_size")] == [201]
        assert run.report.rows_read == 399


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    rows=st.lists(st.lists(cell, min_size=0, max_size=len(COLUMNS) + 2), min_size=1, max_size=40),
    piece=st.integers(min_value=1, max_value=300),
    newline=st.sampled_from(["\n", "\r\n"]),
)
def test_random_csv_reads_the_same_in_reader_processes(
    tmp_path: Path, pool: ReaderPool, rows: list[list[str]], piece: int, newline: str
) -> None:
    import csv
    import io

    out = io.StringIO()
    writer = csv.writer(out, lineterminator=newline)
    writer.writerow(COLUMNS)
    writer.writerows(rows)
    data = out.getvalue().encode("utf-8", "surrogatepass")
    if not any(rows):
        return  # an empty file is refused before any reader is involved
    original = batches.POOL_FROM_BYTES
    batches.POOL_FROM_BYTES = 0
    try:
        assert_pool_reads_the_same(tmp_path, data, pool, piece)
    finally:
        batches.POOL_FROM_BYTES = original


@given(text=st.text(alphabet=st.sampled_from(list('ab,"\n\r \x00é')), max_size=80))
def test_count_rows_counts_what_the_parser_reads(text: str) -> None:
    block = text.encode()
    parser = CsvParser.after_header(["x", "y"], 1)
    assert count_rows(block) == len(parser.parse(block))


def test_a_dead_reader_fails_the_batch_and_the_next_batch_reads(
    tmp_path: Path, pool: ReaderPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(batches, "POOL_FROM_BYTES", 0)
    data = b"id,age\n" + b"".join(f"{i},{i % 100}\n".encode() for i in range(20_000))
    run = new_run(tmp_path, pool)
    run.feed(data[:5000])
    run.feed(data[5000:10000])
    assert run._blocks is not None
    for reader in run._blocks.readers:
        reader.process.kill()
        reader.process.wait()
    with pytest.raises(ReaderDied, match="send the batch again"):
        read_rest(run, data[10000:])
    run.close()
    assert_pool_reads_the_same(tmp_path, data, pool, piece=4096)


def read_rest(run: BatchRun, data: bytes) -> None:
    run.feed(data)
    run.finish()


def test_readers_end_when_their_service_is_killed(tmp_path: Path) -> None:
    script = (
        "import sys, time\n"
        "from cdp_ingest.readers import ReaderPool\n"
        "readers = ReaderPool(2).acquire()\n"
        "print(' '.join(str(r.process.pid) for r in readers), flush=True)\n"
        "time.sleep(60)\n"
    )
    service = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert service.stdout is not None
        pids = [int(p) for p in service.stdout.readline().split()]
        assert len(pids) == 2
        assert all(_alive(p) for p in pids)
        service.send_signal(signal.SIGKILL)
        service.wait()
        deadline = time.monotonic() + 20
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(p) for p in pids)
    finally:
        service.kill()
        service.wait()


def _alive(pid: int) -> bool:
    """A process that exists and is not a zombie (readers are reaped by init once orphaned)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
