"""Recovery in the local pool (layer 2): crashes, cancels, deadlines, health.

:class:`Recovery` decides what becomes of work when something goes wrong, and watches for it:

* a worker exited (``recover``): each chunk it had is re-queued, split into single items
  (a suspect each, alone on a worker), failed, or cancelled, depending on how it died, how
  far the chunk got and how often its item already killed a worker;
* a job or one call was cancelled: the worker gets a ``Cancel`` (SIGINT in the task), and
  after ``cancel_grace`` a SIGKILL if the task ignored it; a task past its timeout is
  killed after ``timeout_grace`` (its worker is replaced);
* every quarter second (``_tick``): workers silent past ``stall_timeout`` are reported
  (and replaced if asked), memory limits are checked, freed result segments unmapped.

Putting work back goes through the dispatcher (``requeue``, ``fail_range``: the retry
policy); killing and replacing a worker through the worker set.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from . import _protocol as proto
from ._bus import EventBus
from ._events import WorkerStalled
from ._exceptions import MemoryLimitError, TaskTimeoutError, WorkerCrashedError
from ._jobs import Chunk, Job
from ._pool_dispatch import FINAL_BYTES, NOT_RUN
from ._procs import WorkerProc, crash_cause
from ._state import PoolState, TaskState

if TYPE_CHECKING:
    from ._ioloop import EngineLoop
    from ._pool import PoolOptions
    from ._pool_dispatch import Dispatcher
    from ._pool_wire import Wire
    from ._pool_workers import PoolStatus, WorkerSet

__all__ = ["Recovery"]

TICK = 0.25  # seconds between health checks


class Recovery:
    def __init__(
        self, options: PoolOptions, bus: EventBus, loop: EngineLoop, wire: Wire, workers: WorkerSet,
        dispatch: Dispatcher, pool: PoolStatus, jobs: dict[int, Job],
    ) -> None:
        self.options = options
        self.bus = bus
        self.loop = loop
        self.wire = wire
        self.workers = workers
        self._procs = workers.procs  # the same dict for the pool's life: bound once
        self.dispatch = dispatch
        self.pool = pool
        self.jobs = jobs  # the core's job table (read only)
        self._tick_handle: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self._tick_handle = self.loop.call_later(TICK, self._tick)

    def close(self) -> None:
        if self._tick_handle is not None:
            self._tick_handle.cancel()

    def task_started(self, w: WorkerProc, msg: proto.Started) -> None:
        """A task with a timeout started: arm the hard deadline behind the worker's own."""
        job = self.jobs.get(msg.job)
        if job is not None and job.timeout is not None:
            deadline = job.timeout + self.options.timeout_grace
            w.timers.append(self.loop.call_later(deadline, self._hard_timeout, w, job, msg.index))

    def recover(self, w: WorkerProc, returncode: int) -> None:
        """``w`` exited: settle every chunk it had, sent (the first one was running) or only
        assigned to it."""
        running = True
        sent = len(w.inflight)
        for i, chunk in enumerate(list(w.inflight) + list(w.assigned)):
            # Any chunk sent to it may have been running (a result sent just before the
            # exit may never arrive): with more than one item sent, nobody is blamed yet.
            suspect = i < sent and (sent > 1 or chunk.count > 1)
            job = chunk.job
            job.inflight.pop(chunk.start, None)
            # How long it ran, seen from here: exact for a lone item sent alone.
            ran = (time.monotonic() - chunk.started_at, sent > 1 or chunk.count > 1) if (
                running and i < sent and chunk.started_at) else None
            if job.circuit is not None and i < sent:  # admitted: report how the call ended
                job.circuit.record_failure(
                    WorkerCrashedError(w.id, w.pid, returncode, chunk.start) if running else NOT_RUN
                )
            if job.cancelled or (self.pool.state != PoolState.RUNNING and job.id not in self.jobs):
                self._cancel_range(job, chunk.start, chunk.count)
            elif chunk.count == 1 and chunk.start in job.cancelled_items:
                self._cancel_range(job, chunk.start, 1)  # a cancelled call: never re-run it
            elif w.kill_kind == "close":  # the pool killed it: not the task's fault, no crash
                job.transition(chunk.start, chunk.count, TaskState.PENDING, unfinished_only=True)
                self.dispatch.requeue(job, chunk, front=True)  # close() fails it with PoolClosedError
            elif chunk.target is not None:
                crashed = WorkerCrashedError(w.id, w.pid, returncode, chunk.start, crash_cause(w, returncode))
                self.dispatch.fail_range(job, chunk, crashed, ran, w)
            elif running and w.kill_kind == "timeout":
                exc: Exception = TaskTimeoutError(w.kill_reason)
                self.dispatch.fail_range(job, chunk, exc, ran, w)
            elif running and w.kill_kind == "memory":
                exc = MemoryLimitError(w.id, w.pid, returncode, chunk.start, w.kill_reason)
                self.dispatch.fail_range(job, chunk, exc, ran, w)
            elif suspect:
                # Which item killed it is unknown: rerun them one by one, each alone on its
                # worker, blaming none yet.
                job.transition(chunk.start, chunk.count, TaskState.PENDING, unfinished_only=True)
                for offset in reversed(range(chunk.count)):
                    index = chunk.start + offset
                    if index in job.cancelled_items:  # cancelled: not re-run
                        job.transition(index, 1, TaskState.CANCELLED, unfinished_only=True)
                        continue
                    if job.state_of(index).is_final:
                        continue
                    single = Chunk(job, index, [chunk.items[offset]])
                    single.suspect = True
                    self.dispatch.requeue(job, single, front=True)
            elif running:
                crashes = job.crashes.get(chunk.start, 0) + 1
                job.crashes[chunk.start] = crashes
                if crashes >= self.options.max_worker_crashes:
                    cause = crash_cause(w, returncode)
                    exc = WorkerCrashedError(w.id, w.pid, returncode, chunk.start, cause)
                    self.dispatch.fail_range(job, chunk, exc, ran, w)
                else:
                    job.transition(chunk.start, 1, TaskState.PENDING)
                    self.dispatch.requeue(job, chunk, front=True)
            elif any(job.states[chunk.start + k] in FINAL_BYTES for k in range(chunk.count)):
                self.dispatch.requeue_open_items(job, chunk)  # calls of it were cancelled meanwhile
            else:
                job.transition(chunk.start, chunk.count, TaskState.PENDING, unfinished_only=True)
                self.dispatch.requeue(job, chunk, front=True)
            running = False
            job.progress()
        w.inflight.clear()
        w.assigned.clear()

    def _cancel_range(self, job: Job, start: int, count: int) -> None:
        job.transition(start, count, TaskState.CANCELLED, unfinished_only=True)

    def cancel(self, job_id: int, kill: bool = False) -> None:
        job = self.jobs.get(job_id)
        if job is None:
            return
        if job.cancelled and not kill:
            return  # already done (e.g. again from the future's callback): no second SIGINT
        job.cancel_pending()
        job.future.cancel()
        touched: set[int] = set()
        for chunk in list(job.inflight.values()):
            w = self._procs.get(chunk.worker) if chunk.worker is not None else None
            if w is None or w.id in touched:
                continue
            touched.add(w.id)
            if kill:
                w.kill("cancel", f"job {job.id} was cancelled with kill=True")
                continue
            self.wire.send(self.wire.ctrl, w, proto.Cancel(job.id, -1))
            w.timers.append(self.loop.call_later(self.options.cancel_grace, self._escalate, w, job))
        job.progress()

    def cancel_item(self, job: Job, index: int) -> None:
        """Cancel one call of a batch of ``run`` calls, leaving the others alone."""
        if job.id not in self.jobs or index in job.cancelled_items:
            return
        job.cancelled_items.add(index)
        if index >= job.pulled:
            return  # not read from the batch yet: the dispatcher cancels it when it is
        state = job.states[index]
        if state in (TaskState.PENDING, TaskState.RETRYING):
            job.transition(index, 1, TaskState.CANCELLED)
        elif state == TaskState.RUNNING:
            for chunk in job.inflight.values():
                if chunk.start <= index < chunk.start + chunk.count and chunk.worker is not None:
                    w = self._procs.get(chunk.worker)
                    if w is not None:
                        self.wire.send(self.wire.ctrl, w, proto.Cancel(job.id, index))
                        w.timers.append(self.loop.call_later(
                            self.options.cancel_grace, self._escalate_item, w, job, index))
        job.progress()

    def _escalate(self, w: WorkerProc, job: Job) -> None:
        running = w.running_chunk
        if w.state != "dead" and running is not None and running.job is job:
            w.kill("cancel", f"a task of cancelled job {job.id} ignored the interrupt "
                             f"for {self.options.cancel_grace} s")

    def _escalate_item(self, w: WorkerProc, job: Job, index: int) -> None:
        running = w.running_chunk
        if (w.state != "dead" and running is not None and running.job is job
                and running.start <= index < running.start + running.count
                and job.states[index] == TaskState.RUNNING):
            w.kill("cancel", f"cancelled task {index} of job {job.id} ignored the "
                             f"interrupt for {self.options.cancel_grace} s")

    def kill_busy(self, job_id: int) -> None:
        """Hard-kill (and so respawn) the workers running tasks of ``job_id``."""
        job = self.jobs.get(job_id)
        if job is None:
            return
        for chunk in list(job.inflight.values()):
            w = self._procs.get(chunk.worker) if chunk.worker is not None else None
            if w is not None:
                w.kill("cancel", f"job {job.id} was interrupted twice")

    def _hard_timeout(self, w: WorkerProc, job: Job, index: int) -> None:
        running = w.running_chunk
        if w.state != "dead" and running is not None and running.job is job and running.start == index:
            w.kill("timeout",
                   f"task {index} exceeded its timeout of {job.timeout} s and did not respond "
                   f"to the interrupt within {self.options.timeout_grace} s; its worker was "
                   "killed and replaced")

    def _tick(self) -> None:
        now = time.monotonic()
        stall = self.options.stall_timeout
        for w in list(self._procs.values()):
            if w.state != "ready":
                continue
            silent = now - w.last_seen
            if stall is not None and silent > stall and not w.stalled:
                w.stalled = True
                self.bus.publish(WorkerStalled(w.id, w.pid, silent))
                replace = self.options.replace_stalled
                if replace or (replace is None and _is_stopped(w.pid)):
                    w.kill("stall", f"no heartbeat for {silent:.1f} s")
        self._check_memory()
        if self.wire.mappings is not None:
            self.wire.mappings.sweep()  # segments the workers deleted since the last read
        if self.pool.state in (PoolState.RUNNING, PoolState.CLOSING):
            self._tick_handle = self.loop.call_later(TICK, self._tick)

    def _check_memory(self) -> None:
        policy = self.options.memory
        if policy.soft_limit is None and policy.hard_limit is None:
            return
        import psutil  # only pools with a memory limit pay for it

        for w in list(self._procs.values()):
            if w.state != "ready":
                continue
            try:
                rss = psutil.Process(w.pid).memory_info().rss
            except psutil.Error:
                continue
            verdict = policy.verdict(rss)
            if verdict == "kill":
                limit = policy.hard_limit or 0  # a "kill" verdict implies a hard limit
                w.kill("memory", f"memory use {rss / 2**20:.0f} MiB passed the pool's "
                                 f"memory_limit of {limit / 2**20:.0f} MiB")
            elif verdict == "recycle" and not w.retire:
                w.retire = True
                if not w.inflight:
                    self.workers.recycle(w, "soft memory limit")
                elif self.pool.state == PoolState.RUNNING:
                    self.workers.spawn()


def _is_stopped(pid: int) -> bool:
    """Whether ``pid`` is stopped (state T) or traced (t), from /proc/<pid>/stat."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3] in (b"T", b"t")
