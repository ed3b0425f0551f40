"""`cdp events publish`'s publishing half against a real nats-server: a file read line by line
with many windows of acknowledgements in flight, every event line's bytes on
cdp.collect.<dataset> in file order with its Nats-Msg-Id, bad lines reported by number and
not sent, and a second run stored as duplicates only. (The dead-letter count, which needs
ingest, is tested end to end in tests/e2e/test_record_time_and_publish.py.)"""

from __future__ import annotations

import json
from pathlib import Path

from cdp_cli.cmd_publish import publish_file
from cdp_kit.eventlog import EventLog
from cdp_kit.streams import COLLECT

LINES = 5_000
BAD = {7: "{oops", 4_000: '"just a string"', 4_500: "[1]", 4_600: '{"a":' + "[" * 100_000}
# ids a NATS header would not carry as they are: the events go out without Nats-Msg-Id
UNSAFE_IDS = {13: "e13\r\nNats-Msg-Id: forged", 15: " e15 ", 17: "é17", 19: "e\t19"}


def write_events(path: Path) -> list[bytes]:
    """The file, and the bytes each good line should be published as."""
    good: list[bytes] = []
    with path.open("wb") as out:
        for number in range(1, LINES + 1):
            if number in BAD:
                line = BAD[number].encode()
            elif number == 9:
                line = b"   "  # blank: skipped, not an error
            else:
                event = {"event_id": f"e{number}", "ts": "2026-01-01T00:00:00Z", "type": "page_view"}
                if number == 11:
                    event.pop("event_id")  # no id: sent without Nats-Msg-Id (ingest dead-letters it)
                if number in UNSAFE_IDS:
                    event["event_id"] = UNSAFE_IDS[number]
                line = json.dumps(event, separators=(",", ":")).encode()
                good.append(line)
            out.write(line + (b"\r\n" if number % 2 else b"\n"))
    return good


async def test_a_file_is_published_line_by_line_in_order_with_its_ids(eventlog: EventLog, tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    good = write_events(path)
    url = eventlog.nc.connected_url
    assert url is not None
    nats_url = f"nats://{url.hostname}:{url.port}"

    first = await publish_file(path, "web", nats_url, "event_id", 37, None)
    assert (first.lines, first.published, first.duplicates, first.bad_count) == (LINES, len(good), 0, 4)
    assert [(b.line, b.reason.split(" (")[0]) for b in first.bad] == [
        (7, "not JSON"),
        (4_000, "not a JSON object"),
        (4_500, "not a JSON object"),
        (4_600, "not JSON that can be read"),
    ]
    stored = [m async for m in eventlog.read(COLLECT.name, "cdp.collect.web")]
    assert [m.data for m in stored] == good
    assert sorted(first.sequences) == [m.sequence for m in stored]
    ids = [m.headers.get("Nats-Msg-Id") for m in stored]
    assert ids[:3] == ["web:e1", "web:e2", "web:e3"]
    assert ids[good.index(next(g for g in good if b"event_id" not in g))] is None
    for unsafe in UNSAFE_IDS.values():
        [line] = [g for g in good if json.loads(g).get("event_id") == unsafe]
        assert ids[good.index(line)] is None
    assert all(i is None or i.startswith("web:e") for i in ids)

    again = await publish_file(path, "web", nats_url, "event_id", 500, None)
    # the id-less event and the four without a header are stored again; ingest de-duplicates them
    unheaded = 1 + len(UNSAFE_IDS)
    assert (again.published, again.duplicates) == (unheaded, len(good) - unheaded)
    assert again.sequences == set(range(len(good) + 1, len(good) + unheaded + 1))
