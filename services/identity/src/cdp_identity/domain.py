"""Pure identity rules: namespaces, normalisation, priorities, profile ids. No I/O, no clock."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from cdp.identity.v1 import identity_pb2 as pb
from cdp_kit.identities import (
    CUSTOM_PRIORITY,
    DEFAULT_BLOCKLIST,
    DEFAULT_PHONE_REGION,
    EMAIL_TYPE,
    HASHED_TYPE,
    PHONE_TYPE,
    STANDARD,
    Namespace,
    Normaliser,
    simple_email,
)

NT = pb.NamespaceType
NAME_RE = re.compile(r"^[a-z][a-z0-9_]{1,62}$")

__all__ = [
    "CUSTOM_PRIORITY",
    "DEFAULT_BLOCKLIST",
    "EMAIL_TYPE",
    "HASHED_TYPE",
    "PHONE_TYPE",
    "STANDARD",
    "Namespace",
    "Rules",
    "simple_email",
]

# Which identities the size guardrail detaches first: cookies, then devices, then people ids.
EVICTION_CLASS = {NT.NAMESPACE_TYPE_COOKIE: 0, NT.NAMESPACE_TYPE_DEVICE: 1}
PEOPLE_CLASS = 2


@dataclass(frozen=True)
class Rules:
    """What the graph decisions depend on (settings plus the namespaces created so far)."""

    namespaces: Mapping[str, Namespace]
    blocklist: frozenset[str] = frozenset(DEFAULT_BLOCKLIST)
    max_identities: int = 50
    default_phone_region: str = DEFAULT_PHONE_REGION
    _order: dict[str, tuple[int, str]] = field(default_factory=dict, compare=False, repr=False)
    normaliser: Normaliser = field(default_factory=Normaliser, compare=False, repr=False)

    def __post_init__(self) -> None:
        types = {name: ns.type for name, ns in self.namespaces.items()}
        object.__setattr__(self, "normaliser", Normaliser(types, self.blocklist, self.default_phone_region))

    @classmethod
    def make(
        cls,
        custom: Iterable[Namespace] = (),
        *,
        blocklist: Iterable[str] = DEFAULT_BLOCKLIST,
        unique: Iterable[str] | None = None,
        max_identities: int = 50,
        default_phone_region: str = DEFAULT_PHONE_REGION,
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
        and rule says why (unknown_namespace, invalid, blocklist). The kit's shared normaliser."""
        return self.normaliser.normalise(namespace, value)


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
