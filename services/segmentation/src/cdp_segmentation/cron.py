"""A 5-field cron schedule (minute hour day-of-month month day-of-week, UTC): `*`, `*/n`, `a-b`, `a,b`."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from cdp_kit.errors import InvalidInput, Violation

RANGES = ((0, 59), (0, 23), (1, 31), (1, 12), (0, 6))
NAMES = ("minute", "hour", "day of month", "month", "day of week")


def _field(text: str, index: int) -> set[int]:
    lo, hi = RANGES[index]
    values: set[int] = set()
    for part in text.split(","):
        base, _, step_text = part.partition("/")
        step = int(step_text) if step_text else 1
        if base == "*":
            start, end = lo, hi
        elif "-" in base:
            a, b = base.split("-", 1)
            start, end = int(a), int(b)
        else:
            start = end = int(base)
        if step < 1 or start < lo or end > hi or start > end:
            raise ValueError(part)
        values.update(range(start, end + 1, step))
    return values


def parse_cron(schedule: str) -> list[set[int]]:
    parts = schedule.split()
    try:
        if len(parts) != 5:
            raise ValueError(schedule)
        return [_field(p, i) for i, p in enumerate(parts)]
    except ValueError:
        hint = "5 fields, minute hour day-of-month month day-of-week (UTC), e.g. '0 3 * * *' or '*/15 * * * *'"
        raise InvalidInput("invalid schedule", [Violation("schedule", "cron", hint)]) from None


def fires_at(fields: list[set[int]], at: datetime) -> bool:
    minute, hour, dom, month, dow = fields
    weekday = (at.weekday() + 1) % 7  # cron: 0 = Sunday
    return at.minute in minute and at.hour in hour and at.day in dom and at.month in month and weekday in dow


def last_fire(schedule: str, after_ms: int, now_ms: int) -> int | None:
    """The latest minute in (after, now] the schedule fires at (looking back at most a day), in epoch ms."""
    fields = parse_cron(schedule)
    now = datetime.fromtimestamp(now_ms / 1000, UTC).replace(second=0, microsecond=0)
    floor = max(after_ms, now_ms - 86_400_000)
    at = now
    while at.timestamp() * 1000 > floor:
        if fires_at(fields, at):
            return int(at.timestamp() * 1000)
        at -= timedelta(minutes=1)
    return None
