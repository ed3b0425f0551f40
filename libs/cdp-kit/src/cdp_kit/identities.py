"""The one normaliser of identity values, shared by every service. Pure: no I/O, no clock.

Identity normalises a record's identities with it before they link anyone; ingest checks a
row's identity values with it (``check``: syntax only, junk passes); every lookup by identity
(identity's Resolve and GetGraph, segmentation's GetProfile) normalises what it is asked with
it, so a value finds what the graph holds whatever form it was typed in.

What a namespace's values look like is its *type* (``cdp.identity.v1.NamespaceType``): email
(email-validator, no DNS, lower-cased), phone (E.164 by phonenumbers, a number without ``+``
read in the default region), hashed (64 lower-case hex characters), anything else trimmed.
Identity owns the namespaces (the standard ones below and custom ones, ``NamespaceCreated``
on ``cdp.config.identity``); other services learn the custom ones from that log
(``cdp_kit.namespaces``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import phonenumbers
from email_validator import SPECIAL_USE_DOMAIN_NAMES, EmailNotValidError, validate_email

from cdp.identity.v1 import identity_pb2 as pb

NT = pb.NamespaceType
# Enum values as plain ints: attribute access on the protobuf enum wrapper is slow in hot loops.
UNSPECIFIED_TYPE = int(NT.NAMESPACE_TYPE_UNSPECIFIED)
EMAIL_TYPE = int(NT.NAMESPACE_TYPE_EMAIL)
PHONE_TYPE = int(NT.NAMESPACE_TYPE_PHONE)
CROSS_DEVICE_TYPE = int(NT.NAMESPACE_TYPE_CROSS_DEVICE)
COOKIE_TYPE = int(NT.NAMESPACE_TYPE_COOKIE)
DEVICE_TYPE = int(NT.NAMESPACE_TYPE_DEVICE)
HASHED_TYPE = int(NT.NAMESPACE_TYPE_HASHED)
CUSTOM_TYPE = int(NT.NAMESPACE_TYPE_CUSTOM)

# Why a value is not used: the namespace is not defined, the value is not of its type, or it
# is a placeholder (junk).
UNKNOWN_NAMESPACE = "unknown_namespace"
INVALID = "invalid"
BLOCKLIST = "blocklist"

# Values that never link anyone, compared after normalisation (case-insensitive).
DEFAULT_BLOCKLIST: tuple[str, ...] = (
    "",
    "null",
    "none",
    "nil",
    "nan",
    "undefined",
    "anonymous",
    "unknown",
    "n/a",
    "na",
    "-",
    "0",
    "test",
    "test@test.com",
    "test@example.com",
    "noemail@noemail.com",
    "no@email.com",
    "0000000000",
    "+10000000000",
    "1234567890",
    "+11234567890",
    "00000000-0000-0000-0000-000000000000",
)
HASH_RE = re.compile(r"^[a-f0-9]{64}$")
# The common case of an email that email-validator accepts unchanged (ASCII dot-atoms, a
# letters-only TLD, no reserved label forms): checked by a regex; anything else goes to
# email-validator. tests/unit/test_identity_normalise.py checks that the two agree.
SIMPLE_EMAIL_RE = re.compile(r"[a-z0-9_+-]+(?:\.[a-z0-9_+-]+)*@(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]{2,63}")
SPECIAL_USE_SUFFIXES = tuple(f".{d}" for d in SPECIAL_USE_DOMAIN_NAMES)
CUSTOM_PRIORITY = 100
DEFAULT_PHONE_REGION = "US"


@dataclass(frozen=True)
class Namespace:
    name: str
    type: int  # pb.NamespaceType
    unique: bool = False
    priority: int = CUSTOM_PRIORITY
    standard: bool = False
    description: str = ""

    def to_proto(self) -> pb.Namespace:
        return pb.Namespace(
            name=self.name,
            type=self.type,  # type: ignore[arg-type]
            unique=self.unique,
            priority=self.priority,
            standard=self.standard,
            description=self.description,
        )


STANDARD: tuple[Namespace, ...] = (
    Namespace("crm_id", CROSS_DEVICE_TYPE, True, 10, True, "CRM customer id"),
    Namespace("loyalty_id", CROSS_DEVICE_TYPE, True, 20, True, "loyalty programme member id"),
    Namespace("email", EMAIL_TYPE, False, 30, True, "email address"),
    Namespace("phone", PHONE_TYPE, False, 40, True, "phone number (E.164)"),
    Namespace("email_sha256", HASHED_TYPE, False, 50, True, "SHA-256 of a normalised email"),
    Namespace("phone_sha256", HASHED_TYPE, False, 60, True, "SHA-256 of an E.164 phone"),
    Namespace("idfa", DEVICE_TYPE, False, 70, True, "Apple advertising id"),
    Namespace("gaid", DEVICE_TYPE, False, 80, True, "Google advertising id"),
    Namespace("cookie", COOKIE_TYPE, False, 90, True, "web cookie id"),
)
STANDARD_TYPES: dict[str, int] = {ns.name: ns.type for ns in STANDARD}


def type_of_name(name: str) -> int:
    """A namespace type from its enum name as ``NamespaceCreated`` carries it (0 when unknown)."""
    try:
        return int(NT.Value(name))
    except ValueError:
        return UNSPECIFIED_TYPE


def canonical(kind: int, text: str, phone_region: str = DEFAULT_PHONE_REGION) -> tuple[str | None, str]:
    """(the canonical form of a trimmed value of a namespace of type ``kind``, or None; why not)."""
    if kind == EMAIL_TYPE:
        simple = simple_email(text)
        if simple is not None:
            return simple, ""
        try:
            return validate_email(text, check_deliverability=False).normalized.lower(), ""
        except EmailNotValidError:
            return None, "not a syntactically valid email address"
    if kind == PHONE_TYPE:
        try:
            number = phonenumbers.parse(text, phone_region)
        except phonenumbers.NumberParseException:
            return None, "not a phone number"
        if not phonenumbers.is_valid_number(number):
            return None, "not a valid phone number"
        return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164), ""
    if kind == HASHED_TYPE:
        lowered = text.lower()
        if not HASH_RE.match(lowered):
            return None, "not a lower-case hex SHA-256 (64 characters)"
        return lowered, ""
    return text, ""


def simple_email(text: str) -> str | None:
    """The normalised form of a plain ASCII email, or None when email-validator must decide."""
    lowered = text.lower()
    if not SIMPLE_EMAIL_RE.fullmatch(lowered) or len(lowered) > 254 or "--" in lowered:
        return None
    local, _, domain = lowered.partition("@")
    if len(local) > 64 or domain.endswith(SPECIAL_USE_SUFFIXES):
        return None
    return lowered


# How costly a type's check is: a row's identity fields are checked cheapest first, and the
# first usable value settles the row.
CHECK_COST = {EMAIL_TYPE: 2, HASHED_TYPE: 1, PHONE_TYPE: 3}


@dataclass(frozen=True)
class Normaliser:
    """Namespace types (standard ones included), the blocklist and the default phone region:
    all it takes to normalise a value as identity does."""

    types: Mapping[str, int] = field(default_factory=lambda: dict(STANDARD_TYPES))
    blocklist: frozenset[str] = frozenset(DEFAULT_BLOCKLIST)
    phone_region: str = DEFAULT_PHONE_REGION

    @classmethod
    def make(
        cls,
        custom: Mapping[str, int] | None = None,
        *,
        blocklist: Iterable[str] = DEFAULT_BLOCKLIST,
        phone_region: str = DEFAULT_PHONE_REGION,
    ) -> Normaliser:
        return cls(
            types={**STANDARD_TYPES, **(custom or {})},
            blocklist=frozenset(v.strip().lower() for v in blocklist),
            phone_region=phone_region,
        )

    def with_type(self, namespace: str, kind: int) -> Normaliser:
        return Normaliser({**self.types, namespace: kind}, self.blocklist, self.phone_region)

    def normalise(self, namespace: str, value: str) -> tuple[str | None, str, str]:
        """(canonical value, rule, detail): the value is None when it must not link anyone,
        and rule says why (unknown_namespace, invalid, blocklist)."""
        kind = self.types.get(namespace)
        if kind is None:
            return None, UNKNOWN_NAMESPACE, f"namespace {namespace!r} is not defined"
        text = value.strip()
        if text.lower() in self.blocklist:
            return None, BLOCKLIST, "a placeholder value"
        clean, detail = canonical(kind, text, self.phone_region)
        if clean is None:
            return None, INVALID, detail
        if not clean or clean.lower() in self.blocklist:
            return None, BLOCKLIST, "a placeholder value"
        return clean, "", ""

    def check(self, namespace: str, value: str) -> tuple[str, str]:
        """Ingest's check of a row's identity value: ("", "") when it may travel to identity as
        an identity (valid for its namespace's type, or a blocklisted placeholder, which identity
        counts and drops), else (rule, detail). Blank is ("missing", …)."""
        text = value.strip()
        if not text:
            return "missing", "blank"
        kind = self.types.get(namespace)
        if kind is None:
            return UNKNOWN_NAMESPACE, f"namespace {namespace!r} is not defined"
        if text.lower() in self.blocklist:
            return "", ""
        clean, detail = canonical(kind, text, self.phone_region)
        return ("", "") if clean is not None else (INVALID, detail)

    def lookup(self, namespace: str, value: str) -> str | None:
        """The form a lookup by (namespace, value) must search for, or None when no profile can
        hold it (unknown namespace, invalid or junk value)."""
        return self.normalise(namespace, value)[0]
