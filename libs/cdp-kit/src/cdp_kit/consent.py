"""Consent to a marketing action, read the same way everywhere.

A profile's consent to action ``A`` is its attribute ``consent_<A>`` (the canonical one: ingest
writes it, normalised, from any field a schema marks ``consent_for: A``), else the nested
``consents.<A>`` (data sent that way). Values are normalised here, once: ``y``/``n``/``u`` from
the usual spellings; any other text is kept lower-cased and stripped; no value is "unknown".
Segmentation's ``consent A = "y"`` (streaming and SQL) and activation's consent gate both read
through this module, so they cannot disagree.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

MARKETING_ACTIONS = ("email_marketing", "sms_marketing", "ad_targeting", "data_sharing")
YES, NO, UNSET = "y", "n", "u"
UNKNOWN = "unknown"  # no value at all (activation's CDP_UNKNOWN_CONSENT decides)
NESTED = "consents"
SPELLINGS: dict[str, frozenset[str]] = {
    YES: frozenset({"y", "yes", "true", "t", "1", "1.0", "opt_in", "opt-in", "optin", "opted_in", "granted"}),
    NO: frozenset({"n", "no", "false", "f", "0", "0.0", "opt_out", "opt-out", "optout", "opted_out", "denied"}),
    UNSET: frozenset({"u", "unknown", "unset"}),
}
_BY_SPELLING = {spelling: value for value, spellings in SPELLINGS.items() for spelling in spellings}


def attribute_of(action: str) -> str:
    """The canonical attribute holding consent to ``action``."""
    return f"consent_{action}"


def normalise_consent(raw: Any) -> str | None:
    """``y``, ``n`` or ``u`` for a recognised spelling (case and spaces ignored; booleans and 1/0
    too), None for anything else."""
    if isinstance(raw, bool):
        return YES if raw else NO
    if isinstance(raw, int | float):
        return YES if raw == 1 else NO if raw == 0 else None
    if isinstance(raw, str):
        return _BY_SPELLING.get(raw.strip().lower())
    return None


def consent_text(raw: Any) -> str:
    """A stored or compared consent value as it is matched: normalised, else lower-cased text."""
    known = normalise_consent(raw)
    return known if known is not None else str(raw).strip().lower()


def spellings_of(value: str) -> frozenset[str]:
    """Every lower-cased text that reads as ``value`` (what SQL compares a stored text with)."""
    known = normalise_consent(value)
    return SPELLINGS[known] if known is not None else frozenset({value.strip().lower()})


def consent_of(attributes: Mapping[str, Any], action: str) -> str:
    """A profile's consent to ``action``: ``y``/``n``/``u``, other text as written, or "unknown"."""
    raw = attributes.get(attribute_of(action))
    if raw is None:
        nested = attributes.get(NESTED)
        raw = nested.get(action) if isinstance(nested, Mapping) else None
    if raw is None:
        return UNKNOWN
    return consent_text(raw)
