"""What identity seals of its own events (crypto-shredding, docs/privacy.md), and under which keys.

* ``ProfileFragment``: identities, attributes and anchor, as a whole, under every key of its
  record (the shared-device rule); ``key_refs`` start with the ref of each fragment identity, in
  their order, so a reader can learn which ref is whose.
* ``ProfilesMerged``: ``via``; ``GraphDecision``: ``identity``, ``other`` and its links;
  ``ProfileSplit``: each part's ``identities`` and ``founder`` (a part each, ``parts.<i>``). These
  are sealed under one key ref of each identity they name (erasing a person destroys every ref of
  every identity of theirs, so one is enough), and fold with the fields left empty when a key is
  gone: the event's structure (profiles merged or split) stays.

A ref of an identity comes from the record being resolved, else from this transaction's new refs,
else from the store (``identity_key_ref``). Keys not at hand raise ``cdp_kit.vault.KeysNeeded``:
the processor fetches them and applies the work again. An identity without a known ref (data
written while sealing was off) adds no key; an event none of whose identities has one is left
as it is.
"""

from __future__ import annotations

from collections.abc import Iterable

from google.protobuf.message import Message

from cdp.common.v1.envelope_pb2 import IdentityValue, Sealed
from cdp.identity.v1 import events_pb2 as ev
from cdp_identity import store
from cdp_identity.graph import WorkingSet
from cdp_kit.sealing import Erased, split_fields
from cdp_kit.vault import PersonVault

FRAGMENT = ev.ProfileFragment.DESCRIPTOR.full_name
MERGED = ev.ProfilesMerged.DESCRIPTOR.full_name
DECISION = ev.GraphDecision.DESCRIPTOR.full_name
SPLIT = ev.ProfileSplit.DESCRIPTOR.full_name
FRAGMENT_PERSONAL = ("identities", "attributes", "anchor")
DECISION_PERSONAL = ("identity", "other", "removed_links", "refused_links")
PART_PERSONAL = ("identities", "founder")


def key_of(ident: IdentityValue) -> str:
    return f"{ident.namespace}:{ident.value}"


class IdentitySealer:
    """``Maker.seal`` for identity's events (see the module docstring)."""

    def __init__(
        self, vault: PersonVault, ws: WorkingSet, ref_of: dict[str, str] | None = None, refs: list[str] | None = None
    ) -> None:
        self.vault = vault
        self.ws = ws
        self.ref_of = ref_of or {}  # the record's identity key -> its ref
        self.record_refs = refs or []

    def refs_of(self, keys: list[str]) -> dict[str, str]:
        """Key ref -> identity key of a fragment's identities (to remember in the store)."""
        return {self.ref_of[k]: k for k in keys if k in self.ref_of}

    def __call__(self, payload: Message, event_id: str) -> tuple[Message, list[Sealed]]:
        kind = payload.DESCRIPTOR.full_name
        if kind == FRAGMENT:
            return self._fragment(payload, event_id)
        if kind == MERGED:
            assert isinstance(payload, ev.ProfilesMerged)
            return self._fields(payload, ("via",), [key_of(payload.via)], event_id)
        if kind == DECISION:
            assert isinstance(payload, ev.GraphDecision)
            keys = [key_of(payload.identity), key_of(payload.other)]
            keys += [key_of(i) for link in [*payload.removed_links, *payload.refused_links] for i in (link.a, link.b)]
            return self._fields(payload, DECISION_PERSONAL, keys, event_id)
        if kind == SPLIT:
            assert isinstance(payload, ev.ProfileSplit)
            return self._split(payload, event_id)
        return payload, []

    def _fragment(self, payload: Message, event_id: str) -> tuple[Message, list[Sealed]]:
        if not self.record_refs:
            return payload, []
        assert isinstance(payload, ev.ProfileFragment)
        stripped, personal = split_fields(payload, FRAGMENT_PERSONAL)
        keys = [key_of(i) for i in payload.identities]
        own = [self.ref_of[k] for k in keys if k in self.ref_of]
        if len(own) < len(keys):
            own = []  # an identity without a ref (never expected): no identity -> ref pairing
        refs = own + [r for r in self.record_refs if r not in own]
        try:
            return stripped, [self.vault.seal(refs, personal, event_id=event_id, event_type=FRAGMENT)]
        except Erased:
            return stripped, []  # a key revoked meanwhile: the fragment goes out without its person

    def _fields(
        self, payload: Message, fields: tuple[str, ...], keys: list[str], event_id: str
    ) -> tuple[Message, list[Sealed]]:
        refs = self._refs(k for k in keys if k != ":")
        if not refs:
            return payload, []
        stripped, personal = split_fields(payload, fields)
        kind = payload.DESCRIPTOR.full_name
        try:
            return stripped, [self.vault.seal(refs, personal, event_id=event_id, event_type=kind, whole=False)]
        except Erased:
            return stripped, []  # someone named is being erased: the fields go out empty

    def _split(self, payload: ev.ProfileSplit, event_id: str) -> tuple[Message, list[Sealed]]:
        stripped = ev.ProfileSplit()
        stripped.CopyFrom(payload)
        parts: list[Sealed] = []
        for i, part in enumerate(payload.parts):
            refs = self._refs([key_of(ident) for ident in part.identities] + [key_of(part.founder)])
            if not refs:
                continue
            bare, personal = split_fields(part, PART_PERSONAL)
            stripped.parts[i].CopyFrom(bare)
            try:
                parts.append(
                    self.vault.seal(refs, personal, event_id=event_id, event_type=SPLIT, path=f"parts.{i}", whole=False)
                )
            except Erased:
                continue  # someone of the part is being erased: its identities go out empty
        return stripped, parts

    def _refs(self, keys: Iterable[str]) -> list[str]:
        """One ref of each of these identities that has one, sorted."""
        wanted = set(keys)
        found: dict[str, str] = {}
        pending = self.ws.refs_by_key
        for key in wanted:
            ref = self.ref_of.get(key) or pending.get(key)
            if ref is not None:
                found[key] = ref
        unknown = {k for k in wanted if k not in found}
        if unknown:
            for ref, key in self.ws.bulk.select_in(store.KEY_REF, ("key_ref", "key"), "key", unknown):
                found.setdefault(str(key), str(ref))
        return sorted(set(found.values()))
