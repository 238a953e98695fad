"""States (layer 0): tasks, pools, workers and how a pool closes, defined once.

Task life cycle, for every item of every job on every backend::

    SCHEDULED ──> PENDING ──> RUNNING ──> SUCCEEDED
        │            │           │ ├────> FAILED
        │            │           │ └────> RETRYING ──> PENDING (again, after a backoff)
        │            │           └──────> PENDING (its worker died: not the task's fault)
        └────────────┴───────────┴──────> CANCELLED
    SCHEDULED, PENDING and RETRYING may also go to FAILED without running (an unpicklable
    argument, an open circuit breaker, a pool that closed, an input that raised), and a
    PENDING task that failed so without running may be retried (PENDING -> RETRYING).

``SCHEDULED`` is work waiting for a time or for another task. A task re-queued after its
worker crashed goes back to PENDING without passing RETRYING: that does not use up its
``retries``. :data:`LEGAL` is the one table of allowed moves; the task table
(``_jobs.Job.transition``) refuses any other and publishes one event per move.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence

__all__ = [
    "FINAL_STATES",
    "LEGAL",
    "CloseMode",
    "KillKind",
    "PoolState",
    "TaskState",
    "WorkerState",
    "done_count",
]


class TaskState(enum.IntEnum):
    """The state of one task (one item of a map, or one ``run`` call)."""

    PENDING = 0
    RUNNING = 1
    SUCCEEDED = 2
    FAILED = 3
    RETRYING = 4
    CANCELLED = 5
    SCHEDULED = 6

    @property
    def is_final(self) -> bool:
        return self in FINAL_STATES


FINAL_STATES = frozenset({TaskState.SUCCEEDED, TaskState.FAILED, TaskState.CANCELLED})

_S = TaskState
LEGAL: frozenset[tuple[TaskState, TaskState]] = frozenset({
    (_S.SCHEDULED, _S.PENDING), (_S.SCHEDULED, _S.FAILED), (_S.SCHEDULED, _S.CANCELLED),
    (_S.PENDING, _S.RUNNING), (_S.PENDING, _S.FAILED), (_S.PENDING, _S.CANCELLED),
    (_S.PENDING, _S.RETRYING),
    (_S.RUNNING, _S.SUCCEEDED), (_S.RUNNING, _S.FAILED), (_S.RUNNING, _S.RETRYING),
    (_S.RUNNING, _S.CANCELLED), (_S.RUNNING, _S.PENDING),
    (_S.RETRYING, _S.PENDING), (_S.RETRYING, _S.FAILED), (_S.RETRYING, _S.CANCELLED),
})
"""Every allowed (old, new) move of a task; anything else is a bug in a backend."""


def done_count(counts: Sequence[int]) -> int:
    """Tasks in a final state, from counts indexed by :class:`TaskState`."""
    return counts[_S.SUCCEEDED] + counts[_S.FAILED] + counts[_S.CANCELLED]


class PoolState(enum.StrEnum):
    """The life cycle of a pool (any backend). A ``StrEnum``: it compares and prints as its value."""

    UNOPENED = "unopened"
    RUNNING = "running"
    CLOSING = "closing"
    CLOSED = "closed"
    BROKEN = "broken"


class WorkerState(enum.StrEnum):
    """A worker process's life cycle. ``READY`` means handshake done: it takes work
    (whether it is busy is told by its statistics, not by this state)."""

    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"
    DEAD = "dead"


class KillKind(enum.StrEnum):
    """Why the pool killed a worker: decides what happens to the tasks it was running."""

    START = "start"  # no ready handshake in time
    CLOSE = "close"  # the pool is closing (or broke): not the tasks' fault
    CANCEL = "cancel"  # a cancelled task ignored its interrupt
    TIMEOUT = "timeout"  # a task passed its timeout and ignored the interrupt
    MEMORY = "memory"  # over the hard memory limit
    STALL = "stall"  # no heartbeat, with replace_stalled=True


class CloseMode(enum.StrEnum):
    """How a pool closes: finish its work, cancel it, or SIGKILL everything now."""

    GRACEFUL = "graceful"
    CANCEL = "cancel"
    KILL = "kill"

