"""One HTTP call, its outcome classified: 2xx ok; 429, 408 and 5xx transient (honouring
Retry-After); other 4xx permanent. Connectors refine the classification from the body."""

from __future__ import annotations

import email.utils
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp

from cdp_activation.connectors.base import DeliveryError


@dataclass
class Response:
    status: int
    headers: Mapping[str, str]
    body: Any
    text: str


Classifier = Callable[[Response], DeliveryError | None]


def retry_after(headers: Mapping[str, str], body: Any = None) -> float | None:
    value = headers.get("Retry-After")
    if value:
        try:
            return max(0.0, float(value))
        except ValueError:
            parsed = email.utils.parsedate_to_datetime(value)
            return max(0.0, parsed.timestamp() - time.time())
    if isinstance(body, dict) and isinstance(body.get("retryAfter"), int | float):
        return float(body["retryAfter"])
    return None


def short(text: str, limit: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "…"


def default_error(resp: Response) -> DeliveryError | None:
    if 200 <= resp.status < 300:
        return None
    reason = f"HTTP {resp.status}: {short(resp.text)}"
    if resp.status in (408, 429) or resp.status >= 500:
        return DeliveryError(reason, permanent=False, retry_after=retry_after(resp.headers, resp.body))
    return DeliveryError(reason, permanent=True)


async def call(
    http: aiohttp.ClientSession,
    method: str,
    url: str,
    *,
    json_body: Any = None,
    data: bytes | None = None,
    headers: Mapping[str, str] | None = None,
    params: Mapping[str, str] | None = None,
    classify: Classifier | None = None,
) -> Response:
    hdrs = dict(headers or {})
    if json_body is not None:
        data = json.dumps(json_body, separators=(",", ":")).encode()
        hdrs.setdefault("Content-Type", "application/json")
    try:
        async with http.request(method, url, data=data, headers=hdrs, params=params) as raw:
            text = await raw.text()
            try:
                body = json.loads(text) if text else None
            except ValueError:
                body = None
            resp = Response(raw.status, raw.headers, body, text)
    except TimeoutError:
        raise DeliveryError(f"{method} timed out", permanent=False) from None
    except aiohttp.ClientError as exc:
        raise DeliveryError(f"{method} failed: {type(exc).__name__}", permanent=False) from None
    error = (classify or default_error)(resp)
    if error is not None:
        raise error
    return resp
