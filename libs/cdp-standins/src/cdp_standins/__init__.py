"""Stand-ins for the destination platforms (webhooks, Meta, Google, TikTok, Snap, LinkedIn,
Mailchimp, Braze, Twilio, Klaviyo, Salesforce Marketing Cloud, The Trade Desk): one loopback
aiohttp server that validates requests as each platform documents them, for the demo, the tests
and the benchmarks. Not product code: no service depends on this distribution, and no service
image ships it."""

from cdp_standins.platforms import Fault, LocalPlatforms

__all__ = ["Fault", "LocalPlatforms"]
