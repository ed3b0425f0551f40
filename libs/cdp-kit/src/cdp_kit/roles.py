"""Who may call what: the role every gRPC method needs, in one table (docs/security.md lists it).

Roles are hierarchical, with one separate branch::

    admin  ⊇  operator  ⊇  reader
              operator  ⊇  publisher

* ``admin``: configuration (schemas, datasets, namespaces, segments, merge policies, computed
  attributes, destinations, activation plans, data labels and policies).
* ``operator``: running the platform (ingest files, evaluate segments, redrive, unlink) and
  reading raw rejected values (``cdp_kit.access.require_role`` in a servicer).
* ``reader``: profiles, members, graphs, status, and listings (masked where they hold values).
* ``publisher``: ``PublishEvents`` only (a collector's token); an operator may publish too.

Default deny: a method missing from :data:`METHOD_ROLES` is refused to everyone, and a unit test
enumerates every method of every service descriptor and fails when one is missing. Health is
open (probes carry no credentials); server reflection is for admins unless configured open.
"""

from __future__ import annotations

from typing import Final, Literal

Role = Literal["admin", "operator", "reader", "publisher"]

ADMIN: Final[Role] = "admin"
OPERATOR: Final[Role] = "operator"
READER: Final[Role] = "reader"
PUBLISHER: Final[Role] = "publisher"
ROLES: Final[tuple[Role, ...]] = (ADMIN, OPERATOR, READER, PUBLISHER)

# What a role includes (itself too).
GRANTS: Final[dict[Role, frozenset[Role]]] = {
    ADMIN: frozenset({ADMIN, OPERATOR, READER, PUBLISHER}),
    OPERATOR: frozenset({OPERATOR, READER, PUBLISHER}),
    READER: frozenset({READER}),
    PUBLISHER: frozenset({PUBLISHER}),
}

# Methods anyone may call, without credentials.
OPEN_SERVICES: Final[frozenset[str]] = frozenset({"grpc.health.v1.Health"})
REFLECTION_SERVICES: Final[frozenset[str]] = frozenset(
    {"grpc.reflection.v1alpha.ServerReflection", "grpc.reflection.v1.ServerReflection"}
)

_ING = "/cdp.ingest.v1.IngestService/"
_IDN = "/cdp.identity.v1.IdentityService/"
_SEG = "/cdp.segmentation.v1.SegmentationService/"
_ACT = "/cdp.activation.v1.ActivationService/"
_DLS = "/cdp.common.v1.DeadLetterService/"
_PRV = "/cdp.privacy.v1.PrivacyService/"
_ADM = "/cdp.common.v1.AdminService/"

METHOD_ROLES: Final[dict[str, Role]] = {
    # every service
    _ADM + "GetStatus": READER,
    _DLS + "ListDeadLetters": READER,  # excerpts masked; raw values need operator
    _DLS + "RedriveDeadLetters": OPERATOR,
    # ingest
    _ING + "CreateSchema": ADMIN,
    _ING + "GetSchema": READER,
    _ING + "ListSchemas": READER,
    _ING + "CreateDataset": ADMIN,
    _ING + "ListDatasets": READER,
    _ING + "IngestFile": OPERATOR,
    _ING + "IngestFileWithProgress": OPERATOR,
    _ING + "GetBatch": READER,  # rejected values masked; raw values need operator
    _ING + "ListBatchErrors": READER,  # idem
    _ING + "ListDeadLetters": READER,  # idem
    _ING + "PublishEvents": PUBLISHER,
    # identity
    _IDN + "Resolve": READER,
    _IDN + "GetGraph": READER,
    _IDN + "GetStats": READER,
    _IDN + "CreateNamespace": ADMIN,
    _IDN + "ListNamespaces": READER,
    _IDN + "Unlink": OPERATOR,
    # privacy (served by identity): requests and answers carry keyed hashes, never a plain identity
    _PRV + "Submit": OPERATOR,
    _PRV + "GetRequest": READER,
    _PRV + "ListRequests": READER,
    # segmentation
    _SEG + "CreateSegment": ADMIN,
    _SEG + "GetSegment": READER,
    _SEG + "ListSegments": READER,
    _SEG + "ListMembers": READER,
    _SEG + "GetProfile": READER,
    _SEG + "GetStats": READER,
    _SEG + "ExplainQuery": READER,
    _SEG + "EvaluateSegment": OPERATOR,
    _SEG + "SetMergePolicy": ADMIN,
    _SEG + "CreateComputedAttribute": ADMIN,
    _SEG + "ListComputedAttributes": READER,
    # activation
    _ACT + "CreateDestination": ADMIN,
    _ACT + "ListDestinations": ADMIN,  # a destination's configuration may hold its credentials
    _ACT + "Activate": ADMIN,
    _ACT + "ListPlans": READER,
    _ACT + "ListDeliveries": READER,
    _ACT + "ListDeadLetters": READER,  # masked like the other dead letters
    _ACT + "Redrive": OPERATOR,
    _ACT + "LabelData": ADMIN,
    _ACT + "CreatePolicy": ADMIN,
    _ACT + "ListGovernance": READER,
    _ACT + "RotateSecrets": ADMIN,  # re-encrypts every destination secret under the newest master key
}


def service_of(method: str) -> str:
    """``/pkg.Service/Method`` -> ``pkg.Service``."""
    return method.lstrip("/").split("/", 1)[0]


def grants(role: str, needed: Role) -> bool:
    """True when ``role`` includes ``needed``."""
    return needed in GRANTS.get(role, frozenset())  # type: ignore[call-overload]
