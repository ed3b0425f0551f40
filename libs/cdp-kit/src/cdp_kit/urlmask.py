"""Credentials inside URLs, masked wherever a URL is shown or recorded.

``https://ann:pw@host/x?api_key=abc&page=2`` becomes ``https://****@host/x?api_key=****&page=2``:
the user information of any ``scheme://`` and the value of every query or fragment parameter
whose name says it is a credential (key, token, secret, password, auth, signature …). Works on a
bare URL or on free text quoting URLs (an error message, a log line) and runs in time linear in
the text: every match starts at a fixed marker and its parts are bounded.
"""

from __future__ import annotations

import re

MASK = "****"
CREDENTIAL_WORDS = ("key", "token", "secret", "password", "passwd", "pwd", "auth", "credential", "signature", "sig")

_USERINFO = re.compile(r"(?<![A-Za-z0-9+.-])([A-Za-z][A-Za-z0-9+.-]{0,30}://)([^/\s@?#]{1,512})@")
_PARAM = re.compile(r"([?&;#])([^=&;#?\s]{1,100})=([^&;#\s]*)")


def is_credential_name(name: str) -> bool:
    lowered = name.lower()
    return any(word in lowered for word in CREDENTIAL_WORDS)


def _param(match: re.Match[str]) -> str:
    sep, name, value = match.group(1), match.group(2), match.group(3)
    if value and is_credential_name(name):
        return f"{sep}{name}={MASK}"
    return match.group(0)


def mask_url_credentials(text: str) -> str:
    """``text`` with URL user information and credential-named parameters masked."""
    if "://" not in text and "=" not in text:
        return text
    text = _USERINFO.sub(lambda m: f"{m.group(1)}{MASK}@", text)
    return _PARAM.sub(_param, text)


def has_url_credentials(text: str) -> bool:
    return mask_url_credentials(text) != text
