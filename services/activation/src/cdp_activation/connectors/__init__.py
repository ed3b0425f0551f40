"""Destination connectors: each turns an audience snapshot into what one destination expects."""

from cdp_activation.connectors.base import Audience, Connector, DeliveryResult, connector_for

__all__ = ["Audience", "Connector", "DeliveryResult", "connector_for"]
