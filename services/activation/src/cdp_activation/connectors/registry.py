"""The connector catalog: every connector by its name. It imports the connector modules; they
import only ``base`` (no module imports its own subclasses, so there is no import cycle)."""

from __future__ import annotations

import functools

from cdp_activation.connectors import ads, crm, email, file_export, webhook
from cdp_activation.connectors.base import Connector
from cdp_kit.errors import InvalidInput, Violation


@functools.cache
def catalog() -> dict[str, Connector]:
    connectors: list[Connector] = [
        file_export.FileExport(),
        webhook.Webhook(),
        webhook.SegmentShare(),
        ads.MetaCustomAudience(),
        ads.GoogleCustomerMatch(),
        ads.SnapAudience(),
        ads.TikTokAudience(),
        ads.LinkedInAudience(),
        email.Mailchimp(),
        email.Braze(),
        email.TwilioSms(),
        crm.Klaviyo(),
        crm.SalesforceMarketingCloud(),
        crm.TradeDeskCrm(),
    ]
    return {c.name: c for c in connectors}


def connector_for(name: str) -> Connector:
    connectors = catalog()
    if name not in connectors:
        known = ", ".join(sorted(connectors))
        raise InvalidInput(f"unknown connector {name!r}", [Violation("connector", "catalog", f"one of: {known}")])
    return connectors[name]
