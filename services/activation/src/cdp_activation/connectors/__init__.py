"""Destination connectors: each turns a micro-batch into what one destination expects."""

from cdp_activation.connectors.base import (
    Action,
    Batch,
    Connector,
    ConnectorConfig,
    DeliveryError,
    Record,
    SendContext,
    SendResult,
)
from cdp_activation.connectors.registry import catalog, connector_for

__all__ = [
    "Action",
    "Batch",
    "Connector",
    "ConnectorConfig",
    "DeliveryError",
    "Record",
    "SendContext",
    "SendResult",
    "catalog",
    "connector_for",
]
