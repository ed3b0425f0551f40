"""Identity normalisation and hashing per destination (docs/activation.md, "Identity normalisation").

Pure functions. One canonical E.164 phone (with "+") comes from ``phonenumbers`` and only
for a number it holds valid; every platform's phone string is derived from it. Countries
are ISO 3166-1 alpha-2 through ``pycountry``. Gmail rules apply only where a platform asks
for them. A value that cannot be normalised is dropped (``None``), never hashed and never
guessed; ``DROP_REASONS`` says why without quoting the value.
"""

from __future__ import annotations

import base64
import hashlib
import re
import unicodedata
from collections.abc import Callable
from datetime import UTC, date, datetime

import phonenumbers
import pycountry

HEX64 = re.compile(r"^[a-f0-9]{64}$")
_NON_DIGIT = re.compile(r"\D")
_WHITESPACE = re.compile(r"\s+")
_NON_ASCII_LETTER = re.compile(r"[^a-z]")
# A mobile advertising id (IDFA / GAID, also AAID): a UUID, 8-4-4-4-12 hex digits.
_MAID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
_ISO_DATE = re.compile(r"^([0-9]{4})[-/.]([0-9]{1,2})[-/.]([0-9]{1,2})(?:[T ].*)?$")
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
# State names as letters only ("New-York", "new york" -> "newyork"), for the lookup.
_US_STATES_BY_LETTERS = {name.replace(" ", ""): code for name, code in US_STATES.items()}
# Country names people write that ISO 3166 (and so pycountry) does not spell that way. Not
# guesses: each is the one country the name means ("uk" is ISO's exceptional reservation for GB).
COUNTRY_ALIASES = {
    "uk": "gb", "great britain": "gb", "britain": "gb", "england": "gb", "scotland": "gb", "wales": "gb",
    "northern ireland": "gb", "turkey": "tr", "russia": "ru", "holland": "nl", "the netherlands": "nl",
    "czech republic": "cz", "ivory coast": "ci", "cape verde": "cv", "swaziland": "sz", "burma": "mm",
}  # fmt: skip
# Why a value was dropped, per kind of identifier; the value itself is never quoted.
DROP_REASONS = {
    "email": "not an email address",
    "phone": "not a valid phone number",
    "maid": "not a mobile advertising id (or a zeroed, tracking-limited one)",
    "country": "not an ISO 3166 country",
    "state": "no letters",
    "zip": "empty",
    "name": "no letters",
    "gender": "not a recognised gender",
    "dob": "not a valid date of birth",
    "hash": "not a SHA-256 hex digest",
}


def drop_reason(kind: str) -> str:
    """The counted reason for a dropped identifier: its kind and why, no value."""
    return f"{kind} dropped: {DROP_REASONS.get(kind, 'cannot be normalised')}"


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
    """A 64-char lowercase hex value is taken as already SHA-256 hashed (anchored)."""
    return bool(HEX64.match(value))


def hex_to_b64(digest_hex: str) -> str:
    """A SHA-256 hex digest as UID2 wants it: Base64 of the 32 digest bytes, not hashed again."""
    return base64.b64encode(bytes.fromhex(digest_hex)).decode("ascii")


def hash_or_none(normalised: str | None, digest: Callable[[str], str] = sha256_hex) -> str | None:
    """Hash a normalised value; empty values are dropped, never hashed. A value that is
    already a SHA-256 hex digest is passed on (hex) or re-encoded (Base64), never hashed
    again; no other digest can be made from it, so it is dropped there."""
    if not normalised:
        return None
    if is_prehashed(normalised):
        if digest is sha256_hex:
            return normalised
        return hex_to_b64(normalised) if digest is sha256_b64 else None
    return digest(normalised)


def hashed(raw: str, normalise: Callable[[str], str | None], digest: Callable[[str], str] = sha256_hex) -> str | None:
    """Normalise then hash a raw value; one that is already a SHA-256 hex digest (any case,
    trimmed) skips normalisation, which would only spoil it (a phone's digits, say)."""
    text = raw.strip().lower()
    if is_prehashed(text):
        return hash_or_none(text, digest)
    return hash_or_none(normalise(raw), digest)


# --- phones ------------------------------------------------------------------------------


def canonical_phone(raw: str, default_region: str = "US") -> str | None:
    """The one canonical E.164 form ("+" and country code), or None unless ``phonenumbers``
    holds the number valid (a possible length is not enough: "911 234 0375" is dropped).

    "+..." and "00..." are international; anything else is read in ``default_region`` first
    and, if that is not a valid number there, as digits that already carry a country code.
    Nothing is guessed: a number that is valid neither way is dropped, never sent as digits.
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
        if phonenumbers.is_valid_number(parsed):
            return phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)
    return None


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


def dob_year(raw: str, this_year: int | None = None) -> str | None:
    """Meta DOBY: "YYYY format from 1900 to current year"."""
    digits = _NON_DIGIT.sub("", raw)
    latest = this_year if this_year is not None else datetime.now(UTC).year
    return digits if len(digits) == 4 and 1900 <= int(digits) <= latest else None


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
    """Meta ST: letters a-z only, lower-cased, as Meta's SDK does ("123abc " -> "abc"); a US
    state's name becomes its two-letter code ("California" -> "ca")."""
    letters = _NON_ASCII_LETTER.sub("", raw.lower())
    return _US_STATES_BY_LETTERS.get(letters, letters) or None


def zip_code(raw: str) -> str | None:
    return _WHITESPACE.sub("", raw.lower()).split("-", 1)[0] or None


def country(raw: str) -> str | None:
    """ISO 3166-1 alpha-2, lower case, from an alpha-2 or alpha-3 code, a numeric code or a
    country name (pycountry); None for anything else: "IRL" -> "ie", never "ir" (Iran)."""
    text = _WHITESPACE.sub(" ", raw.strip()).lower()
    if not text:
        return None
    compact = text.replace(".", "").replace(" ", "")
    for key in (text, compact, text.removeprefix("the ")):
        if key in COUNTRY_ALIASES:
            return COUNTRY_ALIASES[key]
        try:
            found = pycountry.countries.lookup(key)
        except LookupError:
            continue
        return str(found.alpha_2).lower()
    return None


def country_upper(raw: str) -> str | None:
    """ISO 3166-1 alpha-2 in upper case (Google countryCode / regionCode, Braze country)."""
    code = country(raw)
    return code.upper() if code else None


def madid(raw: str) -> str | None:
    """A mobile advertising id (IDFA / GAID), lower case with its hyphens; None for anything
    that is not a UUID, and for the all-zero id a device sends when tracking is limited."""
    text = raw.strip().lower()
    if not _MAID.match(text) or not text.replace("-", "").strip("0"):
        return None
    return text


# --- Braze profile fields ------------------------------------------------------------------

BRAZE_GENDERS = {
    "m": "M", "male": "M", "man": "M", "f": "F", "female": "F", "woman": "F",
    "o": "O", "other": "O", "non-binary": "O", "nonbinary": "O",
    "n": "N", "not applicable": "N", "n/a": "N", "p": "P", "prefer not to say": "P",
}  # fmt: skip


def braze_gender(raw: str) -> str | None:
    """Braze gender: one of M, F, O (other), N (not applicable), P (prefer not to say)."""
    return BRAZE_GENDERS.get(_WHITESPACE.sub(" ", raw.strip().lower()))


def iso_date(raw: str, today: date | None = None) -> str | None:
    """A date of birth as "YYYY-MM-DD" (Braze dob) from YYYY-MM-DD, YYYY/MM/DD or an ISO
    timestamp; None for an impossible date, one before 1900 or one in the future."""
    match = _ISO_DATE.match(raw.strip())
    if not match:
        return None
    try:
        when = date(int(match.group(1)), int(match.group(2)), int(match.group(3)))
    except ValueError:
        return None
    if when.year < 1900 or when > (today or datetime.now(UTC).date()):
        return None
    return when.isoformat()


# --- Google address fields -------------------------------------------------------------


def google_first_name(raw: str) -> str | None:
    return _WHITESPACE.sub("", raw.lower()) or None


def google_last_name(raw: str) -> str | None:
    return _letters(raw) or None
