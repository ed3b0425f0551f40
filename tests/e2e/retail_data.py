"""A realistic retail data set, seeded, and what the platform must make of it, computed independently.

The generator writes what a retailer really exports:

* a wide CRM CSV (44 columns, long free-text values with commas, quotes and line breaks) with an
  ``updated_at`` per row and one to three rows per person, older and newer rows in both file orders
  (and a few with the same ``updated_at``: then the row later in the file wins);
* a loyalty file (JSON Lines) whose members link to CRM people by email, by phone, or not at all;
* in-store orders (Parquet) keyed by the loyalty id, the CRM id or both, guest checkouts with
  neither (rejected, rule ``identity``), and rows whose only id is a placeholder (kept by ingest,
  dropped by identity);
* web events (JSON, one per message on ``cdp.collect.web``): anonymous browsing first and logins
  later (the cookie is linked by the login's email), a device shared by two people, junk emails
  from identity's blocklist, and emails and phones in several formats.

Every identity value is generated from its canonical form (lower-case email, E.164 phone) and then
rendered in a variant, so what identity must make of it is known by construction: nothing here
imports the platform's code. ``expect`` stitches the records (a union-find with the documented
rules: namespace priority, unique namespaces where the first link wins, blocklisted values never
link) and evaluates every audience in plain Python.
"""

from __future__ import annotations

import csv
import io
import json
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pyarrow as pa  # type: ignore[import-untyped]
import pyarrow.parquet as pq  # type: ignore[import-untyped]

SEED = 14_2026
DAY = timedelta(days=1)
HOUR = timedelta(hours=1)
MINUTE = timedelta(minutes=1)

# Identity's rules as docs/identity.md states them (not read from its code).
PRIORITY = {"crm_id": 10, "loyalty_id": 20, "email": 30, "phone": 40, "cookie": 90}
UNIQUE = frozenset({"crm_id", "loyalty_id"})
# Placeholders from identity's default blocklist (CDP_IDENTITY_BLOCKLIST) that a real export holds.
JUNK_EMAILS = ("test@test.com", "noemail@noemail.com", "TEST@TEST.COM ", "no@email.com")
JUNK_PHONES = ("0000000000", "1234567890", "+11234567890")
JUNK_IDS = ("unknown", "N/A", "null")
CONSENT_SPELLINGS = {"y": ("y", "Y", "yes"), "n": ("n", "N", "no"), "u": ("u", "U", "unknown")}
INVALID_PHONE = "9112340375"  # possible in the US plan, not a valid number: identity drops it

CITIES = ("Boston", "Chicago", "Seattle", "Austin", "Denver", "Portland", "Atlanta", "Miami")
STATES = {"Boston": "MA", "Chicago": "IL", "Seattle": "WA", "Austin": "TX", "Denver": "CO", "Portland": "OR"}
AREA_CODES = (201, 212, 312, 415, 617, 718, 646, 305, 404, 512)
TIERS = ("bronze", "silver", "gold", "platinum")
CATEGORIES = ("shoes", "bags", "jackets", "dresses")
FIRST = ("Ann", "Bob", "Chloé", "Dev", "Eva", "Femi", "Gus", "Hana", "Ivo", "Jo", "Kai", "Lena", "Mo", "Nia")
LAST = ("Smith", "O'Neil", "García", "Nguyen", "Okafor", "Müller", "Rossi", "Kowalski", "Dubois", "Tanaka")
FILLER = (
    "company",
    "job_title",
    "industry",
    "website",
    "customer_type",
    "acquisition_channel",
    "marketing_source",
    "source_system",
    "account_manager",
    "preferred_store",
    "preferred_language",
    "currency",
    "household_id",
    "gender",
    "secondary_address",
    "delivery_instructions",
    "twitter_handle",
    "instagram_handle",
    "fax",
    "segment_code",
    "region",
    "payment_terms",
)
CRM_COLUMNS = (
    "crm_id",
    "email",
    "phone",
    "first_name",
    "last_name",
    "address_line1",
    "city",
    "state",
    "zip",
    "country",
    "birth_date",
    "created_at",
    "updated_at",
    "email_consent",
    "sms_consent",
    "credit_limit",
    "vip_score",
    "notes",
    "last_contact_note",
    "interests",
    "store_feedback",
    "complaint_history",
    *FILLER,
)
assert len(CRM_COLUMNS) >= 40


# ----------------------------------------------------------------------------------- records
@dataclass(frozen=True)
class Record:
    """One row or event as identity sees it: its identities (canonical, or None for none or one
    identity must drop), the values identity must drop (namespace, rule: ``blocklist`` for a
    placeholder, ``invalid`` for a value its namespace's type refuses), and what segmentation keeps
    of it."""

    dataset: str
    identities: tuple[tuple[str, str | None], ...]
    kind: str  # "profile" or "event"
    at: datetime  # record time (profile: updated_at or batch time; event: its timestamp)
    values: dict[str, Any] = field(default_factory=dict)
    event_type: str = ""
    dropped: tuple[tuple[str, str], ...] = ()

    def kept(self) -> list[str]:
        """Identity keys that link, strongest first (the first is the anchor)."""
        keys = {f"{ns}:{value}" for ns, value in self.identities if value is not None}
        return sorted(keys, key=lambda k: (PRIORITY[k.split(":", 1)[0]], k.split(":", 1)[0], k.split(":", 1)[1]))


@dataclass(frozen=True)
class Person:
    n: int
    crm_id: str | None
    loyalty_id: str | None
    email: str  # canonical
    phone: str | None  # canonical E.164
    consent: str  # y / n / u, most CRM rows of the person say so
    junk_email_in_crm: bool


@dataclass
class RetailData:
    now: datetime
    crm_csv: bytes
    loyalty_jsonl: bytes
    orders_parquet: bytes
    web_events: list[bytes]
    # In log order within each input (the files are ingested in this order, then the events published).
    crm: list[Record]
    loyalty: list[Record]
    orders: list[Record]
    web: list[Record]
    crm_rows: int
    loyalty_rows: int
    order_rows: int
    guest_orders: int
    people: list[Person]
    shared_cookies: list[tuple[str, str, str]] = field(default_factory=list)  # (cookie, first, second) crm ids


# ----------------------------------------------------------------------------------- rendering
def email_variant(rng: random.Random, email: str) -> str:
    """The same address as exports and forms write it: case, surrounding spaces."""
    local, _, domain = email.partition("@")
    return rng.choice(
        [
            email,
            email.upper(),
            f"  {email} ",
            f"{local.title()}@{domain.upper()}",
            f"{local[:1].upper()}{local[1:]}@{domain}",
        ]
    )


def phone_variant(rng: random.Random, e164: str) -> str:
    """A US number in E.164 written as people write it."""
    d = e164[2:]
    return rng.choice(
        [e164, f"({d[:3]}) {d[3:6]}-{d[6:]}", f"{d[:3]}-{d[3:6]}-{d[6:]}", f"{d[:3]}.{d[3:6]}.{d[6:]}", f"1 {d}", d]
    )


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def long_text(rng: random.Random, low: int = 60, high: int = 400) -> str:
    """Free text as a CRM holds it: commas, quotes, semicolons, accents, now and then a line break."""
    words = ("great", "customer", 'asked "again"', "delivery, late", "size 42;", "café", "returned", "VIP", "n/a")
    text = ""
    while len(text) < rng.randint(low, high):
        text += rng.choice(words) + rng.choice([" ", ", ", "; ", " - "])
        if rng.random() < 0.03:
            text += "\n"
    return text.strip()


# ----------------------------------------------------------------------------------- generation
def _safe(now: datetime, offset: timedelta, boundaries: Iterable[timedelta] = ()) -> datetime:
    """``now - offset``, pushed out to two to three days from any window boundary it lies within two
    days of (the boundaries are a week apart or more), so the run's own duration cannot move an event
    across one."""
    for edge in boundaries:
        gap = offset - edge
        if abs(gap) < 2 * DAY:
            offset = edge + (2 * DAY + abs(gap) / 2) * (1 if gap >= timedelta(0) else -1)
    return now - offset


WINDOWS = (7 * DAY, 14 * DAY, 30 * DAY, 180 * DAY, 365 * DAY)


def generate(now: datetime, seed: int = SEED) -> RetailData:
    rng = random.Random(seed)
    people: list[Person] = []
    used_emails: set[str] = set()
    for n in range(1, 361):
        crm = f"C{n:05d}" if n <= 300 else None
        loyalty = f"L{n:05d}" if (crm is None and n <= 340) or (crm is not None and rng.random() < 0.55) else None
        first, last = rng.choice(FIRST), rng.choice(LAST)
        base = "".join(c for c in f"{first}.{last}".lower() if c.isascii() and (c.isalnum() or c == "."))
        email = f"{base}{n}@{rng.choice(['example.com', 'mail.example.org', 'shop.example.net'])}"
        used_emails.add(email)
        phone = None
        if rng.random() < 0.7:
            phone = f"+1{rng.choice(AREA_CODES)}{rng.randint(200, 999)}{rng.randint(0, 9999):04d}"
        people.append(
            Person(n, crm, loyalty, email, phone, rng.choice("yyynu"), crm is not None and rng.random() < 0.05)
        )

    data = RetailData(now, b"", b"", b"", [], [], [], [], [], 0, 0, 0, 0, people)
    _write_crm(rng, data)
    _write_loyalty(rng, data)
    _write_orders(rng, data)
    _write_web(rng, data)
    return data


def _write_crm(rng: random.Random, data: RetailData) -> None:
    now = data.now
    crm_people = [p for p in data.people if p.crm_id is not None]
    # Households: the second person of each pair gives the first one's phone (identity keeps it with
    # the first: linking it would put two crm_id values in one graph).
    household = {crm_people[k + 1].n: crm_people[k].phone for k in range(0, 16, 4) if crm_people[k].phone}
    rows: list[tuple[list[str], Record]] = []
    for p in crm_people:
        assert p.crm_id is not None
        count = rng.choice([1, 1, 2, 2, 2, 3])
        cities = rng.sample(CITIES, count)
        times = sorted(now - timedelta(days=rng.randint(20, 700), seconds=rng.randint(0, 86_399)) for _ in cities)
        if count > 1 and rng.random() < 0.15:
            times[-1] = times[-2]  # the same update time: the later row in the file wins
        for city, updated in zip(cities, times, strict=True):
            phone = household.get(p.n, p.phone)
            phone_raw, phone_canon = "", None  # an empty cell: no identity
            dropped: list[tuple[str, str]] = []
            roll = rng.random()
            if phone is not None and roll < 0.85:
                phone_raw, phone_canon = phone_variant(rng, phone), phone
            elif roll < 0.92:
                phone_raw = rng.choice(JUNK_PHONES)
                dropped.append(("phone", "blocklist"))
            elif roll < 0.95:
                phone_raw = INVALID_PHONE
                dropped.append(("phone", "invalid"))
            if p.junk_email_in_crm:
                email_raw, email_canon = rng.choice(JUNK_EMAILS), None
                dropped.append(("email", "blocklist"))
            else:
                email_raw, email_canon = email_variant(rng, p.email), p.email
            # The consent column as exports spell it; now and then a row disagrees with the rest
            # (the newest row's consent is the person's).
            consent = p.consent if rng.random() < 0.7 else rng.choice("ynu")
            consent_raw = rng.choice(CONSENT_SPELLINGS[consent])
            values: dict[str, str] = {
                "crm_id": p.crm_id,
                "email": email_raw,
                "phone": phone_raw,
                "first_name": rng.choice(FIRST),
                "last_name": rng.choice(LAST),
                "address_line1": f"{rng.randint(1, 9999)} {rng.choice(LAST)} Street, Apt {rng.randint(1, 99)}",
                "city": city,
                "state": STATES.get(city, "FL"),
                "zip": f"{rng.randint(1000, 99999):05d}",
                "country": "US",
                "birth_date": f"{rng.randint(1940, 2005)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}",
                "created_at": iso(times[0] - DAY * rng.randint(1, 300)),
                "updated_at": iso(updated),
                "email_consent": consent_raw,
                "sms_consent": rng.choice("ynu"),
                "credit_limit": str(rng.choice([500, 1000, 2500, 5000])),
                "vip_score": str(rng.randint(0, 100)),
                "notes": long_text(rng),
                "last_contact_note": long_text(rng, 20, 200),
                "interests": ",".join(rng.sample(CATEGORIES, 2)),
                "store_feedback": long_text(rng, 0, 300),
                "complaint_history": long_text(rng, 0, 500),
            }
            for name in FILLER:
                values[name] = long_text(rng, 5, 80) if rng.random() < 0.5 else rng.choice(["", "A", "n/a", "B2C"])
            identities = (("crm_id", p.crm_id), ("email", email_canon), ("phone", phone_canon))
            kept = {"city": city, "consent_email_marketing": consent}
            record = Record("crm", identities, "profile", updated, kept, dropped=tuple(dropped))
            rows.append(([values[c] for c in CRM_COLUMNS], record))
    # Shuffled: a person's newer row comes before the older one about as often as after it.
    rng.shuffle(rows)
    out = io.StringIO()
    writer = csv.writer(out, quoting=csv.QUOTE_MINIMAL)
    writer.writerow(CRM_COLUMNS)
    for cells, record in rows:
        writer.writerow(cells)
        data.crm.append(record)
    data.crm_csv = out.getvalue().encode()
    data.crm_rows = len(rows)


def _write_loyalty(rng: random.Random, data: RetailData) -> None:
    """Members link to their CRM person by the same email (another format), by phone (their loyalty
    email is a personal one), or by nothing in this file (only orders carrying both ids link them)."""
    out = io.StringIO()
    for p in data.people:
        if p.loyalty_id is None:
            continue
        mode = "email" if p.crm_id is None else rng.choice(["email", "email", "email", "phone", "none"])
        if mode == "phone" and p.phone is None:
            mode = "email"
        line: dict[str, Any] = {"loyalty_id": p.loyalty_id}
        identities: list[tuple[str, str | None]] = [("loyalty_id", p.loyalty_id)]
        dropped: list[tuple[str, str]] = []
        if mode == "email":
            line["email"] = email_variant(rng, p.email)
            identities.append(("email", p.email))
        else:
            personal = f"member{p.n}@personal.example.com"
            line["email"] = personal.upper() if rng.random() < 0.3 else personal
            identities.append(("email", personal))
        if mode == "phone":
            assert p.phone is not None
            line["phone"] = phone_variant(rng, p.phone)
            identities.append(("phone", p.phone))
        elif rng.random() < 0.1:
            line["phone"] = rng.choice(JUNK_PHONES)
            dropped.append(("phone", "blocklist"))
        tier = rng.choice(TIERS)
        points = rng.randint(0, 20_000)
        line.update(
            {"tier": tier, "points": points, "member_since": f"20{rng.randint(15, 25)}-0{rng.randint(1, 9)}-15"}
        )
        out.write(json.dumps(line, ensure_ascii=False) + "\n")
        kept = {"tier": tier, "points": points}
        data.loyalty.append(Record("loyalty", tuple(identities), "profile", data.now, kept, dropped=tuple(dropped)))
    data.loyalty_jsonl = out.getvalue().encode()
    data.loyalty_rows = len(data.loyalty)


ORDER_COLUMNS = ("order_id", "ts", "type", "loyalty_id", "crm_id", "channel", "store", "amount")


def _write_orders(rng: random.Random, data: RetailData) -> None:
    """Point-of-sale rows keyed by the loyalty id, the CRM id or both; guest checkouts carry neither
    (rejected with rule identity); a few carry only a placeholder id (kept, then dropped by identity)."""
    columns: dict[str, list[Any]] = {c: [] for c in ORDER_COLUMNS}
    number = 0

    def add(
        loyalty: str | None,
        crm: str | None,
        identities: tuple[tuple[str, str | None], ...] | None,
        dropped: tuple[tuple[str, str], ...] = (),
    ) -> None:
        nonlocal number
        number += 1
        ts = _safe(data.now, timedelta(days=rng.randint(1, 420), hours=rng.randint(0, 23)), WINDOWS)
        channel = "store" if rng.random() < 0.8 else "online_pickup"
        amount = round(rng.uniform(5, 320), 2)
        row = {
            "order_id": f"POS-{number:06d}",
            "ts": iso(ts),
            "type": "order",
            "loyalty_id": loyalty,
            "crm_id": crm,
            "channel": channel,
            "store": rng.choice(["Boston-Back Bay", "Chicago-Loop", "Seattle-Pike", "Austin-Domain"]),
            "amount": amount,
        }
        for c in ORDER_COLUMNS:
            columns[c].append(row[c])
        if identities is None:
            data.guest_orders += 1
            return
        values = {"channel": channel, "amount": amount, "store": row["store"]}
        data.orders.append(Record("orders", identities, "event", ts, values, "order", dropped))

    for p in data.people:
        if p.crm_id is None and p.loyalty_id is None:
            continue
        for _ in range(rng.choice([0, 0, 1, 2, 3, 4, 6, 9])):
            keys = [k for k in ("crm", "loyalty", "both") if p.loyalty_id or k == "crm"]
            keys = keys if p.crm_id else ["loyalty"]
            how = rng.choice(keys)
            crm = p.crm_id if how in ("crm", "both") else None
            loyalty = p.loyalty_id if how in ("loyalty", "both") else None
            add(loyalty, crm, (("crm_id", crm), ("loyalty_id", loyalty)) if crm or loyalty else None)
        if rng.random() < 0.035:
            add(None, None, None)  # a guest checkout
    for junk in JUNK_IDS:
        add(None, junk, (("crm_id", None),), (("crm_id", "blocklist"),))
    sink = io.BytesIO()
    schema = pa.schema([(c, pa.float64() if c == "amount" else pa.string()) for c in ORDER_COLUMNS])
    pq.write_table(pa.table(columns, schema=schema), sink)
    data.orders_parquet = sink.getvalue()
    data.order_rows = number


def _web_event(
    data: RetailData,
    out: list[tuple[datetime, int, dict[str, Any], Record]],
    ts: datetime,
    kind: str,
    cookie: str,
    email: tuple[str, str | None] | None = None,
    **fields: Any,
) -> None:
    """One web event: its JSON as the site sends it and the record identity will see."""
    event: dict[str, Any] = {"event_id": f"web-{len(out) + 1:06d}", "ts": iso(ts), "type": kind, "cookie_id": cookie}
    identities: list[tuple[str, str | None]] = [("cookie", cookie)]
    dropped: tuple[tuple[str, str], ...] = ()
    if email is not None:
        event["email"] = email[0]
        identities.append(("email", email[1]))
        dropped = () if email[1] is not None else (("email", "blocklist"),)
    event.update(fields)
    kept = dict(fields)
    out.append((ts, len(out), event, Record("web", tuple(identities), "event", ts, kept, kind, dropped)))


CART_PATTERNS = ("recent_abandoned", "old_then_recent_completed", "recent_completed", "old_abandoned", "fresh", "none")


def _cart_events(rng: random.Random, now: datetime, pattern: str) -> list[tuple[datetime, str, dict[str, Any]]]:
    """Cart and purchase events for one shopper (amounts as strings, as the site sends them)."""

    def cart(at: datetime) -> tuple[datetime, str, dict[str, Any]]:
        return at, "add_to_cart", {"product_id": f"SKU-{rng.randint(1, 999):03d}", "category": rng.choice(CATEGORIES)}

    def purchase(at: datetime) -> tuple[datetime, str, dict[str, Any]]:
        return at, "purchase", {"amount": f"{rng.uniform(10, 400):.2f}", "currency": "USD"}

    recent = now - timedelta(days=rng.randint(1, 5), hours=rng.randint(0, 20))
    old = now - timedelta(days=rng.randint(9, 25), hours=rng.randint(0, 20))
    if pattern == "recent_abandoned":  # no purchase, or one hours later: in
        out = [cart(recent)]
        return out + ([purchase(recent + timedelta(hours=rng.randint(3, 10)))] if rng.random() < 0.5 else [])
    if pattern == "old_then_recent_completed":  # the case: out
        return [cart(old), cart(recent), purchase(recent + rng.randint(5, 50) * MINUTE)]
    if pattern == "recent_completed":
        return [cart(recent), purchase(recent + rng.randint(5, 50) * MINUTE)]
    if pattern == "old_abandoned":
        return [cart(old)]
    if pattern == "fresh":  # abandoned for less than the hour the sequence waits: out
        return [cart(now - rng.randint(10, 30) * MINUTE)]
    return []


def _write_web(rng: random.Random, data: RetailData) -> None:
    now = data.now
    out: list[tuple[datetime, int, dict[str, Any], Record]] = []
    logins: dict[str, tuple[datetime, str]] = {}  # crm id -> (login time, cookie) of the first cookie
    for p in data.people:
        active = p.n > 340 or (p.crm_id is not None and rng.random() < 0.5) or rng.random() < 0.3
        if not active:
            continue
        junk_login = rng.random() < 0.05
        for c in range(rng.choice([1, 1, 1, 2])):
            cookie = f"ck-{p.n:05d}-{c}"
            moments = [
                _safe(
                    now,
                    timedelta(days=rng.randint(1, 40), minutes=rng.randint(0, 1439), seconds=rng.randint(0, 59)),
                    WINDOWS,
                )
                for _ in range(rng.randint(2, 10))
            ]
            cats = [rng.choice(("shoes", *CATEGORIES)) for _ in moments]
            items: list[tuple[datetime, str, dict[str, Any]]] = [
                (m, "page_view", {"page": f"/c/{cat}", "category": cat}) for m, cat in zip(moments, cats, strict=True)
            ]
            if c == 0:
                items += _cart_events(rng, now, rng.choice(CART_PATTERNS))
            items.sort(key=lambda item: item[0])
            anonymous = min(rng.randint(1, 3), len(items))
            login_at = items[anonymous - 1][0] + MINUTE
            for at, kind, fields in items[:anonymous]:
                _web_event(data, out, at, kind, cookie, **fields)
            email = (rng.choice(JUNK_EMAILS), None) if junk_login else (email_variant(rng, p.email), p.email)
            _web_event(data, out, login_at, "login", cookie, email, page="/account")
            for at, kind, fields in items[anonymous:]:
                _web_event(data, out, max(at, login_at + MINUTE), kind, cookie, **fields)
            if c == 0 and p.crm_id is not None and not junk_login and not p.junk_email_in_crm:
                logins[p.crm_id] = (login_at, cookie)
    # Shared devices: a second person logs in on the first one's cookie, later. The cookie stays
    # with the first (unique crm_id: the first link wins); the second person's login event is theirs,
    # the cookie's anonymous page views after it stay the first person's.
    known = sorted(logins)
    by_crm = {p.crm_id: p for p in data.people if p.crm_id}
    for first, second in zip(known[0:10:2], known[1:10:2], strict=True):
        at, cookie = logins[first]
        later = max(at, logins[second][0]) + 2 * HOUR
        if later > now - DAY:
            continue
        address = by_crm[second].email
        _web_event(data, out, later, "login", cookie, (email_variant(rng, address), address), page="/account")
        for k in range(2):
            _web_event(data, out, later + (k + 1) * MINUTE, "page_view", cookie, page="/c/shoes", category="shoes")
        data.shared_cookies.append((cookie, first, second))
    for k in range(40):  # visitors who never log in
        cookie = f"anon-{k:04d}"
        for _ in range(rng.randint(1, 5)):
            at = _safe(
                now,
                timedelta(days=rng.randint(1, 40), minutes=rng.randint(0, 1439), seconds=rng.randint(0, 59)),
                WINDOWS,
            )
            cat = rng.choice(CATEGORIES)
            _web_event(data, out, at, "page_view", cookie, page=f"/c/{cat}", category=cat)
    out.sort(key=lambda item: (item[0], item[1]))  # published in the order they happened
    data.web_events = [json.dumps(event, ensure_ascii=False).encode() for _, _, event, _ in out]
    data.web = [record for _, _, _, record in out]


# ----------------------------------------------------------------------------------- expectation
@dataclass
class Profile:
    """One expected profile: a connected component of the identity graph and what it holds."""

    identities: set[str]
    records: list[tuple[int, Record]] = field(default_factory=list)  # (log position, record)

    @property
    def label(self) -> str:
        """A stable name for the person: the strongest identity (crm_id, then loyalty_id, ...)."""
        return min(self.identities, key=lambda k: (PRIORITY[k.split(":", 1)[0]], k))

    def attribute(self, name: str) -> Any:
        """The timestamp merge policy: the newest record time wins; ties go to the later log position."""
        held = [(r.at, pos, r.values[name]) for pos, r in self.records if r.kind == "profile" and name in r.values]
        return max(held, key=lambda h: (h[0], h[1]))[2] if held else None

    def events(self, event_type: str) -> list[Record]:
        return [r for _, r in self.records if r.kind == "event" and r.event_type == event_type]

    def has(self, namespace: str) -> bool:
        return any(k.startswith(namespace + ":") for k in self.identities)


class Graph:
    """Union-find over identity keys, with the unique values each component holds."""

    def __init__(self) -> None:
        self.parent: dict[str, str] = {}
        self.uniques: dict[str, dict[str, str]] = {}

    def find(self, key: str) -> str:
        root = key
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[key] != root:
            self.parent[key], key = root, self.parent[key]
        return root

    def add(self, key: str) -> None:
        if key not in self.parent:
            self.parent[key] = key
            ns, value = key.split(":", 1)
            self.uniques[key] = {ns: value} if ns in UNIQUE else {}

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra
            self.uniques[ra] = {**self.uniques[rb], **self.uniques[ra]}

    def link(self, kept: list[str]) -> str:
        """Link a record's identities (strongest first) as docs/identity.md says; returns its anchor.
        An identity whose graph would bring a second value of a unique namespace is refused and stays
        where it was (the first link wins)."""
        accepted: list[str] = []
        roots: set[str] = set()
        held: dict[str, str] = {}
        for key in kept:
            root = self.find(key) if key in self.parent else None
            if root is not None and root in roots:
                accepted.append(key)
                continue
            ns, value = key.split(":", 1)
            uniques = self.uniques[root] if root is not None else ({ns: value} if ns in UNIQUE else {})
            if any(held.get(n, v) != v for n, v in uniques.items()):
                continue
            accepted.append(key)
            held.update(uniques)
            if root is not None:
                roots.add(root)
        for key in accepted:
            self.add(key)
            self.union(accepted[0], key)
        return accepted[0]


def stitch(records: Sequence[Record]) -> list[Profile]:
    """Every record in log order through the graph; each record then belongs to the final component
    of its anchor (merges carry fragments along; nothing here splits)."""
    graph = Graph()
    anchored: list[tuple[int, Record, str]] = []
    for pos, record in enumerate(records):
        kept = record.kept()
        if kept:  # no identity left: no fragment, no profile
            anchored.append((pos, record, graph.link(kept)))
    profiles: dict[str, Profile] = {}
    for key in graph.parent:
        profiles.setdefault(graph.find(key), Profile(set())).identities.add(key)
    for pos, record, anchor in anchored:
        profiles[graph.find(anchor)].records.append((pos, record))
    return list(profiles.values())


# The audiences: name, query, the part of issue #14 it exercises (beside what every one needs: the
# several identity fields per row, and one normaliser), and its independent check.
# Expected memberships are computed by the functions below, never by the platform's evaluator.
Check = Callable[[Profile, datetime], bool]


def within(events: Iterable[Record], now: datetime, width: timedelta) -> list[Record]:
    return [e for e in events if e.at > now - width]


def boston_newest(p: Profile, now: datetime) -> bool:
    return bool(p.attribute("city") == "Boston")


def gold_members(p: Profile, now: datetime) -> bool:
    return p.attribute("tier") in ("gold", "platinum") and (p.attribute("points") or 0) >= 5000


def store_regulars(p: Profile, now: datetime) -> bool:
    store = [e for e in within(p.events("order"), now, 180 * DAY) if e.values["channel"] == "store"]
    return len(store) >= 3


def big_store_spenders(p: Profile, now: datetime) -> bool:
    orders = within(p.events("order"), now, 365 * DAY)
    return sum(float(e.values["amount"]) for e in orders if e.values["channel"] == "store") > 500


def shoe_browsers(p: Profile, now: datetime) -> bool:
    views = within(p.events("page_view"), now, 14 * DAY)
    return sum(1 for e in views if e.values.get("category") == "shoes") >= 2


def lapsed_known(p: Profile, now: datetime) -> bool:
    return not within(p.events("page_view"), now, 30 * DAY) and p.has("crm_id")


def cart_abandoners(p: Profile, now: datetime) -> bool:
    """Some add_to_cart within 7 days, at least an hour old, with no purchase in the hour after it."""
    purchases = [e.at for e in p.events("purchase")]
    for cart in within(p.events("add_to_cart"), now, 7 * DAY):
        answered = any(cart.at < at <= cart.at + HOUR for at in purchases)
        if cart.at + HOUR <= now and not answered:
            return True
    return False


def email_reachable(p: Profile, now: datetime) -> bool:
    return p.attribute("consent_email_marketing") == "y" and p.has("email")


def phone_known(p: Profile, now: datetime) -> bool:
    return p.has("phone")


def shoe_browsers_not_gold(p: Profile, now: datetime) -> bool:
    return shoe_browsers(p, now) and not gold_members(p, now)


def reachable_abandoners(p: Profile, now: datetime) -> bool:
    return email_reachable(p, now) and cart_abandoners(p, now) and not boston_newest(p, now)


@dataclass(frozen=True)
class Audience:
    name: str
    query: str
    covers: str  # what of issue #14 it exercises most
    check: Check


AUDIENCES = (
    Audience("boston_newest", 'city = "Boston"', "record time from updated_at", boston_newest),
    Audience("gold_members", 'tier in ["gold", "platinum"] and points >= 5000', "attributes", gold_members),
    Audience(
        "store_regulars",
        'count(order where channel = "store") >= 3 within 180d',
        "orders keyed by either id",
        store_regulars,
    ),
    Audience(
        "big_store_spenders",
        'sum(order.amount where channel = "store") > 500 within 365d',
        "event field types per event type",
        big_store_spenders,
    ),
    Audience(
        "shoe_browsers",
        'count(page_view where category = "shoes") >= 2 within 14d',
        "late logins, a shared device",
        shoe_browsers,
    ),
    Audience("lapsed_known", "count(page_view) = 0 within 30d and has crm_id", "windows", lapsed_known),
    Audience(
        "cart_abandoners",
        "add_to_cart within 7d not followed by purchase within 1h",
        "a window on each step",
        cart_abandoners,
    ),
    Audience("email_reachable", 'consent email_marketing = "y" and has email', "consent_for", email_reachable),
    Audience("phone_known", "has phone", "phone formats, junk and invalid numbers", phone_known),
    Audience(
        "shoe_browsers_not_gold",
        "in segment shoe_browsers and not in segment gold_members",
        "segment of segments",
        shoe_browsers_not_gold,
    ),
    Audience(
        "reachable_abandoners",
        "in segment email_reachable and in segment cart_abandoners and not in segment boston_newest",
        "segment of segments",
        reachable_abandoners,
    ),
)


def drops(records: Sequence[Record]) -> dict[tuple[str, str], int]:
    """What identity's stats must count: each dropped value by (namespace, rule), and the records
    that link no one (every identity dropped) under ``("*", "no_identities")``."""
    counts: dict[tuple[str, str], int] = {}
    for record in records:
        for key in (*record.dropped, *([("*", "no_identities")] if not record.kept() else [])):
            counts[key] = counts.get(key, 0) + 1
    return counts


def expect(records: Sequence[Record], now: datetime) -> tuple[list[Profile], dict[str, set[str]]]:
    """The profiles (as identity sets) and each audience's members (by profile label)."""
    profiles = stitch(records)
    members = {a.name: {p.label for p in profiles if a.check(p, now)} for a in AUDIENCES}
    return profiles, members
