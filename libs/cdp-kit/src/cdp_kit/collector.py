"""Pausing CPython's cyclic garbage collector while a batch's objects are alive.

A processor's batch keeps hundreds of thousands of container objects alive until it commits
(the services' working sets: graphs, profiles, rows), none in reference cycles. Each automatic
collection in that time scans all of them: about a tenth of the CPU of identity's and
segmentation's processors. A working set pauses the collector when it is made and resumes it
when its transaction ends (commit or rollback); cyclic garbage made meanwhile waits at most one
transaction.
"""

from __future__ import annotations

import gc


class CollectorPause:
    """``pause`` turns the collector off; ``resume`` turns it back on, once, and only if this
    pause turned it off (a collector someone else turned off stays off)."""

    def __init__(self) -> None:
        self._paused = False

    def pause(self) -> None:
        if gc.isenabled():
            gc.disable()
            self._paused = True

    def resume(self) -> None:
        if self._paused:
            self._paused = False
            gc.enable()
