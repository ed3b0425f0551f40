"""The ``cdp`` command-line client: runs the embedded stack and talks gRPC to the services."""

from __future__ import annotations

__version__ = "0.1.0"
