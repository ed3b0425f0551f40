"""The shared kit of the CDP services.

Modules: ``envelope`` (event envelope, deterministic ids), ``streams`` (every stream
and consumer), ``eventlog`` (JetStream adapter), ``processor`` (the projector loop),
``store`` (SQLModel base and checkpoints), ``settings``, ``telemetry``,
``grpc_server``, ``errors``, ``runtime`` (serve/rebuild), ``natsserver``, ``keyring``
(envelope encryption under versioned master keys), ``urlmask`` (credentials inside URLs),
and ``testing`` (pytest fixtures).
"""

from cdp_kit.errors import (
    AlreadyExists,
    CdpError,
    Conflict,
    FailedPrecondition,
    InvalidInput,
    NotFound,
    Unavailable,
    Violation,
)

__all__ = [
    "AlreadyExists",
    "CdpError",
    "Conflict",
    "FailedPrecondition",
    "InvalidInput",
    "NotFound",
    "Unavailable",
    "Violation",
]
