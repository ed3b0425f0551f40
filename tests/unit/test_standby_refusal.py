"""What a standby (cdp_kit.lease) answers: status, health and each service's replica reads, and
``UNAVAILABLE`` naming the active instance for everything else; once active, everything."""

from __future__ import annotations

import pytest

from cdp.identity.v1 import identity_pb2
from cdp.segmentation.v1 import segmentation_pb2
from cdp_identity import main as identity_main
from cdp_kit.grpc_server import Registration
from cdp_kit.lease import Holder, Lease
from cdp_kit.runtime import _standby_refusal
from cdp_segmentation import main as segmentation_main

SEG = segmentation_pb2.DESCRIPTOR.services_by_name["SegmentationService"]
IDENTITY = identity_pb2.DESCRIPTOR.services_by_name["IdentityService"]


class NoLog:
    """The refusal never touches the event log."""


def lease() -> Lease:
    held = Lease(NoLog(), "segmentation", "segmentation-b", 10.0)  # type: ignore[arg-type]
    held.holder = Holder(revision=7, instance="segmentation-a", epoch=7)
    return held


def registration(full_name: str, reads: frozenset[str]) -> Registration:
    return Registration(full_name, lambda servicer, server: None, None, replica_reads=reads)


def test_a_standby_serves_its_replica_reads_and_refuses_the_rest_naming_the_active() -> None:
    held = lease()
    refusal = _standby_refusal("segmentation", held, [registration(SEG.full_name, segmentation_main.REPLICA_READS)])
    assert refusal is not None
    assert refusal(f"/{SEG.full_name}/GetProfile") is None
    assert refusal(f"/{SEG.full_name}/ListMembers") is None
    refused = refusal(f"/{SEG.full_name}/CreateSegment")
    assert refused is not None
    assert "standby" in refused
    assert "segmentation-a" in refused
    # Status, health and reflection are not the service's: always answered.
    assert refusal("/cdp.common.v1.AdminService/GetStatus") is None
    assert refusal("/grpc.health.v1.Health/Check") is None
    held.epoch = 9  # it won the lease, but has not fenced yet: still refused
    held._sent_at = held.clock()
    assert refusal(f"/{SEG.full_name}/CreateSegment") is not None
    held.serving = True  # fenced and recovered: an active
    assert refusal(f"/{SEG.full_name}/CreateSegment") is None
    held._sent_at = held.clock() - 9.0  # its last renewal is stale: writes wait
    assert refusal(f"/{SEG.full_name}/CreateSegment") is not None
    assert refusal(f"/{SEG.full_name}/GetProfile") is None


def test_without_a_lease_nothing_is_refused() -> None:
    assert _standby_refusal("segmentation", None, []) is None


@pytest.mark.parametrize(
    ("descriptor", "reads"),
    [(SEG, segmentation_main.REPLICA_READS), (IDENTITY, identity_main.REPLICA_READS)],
    ids=["segmentation", "identity"],
)
def test_every_replica_read_is_a_method_of_the_service(descriptor: object, reads: frozenset[str]) -> None:
    methods = {m.name for m in descriptor.methods}  # type: ignore[attr-defined]
    assert reads <= methods, f"not methods of the service: {sorted(reads - methods)}"
    assert not {m for m in reads if m.startswith(("Create", "Set", "Unlink", "Evaluate"))}
