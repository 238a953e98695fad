"""The local pool's result path (layer 2): a chunk's results, back into its job.

:class:`ResultPath` handles a worker's ``Result`` message: it takes the chunk off the
worker, unpickles the values (large arrays arrive as shared-memory segments, handed back to
the worker once the last array using one is dropped, from whatever thread drops it), feeds
the per-callable time estimate that sizes adaptive chunks, records successes and errors
(an error goes to its job's retry policy through the dispatcher), tells the job's circuit
breaker how each call ended, and retires a worker whose work is done. This is the hottest
path of the pool: one call per chunk, nothing per item but the job's own tables.
"""

from __future__ import annotations

import collections
import contextlib
import pickle
from typing import TYPE_CHECKING, Any

from . import _protocol as proto
from ._exceptions import SerializationError
from ._jobs import Chunk, Job, describe_input
from ._pool_dispatch import FINAL_BYTES, NOT_RUN
from ._procs import WorkerProc
from ._serialize import ErrorRecord, rebuild_exception
from ._state import TaskState

if TYPE_CHECKING:
    from ._ioloop import EngineLoop
    from ._pool import PoolOptions
    from ._pool_dispatch import Dispatcher
    from ._pool_wire import Wire
    from ._pool_workers import PoolStatus, WorkerSet

__all__ = ["ResultPath"]


class ResultPath:
    def __init__(
        self, options: PoolOptions, loop: EngineLoop, wire: Wire, workers: WorkerSet,
        dispatch: Dispatcher, pool: PoolStatus,
    ) -> None:
        self.options = options
        self.loop = loop
        self.wire = wire
        self.workers = workers
        self._procs = workers.procs  # the same dict for the pool's life: bound once
        self.dispatch = dispatch
        self.fn_time = dispatch.fn_time  # the dispatcher's estimates: updated here
        self.pool = pool  # counts a result of no chunk as a bad message
        self._released: collections.deque[tuple[int, str]] = collections.deque()
        self._release_scheduled = False

    def on_result(self, w: WorkerProc, msg: proto.Result, payload: list[Any]) -> None:
        """``w`` sent the results of one of its chunks (values, and the errors by offset)."""
        chunk = _pop_chunk(w, msg.job, msg.start)
        if chunk is None:
            names = tuple(n for n in msg.buffers if n is not None)
            if names:
                self.wire.send(self.wire.data, w, proto.Release(names))
            self.pool.bad_messages += 1
            return
        for timer in w.timers:
            timer.cancel()
        w.timers.clear()
        job = chunk.job
        job.inflight.pop(chunk.start, None)
        w.tasks_done += chunk.count
        try:
            values, errors = pickle.loads(
                payload[0],
                buffers=proto.read_buffers(
                    payload, msg.buffers, self.wire.mappings, self._result_releaser(w.id)
                ) if msg.buffers else None,
            )
        except Exception as exc:
            if chunk.count > 1:
                # One result is to blame, unknown which: run the tasks again one by one, so
                # that only the culprit fails (as for arguments that cannot be unpickled).
                self.dispatch.requeue_open_items(job, chunk)
            else:
                err = SerializationError(
                    f"cannot unpickle the result of task {chunk.start} in the pool: "
                    f"{type(exc).__name__}: {exc}"
                )
                self.dispatch.fail_range(job, chunk, err)
            job.progress()
            return
        if msg.count and msg.elapsed >= 0:
            per_item = msg.elapsed / msg.count
            old = self.fn_time.get(job.digest)
            # Noise only ever inflates a measure (a small chunk's fixed cost, a worker
            # preempted on a loaded machine): a lower one replaces the estimate at once, a
            # higher one moves it half-way. (Halving the error once per result, the chunks
            # of tiny tasks took several round trips to grow, and shrank again after each
            # preemption.)
            if old is None or per_item < old:
                self.fn_time[job.digest] = per_item
            else:
                self.fn_time[job.digest] = 0.5 * old + 0.5 * per_item
        start, count = chunk.start, chunk.count
        if job.circuit is not None:
            self._circuit_outcome(job, errors, count)
        errors = errors or {}  # None when every task of the chunk succeeded
        if not errors and not job.cancelled_items:
            job.succeed(start, values, w.id)
        elif errors and count > 1 and len(errors) == count and all(
            r.kind == "arguments" for r in errors.values()
        ):
            # The worker could not load the chunk's arguments: one item is to blame, unknown
            # which. Re-run them one by one so that only the culprit fails.
            for offset in reversed(range(count)):
                if job.states[start + offset] in FINAL_BYTES:  # a call cancelled meanwhile
                    continue
                job.transition(start + offset, 1, TaskState.PENDING)
                self.dispatch.requeue(job, Chunk(job, start + offset, [chunk.items[offset]]), front=True)
        else:
            for offset in range(count):
                if offset not in errors and job.states[start + offset] not in FINAL_BYTES:
                    job.succeed(start + offset, [values[offset]], w.id)
            for offset, record in errors.items():
                if job.states[start + offset] not in FINAL_BYTES:
                    self._on_error(job, chunk, offset, record, w)
        job.progress()
        if w.retire and not w.inflight:
            self.workers.stop(w)
        elif self.options.max_tasks_per_worker and w.tasks_done >= self.options.max_tasks_per_worker:
            w.retire = True
            if not w.inflight:
                self.workers.recycle(w, "max_tasks_per_worker reached")

    def _circuit_outcome(self, job: Job, errors: dict[int, ErrorRecord] | None, count: int) -> None:
        breaker = job.circuit
        for offset in range(count):
            record = errors.get(offset) if errors else None
            if record is None:
                breaker.record_success()
            elif record.kind == "cancelled":
                breaker.record_failure(NOT_RUN)
            else:
                breaker.record_failure(rebuild_exception(record, ""))

    def _on_error(self, job: Job, chunk: Chunk, offset: int, record: ErrorRecord, w: WorkerProc) -> None:
        index = chunk.start + offset
        if record.kind == "cancelled":
            job.results[index] = None
            job.transition(index, 1, TaskState.CANCELLED, w.id)
            return
        note = (f"raised in worker {w.id} (pid {w.pid}) while running task {index} of job "
                f"{job.id} ({job.name!r}), input {describe_input(job, chunk.items[offset])}")
        exc = rebuild_exception(record, note)
        self.dispatch.fail_item(job, chunk, offset, exc, w, record.duration, record.duration_bound)

    def _result_releaser(self, worker_id: int) -> Any:
        """A callback for result segments of ``worker_id``: called in whatever thread drops
        the last array using one, it hands the name to the I/O thread."""

        def release(name: str) -> None:
            self._released.append((worker_id, name))
            if not self._release_scheduled:
                self._release_scheduled = True
                with contextlib.suppress(RuntimeError):  # the loop is closed: nothing to do
                    self.loop.call_soon_threadsafe(self._send_releases)

        return release

    def _send_releases(self) -> None:
        self._release_scheduled = False
        by_worker: dict[int, list[str]] = {}
        while self._released:
            worker_id, name = self._released.popleft()
            by_worker.setdefault(worker_id, []).append(name)
        for worker_id, names in by_worker.items():
            w = self._procs.get(worker_id)
            if w is not None and w.state in ("ready", "stopping"):
                self.wire.send(self.wire.data, w, proto.Release(tuple(names)))


def _pop_chunk(w: WorkerProc, job_id: int, start: int) -> Chunk | None:
    for i, chunk in enumerate(w.inflight):
        if chunk.job.id == job_id and chunk.start == start:
            del w.inflight[i]
            return chunk
    return None
