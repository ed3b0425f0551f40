"""The email fast path (a regex for plain ASCII addresses) agrees with email-validator: whatever it
accepts, email-validator accepts with the same normalised form; the rest goes to email-validator."""

from __future__ import annotations

import pytest
from email_validator import EmailNotValidError, validate_email
from hypothesis import example, given, settings
from hypothesis import strategies as st

from cdp_identity.domain import Rules, simple_email
from cdp_identity.engine import Normaliser, kept_and_dropped
from cdp_identity.settings import IdentitySettings

atoms = st.text(alphabet="abcXYZ019_+-.", min_size=1, max_size=12)
labels = st.text(alphabet="abcXYZ019-", min_size=1, max_size=12)
tlds = st.sampled_from(["com", "org", "COM", "test", "local", "localhost", "c", "arpa", "io", "x1", "invalid"])
emails = st.builds(lambda a, ls, t: f"{a}@{'.'.join([*ls, t])}", atoms, st.lists(labels, min_size=0, max_size=3), tlds)


def reference(text: str) -> str | None:
    try:
        return validate_email(text, check_deliverability=False).normalized.lower()
    except EmailNotValidError:
        return None


@settings(max_examples=400, deadline=None)
@given(emails)
@example("Ann.Smith@Example.COM")
@example("a..b@example.com")
@example(".a@example.com")
@example("a@-b.com")
@example("a@b--c.com")
@example("a@sub.example.test")
@example(("x" * 65) + "@example.com")
def test_the_fast_path_accepts_only_what_email_validator_accepts_unchanged(text: str) -> None:
    fast = simple_email(text)
    if fast is not None:
        assert fast == reference(text)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("  Ann@Example.com ", "ann@example.com"),
        ("ann@exämple.com", "ann@exämple.com"),  # non-ASCII: email-validator decides
        ("not-an-email", None),
        ("test@test.com", None),
        ("ann@host.local", None),
    ],
)
def test_emails_are_normalised_the_same_on_both_paths(raw: str, expected: str | None) -> None:
    assert Rules.make().normalise("email", raw)[0] == expected


def test_kept_and_dropped_names_each_raw_identitys_key_in_the_records_order() -> None:
    """The sealer pairs a record's key refs (one per raw identity, in order) with these keys:
    a dropped identity keeps its place (None), a memo hit gives the same key as a first read."""
    rules = IdentitySettings().rules()
    normalise = Normaliser()
    raw = [("cookie", "ck-1"), ("email", "not an email"), ("email", "Ann@Example.com"), ("nope", "x")]
    for _pass in range(2):  # the second pass reads from the memo
        keys: list[str | None] = []
        kept, dropped = kept_and_dropped(rules, normalise, raw, keys)
        assert keys == ["cookie:ck-1", None, "email:ann@example.com", None]
        assert sorted(kept) == ["cookie:ck-1", "email:ann@example.com"]
        assert len(dropped) == 2
