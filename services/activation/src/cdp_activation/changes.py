"""What changed since the planner last looked, so a planning round reads only the members whose
wanted state may differ (``cdp_activation.delivery``) instead of every plan's whole audience.

The inputs and the delivery log's folds note, in the transaction that changes the store, which
profile ids a change touches (a membership, a fragment, a merge or split, a delivered batch, an
erasure) or that everything must be planned again (a new merge policy, plan, destination,
label or policy). The notes reach the tracker only once that transaction commits
(a rolled-back batch notes nothing, and is applied again), so whatever the planner takes is
already visible to its next read: a note is never consumed before the change it names. Noting
too much costs a lookup; noting too little would lose a change, so when in doubt a fold notes.

A tracker starts with ``everything`` set: the first round after a start plans every plan whole.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from sqlalchemy import event
from sqlmodel import Session

_NOTES = "act_planner_notes"


@dataclass
class _Note:
    profiles: set[str] = field(default_factory=set)
    delivered: set[str] = field(default_factory=set)
    everything: bool = False


class Changes:
    """Profile ids changed since the last ``take``, and whether every plan must be planned whole."""

    def __init__(self) -> None:
        self.profiles: set[str] = set()
        # Profiles of delivered batches: no longer in flight. The planner looks again only at
        # those whose change it deferred while their batch was in flight.
        self.delivered: set[str] = set()
        self.everything = True

    def note(
        self,
        session: Session,
        profiles: Iterable[str] = (),
        *,
        delivered: Iterable[str] = (),
        everything: bool = False,
    ) -> None:
        """Note a change made in ``session``'s transaction (kept once it commits)."""
        notes: dict[int, tuple[Changes, _Note]] = session.info.setdefault(_NOTES, {})
        _, pending = notes.setdefault(id(self), (self, _Note()))
        pending.profiles.update(profiles)
        pending.delivered.update(delivered)
        pending.everything = pending.everything or everything

    def take(self) -> tuple[set[str], set[str], bool]:
        """The changes noted so far (committed), forgetting them: changed profiles, delivered
        profiles, and whether every plan is to be planned whole."""
        taken = self.profiles, self.delivered, self.everything
        self.profiles, self.delivered, self.everything = set(), set(), False
        return taken

    def put_back(self, profiles: Iterable[str], delivered: Iterable[str], everything: bool) -> None:
        """Keep changes (committed, or taken by a round that did not finish). While every plan is
        to be planned whole no profile id is kept: a start's catch-up or a rebuild notes every
        profile it replays, and would hold them all in memory for nothing."""
        if self.everything or everything:
            self.everything = True
            self.profiles.clear()
            self.delivered.clear()
            return
        self.profiles.update(profiles)
        self.delivered.update(delivered)


@event.listens_for(Session, "after_commit")
def _committed(session: Session) -> None:
    notes: dict[int, tuple[Changes, _Note]] = session.info.pop(_NOTES, {})
    for tracker, pending in notes.values():
        tracker.put_back(pending.profiles, pending.delivered, pending.everything)


@event.listens_for(Session, "after_rollback")
def _rolled_back(session: Session) -> None:
    session.info.pop(_NOTES, None)
