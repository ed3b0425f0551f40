"""Who may do what over gRPC: the one check every servicer calls before a guarded operation.

Roles (DESIGN: admin, operator, reader, publisher) will come from gRPC authentication: an
interceptor will put the authenticated caller's role in the call context, and ``require_role``
will compare it with what the operation needs. Until that lands no caller has a role, so an
operation that needs one is refused (PERMISSION_DENIED) unless the deployment opted in for every
caller with a setting (``CDP_ALLOW_RAW_REJECTS`` for raw rejected values). Callers keep calling
``require_role`` alike; only this module changes when roles arrive.
"""

from __future__ import annotations

from typing import Literal

from cdp_kit.errors import PermissionDenied

Role = Literal["admin", "operator", "reader", "publisher"]


def require_role(context: object, role: Role, *, allowed_by_setting: bool) -> None:
    """Return when the caller of ``context`` may act as ``role``; raise ``PermissionDenied`` if not.

    ``allowed_by_setting``: the deployment lets every caller act as ``role`` for this operation
    (the only grant there is before gRPC authentication lands; then the caller's role decides).
    """
    del context  # read once the authentication interceptor puts the caller's role in it
    if not allowed_by_setting:
        raise PermissionDenied(f"this needs the {role} role (raw values are refused unless the deployment allows them)")
