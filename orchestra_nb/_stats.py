"""Typed statistics (layer 0): a frozen snapshot of a pool, the same for every backend.

``Pool.statistics()`` returns a :class:`PoolStatistics`. The status views (``status()``,
``%orchestra status``, the progress widget, the JupyterLab panel) read only this snapshot
and the events, never a backend's private members.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Mapping
from typing import Any

from ._state import PoolState, TaskState, WorkerState, done_count

__all__ = ["JobStatistics", "PoolStatistics", "ScheduledStatistics", "WorkerStatistics"]


@dataclasses.dataclass(frozen=True, slots=True)
class WorkerStatistics:
    """One worker. ``job``/``item``: what it runs now (None when idle). ``cpu_percent`` and
    ``memory_bytes`` are None where the backend cannot measure them."""

    id: int
    pid: int | None
    state: WorkerState
    job: int | None = None
    item: int | None = None
    tasks_done: int = 0
    stalled: bool = False
    queued_chunks: int = 0
    cpu_percent: float | None = None
    memory_bytes: int | None = None
    host: str | None = None

    @property
    def busy(self) -> bool:
        return self.job is not None

    @property
    def activity(self) -> str:
        """``busy`` or ``idle`` for a ready worker, else its state: what a view shows."""
        if self.state is WorkerState.READY:
            return "busy" if self.busy else "idle"
        return self.state.value


@dataclasses.dataclass(frozen=True, slots=True)
class JobStatistics:
    """One job. ``counts`` has every :class:`TaskState`; ``total`` is None while a lazy
    input has not been read to its end; ``read`` is how many items were read so far;
    ``paused``: no new task of it is handed out (``Pool.pause_job``, ``MapHandle.pause``)."""

    id: int
    name: str
    total: int | None
    read: int
    counts: Mapping[TaskState, int]
    elapsed: float
    finished: bool = False
    cancelled: bool = False
    paused: bool = False

    @property
    def done(self) -> int:
        return done_count([self.counts[s] for s in TaskState])

    @property
    def waiting(self) -> int:
        """Tasks not started yet: pending, retrying or scheduled."""
        c = self.counts
        return c[TaskState.PENDING] + c[TaskState.RETRYING] + c[TaskState.SCHEDULED]


@dataclasses.dataclass(frozen=True, slots=True)
class ScheduledStatistics:
    """One scheduled task (``run_after``, ``run_at``, ``every``) that will run on the pool.

    ``id`` and ``name`` are what ``Pool.cancel_scheduled`` takes. ``state`` is SCHEDULED
    while it waits for its next start, else its current run's state. ``next_start`` is
    wall-clock time (None when no start is due any more); ``interval`` is the period in
    seconds (None: it runs once); ``count`` the number of runs asked for (None: until
    cancelled); ``runs`` the runs started so far, ``skipped`` the due starts dropped because
    a run was still going."""

    id: int
    name: str
    state: TaskState
    next_start: datetime.datetime | None
    next_start_in: float | None
    interval: float | None
    count: int | None
    runs: int
    skipped: int
    overlap: str

    def as_dict(self) -> dict[str, Any]:
        """Plain data (the state as its name, ``next_start`` in ISO 8601)."""
        when = self.next_start
        return {
            "id": self.id,
            "name": self.name,
            "state": self.state.name,
            "next_start": None if when is None else when.isoformat(),
            "next_start_in": self.next_start_in,
            "interval": self.interval,
            "count": self.count,
            "runs": self.runs,
            "skipped": self.skipped,
            "overlap": self.overlap,
        }


@dataclasses.dataclass(frozen=True, slots=True)
class PoolStatistics:
    backend: str
    state: PoolState
    target_workers: int
    workers: tuple[WorkerStatistics, ...]
    jobs: tuple[JobStatistics, ...]
    queued: int  # tasks read but not sent to a worker yet, over all jobs
    bad_messages: int = 0
    # Below target_workers because starting workers fails: the last error, while it lasts.
    spawn_error: str | None = None
    # Work scheduled to run on this pool later (added by Pool.statistics; backends leave it empty).
    scheduled: tuple[ScheduledStatistics, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        """Plain data (enums as their names/values) for JSON, comms and ``status()``."""
        return {
            "backend": self.backend,
            "state": self.state.value,
            "target_workers": self.target_workers,
            "queued": self.queued,
            "bad_messages": self.bad_messages,
            "spawn_error": self.spawn_error,
            "workers": [
                {
                    "id": w.id,
                    "pid": w.pid,
                    "state": w.state.value,
                    "activity": w.activity,
                    "job": w.job,
                    "item": w.item,
                    "current": None if w.job is None else (w.job, w.item),
                    "tasks_done": w.tasks_done,
                    "stalled": w.stalled,
                    "queued_chunks": w.queued_chunks,
                    "cpu_percent": w.cpu_percent,
                    "memory_bytes": w.memory_bytes,
                    "host": w.host,
                }
                for w in self.workers
            ],
            "jobs": [
                {"id": j.id, "name": j.name, "total": j.total, "read": j.read,
                 "counts": {s.name: j.counts[s] for s in TaskState}, "done": j.done,
                 "elapsed": j.elapsed, "finished": j.finished, "cancelled": j.cancelled,
                 "paused": j.paused}
                for j in self.jobs
            ],
            "scheduled": [t.as_dict() for t in self.scheduled],
        }
