"""TEMPORARY (layer 2): a :class:`Backend` dressed as the ``PoolCore`` that ``Pool`` and the
handles still call, so that ``Pool(backend="dask")`` works end to end before ``Pool`` takes
a backend itself. Delete this module when the centre's ``Pool(backend=...)`` lands.

Only the members the API and the handles use are here; they forward to the backend.
"""

from __future__ import annotations

import asyncio
from typing import Any

from .._jobs import Job
from .._spin import BusyPoll
from .._state import CloseMode, PoolState
from .._stats import PoolStatistics
from ._base import Backend

__all__ = ["BackendCore"]


class _Ready:
    def __init__(self, backend: Backend) -> None:
        self._backend = backend

    async def wait(self) -> None:
        await asyncio.wrap_future(self._backend.started())


class BackendCore:
    segments = None
    shm_dir = None
    data_fd = -1

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.bus = backend.events
        self.caller_poll = BusyPoll(0)  # no busy polling: results come from another thread
        self.all_ready = _Ready(backend)
        self.broken = None
        self._jobs: dict[int, Job] = {}

    def submit(self, job: Job) -> None:
        self._jobs[job.id] = job
        job.future.add_done_callback(lambda _: self._jobs.pop(job.id, None))
        self.backend.submit(job)

    def run_on_all(self, job: Job, replay: bool) -> None:
        self.backend.run_on_all(job, replay=replay)

    def cancel(self, job_id: int, kill: bool = False) -> None:
        job = self._jobs.get(job_id)
        if job is not None:
            self.backend.cancel(job, kill=kill)

    def cancel_item(self, job: Job, index: int) -> None:
        self.backend.cancel_item(job, index)

    @property
    def state(self) -> PoolState:
        return self.backend.state

    @property
    def target_workers(self) -> int:
        return self.backend.target_workers

    def resize(self, workers: int) -> None:
        self.backend.resize(workers)

    def statistics(self) -> PoolStatistics:
        return self.backend.statistics()

    def worker_pids(self) -> list[int]:
        return self.backend.worker_pids()

    async def close(self, mode: str = "graceful", timeout: float = 10.0) -> None:  # noqa: ASYNC109
        await asyncio.wrap_future(self.backend.close(CloseMode(mode), timeout))

    def __getattr__(self, name: str) -> Any:
        raise AttributeError(f"the {self.backend.name} backend has no {name!r} (yet)")
