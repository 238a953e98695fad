"""Dispatch in the local pool (layer 2): the ready jobs, chunk sizing, sending chunks.

:class:`Dispatcher` owns the queue of jobs that may have work (``ready_jobs``, round robin),
the per-callable time estimates that size adaptive chunks (``fn_time``), the setup calls
every new worker replays first, and each job's large buffers, written once into pinned
segments as its chunks go out (``placements``, see ``_shared``; dropped when the job ends,
:meth:`Dispatcher.job_finished`). :meth:`Dispatcher.pump` hands chunks to ready workers while
they have room: a worker's assigned chunks first, then one chunk at a time from the ready
jobs (a suspect item alone on an idle worker). :meth:`Dispatcher.requeue` is the one way a
chunk goes back (after a crash, a retry's backoff...), and :meth:`Dispatcher.fail_item` the
one place a failed task is retried or failed by its job's retry policy, so that everything
that touches the queue stays here; recovery and the result path decide *what* goes back.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from . import _protocol as proto
from ._exceptions import CircuitOpenError, SerializationError
from ._jobs import Chunk, Job, adaptive_chunk_size, next_job_id
from ._procs import WorkerProc
from ._serialize import describe_unpicklable_argument, dumps
from ._shared import Placements, function_frames
from ._state import PoolState, TaskState

if TYPE_CHECKING:
    from ._ioloop import EngineLoop
    from ._pool import PoolOptions
    from ._pool_wire import Wire
    from ._pool_workers import PoolStatus, WorkerSet

__all__ = ["FINAL_BYTES", "NOT_RUN", "Dispatcher"]

TARGET_CHUNK_SECONDS = 0.02  # adaptive chunks aim at tens of ms: cheap dispatch, live progress
SHORT_CHUNK_SECONDS = 0.005  # below this, queue several chunks per worker to hide latency
# A chunk with less work than this is not split further to balance a map's end: its
# dispatch (a message each way, a wake-up) would cost more than the balance gains.
MIN_CHUNK_SECONDS = 0.001
PREFETCH = 4
FUNCTION_CACHE = 64  # callables cached per worker

# Reported to a circuit breaker for an admitted call that never ran: neutral, not a failure.
NOT_RUN = asyncio.CancelledError("the task did not run")
FINAL_BYTES = bytes([TaskState.SUCCEEDED, TaskState.FAILED, TaskState.CANCELLED])


class Dispatcher:
    def __init__(
        self, options: PoolOptions, loop: EngineLoop, wire: Wire, workers: WorkerSet,
        pool: PoolStatus, jobs: dict[int, Job], forget_job: Callable[[Job], None],
    ) -> None:
        self.options = options
        self.loop = loop
        self.wire = wire
        self.workers = workers
        self._procs = workers.procs  # the same dict for the pool's life: bound once
        self.pool = pool
        self.jobs = jobs  # the core's job table (read here; setup replays are added)
        self._forget_job = forget_job  # a setup replay's ``on_finished``
        self.ready_jobs: collections.deque[Job] = collections.deque()  # may have work
        self.fn_time: dict[bytes, float] = {}  # EMA of seconds per item, per callable
        self.setups: list[tuple[str, bytes, bytes, Any]] = []  # (name, digest, payload, item)
        # Per job: its large buffers, written once into pinned segments (see _shared).
        self.placements: dict[int, Placements] = {}
        self.placed_bytes = 0  # written into pinned segments by jobs that ended

    def assign_setups(self, w: WorkerProc) -> None:
        """``w`` is ready: the setup calls go first on it."""
        for name, digest, payload, item in self.setups:
            self._assign_setup(w, name, digest, payload, item)

    def add_setup(self, name: str, digest: bytes, payload: bytes, item: Any) -> None:
        """Replay ``fn(*args)`` on every worker that starts from now on, before other work."""
        self.setups.append((name, digest, payload, item))

    def _assign_setup(self, w: WorkerProc, name: str, digest: bytes, payload: bytes, item: Any) -> None:
        job = Job(next_job_id(), f"setup replay: {name}", digest, payload, iter([item]), 1, call=True)
        job.internal = True
        job.on_finished = self._forget_job
        self.jobs[job.id] = job
        chunk = job.take(1)
        assert chunk is not None
        chunk.target = w.id
        w.assigned.append(chunk)

    def pump(self) -> None:
        state = self.pool.state
        if state != PoolState.RUNNING and state != PoolState.CLOSING:
            return
        for w in list(self._procs.values()):
            if w.state != "ready":
                continue
            while w.assigned and len(w.inflight) < PREFETCH:
                if not self._send_chunk(w, w.assigned.popleft()):
                    break
            if w.retire:
                continue
            # No job has work waiting (after a result, most often): nothing to scan for.
            while self.ready_jobs and self._has_room(w):
                budget = self._task_budget(w)
                if budget == 0:
                    break  # its last tasks are out: it retires when they are done
                chunk = self._next_chunk(budget)
                if chunk is None:
                    break  # not return: later workers may still have assigned chunks
                if chunk.suspect and w.inflight:  # a suspect runs alone: an idle worker's
                    self.requeue(chunk.job, chunk, front=True)
                    break
                if not self._send_chunk(w, chunk):
                    break  # unreachable (exiting): retrying it here would spin forever

    def _has_room(self, w: WorkerProc) -> bool:
        if not w.inflight:
            return True
        if any(chunk.suspect for chunk in w.inflight):
            return False  # nothing queued behind (or before) an item that may kill it
        if len(w.inflight) >= PREFETCH:
            return False
        # Queue more behind a chunk only when chunks are short; long ones would imbalance.
        for chunk in w.inflight:
            est = self.fn_time.get(chunk.job.digest)
            if est is None or est * chunk.count > SHORT_CHUNK_SECONDS:
                if chunk.job.queue_one_more and est is not None and len(w.inflight) < 2:
                    continue  # one long chunk may wait behind another for this job
                return False
        return True

    def _task_budget(self, w: WorkerProc) -> int | None:
        """Tasks ``w`` may still be sent under max_tasks_per_worker (None: no limit)."""
        limit = self.options.max_tasks_per_worker
        if not limit:
            return None
        return max(0, limit - w.tasks_done - sum(c.count for c in w.inflight))

    def _next_chunk(self, budget: int | None = None) -> Chunk | None:
        """Round-robin over jobs with work: one chunk from the first, which goes to the back;
        at most ``budget`` tasks in it."""
        ready = self.ready_jobs
        while ready:
            job = ready.popleft()
            if job.paused:  # out of the queue until set_paused(..., False) puts it back
                job.queued = False
                continue
            size = self._chunk_size(job) if budget is None else min(budget, self._chunk_size(job))
            chunk = job.take(size) if job.id in self.jobs else None
            if chunk is None:
                job.queued = False
                job.check_done()
                continue
            if job.has_work():
                ready.append(job)
            else:
                job.queued = False
            return chunk
        return None

    def _chunk_size(self, job: Job) -> int:
        # Two chunks per worker to the end; never below MIN_CHUNK_SECONDS of work (without
        # that floor the chunks shrank geometrically: 12 for a 50-item map of tiny tasks).
        return adaptive_chunk_size(
            job, self.fn_time.get(job.digest), target_seconds=TARGET_CHUNK_SECONDS,
            balance_slots=2 * len(self._procs), floor_seconds=MIN_CHUNK_SECONDS,
        )

    def requeue(self, job: Job, chunk: Chunk, front: bool = False) -> None:
        """Put a chunk back in its job's queue (after a crash, a retry backoff...)."""
        if front:
            job.requeued.appendleft(chunk)
        else:
            job.requeued.append(chunk)
        self.mark_ready(job)

    def mark_ready(self, job: Job) -> None:
        if not job.queued and job.targets is None:
            job.queued = True
            self.ready_jobs.append(job)

    def requeue_open_items(self, job: Job, chunk: Chunk) -> None:
        """Re-queue the items of ``chunk`` one by one, except those already final (a
        cancelled call of a batch) or cancelled since: those are never run again."""
        for offset in reversed(range(chunk.count)):
            index = chunk.start + offset
            if job.states[index] in FINAL_BYTES:
                continue
            if index in job.cancelled_items:
                job.transition(index, 1, TaskState.CANCELLED)
                continue
            job.transition(index, 1, TaskState.PENDING)
            self.requeue(job, Chunk(job, index, [chunk.items[offset]]), front=True)

    def _send_chunk(self, w: WorkerProc, chunk: Chunk) -> bool:
        """Send ``chunk`` to ``w``; False if ``w`` could not be reached (chunk re-queued)."""
        job = chunk.job
        wire, workers = self.wire, self.workers
        if job.cancelled_items:
            trimmed = self._drop_cancelled_calls(job, chunk)
            if trimmed is None:
                return True
            chunk = trimmed
        if w.sys_path_version != workers.sys_path_version:
            version = workers.sys_path_version  # read first: the paths are at least as new
            if not wire.send(wire.data, w, proto.SysPath(tuple(workers.sys_path))):
                self.requeue(job, chunk, front=True)
                return False
            w.sys_path_version = version
        try:
            if chunk.payload is not None:  # pickled by the caller; a re-send pickles afresh
                (frames, names), chunk.payload = chunk.payload, None
            else:
                placed = self._placements(job)
                if placed is not None:
                    placed.begin()
                frames, names = proto.pickle_payload(dumps, chunk.items, wire.segments or wire.shm_dir, placed)
        except Exception as exc:
            self._unpicklable_chunk(job, chunk, exc)
            return True
        if job.digest in w.functions:
            w.functions.move_to_end(job.digest)
        else:
            forget: list[bytes] = []
            while len(w.functions) >= FUNCTION_CACHE:
                forget.append(w.functions.popitem(last=False)[0])
            fn_frames, fn_names = function_frames(job.fn_payload, job.fn_buffers, self._placements(job))
            try:
                wire.send(wire.data, w, proto.Define(job.digest, tuple(forget), fn_names), fn_frames)
            except OSError as exc:
                return self._unsendable_chunk(job, chunk, names, "function", exc)
            w.functions[job.digest] = None
        run = proto.Run(job.id, chunk.start, chunk.count, job.digest, job.star, job.call,
                        job.timeout, names)
        if job.circuit is not None and not self.admit(job, chunk):
            wire.discard(names)
            return True
        try:
            sent = wire.send(wire.data, w, run, frames)
        except OSError as exc:
            return self._unsendable_chunk(job, chunk, names, "arguments", exc)
        if not sent:
            wire.discard(names)
            self.requeue(job, chunk, front=True)
            if job.circuit is not None:
                job.circuit.record_failure(NOT_RUN)
            return False
        chunk.worker = w.id
        w.held.update(n for n in names if n is not None)
        chunk.started_at = time.monotonic()
        w.inflight.append(chunk)
        job.inflight[chunk.start] = chunk
        placed = self.placements.get(job.id)
        if placed is not None:  # pinned segments no chunk in flight nor recent names go
            placed.sent(chunk.start, names)
            placed.evict(job.inflight)
        job.transition(chunk.start, chunk.count, TaskState.RUNNING, w.id)
        return True

    def _placements(self, job: Job) -> Placements | None:
        if self.wire.shm_dir is None:
            return None
        placed = self.placements.get(job.id)
        if placed is None:
            placed = self.placements[job.id] = Placements(self.wire.shm_dir)
        return placed

    def job_finished(self, job: Job) -> None:
        """Every task of ``job`` is final: its pinned segments go (the workers unmap them),
        and a function of its own is forgotten (its estimate, the workers' cached copy)."""
        placed = self.placements.pop(job.id, None)
        if placed is None:
            return
        self.placed_bytes += placed.written_bytes
        pinned = tuple(placed.names)
        placed.close()  # every task of the job is final: no chunk will name them again
        if job.fn_buffers:  # its digest is the job's own: never used again
            self.fn_time.pop(job.digest, None)
        wire = self.wire
        for w in list(self._procs.values()):
            if job.fn_buffers:
                w.functions.pop(job.digest, None)
            if pinned and w.state == "ready":  # unmap them now (and forget the function)
                wire.send(wire.data, w, proto.Release(pinned))

    def close(self) -> None:
        for placed in self.placements.values():
            placed.close()
        self.placements.clear()

    def _drop_cancelled_calls(self, job: Job, chunk: Chunk) -> Chunk | None:
        """Calls of a batch cancelled before their chunk was sent are never sent: a Cancel on
        the control socket would race the Run on the data socket, and the worker could start
        the call first. Returns the first run of live calls to send (the later runs are
        re-queued in order), or None when every call of the chunk was cancelled."""
        cancelled = job.cancelled_items
        indices = range(chunk.start, chunk.start + chunk.count)
        if not any(index in cancelled for index in indices):
            return chunk
        if chunk.payload is not None:  # pre-pickled for a lone call: its segments go unused
            self.wire.discard(chunk.payload[1])
            chunk.payload = None
        runs: list[Chunk] = []
        live: list[Any] = []
        for offset, index in enumerate(indices):
            if index in cancelled:
                job.transition(index, 1, TaskState.CANCELLED, unfinished_only=True)
                if live:
                    runs.append(Chunk(job, index - len(live), live, chunk.target))
                    live = []
            else:
                live.append(chunk.items[offset])
        if live:
            runs.append(Chunk(job, chunk.start + chunk.count - len(live), live, chunk.target))
        for later in reversed(runs[1:]):
            self.requeue(job, later, front=True)
        job.progress()
        return runs[0] if runs else None

    def admit(self, job: Job, chunk: Chunk) -> bool:
        """Ask the job's circuit breaker; a rejected task fails fast, never reaching a worker."""
        try:
            job.circuit.before_call()
        except CircuitOpenError as exc:
            self.fail_item(job, chunk, 0, exc, None)
            job.progress()
            return False
        return True

    def _unsendable_chunk(
        self, job: Job, chunk: Chunk, names: tuple[str | None, ...], what: str, exc: OSError
    ) -> bool:
        """The chunk's message has a frame above the frame limit, and the file that would
        carry it could not be written (ENOSPC...): its tasks fail, naming that."""
        self.wire.discard(names)
        err = SerializationError(
            f"cannot send the {what} of {proto.task_range(chunk.start, chunk.count)} to "
            f"a worker: a frame carries at most {self.wire.frame_limit:,} bytes, and writing the "
            f"message to {self.wire.run_dir} failed: {type(exc).__name__}: {exc}"
        )
        self.fail_range(job, chunk, err)
        job.progress()
        return True

    def _unpicklable_chunk(self, job: Job, chunk: Chunk, exc: Exception) -> None:
        culprits = describe_unpicklable_argument(chunk.items, chunk.start, exc)
        for offset, item in enumerate(chunk.items):
            index = chunk.start + offset
            if index in culprits:
                job.fail(index, SerializationError(culprits[index]))
            else:
                self.requeue(job, Chunk(job, index, [item]))
        job.progress()

    def fail_item(
        self, job: Job, chunk: Chunk, offset: int, exc: BaseException, w: WorkerProc | None,
        duration: float | None = None, duration_bound: bool = False,
    ) -> None:
        """A task failed: retry it if its policy says so, else record the failure (with how
        long the attempt ran, when known)."""
        index = chunk.start + offset
        if job.state_of(index).is_final:
            return  # cancelled one by one meanwhile: that outcome stands
        attempt = job.attempts.get(index, 0) + 1
        job.attempts[index] = attempt
        worker_id = w.id if w is not None else None
        if not job.cancelled and job.retry.should_retry(exc, attempt):
            delay = job.retry.delay(attempt, self.options.retry_random)
            job.transition(index, 1, TaskState.RETRYING, worker_id, attempt, delay)
            item = chunk.items[offset]
            self.loop.call_later(delay, self._requeue_one, job, index, item)
            return
        job.fail(index, exc, worker_id, duration, duration_bound)

    def fail_range(
        self, job: Job, chunk: Chunk, exc: BaseException, ran: tuple[float, bool] | None = None,
        w: WorkerProc | None = None,
    ) -> None:
        """Fail every open item of ``chunk`` with ``exc``; ``ran``: how long the chunk ran
        (seconds, at most?) on worker ``w``, when it ran."""
        duration, bound = ran if ran is not None else (None, False)
        for offset in range(chunk.count):
            if job.states[chunk.start + offset] not in FINAL_BYTES:  # e.g. a cancelled call
                self.fail_item(job, chunk, offset, exc, w, duration, bound)

    def _requeue_one(self, job: Job, index: int, item: Any) -> None:
        if job.cancelled or job.state_of(index) != TaskState.RETRYING:
            return
        job.transition(index, 1, TaskState.PENDING)
        self.requeue(job, Chunk(job, index, [item]))
        self.pump()
