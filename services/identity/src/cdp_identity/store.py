"""The identity store: profiles with their graphs (identities and links), the identity index,
fragments, decisions.

Times are integer microseconds since the epoch (UTC), taken from events. The hot tables are
clustered on their text keys (SQLite ``WITHOUT ROWID``; ignored by PostgreSQL): one B-tree per
table instead of a rowid table plus a key index, so a write touches half the pages.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from sqlmodel import Field, Session, SQLModel, col, select

from cdp_kit.store import tables_of

CLUSTERED = {"sqlite_with_rowid": False}


class IdentityRow(SQLModel, table=True):
    """Which profile holds each identity: the index from an identity to its profile's graph."""

    __tablename__ = "identity_node"
    __table_args__ = CLUSTERED

    key: str = Field(primary_key=True)  # "namespace:value"
    profile_id: str


class ProfileRow(SQLModel, table=True):
    """A profile and its whole graph, as one document (``document``, JSON, written by ``graph.encode_graph``):

    ``[sources, nodes, links]``. ``sources`` lists the distinct ``[dataset, batch_id]`` pairs the
    graph was seen from, numbered in the order the nodes and then the links first use them.
    ``node = [key, first_seen, last_seen - first_seen, first_source, last_source]``, sorted by key;
    ``link = [i, j, first_seen, last_seen - first_seen, first_source, last_source]`` between the
    nodes at positions i < j, sorted. Sources are numbers into ``sources``. The size guardrail
    keeps a graph small, so a record reads and writes its profile's graph as one row instead of
    one row per identity and per link. ``identities`` and ``links`` count what it holds.
    """

    __tablename__ = "identity_profile"
    __table_args__ = CLUSTERED

    profile_id: str = Field(primary_key=True)
    ordinal: int = Field(sa_type=sa.BigInteger, index=True)
    founder: str = ""
    merged_into: str = ""
    split_from: str = ""
    identities: int = 0
    links: int = 0
    document: str = Field(default="", sa_type=sa.Text)


class KeyRefRow(SQLModel, table=True):
    """Every key ref (``cdp_kit.vault``) records of each identity were sealed with: erasing the
    person destroys them all (a generation per ingest process, so an identity may have several)."""

    __tablename__ = "identity_key_ref"
    __table_args__ = CLUSTERED

    key_ref: str = Field(primary_key=True)
    key: str = Field(index=True)  # "namespace:value" of the identity


class FragmentRow(SQLModel, table=True):
    """Which identity each fragment hangs on (its anchor): a split moves it with that identity."""

    __tablename__ = "identity_fragment"
    __table_args__ = CLUSTERED

    anchor: str = Field(primary_key=True)
    source_event_id: str = Field(primary_key=True)


class DecisionRow(SQLModel, table=True):
    __tablename__ = "identity_decision"

    id: str = Field(primary_key=True)
    rule: str
    reason: str
    effect: str  # removed | refused | remembered
    profile_id: str = Field(index=True)
    identity: str = Field(index=True)
    other: str = ""
    links: str = ""  # "a\tb" lines
    source_event_id: str = ""
    at: int = Field(sa_type=sa.BigInteger)


class UnlinkedRow(SQLModel, table=True):
    """An operator unlink, remembered: a pair (a, b) never re-links; b == "" detaches a for good."""

    __tablename__ = "identity_unlinked"

    a: str = Field(primary_key=True)
    b: str = Field(primary_key=True)


class DropRow(SQLModel, table=True):
    """How many identity values were dropped, by namespace and rule."""

    __tablename__ = "identity_drop"

    namespace: str = Field(primary_key=True)
    rule: str = Field(primary_key=True)
    total: int = Field(default=0, sa_type=sa.BigInteger)


class NamespaceRow(SQLModel, table=True):
    __tablename__ = "identity_namespace"

    name: str = Field(primary_key=True)
    type: str
    unique: bool = False
    priority: int
    description: str = ""


class PrivacyRequestRow(SQLModel, table=True):
    """A privacy request (cdp.privacy.v1) and where it is. Keyed hashes only, never a plain identity."""

    __tablename__ = "identity_privacy_request"

    request_id: str = Field(primary_key=True)
    ordinal: int = Field(sa_type=sa.BigInteger, index=True)  # order received (newest first in listings)
    mode: int
    state: int
    identity_hashes: list[str] = Field(default_factory=list, sa_type=sa.JSON)
    profile_ids: list[str] = Field(default_factory=list, sa_type=sa.JSON)
    key_refs: list[str] = Field(default_factory=list, sa_type=sa.JSON)
    nothing_held: bool = False
    received_at: int = Field(default=0, sa_type=sa.BigInteger)
    completed_at: int = Field(default=0, sa_type=sa.BigInteger)
    keys_destroyed: int = Field(default=0, sa_type=sa.BigInteger)


class PrivacyProgressRow(SQLModel, table=True):
    """What one service did for a request (identity's own erasure included)."""

    __tablename__ = "identity_privacy_progress"

    request_id: str = Field(primary_key=True)
    service: str = Field(primary_key=True)
    at: int = Field(default=0, sa_type=sa.BigInteger)
    counts: dict[str, int] = Field(default_factory=dict, sa_type=sa.JSON)
    removals: list[dict[str, object]] = Field(default_factory=list, sa_type=sa.JSON)
    # Further keys of the person the service sealed data under (PrivacyApplied.key_refs): destroyed
    # with the request's at completion.
    key_refs: list[str] = Field(default_factory=list, sa_type=sa.JSON)
    # Identity's own row: the erasure as it was recorded on the fragments log (PrivacyRequested,
    # serialized), so a request whose record on cdp.privacy.requests did not make it (a guard
    # conflict, a crash between the two appends) is recorded as erased, not decided again.
    erasure: bytes | None = Field(default=None, sa_type=sa.LargeBinary)


TABLES = tables_of(
    IdentityRow,
    ProfileRow,
    FragmentRow,
    DecisionRow,
    UnlinkedRow,
    DropRow,
    NamespaceRow,
    KeyRefRow,
    PrivacyRequestRow,
    PrivacyProgressRow,
)
NODE, PROFILE, FRAGMENT, DECISION, UNLINKED, DROP, NAMESPACE, KEY_REF, PRIVACY_REQUEST, PRIVACY_PROGRESS = TABLES


def key_refs_for_profiles(session: Session, profile_ids: Sequence[str]) -> list[str]:
    """Every key ref of every identity of these profiles (for ``PrivacyRequested.key_refs``): what
    a privacy delete of the people destroys (``cdp_kit.vault.PersonVault.destroy``). Sorted."""
    found: set[str] = set()
    ids = sorted(set(profile_ids))
    for start in range(0, len(ids), 500):
        query = (
            select(col(KeyRefRow.key_ref))
            .join(IdentityRow, col(IdentityRow.key) == col(KeyRefRow.key))
            .where(col(IdentityRow.profile_id).in_(ids[start : start + 500]))
        )
        found.update(session.exec(query))
    return sorted(found)
