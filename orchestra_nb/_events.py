"""Typed events published on the pool's event bus (layer 0: plain frozen data).

Events describe *ranges* of tasks, not single tasks: a chunk of 5,000 items that finishes
together is one :class:`TaskStateChanged`, so that accounting every item costs nothing
measurable at a million items per second.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import TypeAlias

from ._state import TaskState, done_count

__all__ = [
    "CircuitChanged",
    "Event",
    "JobFinished",
    "JobPaused",
    "JobProgress",
    "JobStarted",
    "TaskOutput",
    "TaskStateChanged",
    "TasksCached",
    "WorkerExited",
    "WorkerSpawnFailed",
    "WorkerStalled",
    "WorkerStarted",
    "replay_counts",
]

@dataclasses.dataclass(frozen=True, slots=True)
class JobStarted:
    job_id: int
    name: str
    total: int | None  # None while the input iterable's length is unknown


@dataclasses.dataclass(frozen=True, slots=True)
class TaskStateChanged:
    """Tasks ``start .. start+count-1`` of job ``job_id`` moved from ``previous`` to ``state``.

    ``previous`` is None for tasks that just came into being (items read from the input).
    Every move of every task is published exactly once, so the events are a journal:
    applying them in order (:func:`replay_counts`) gives the job's exact counts. For
    ``RETRYING`` (always one task), ``attempt`` is the number of failures so far and
    ``delay`` the backoff in seconds before the task goes back to ``PENDING``.
    """

    job_id: int
    start: int
    count: int
    state: TaskState
    worker_id: int | None = None
    attempt: int | None = None
    delay: float | None = None
    previous: TaskState | None = None


def replay_counts(events: Iterable[object], job_id: int) -> list[int]:
    """Per-state counts (indexed by :class:`TaskState`) of job ``job_id``, rebuilt from its
    :class:`TaskStateChanged` events alone."""
    counts = [0] * len(TaskState)
    for event in events:
        if isinstance(event, TaskStateChanged) and event.job_id == job_id:
            counts[event.state] += event.count
            if event.previous is not None:
                counts[event.previous] -= event.count
    return counts


@dataclasses.dataclass(frozen=True, slots=True)
class JobProgress:
    """A snapshot of a job's counts, published whenever they change."""

    job_id: int
    total: int | None
    counts: tuple[int, ...]  # indexed by TaskState
    elapsed: float

    @property
    def done(self) -> int:
        return done_count(self.counts)


@dataclasses.dataclass(frozen=True, slots=True)
class JobFinished:
    job_id: int
    counts: tuple[int, ...]
    elapsed: float
    cancelled: bool


@dataclasses.dataclass(frozen=True, slots=True)
class JobPaused:
    """Job ``job_id`` was paused (``paused``: no new task of it is handed out) or resumed.

    Published by the backend when the change takes effect, so that no task of a paused job
    is published RUNNING between this event and the one that resumes it. Tasks already
    handed to a worker finish; on Dask, where RUNNING comes from the worker, a task handed
    out before the pause may still report RUNNING after it."""

    job_id: int
    paused: bool


@dataclasses.dataclass(frozen=True, slots=True)
class TaskOutput:
    """Text a task wrote to ``stream`` (``'stdout'`` or ``'stderr'``) in its worker."""

    job_id: int
    index: int
    worker_id: int
    stream: str
    text: str


@dataclasses.dataclass(frozen=True, slots=True)
class TasksCached:
    """``count`` items of a cached map came from the result store and never reached a
    worker. ``job_id`` is the job that computes the other items (it has ``total - count``
    tasks, and may have none); ``total`` is the number of items of the whole map. Published
    once, right after the job is created."""

    job_id: int
    count: int
    total: int


@dataclasses.dataclass(frozen=True, slots=True)
class WorkerStarted:
    worker_id: int
    pid: int


@dataclasses.dataclass(frozen=True, slots=True)
class WorkerExited:
    worker_id: int
    pid: int
    returncode: int | None
    reason: str  # "shutdown", "crashed", "killed: <why>", "recycled: <why>"


@dataclasses.dataclass(frozen=True, slots=True)
class WorkerSpawnFailed:
    """Starting a worker failed (out of descriptors or processes, ...): the pool has
    ``alive`` of its ``target`` workers and tries again in ``retry_in`` seconds, for as
    long as it is open."""

    error: str
    alive: int
    target: int
    retry_in: float


@dataclasses.dataclass(frozen=True, slots=True)
class WorkerStalled:
    """No heartbeat from a worker for ``silent_for`` seconds (its process is still alive)."""

    worker_id: int
    pid: int
    silent_for: float


@dataclasses.dataclass(frozen=True, slots=True)
class CircuitChanged:
    name: str
    old: str
    new: str
    failures: int


Event: TypeAlias = (
    JobStarted
    | TaskStateChanged
    | TasksCached
    | JobProgress
    | JobFinished
    | JobPaused
    | TaskOutput
    | WorkerStarted
    | WorkerExited
    | WorkerSpawnFailed
    | WorkerStalled
    | CircuitChanged
)
