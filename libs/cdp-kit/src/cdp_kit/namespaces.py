"""Identity's namespaces, as another service learns them: the standard ones are in the kit
(``cdp_kit.identities.STANDARD``), custom ones are ``NamespaceCreated`` events on identity's
config log (``cdp.config.identity``), which a service reads as an input with ``NamespacesOfIdentity``
into its own ``kit_identity_namespace`` table. Namespaces are never removed and never change,
so what a service has read is right, only maybe not yet complete: ``learn`` waits until the
input has read everything identity's config log held when it was called.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import nats.errors
from sqlmodel import Field, Session, SQLModel, select

from cdp.identity.v1 import events_pb2 as identity_ev
from cdp_kit.envelope import Envelope, is_a, unpack
from cdp_kit.eventlog import LogMessage
from cdp_kit.identities import STANDARD_TYPES, Normaliser, type_of_name
from cdp_kit.processor import Processor, UnitOfWork, in_checkpoint
from cdp_kit.store import get_checkpoint
from cdp_kit.streams import ConsumerSpec


class NamespaceRow(SQLModel, table=True):
    """A custom namespace of identity's, by name, with its type (``NamespaceType`` as an int)."""

    __tablename__ = "kit_identity_namespace"

    name: str = Field(primary_key=True)
    type: int


NAMESPACE_TABLES = [SQLModel.metadata.tables[NamespaceRow.__tablename__]]


class NamespacesOfIdentity:
    """Input handler for ``cdp.config.identity``: keeps each custom namespace's type."""

    def __init__(self, on_change: Callable[[], None] | None = None) -> None:
        self.on_change = on_change

    def observe(self, session: Session, msg: LogMessage, env: Envelope) -> None:
        if is_a(env, identity_ev.NamespaceCreated):
            created = unpack(env, identity_ev.NamespaceCreated)
            session.merge(NamespaceRow(name=created.name, type=type_of_name(created.type)))
            if self.on_change is not None:
                self.on_change()

    def decide(self, uow: UnitOfWork, msg: LogMessage, env: Envelope) -> None:
        return None


def known_types(session: Session) -> dict[str, int]:
    """Every namespace's type: the standard ones and the custom ones read so far."""
    custom = {row.name: row.type for row in session.exec(select(NamespaceRow)).all()}
    return {**STANDARD_TYPES, **custom}


def normaliser(session: Session, *, phone_region: str) -> Normaliser:
    return Normaliser.make(known_types(session), phone_region=phone_region)


async def learn(processor: Processor, spec: ConsumerSpec, *, timeout_s: float = 5.0) -> bool:
    """Wait until the input ``spec`` has applied everything on its subject as of now. True when
    it has, False when ``timeout_s`` passed first (or the log could not be asked)."""
    try:
        last = await processor.eventlog.last_sequence(spec.stream.name, spec.filter_subject)
    except (nats.errors.Error, OSError, TimeoutError):  # an unreachable log: the caller decides with what it has
        return False
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        with processor.read() as session:
            if get_checkpoint(session, in_checkpoint(spec)) >= last:
                return True
        if loop.time() >= deadline:
            return False
        await asyncio.sleep(0.05)
