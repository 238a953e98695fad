"""Task states (layer 0): the life cycle every item of every job goes through.

::

    PENDING ──> RUNNING ──> SUCCEEDED
       │           │ ├────> FAILED
       │           │ └────> RETRYING ──> PENDING (again, after a backoff)
       └───────────┴──────> CANCELLED

A task re-queued after its worker crashed goes back to PENDING without passing RETRYING:
that is not the task's fault and does not use up its ``retries``.
"""

from __future__ import annotations

import enum

__all__ = ["FINAL_STATES", "TaskState"]


class TaskState(enum.IntEnum):
    """The state of one task (one item of a map, or one ``run`` call)."""

    PENDING = 0
    RUNNING = 1
    SUCCEEDED = 2
    FAILED = 3
    RETRYING = 4
    CANCELLED = 5

    @property
    def is_final(self) -> bool:
        return self in FINAL_STATES


FINAL_STATES = frozenset({TaskState.SUCCEEDED, TaskState.FAILED, TaskState.CANCELLED})
