"""Identity normalisation and hashing per destination (../shared/specs/destinations.md).

Pure functions. One canonical E.164 phone (with "+") comes from ``phonenumbers``; every
platform's phone string is derived from it. Gmail rules apply only where a platform asks
for them. A value that normalises to "" is dropped (``None``), never hashed.
"""

from __future__ import annotations

import base64
import hashlib
import re
import unicodedata
from collections.abc import Callable

import phonenumbers

HEX64 = re.compile(r"^[a-f0-9]{64}$")
_NON_DIGIT = re.compile(r"\D")
_WHITESPACE = re.compile(r"\s+")
GMAIL_DOMAINS = frozenset({"gmail.com", "googlemail.com"})
MONTHS = {
    name: f"{i:02d}"
    for i, name in enumerate(
        (
            "january",
            "february",
            "march",
            "april",
            "may",
            "june",
            "july",
            "august",
            "september",
            "october",
            "november",
            "december",
        ),
        start=1,
    )
}
US_STATES = {
    "alabama": "al", "alaska": "ak", "arizona": "az", "arkansas": "ar", "california": "ca", "colorado": "co",
    "connecticut": "ct", "delaware": "de", "district of columbia": "dc", "florida": "fl", "georgia": "ga",
    "hawaii": "hi", "idaho": "id", "illinois": "il", "indiana": "in", "iowa": "ia", "kansas": "ks",
    "kentucky": "ky", "louisiana": "la", "maine": "me", "maryland": "md", "massachusetts": "ma",
    "michigan": "mi", "minnesota": "mn", "mississippi": "ms", "missouri": "mo", "montana": "mt",
    "nebraska": "ne", "nevada": "nv", "new hampshire": "nh", "new jersey": "nj", "new mexico": "nm",
    "new york": "ny", "north carolina": "nc", "north dakota": "nd", "ohio": "oh", "oklahoma": "ok",
    "oregon": "or", "pennsylvania": "pa", "rhode island": "ri", "south carolina": "sc", "south dakota": "sd",
    "tennessee": "tn", "texas": "tx", "utah": "ut", "vermont": "vt", "virginia": "va", "washington": "wa",
    "west virginia": "wv", "wisconsin": "wi", "wyoming": "wy", "puerto rico": "pr",
}  # fmt: skip


# --- hashing ---------------------------------------------------------------------------


def sha256_hex(value: str) -> str:
    return hashlib.sha256(value.encode("utf-8")).hexdigest()


def sha512_hex(value: str) -> str:
    return hashlib.sha512(value.encode("utf-8")).hexdigest()


def sha256_b64(value: str) -> str:
    """SHA-256 as Base64 of the raw digest (UID2 / The Trade Desk)."""
    return base64.b64encode(hashlib.sha256(value.encode("utf-8")).digest()).decode("ascii")


def md5_hex(value: str) -> str:
    return hashlib.md5(value.encode("utf-8"), usedforsecurity=False).hexdigest()


def is_prehashed(value: str) -> bool:
    """A 64-char lowercase hex value is taken as already SHA-256 hashed (anchored, spec §12.1)."""
    return bool(HEX64.match(value))


def hash_or_none(normalised: str | None, digest: Callable[[str], str] = sha256_hex) -> str | None:
    """Hash a normalised value; empty values are dropped, never hashed."""
    if not normalised:
        return None
    return normalised if digest is sha256_hex and is_prehashed(normalised) else digest(normalised)


# --- phones ------------------------------------------------------------------------------


def canonical_phone(raw: str, default_region: str = "US") -> str | None:
    """The one canonical E.164 form ("+" and country code), or None when there is no number.

    "+..." and "00..." are international; anything else is read in ``default_region`` first
    and, if that is not a possible number there, as digits that already carry a country code.
    """
    text = raw.strip()
    digits = _NON_DIGIT.sub("", text)
    if not digits.strip("0"):
        return None
    if text.startswith("+"):
        candidates = ["+" + digits]
    elif digits.startswith("00"):
        candidates = ["+" + digits[2:]]
    else:
        candidates = [digits, "+" + digits]
    for candidate in candidates:
        try:
            parsed = phonenumbers.parse(candidate, None if candidate.startswith("+") else default_region)
        except phonenumbers.NumberParseException:
            continue
        if phonenumbers.is_possible_number(parsed):
            return phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)
    # Not a number phonenumbers knows: keep the digits (no leading zeros) as a best effort.
    fallback = candidates[0].lstrip("+").lstrip("0")
    return "+" + fallback if 7 <= len(fallback) <= 15 else None


def phone_digits(e164: str | None) -> str | None:
    """Meta / TikTok / Snap: country code and number, digits only, no "+", no leading zeros."""
    if not e164:
        return None
    return _NON_DIGIT.sub("", e164).lstrip("0") or None


# --- emails ------------------------------------------------------------------------------


def email_basic(raw: str) -> str | None:
    """Trim and lowercase (Meta, Google Ads, Snap, Mailchimp)."""
    return raw.strip().lower() or None


def email_meta(raw: str) -> str | None:
    """Meta: trim and lowercase; the Meta SDK also strips leading/trailing dots and NULs."""
    return raw.strip(" \t\r\n\0\x0b.").lower() or None


def _split(email: str) -> tuple[str, str] | None:
    local, at, domain = email.rpartition("@")
    return (local, domain) if at and local and domain else None


def email_google(raw: str, gmail_rule: bool = True) -> str | None:
    """Google (Data Manager rules): lowercase, all whitespace removed; for gmail.com and
    googlemail.com only, dots and "+suffix" removed from the local part."""
    email = _WHITESPACE.sub("", raw).lower()
    parts = _split(email)
    if gmail_rule and parts and parts[1] in GMAIL_DOMAINS:
        local = parts[0].split("+", 1)[0].replace(".", "")
        email = f"{local}@{parts[1]}" if local else ""
    return email or None


def email_tiktok(raw: str) -> str | None:
    """TikTok: lowercase; "+tag" and every dot of the local part removed, all domains."""
    email = raw.strip().lower()
    parts = _split(email)
    if parts:
        local = parts[0].split("+", 1)[0].replace(".", "")
        email = f"{local}@{parts[1]}" if local else ""
    return email or None


def email_uid2(raw: str) -> str | None:
    """The Trade Desk / UID2: trim, lowercase; gmail.com only: dots and "+suffix" removed."""
    email = raw.strip().lower()
    parts = _split(email)
    if parts and parts[1] == "gmail.com":
        local = parts[0].split("+", 1)[0].replace(".", "")
        email = f"{local}@{parts[1]}" if local else ""
    return email or None


def email_linkedin(raw: str) -> str | None:
    """LinkedIn (RudderStack practice): every whitespace removed, lowercase."""
    return _WHITESPACE.sub("", raw).lower() or None


def mailchimp_subscriber_hash(raw: str) -> str | None:
    email = email_basic(raw)
    return md5_hex(email) if email else None


# --- Meta's other keys ---------------------------------------------------------------------


def _letters(raw: str) -> str:
    text = unicodedata.normalize("NFC", raw.strip().lower())
    return "".join(ch for ch in text if ch.isalpha())


def name_meta(raw: str) -> str | None:
    """FN/LN: lowercase, no punctuation or spaces, UTF-8 letters kept ("Émilie" -> "émilie")."""
    return _letters(raw) or None


def first_initial(raw: str) -> str | None:
    letters = _letters(raw)
    return letters[:1] or None


def gender(raw: str) -> str | None:
    letter = _letters(raw)[:1]
    return letter if letter in ("m", "f") else None


def dob_year(raw: str) -> str | None:
    digits = _NON_DIGIT.sub("", raw)
    return digits if len(digits) == 4 else None


def dob_month(raw: str) -> str | None:
    text = raw.strip().lower()
    if text in MONTHS:
        return MONTHS[text]
    for name, number in MONTHS.items():
        if len(text) >= 3 and name.startswith(text):
            return number
    digits = _NON_DIGIT.sub("", text)
    return f"{int(digits):02d}" if digits and 1 <= int(digits) <= 12 else None


def dob_day(raw: str) -> str | None:
    digits = _NON_DIGIT.sub("", raw)
    return f"{int(digits):02d}" if digits and 1 <= int(digits) <= 31 else None


def city(raw: str) -> str | None:
    return _letters(raw) or None


def state(raw: str) -> str | None:
    text = _WHITESPACE.sub(" ", raw.strip().lower())
    if text in US_STATES:
        return US_STATES[text]
    return "".join(ch for ch in text if ch.isalnum()) or None


def zip_code(raw: str) -> str | None:
    return _WHITESPACE.sub("", raw.lower()).split("-", 1)[0] or None


def country(raw: str) -> str | None:
    letters = "".join(ch for ch in raw.lower() if "a" <= ch <= "z")[:2]
    return letters if len(letters) == 2 else None


def madid(raw: str) -> str | None:
    return raw.strip().lower() or None


# --- Google address fields -------------------------------------------------------------


def google_first_name(raw: str) -> str | None:
    return _WHITESPACE.sub("", raw.lower()) or None


def google_last_name(raw: str) -> str | None:
    return _letters(raw) or None
