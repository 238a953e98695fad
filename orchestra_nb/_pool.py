"""The local pool's engine (layer 2): ``PoolCore`` wires its parts and owns the job table.

Everything here runs with the engine lock held (``_ioloop``): on the one I/O thread, or on
a caller's thread that borrowed the engine while the I/O thread waited for events (a loop
awaiting ``run()`` sends its calls and reads its results itself). Never two at once, and
nothing else touches the process table, the sockets or a job's tables. Data flow::

    caller thread                 I/O thread (PoolCore and its parts)         worker process
    ─────────────                 ───────────────────────────────────         ──────────────
    pool.map(f, xs) ──Job──> submit ─> jobs ─> pump ─ Define(f) ──┐
      (f pickled here:                 │        take chunk        ├─ data ROUTER ═══> main thread
       errors raise at once)           │        (adaptive size)  ─┘  (ipc, HMAC)        runs items
                                       │                                                  │
    handle.future <── set_result ── on_result <───── Result(values, errors) ─────────────┘
      await / result()                 │  retries (backoff) ──> requeued
                                       │  events ──> EventBus ──> widgets, iterators
    handle.cancel() ─────────────> cancel ─ Cancel ─ ctrl ROUTER ═══> control thread ─SIGINT─┘
                                       │  after cancel_grace: SIGKILL + respawn
    pidfd readable (process exit) ─> reap, recover: re-queue the dead worker's chunks, respawn

Crash detection is by process exit (a pidfd in the loop), never by a timeout. A chunk that
was *running* on a worker that died is split into single items and re-queued; an item that
dies alone on ``max_worker_crashes`` workers fails with ``WorkerCrashedError``. Chunks that
were only queued on the dead worker are re-queued as they are.

The parts, each owning its state; an arrow is "holds and calls", one way (built from the
bottom up). A part reads the core's ``state`` (and may count a bad message) through
``_pool_workers.PoolStatus``, and calls up only through the functions it was given: the
wire's "a socket has input" and the reader's drain are ``PoolCore._drain``, the worker
set's "a worker exited" is ``PoolCore._worker_exited``::

    PoolCore (_pool): lifecycle, the job table, reading the sockets (_drain), routing messages
      │
      ├──> ResultReaders (backends/_caller): who reads the data socket; callers' busy polls
      ├──> Recovery (_pool_recovery): crashes, cancels + escalation, timeouts, stalls, memory
      ├──> ResultPath (_pool_results): a Result back into its job; segment releases
      │        │  both ──> Dispatcher: requeue / fail_item (retry policy)
      │        ▼
      ├──> Dispatcher (_pool_dispatch): ready jobs, chunk sizing, pump, sending; requeue, retries;
      │        │   a job's pinned segments (placements)
      │        │
      │        ▼
      ├──> WorkerSet (_pool_workers): the processes: spawn + backoff, ready, stop, resize, reap
      │        │
      │        ▼
      └──> Wire (_pool_wire): run directory, key, the data and ctrl ROUTERs, shared memory

    A message in: Wire's socket ─> PoolCore._drain ─> _handle ─┬─ Result ──> ResultPath
                                                               ├─ Started ─> Recovery (deadline)
                                                               └─ Ready ───> WorkerSet, Dispatcher
    A worker out: WorkerSet's pidfd ─> PoolCore._worker_exited ─> WorkerSet.reap ─> Recovery.recover
                  ─> WorkerSet.replenish ─> Dispatcher.pump

The hot paths bind what they call once: the core keeps ``_pump`` and ``_on_result`` bound,
and every part keeps the worker set's ``procs`` dict (one dict for the pool's life).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import zmq

from . import _protocol as proto
from ._bus import EventBus
from ._circuit import CircuitState
from ._events import TaskOutput
from ._exceptions import (
    BrokenPoolError,
    PoolClosedError,
    WorkerCrashedError,
    describe_exit,
)
from ._jobs import Job
from ._policy import MemoryPolicy
from ._pool_dispatch import Dispatcher
from ._pool_recovery import Recovery
from ._pool_results import ResultPath
from ._pool_wire import Wire
from ._pool_workers import MAX_START_FAILURES, WorkerSet
from ._procs import (
    START_DESCRIPTORS,
    WorkerProc,
    check_descriptors,
    install_sigterm_cleanup,
    register_run_dir,
)
from ._spin import DEFAULT_BUSY_POLL
from ._state import PoolState, TaskState, WorkerState
from ._stats import PoolStatistics, WorkerStatistics
from .backends._caller import ResultReaders

if TYPE_CHECKING:
    from ._ioloop import EngineLoop

__all__ = ["PoolCore", "PoolOptions", "PoolState"]

DRAIN_BUDGET = 64  # messages handled per I/O callback before other callbacks get a turn


@dataclasses.dataclass(frozen=True, slots=True)
class PoolOptions:
    workers: int
    start_timeout: float = 30.0
    heartbeat: float = 0.5
    stall_timeout: float | None = 10.0
    # None: replace a stalled worker only if it is stopped (SIGSTOP, a debugger), not one
    # busy in native code that holds the GIL; True: any stalled worker; False: report only.
    replace_stalled: bool | None = None
    max_worker_crashes: int = 2
    cancel_grace: float = 1.0
    timeout_grace: float = 1.0
    max_result_bytes: int | None = None
    memory: MemoryPolicy = MemoryPolicy()  # noqa: RUF009  # frozen, so sharing one is safe
    max_tasks_per_worker: int | None = None
    python: str = sys.executable
    env: tuple[tuple[str, str], ...] = ()
    threads_per_worker: int = 1
    busy_poll: float = DEFAULT_BUSY_POLL  # seconds: see _spin.BusyPoll
    # The jitter source of retry backoffs, in [0, 1): injectable so a schedule is exact in tests.
    retry_random: Callable[[], float] = random.random


class PoolCore:
    """The engine behind ``LocalBackend``, and the one object it talks to: it builds the
    parts (see the module docstring), starts and closes the pool, keeps the job table, and
    reads and routes what the workers send."""

    def __init__(self, options: PoolOptions, bus: EventBus, loop: EngineLoop) -> None:
        self.options = options
        self.bus = bus
        self.loop = loop
        self.state = PoolState.UNOPENED
        self.wire = Wire(loop, options.max_result_bytes, self._drain)
        self.workers = WorkerSet(options, bus, loop, self.wire, self, self._worker_exited,
                                 self._respawned)
        self._procs = self.workers.procs  # bound once: looked up for every message
        self.jobs: dict[int, Job] = {}
        self.dispatch = Dispatcher(options, loop, self.wire, self.workers, self, self.jobs,
                                   self._forget_job)
        self._pump = self.dispatch.pump  # bound once: called after every read
        self.results = ResultPath(options, loop, self.wire, self.workers, self.dispatch, self)
        self._on_result = self.results.on_result  # bound once: called for every result
        self.recovery = Recovery(options, bus, loop, self.wire, self.workers, self.dispatch, self,
                                 self.jobs)
        self.readers: ResultReaders = ResultReaders(loop, self.wire, self, options.busy_poll, self._drain)
        self.bad_messages = 0
        self.broken: BrokenPoolError | None = None
        self.closed_event: asyncio.Event = asyncio.Event()
        install_sigterm_cleanup()  # here, on the caller's (usually the main) thread

    # --- lifecycle --------------------------------------------------------------------

    def start(self) -> None:
        check_descriptors(START_DESCRIPTORS, "a pool")
        try:
            self.wire.open()
        except BaseException:  # out of descriptors: nothing of this pool may stay behind
            self.state = PoolState.CLOSED
            self.closed_event.set()
            raise
        register_run_dir(self.wire.run_dir, self._emergency_stop)
        self.state = PoolState.RUNNING
        self.workers.replenish()
        self.recovery.start()

    def _emergency_stop(self) -> None:
        """The process is being terminated (SIGTERM) with no time for a shutdown: SIGKILL
        the workers and delete the run directory. Runs in a signal handler."""
        self.workers.kill_all("close", "the pool's process was terminated")
        self.wire.owner.remove()

    async def close(self, mode: str = "graceful", timeout: float = 10.0) -> None:  # noqa: ASYNC109
        """``graceful``: finish all jobs; ``cancel``: cancel them; ``kill``: SIGKILL now."""
        if self.state in (PoolState.CLOSED, PoolState.UNOPENED):
            self.state = PoolState.CLOSED
            self.closed_event.set()
            return
        if self.state == PoolState.CLOSING:
            await self.closed_event.wait()
            return
        self.state = PoolState.CLOSING
        if mode == "cancel":
            for job in list(self.jobs.values()):
                self.recovery.cancel(job.id, kill=False)
        # Shutdown polls the tables (ASYNC110): they change in many places, and an Event for
        # each condition would cost every hot path something to serve this one-off wait.
        if mode in ("graceful", "cancel"):
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(None if mode == "graceful" else timeout):
                    while any(not j.internal for j in self.jobs.values()):  # noqa: ASYNC110
                        await asyncio.sleep(0.01)
        for w in list(self.workers.procs.values()):
            if mode == "kill":
                w.kill("close", "pool killed")
            elif w.state != "dead":
                self.workers.stop(w)
        deadline = self.loop.time() + timeout
        while self.workers.procs and self.loop.time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        for w in list(self.workers.procs.values()):
            w.kill("close", "did not exit in time")
        while self.workers.procs and self.loop.time() < deadline + 5:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        for job in list(self.jobs.values()):
            job.fail_all(PoolClosedError("the pool was shut down"))
        self._teardown()

    def _teardown(self) -> None:
        self.recovery.close()
        self.workers.close()
        self.readers.close()
        self.dispatch.close()
        self.wire.close()
        self.state = PoolState.CLOSED
        self.closed_event.set()

    def resize(self, workers: int) -> None:
        if self.state != PoolState.RUNNING:
            raise self.broken or PoolClosedError(f"cannot resize a pool that is {self.state.value}")
        if workers < 1:
            raise ValueError(f"a pool needs at least 1 worker, got {workers}")
        self.workers.resize(workers)
        self.dispatch.pump()

    # --- messages in ------------------------------------------------------------------

    def _drain(self, sock: zmq.Socket[Any]) -> None:
        # A ZeroMQ FD is edge-triggered: read while the socket reports input, but at most
        # DRAIN_BUDGET messages per call, then let the loop run other callbacks (a cancel,
        # a timer, a streaming consumer registering) and come back: a fast map would
        # otherwise keep the I/O thread in here until it ends.
        handled = False
        wire, procs, handle = self.wire, self._procs, self._handle  # read once, not per message
        if sock is wire.data:
            wire.data_drain_due = False  # this read covers the check a send deferred
        try:
            for _ in range(DRAIN_BUDGET):
                if not proto.has_input(sock):
                    break
                frames = proto.recv_frames(sock, _NOBLOCK)
                ident = frames[0]
                try:
                    msg, payload = proto.decode_message(wire.key, frames[1:], wire.run_dir)
                except proto.BadSignature:
                    self.bad_messages += 1
                    continue
                w = procs.get(_worker_id(ident))
                if w is not None and w.ident != ident:  # an impostor, or a stale token
                    self.bad_messages += 1
                    continue
                if w is None:
                    if isinstance(msg, proto.Result):
                        proto.discard_buffers(msg.buffers, wire.shm_dir)
                    continue
                w.last_seen = time.monotonic()
                if w.stalled:
                    w.stalled = False
                try:
                    handle(w, msg, payload)
                except Exception as exc:  # a bug here must not leave the job RUNNING forever
                    self._engine_failed(msg, exc)
                handled = True
            else:
                self.loop.call_soon(self._drain, sock)  # budget spent: more may be waiting
        except zmq.ZMQError:
            if self.state not in (PoolState.CLOSED,):
                raise
        if handled:
            self._pump()

    def drain_results(self) -> None:
        """Read what the workers sent, on the thread that drives the engine."""
        if self.state in (PoolState.RUNNING, PoolState.CLOSING):
            self._drain(self.wire.data)

    def _handle(self, w: WorkerProc, msg: proto.Message, payload: list[Any]) -> None:
        if isinstance(msg, proto.Result):
            self._on_result(w, msg, payload)
        elif isinstance(msg, proto.Release):
            if self.wire.segments is not None:
                self.wire.segments.release(msg.names)
            w.held.difference_update(msg.names)
        elif isinstance(msg, proto.Output):
            if self.bus.active:
                self.bus.publish(TaskOutput(msg.job, msg.index, w.id, msg.stream, msg.text))
        elif isinstance(msg, proto.Started):
            self.recovery.task_started(w, msg)
        elif isinstance(msg, proto.Ready):
            if not self.workers.ready(w, msg.worker_id):
                self.bad_messages += 1
                return
            self.dispatch.assign_setups(w)
            self.workers.note_all_ready()

    def _engine_failed(self, msg: proto.Message, exc: Exception) -> None:
        """The pool's own code raised while handling ``msg``: fail the job it was about
        (with that error, as its cause) instead of leaving its tasks unfinished."""
        job = self.jobs.get(getattr(msg, "job", -1))
        if job is None:
            raise exc  # about no job: the loop's exception handler reports it
        err = RuntimeError(
            f"orchestra_nb internal error while handling a {type(msg).__name__} message of "
            f"job {job.id}: {type(exc).__name__}: {exc}"
        )
        err.__cause__ = exc
        job.fail_all(err)

    # --- worker exits -----------------------------------------------------------------

    def _respawned(self) -> None:
        self._pump()

    def _worker_exited(self, w: WorkerProc) -> None:
        """``w``'s pidfd is readable: reap it, recover its chunks, replace it."""
        returncode, environment_broken = self.workers.reap(w)
        if environment_broken:
            self._break(w, returncode)
            return
        self.recovery.recover(w, returncode)
        if self.state == PoolState.RUNNING:
            self.workers.replenish()
        self.dispatch.pump()

    def _break(self, w: WorkerProc, returncode: int) -> None:
        try:
            with open(w.log_path, "rb") as f:
                stderr = f.read()[-20_000:].decode(errors="replace")
        except OSError:
            stderr = ""
        self.broken = BrokenPoolError(
            f"{MAX_START_FAILURES} workers in a row died before their ready handshake "
            f"(last: worker {w.id}, pid {w.pid}, {describe_exit(returncode)}); the worker "
            "environment is broken, so the pool stopped respawning",
            stderr,
        )
        self.state = PoolState.BROKEN
        for job in list(self.jobs.values()):
            job.fail_all(self.broken)
        self.workers.kill_all("close", "pool broken")
        self.workers.all_ready.set()

    # --- dispatch ---------------------------------------------------------------------

    def submit(self, job: Job) -> None:
        job.seal()
        if self.state != PoolState.RUNNING:
            exc: BaseException = self.broken or PoolClosedError("the pool is shut down")
            job.open(self.bus)
            job.fail_all(exc)
            return
        self.jobs[job.id] = job
        job.on_finished = self._forget_job
        job.open(self.bus)
        if job.circuit is not None and job.call:
            stats = job.circuit.statistics()
            if stats.state is CircuitState.OPEN and stats.retry_in:
                chunk = job.take(1)  # open: fail now, without waiting for a free worker
                if chunk is not None:
                    self.dispatch.admit(job, chunk)
                return
        self.dispatch.mark_ready(job)
        if job.targets is not None:
            for wid in job.targets:
                w = self.workers.procs.get(wid)
                chunk = job.take(1)
                if chunk is None:
                    break
                if w is None:
                    self.dispatch.fail_range(job, chunk, WorkerCrashedError(wid, None, None, chunk.start))
                else:
                    chunk.target = wid
                    w.assigned.append(chunk)
        self.dispatch.pump()
        job.check_done()

    def input_ready(self, job: Job) -> None:
        """The job's feeder read more items (or its input ended): dispatch them."""
        if job.id in self.jobs:
            self.dispatch.mark_ready(job)
            self.dispatch.pump()
            job.check_done()

    def add_setup(self, name: str, digest: bytes, payload: bytes, item: Any) -> None:
        """Replay ``fn(*args)`` on every worker that starts from now on, before other work."""
        self.dispatch.add_setup(name, digest, payload, item)

    def set_paused(self, job_id: int, paused: bool) -> None:
        """Pause (hand out no new chunk of the job; sent ones run) or resume a job."""
        job = self.jobs.get(job_id)
        if job is None:
            return
        job.set_paused(paused)  # on the engine thread, which hands out chunks
        if not paused and job.has_work():
            self.dispatch.mark_ready(job)
            self.dispatch.pump()

    # --- cancellation ------------------------------------------------------------------

    def cancel(self, job_id: int, kill: bool = False) -> None:
        self.recovery.cancel(job_id, kill)

    def cancel_item(self, job: Job, index: int) -> None:
        """Cancel one call of a batch of ``run`` calls, leaving the others alone."""
        self.recovery.cancel_item(job, index)

    def kill_busy(self, job_id: int) -> None:
        """Hard-kill (and so respawn) the workers running tasks of ``job_id``."""
        self.recovery.kill_busy(job_id)

    # --- completion -------------------------------------------------------------------

    def _forget_job(self, job: Job) -> None:
        """``job.on_finished``: the job is done; drop it and what it held."""
        if job.first_payload is not None and self.wire.segments is not None:  # never sent
            self.wire.segments.release([n for n in job.first_payload[1] if n is not None])
            job.first_payload = None
        self.dispatch.job_finished(job)
        self.jobs.pop(job.id, None)

    # --- introspection ----------------------------------------------------------------

    def statistics(self) -> PoolStatistics:
        """A frozen snapshot of the workers, the jobs and the queue (on the engine)."""
        now = time.monotonic()
        workers = []
        for w in self.workers.procs.values():
            running = w.running_chunk
            cpu, rss = w.sample() if w.state != WorkerState.DEAD else (None, None)
            workers.append(WorkerStatistics(
                id=w.id, pid=w.pid, stalled=w.stalled,
                # A retiring worker finishes its chunk, then stops: it takes no new work.
                state=WorkerState.STOPPING if w.retire and w.state == WorkerState.READY
                else WorkerState(w.state),
                tasks_done=w.tasks_done,
                job=None if running is None else running.job.id,
                item=None if running is None else running.start,
                queued_chunks=max(0, len(w.inflight) - 1),
                cpu_percent=cpu, memory_bytes=rss,
            ))
        jobs = []
        queued = 0
        for j in self.jobs.values():
            if j.internal:
                continue
            queued += j.counts[TaskState.PENDING] + j.counts[TaskState.RETRYING]
            jobs.append(j.statistics(now))
        return PoolStatistics("local", PoolState(self.state), self.workers.target, tuple(workers),
                              tuple(jobs), queued, self.bad_messages, self.workers.spawn_error)



_NOBLOCK = int(zmq.NOBLOCK)  # plain ints: enum arithmetic on the hot path is not free


def _worker_id(ident: proto.Frame) -> int:
    try:
        return int(bytes(ident)[1:].split(b"-", 1)[0])
    except ValueError:
        return -1
