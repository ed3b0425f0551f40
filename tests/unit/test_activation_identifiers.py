"""Every test vector the platforms publish for identifier normalisation and hashing (docs/activation.md)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from cdp_activation import identifiers as ids

E = ids.canonical_phone


def meta_phone(raw: str) -> str | None:
    return ids.phone_digits(E(raw))


# (platform/vector, normaliser, input, normalised, digest function, digest)
VECTORS: list[tuple[str, Callable[[str], str | None], str, str, Callable[[str], str] | None, str]] = [
    ("meta-1", ids.email_meta, "  Test@Example.COM  ", "test@example.com", ids.sha256_hex,
     "973dfe463ec85785f5f95af5ba3906eedb2d931c24e69824a89ea65dba4e813b"),
    ("meta-2", meta_phone, "+1 (800) 555-1234", "18005551234", ids.sha256_hex,
     "655dbe4f7591d8ffe8c86b433ed53aa325b40e1be892167ae2e17118da8279c9"),
    ("meta-3", meta_phone, "0044 207 123 4567", "442071234567", ids.sha256_hex,
     "7832ae034a3179d5f2260e4bec5b6b1756ade7bf4ced1f6fc7a8040529fd9e57"),
    ("meta-4", meta_phone, "+44 844 412 4653", "448444124653", ids.sha256_hex,
     "dc008fda46e2e64002cf2f82a4906236282d431c4f75e5b60bfe79fc48546383"),
    ("meta-5", ids.gender, "Female", "f", ids.sha256_hex,
     "252f10c83610ebca1a059c0bae8255eba2f95be4d1d7bcfa89d7248a82d9f111"),
    ("meta-6", ids.dob_year, "1990", "1990", ids.sha256_hex,
     "a7be8e1fe282a37cd666e0632b17d933fa13f21addf4798fc0455bc166e2488c"),
    ("meta-7", ids.dob_month, "january", "01", ids.sha256_hex,
     "938db8c9f82c8cb58d3f3ef4fd250036a48d26a712753d2fde5abd03a85cabf4"),
    ("meta-8", ids.dob_day, " 05 ", "05", ids.sha256_hex,
     "c97550ce8213ef5cf6ed4ba48790c137df3ef6a5da20b48961001a634b6cead2"),
    ("meta-9", ids.name_meta, "O'Brien", "obrien", ids.sha256_hex,
     "b4cb6cb33fe4b865868de825023a1e2790dc12ac01ecc8d7c5afe8254071c8ba"),
    ("meta-10", ids.name_meta, "Anne-Marie", "annemarie", ids.sha256_hex,
     "67495eb5715de43c26f7c18b25cc7f62a7540236516bd59d5162a6f743598083"),
    ("meta-11a", ids.name_meta, "Émilie", "émilie", ids.sha256_hex,
     "2863487194ad92314c0d76b8e4fe04d127789e79c94081329c682b7beea2bf6c"),
    ("meta-12", ids.first_initial, "J.", "j", ids.sha256_hex,
     "189f40034be7a199f1fa9891668ee3ab6049f82d38c68be70f596eab2e1857b7"),
    ("meta-13", ids.city, "New York", "newyork", ids.sha256_hex,
     "350c754ba4d38897693aa077ef43072a859d23f613443133fecbbd90a3512ca5"),
    ("meta-14", ids.state, "California", "ca", ids.sha256_hex,
     "6959097001d10501ac7d54c0bdb8db61420f658f2922cc26e46d536119a31126"),
    ("meta-15", ids.zip_code, "94303-5300", "94303", ids.sha256_hex,
     "dbc44237b6c2015598a867bb304d3740130e32bde3b7f55bdabf61874a1659a9"),
    ("meta-16", ids.country, "US", "us", ids.sha256_hex,
     "79adb2a2fce5c6ba215fe5f27f532d4e7edbac4b6a5e09e1ef3a08084a904621"),
    ("meta-17", ids.madid, "AECE52E7-03EE-455A-B3C4-E57283966239", "aece52e7-03ee-455a-b3c4-e57283966239", None, ""),
    ("google-1", ids.email_google, "dana@example.com", "dana@example.com", ids.sha256_hex,
     "07e2f1394b0ea80e2adca010ea8318df697001a005ba7452720edda4b0ce57b3"),
    ("google-2", E, "+1 800 5550101", "+18005550101", ids.sha256_hex,
     "61d6c2976b5d92b1ad63073a12fddd26040cd980067d03a93dd1cc50f1a3ac68"),
    ("google-3", ids.email_google, "alex.2@example.com", "alex.2@example.com", ids.sha256_hex,
     "97a24240e3c76dfc0abdb63a3d73468ff8d94b81fd3dc084cc32994ba4fad7fe"),
    ("google-4", ids.google_first_name, "Alex", "alex", ids.sha256_hex,
     "4135aa9dc1b842a653dea846903ddb95bfb8c5a10c504a7fa16e10bc31d1fdf0"),
    ("google-5", ids.google_last_name, "Quinn", "quinn", ids.sha256_hex,
     "c512ca0c5c1e71be19f3356821e56732b5fb3ac894b0dbc5846d0b6920106fb3"),
    ("google-7", ids.email_google, "cloudy.sanfrancisco+shopping@gmail.com", "cloudysanfrancisco@gmail.com",
     ids.sha256_hex, "223ebda6f6889b1494551ba902d9d381daf2f642bae055888e96343d53e9f9c4"),
    ("google-8", ids.email_google, "user.name+NYC@Example.com", "user.name+nyc@example.com", ids.sha256_hex,
     "f109a2a632fbcea5fc82049f50beed3d8621bf9034399f437fb622222acccdac"),
    ("google-9", E, "(800)555-0100", "+18005550100", ids.sha256_hex,
     "fb4f73a6ec5fdb7077d564cdd22c3554b43ce49168550c3b12c547b78c517b30"),
    ("google-10", E, "+16502531234", "+16502531234", ids.sha256_hex,
     "e101d1333c2310c83a1f96c4e0c12aa18b151ee0baaa2db3998ee3797d74b685"),
    ("linkedin-1", ids.email_linkedin, " Jane.Doe@Example.com ", "jane.doe@example.com", ids.sha256_hex,
     "86e0b9e56c17cc4d12387e1949b85053fbe73bc3ce5a1188713a9d300cc6133d"),
    ("linkedin-2", ids.email_linkedin, " Jane.Doe@Example.com ", "jane.doe@example.com", ids.sha512_hex,
     "358c75d37759d9df9ed01d23ef5c11ddc7e69b5ee818e60c868cd271de55b54ce641d3028f46a5d5def6c5a938d251efb80ec33a307c321837a055734df1064c"),
    ("tiktok-1", ids.email_tiktok, "janedoe@gmail.com", "janedoe@gmail.com", ids.sha256_hex,
     "d6117306485ed0e50afab3ac871e98f81699151f30281527d63ff5f233656c69"),
    ("tiktok-4", meta_phone, "(657)777-0000", "16577770000", ids.sha256_hex,
     "8d7bdaaf75196f351d22942fc0dd79304ffabc3eaf3339460ef9da0773e3aec2"),
    ("snap-1", ids.email_basic, "Person@Example.com", "person@example.com", ids.sha256_hex,
     "542d240129883c019e106e3b1b2d3f3cb3537c43c425364de8e951d5a3083345"),
    ("snap-2", meta_phone, "+44 844 412 4653", "448444124653", ids.sha256_hex,
     "dc008fda46e2e64002cf2f82a4906236282d431c4f75e5b60bfe79fc48546383"),
    ("snap-3", ids.madid, "AECE52E7-03EE-455A-B3C4-E57283966239", "aece52e7-03ee-455a-b3c4-e57283966239",
     ids.sha256_hex, "e6a11334660bb4c2d68090399aaf9d80b433a569b993c5e32e6cad9bcf550e11"),
    ("ttd-email-hex", ids.email_uid2, "user@example.com", "user@example.com", ids.sha256_hex,
     "b4c9a289323b21a01c3e940f150eb9b8c542587f1abfd8f0e1cc1ffc5e475514"),
    ("ttd-email-b64", ids.email_uid2, "user@example.com", "user@example.com", ids.sha256_b64,
     "tMmiiTI7IaAcPpQPFQ65uMVCWH8av9jw4cwf/F5HVRQ="),
    ("ttd-phone-hex", E, "1 (234) 567-8901", "+12345678901", ids.sha256_hex,
     "10e6f0b47054a83359477dcb35231db6de5c69fb1816e1a6b98e192de9e5b9ee"),
    ("ttd-phone-b64", E, "1 (234) 567-8901", "+12345678901", ids.sha256_b64,
     "EObwtHBUqDNZR33LNSMdtt5cafsYFuGmuY4ZLenlue4="),
    ("mailchimp", ids.email_basic, "Jane.Doe@Example.com", "jane.doe@example.com", ids.md5_hex,
     "0cba00ca3da1b283a57287bcceb17e35"),
    ("twilio", E, "(415) 555-2671", "+14155552671", None, ""),
    ("braze-us", E, "4155552671", "+14155552671", None, ""),
]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "normalise", "raw", "normalised", "digest", "hashed"), VECTORS, ids=[v[0] for v in VECTORS]
)
def test_activation_published_vector(
    name: str,
    normalise: Callable[[str], str | None],
    raw: str,
    normalised: str,
    digest: Callable[[str], str] | None,
    hashed: str,
) -> None:
    assert normalise(raw) == normalised
    if digest is not None:
        assert ids.hash_or_none(normalised, digest) == hashed


@pytest.mark.parametrize(
    ("raw", "region", "e164"), [("2071838750", "GB", "+442071838750"), ("1155256325", "BR", "+551155256325")]
)
def test_activation_braze_e164_vectors_read_national_numbers_in_their_region(raw: str, region: str, e164: str) -> None:
    assert ids.canonical_phone(raw, region) == e164


def test_activation_meta_sdk_divergence_is_not_used() -> None:
    # 11b: the SDK's [^a-zA-Z] strip would give "milie"; the recommended rule keeps accents.
    assert ids.name_meta("Émilie") != "milie"
    assert ids.sha256_hex("milie") == "fbdfc4b88ba29caf2c30666d859efe48f2d5d41df0a97ee550a320cd53a777ad"


def test_activation_mailchimp_hash_needs_lowercase() -> None:
    assert ids.md5_hex("Jane.Doe@Example.com") == "a78ee7cf14fa53ba565aa0e1bdc87e0a"
    assert ids.mailchimp_subscriber_hash("Jane.Doe@Example.com") == "0cba00ca3da1b283a57287bcceb17e35"


def test_activation_tiktok_phone_is_hashed_without_plus() -> None:
    e164 = ids.canonical_phone("+374 93 828222")
    assert e164 == "+37493828222"
    assert ids.sha256_hex(e164) == "241371e614f8650dfae0f111361c69de1bb4829a72b71bb8044daae8b2e7791d"
    assert ids.phone_digits(e164) == "37493828222"


@pytest.mark.parametrize("raw", ["+0000000000", "", "   ", "abc"])
def test_activation_empty_phones_are_dropped_never_hashed(raw: str) -> None:
    assert ids.canonical_phone(raw) is None
    assert ids.hash_or_none(ids.phone_digits(ids.canonical_phone(raw))) is None


@pytest.mark.parametrize("normalise", [ids.email_basic, ids.email_google, ids.email_tiktok, ids.email_uid2])
def test_activation_empty_emails_are_dropped(normalise: Callable[[str], str | None]) -> None:
    assert normalise("   ") is None
    assert ids.hash_or_none(normalise("  ")) is None
    assert ids.hash_or_none("") is None  # never e3b0c442...


def test_activation_gmail_rules_only_where_the_platform_asks() -> None:
    gmail = "Jo.Ann+promo@gmail.com"
    assert ids.email_meta(gmail) == "jo.ann+promo@gmail.com"  # Meta: not documented, not applied
    assert ids.email_basic(gmail) == "jo.ann+promo@gmail.com"  # Snap
    assert ids.email_linkedin(gmail) == "jo.ann+promo@gmail.com"
    assert ids.email_google(gmail) == "joann@gmail.com"
    assert ids.email_google("Jo.Ann+x@googlemail.com") == "joann@googlemail.com"
    assert ids.email_google(gmail, gmail_rule=False) == "jo.ann+promo@gmail.com"
    assert ids.email_uid2(gmail) == "joann@gmail.com"
    assert ids.email_uid2("jo.ann+x@googlemail.com") == "jo.ann+x@googlemail.com"  # UID2: gmail.com only
    assert ids.email_tiktok("Jo.Ann+promo@example.com") == "joann@example.com"  # TikTok: every domain
    assert ids.email_google("jo.ann@gmailx.com") == "jo.ann@gmailx.com"  # exact domain match (spec §12.2)


def test_activation_prehashed_values_pass_through_anchored() -> None:
    hashed = ids.sha256_hex("a@b.c")
    assert ids.hash_or_none(hashed) == hashed
    assert ids.hash_or_none("x" + hashed) != "x" + hashed


def test_activation_one_canonical_phone_per_platform_strings() -> None:
    e164 = ids.canonical_phone("0044 207 123 4567")
    assert e164 == "+442071234567"
    assert ids.phone_digits(e164) == "442071234567"
