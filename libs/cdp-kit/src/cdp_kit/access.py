"""Who may do what over gRPC: the one check a servicer calls before a guarded operation.

The gRPC interceptor (``cdp_kit.grpc_auth``) authenticates every call and keeps its caller (a
principal and its role, ``cdp_kit.roles``) for the duration of the RPC. ``require_role`` asks it:
an authenticated caller may do what its role grants. With gRPC security off (a trusted loopback,
in-process tests) nobody is authenticated, and an operation that needs a role is refused unless
the deployment opted in for every caller with a setting (``CDP_ALLOW_RAW_REJECTS`` for raw
rejected values): default deny.
"""

from __future__ import annotations

from cdp_kit import grpc_auth
from cdp_kit.errors import PermissionDenied
from cdp_kit.roles import Role, grants


def require_role(context: object, role: Role, *, allowed_by_setting: bool) -> None:
    """Return when the caller of the current RPC may act as ``role``; raise ``PermissionDenied`` if not.

    ``allowed_by_setting``: with gRPC security off, the deployment lets every caller act as
    ``role`` for this operation. An authenticated caller's role decides alone.
    """
    del context  # the caller is the RPC's (cdp_kit.grpc_auth.caller), not read from the context
    who = grpc_auth.caller()
    if who is not None and who is not grpc_auth.ANONYMOUS:
        if grants(who.role, role):
            return
        raise PermissionDenied(f"this needs the {role} role; {who.name} has the {who.role} role")
    if not allowed_by_setting:
        raise PermissionDenied(f"this needs the {role} role (raw values are refused unless the deployment allows them)")
