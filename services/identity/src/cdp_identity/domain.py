"""Pure identity rules: namespaces, normalisation, priorities, profile ids. No I/O, no clock."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import phonenumbers
from email_validator import SPECIAL_USE_DOMAIN_NAMES, EmailNotValidError, validate_email

from cdp.identity.v1 import identity_pb2 as pb

NT = pb.NamespaceType
# Enum values as plain ints: attribute access on the protobuf enum wrapper is slow in hot loops.
EMAIL_TYPE = int(NT.NAMESPACE_TYPE_EMAIL)
PHONE_TYPE = int(NT.NAMESPACE_TYPE_PHONE)
HASHED_TYPE = int(NT.NAMESPACE_TYPE_HASHED)

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
NAME_RE = re.compile(r"^[a-z][a-z0-9_]{1,62}$")
CUSTOM_PRIORITY = 100


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
    Namespace("crm_id", NT.NAMESPACE_TYPE_CROSS_DEVICE, True, 10, True, "CRM customer id"),
    Namespace("loyalty_id", NT.NAMESPACE_TYPE_CROSS_DEVICE, True, 20, True, "loyalty programme member id"),
    Namespace("email", NT.NAMESPACE_TYPE_EMAIL, False, 30, True, "email address"),
    Namespace("phone", NT.NAMESPACE_TYPE_PHONE, False, 40, True, "phone number (E.164)"),
    Namespace("email_sha256", NT.NAMESPACE_TYPE_HASHED, False, 50, True, "SHA-256 of a normalised email"),
    Namespace("phone_sha256", NT.NAMESPACE_TYPE_HASHED, False, 60, True, "SHA-256 of an E.164 phone"),
    Namespace("idfa", NT.NAMESPACE_TYPE_DEVICE, False, 70, True, "Apple advertising id"),
    Namespace("gaid", NT.NAMESPACE_TYPE_DEVICE, False, 80, True, "Google advertising id"),
    Namespace("cookie", NT.NAMESPACE_TYPE_COOKIE, False, 90, True, "web cookie id"),
)

# Which identities the size guardrail detaches first: cookies, then devices, then people ids.
EVICTION_CLASS = {NT.NAMESPACE_TYPE_COOKIE: 0, NT.NAMESPACE_TYPE_DEVICE: 1}
PEOPLE_CLASS = 2


@dataclass(frozen=True)
class Rules:
    """What the graph decisions depend on (settings plus the namespaces created so far)."""

    namespaces: Mapping[str, Namespace]
    blocklist: frozenset[str] = frozenset(DEFAULT_BLOCKLIST)
    max_identities: int = 50
    default_phone_region: str = "US"
    _order: dict[str, tuple[int, str]] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def make(
        cls,
        custom: Iterable[Namespace] = (),
        *,
        blocklist: Iterable[str] = DEFAULT_BLOCKLIST,
        unique: Iterable[str] | None = None,
        max_identities: int = 50,
        default_phone_region: str = "US",
    ) -> Rules:
        spaces = {ns.name: ns for ns in STANDARD}
        if unique is not None:
            chosen = set(unique)
            spaces = {n: _with_unique(ns, n in chosen) for n, ns in spaces.items()}
        for ns in custom:
            spaces[ns.name] = ns
        return cls(
            namespaces=spaces,
            blocklist=frozenset(v.strip().lower() for v in blocklist),
            max_identities=max_identities,
            default_phone_region=default_phone_region,
        )

    def with_namespace(self, ns: Namespace) -> Rules:
        return Rules(
            namespaces={**self.namespaces, ns.name: ns},
            blocklist=self.blocklist,
            max_identities=self.max_identities,
            default_phone_region=self.default_phone_region,
        )

    def is_unique(self, namespace: str) -> bool:
        ns = self.namespaces.get(namespace)
        return ns is not None and ns.unique

    def order(self, namespace: str, value: str) -> tuple[int, str, str]:
        """Sort key: stronger namespaces first, then by value (deterministic)."""
        ns = self.namespaces.get(namespace)
        return (ns.priority if ns else CUSTOM_PRIORITY + 1, namespace, value)

    def eviction_class(self, namespace: str) -> int:
        ns = self.namespaces.get(namespace)
        return EVICTION_CLASS.get(ns.type, PEOPLE_CLASS) if ns else PEOPLE_CLASS  # type: ignore[call-overload]

    def type_of(self, namespace: str) -> int:
        ns = self.namespaces.get(namespace)
        return ns.type if ns else NT.NAMESPACE_TYPE_UNSPECIFIED

    def normalise(self, namespace: str, value: str) -> tuple[str | None, str, str]:
        """(canonical value, rule, detail): the value is None when it must not link anyone,
        and rule says why (unknown_namespace, invalid, blocklist)."""
        ns = self.namespaces.get(namespace)
        if ns is None:
            return None, "unknown_namespace", f"namespace {namespace!r} is not defined"
        text = value.strip()
        if text.lower() in self.blocklist:
            return None, "blocklist", "a placeholder value"
        kind = ns.type
        if kind == EMAIL_TYPE:
            simple = simple_email(text)
            if simple is not None:
                text = simple
            else:
                try:
                    text = validate_email(text, check_deliverability=False).normalized.lower()
                except EmailNotValidError:
                    return None, "invalid", "not a syntactically valid email address"
        elif kind == PHONE_TYPE:
            try:
                number = phonenumbers.parse(text, self.default_phone_region)
            except phonenumbers.NumberParseException:
                return None, "invalid", "not a phone number"
            if not phonenumbers.is_valid_number(number):
                return None, "invalid", "not a valid phone number"
            text = phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)
        elif kind == HASHED_TYPE:
            text = text.lower()
            if not HASH_RE.match(text):
                return None, "invalid", "not a lower-case hex SHA-256 (64 characters)"
        if not text or text.lower() in self.blocklist:
            return None, "blocklist", "a placeholder value"
        return text, "", ""


def simple_email(text: str) -> str | None:
    """The normalised form of a plain ASCII email, or None when email-validator must decide."""
    lowered = text.lower()
    if not SIMPLE_EMAIL_RE.fullmatch(lowered) or len(lowered) > 254 or "--" in lowered:
        return None
    local, _, domain = lowered.partition("@")
    if len(local) > 64 or domain.endswith(SPECIAL_USE_SUFFIXES):
        return None
    return lowered


def _with_unique(ns: Namespace, unique: bool) -> Namespace:
    return Namespace(ns.name, ns.type, unique, ns.priority, ns.standard, ns.description)


def node_key(namespace: str, value: str) -> str:
    return f"{namespace}:{value}"


def split_key(key: str) -> tuple[str, str]:
    namespace, _, value = key.partition(":")
    return namespace, value


def profile_id_for(namespace: str, value: str, generation: int = 0) -> str:
    """A new profile's id: derived from the identity that founded it (its anchor), so a replay
    finds the same id. ``generation`` > 0 when that id was already used by an earlier profile."""
    salt = f"\x1f{generation}" if generation else ""
    return "p-" + hashlib.sha256(f"{namespace}\x1f{value}{salt}".encode()).hexdigest()[:24]


def split_profile_id(profile_id: str, cause: str, founder: str) -> str:
    """The id of a part split off a profile: derived from the profile, the cause and the part's founder."""
    return "p-" + hashlib.sha256(f"split\x1f{profile_id}\x1f{cause}\x1f{founder}".encode()).hexdigest()[:24]


def components(nodes: Iterable[str], edges: Iterable[tuple[str, str]]) -> list[set[str]]:
    """Connected components (union-find)."""
    parent: dict[str, str] = {n: n for n in nodes}

    def find(x: str) -> str:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in edges:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    groups: dict[str, set[str]] = {}
    for n in parent:
        groups.setdefault(find(n), set()).add(n)
    return list(groups.values())
