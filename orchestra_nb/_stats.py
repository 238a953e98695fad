"""Typed statistics (layer 0): a frozen snapshot of a pool, the same for every backend.

``Pool.statistics()`` returns a :class:`PoolStatistics`. The status views (``status()``,
``%orchestra status``, the progress widget, the JupyterLab panel) read only this snapshot
and the events, never a backend's private members.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from ._state import PoolState, TaskState, WorkerState, done_count

__all__ = ["JobStatistics", "PoolStatistics", "WorkerStatistics"]


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
                {"id": w.id, "pid": w.pid, "state": w.state.value, "activity": w.activity,
                 "job": w.job, "item": w.item,
                 "current": None if w.job is None else (w.job, w.item),
                 "tasks_done": w.tasks_done, "stalled": w.stalled,
                 "queued_chunks": w.queued_chunks, "cpu_percent": w.cpu_percent,
                 "memory_bytes": w.memory_bytes, "host": w.host}
                for w in self.workers
            ],
            "jobs": [
                {"id": j.id, "name": j.name, "total": j.total, "read": j.read,
                 "counts": {s.name: j.counts[s] for s in TaskState}, "done": j.done,
                 "elapsed": j.elapsed, "finished": j.finished, "cancelled": j.cancelled,
                 "paused": j.paused}
                for j in self.jobs
            ],
        }
