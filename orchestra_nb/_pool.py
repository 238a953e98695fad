"""The pool supervisor (layer 2): worker processes, the task table, dispatch and recovery.

Everything here runs with the engine lock held (``_ioloop``): on the one I/O thread, or on
a caller's thread that borrowed the engine while the I/O thread waited for events (a loop
awaiting ``run()`` sends its calls and reads its results itself). Never two at once, and
nothing else touches the process table, the sockets or a job's tables. Data flow::

    caller thread                 I/O thread (PoolCore)                       worker process
    ─────────────                 ─────────────────────                       ──────────────
    pool.map(f, xs) ──Job──> submit ─> jobs ─> _pump ─ Define(f) ─┐
      (f pickled here:                 │        take chunk        ├─ data ROUTER ═══> main thread
       errors raise at once)           │        (adaptive size)  ─┘  (ipc, HMAC)        runs items
                                       │                                                  │
    handle.future <── set_result ── _on_result <──── Result(values, errors) ─────────────┘
      await / result()                 │  retries (backoff) ──> requeued
                                       │  events ──> EventBus ──> widgets, iterators
    handle.cancel() ─────────────> cancel ─ Cancel ─ ctrl ROUTER ═══> control thread ─SIGINT─┘
                                       │  after cancel_grace: SIGKILL + respawn
    pidfd readable (process exit) ─> _on_exit: re-queue the dead worker's chunks, respawn

Crash detection is by process exit (a pidfd in the loop), never by a timeout. A chunk that
was *running* on a worker that died is split into single items and re-queued; an item that
dies alone on ``max_worker_crashes`` workers fails with ``WorkerCrashedError``. Chunks that
were only queued on the dead worker are re-queued as they are.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import functools
import random
import select
import selectors
import sys
import threading
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
from ._spin import DEFAULT_BUSY_POLL, BusyPoll
from ._state import PoolState, TaskState, WorkerState
from ._stats import PoolStatistics, WorkerStatistics

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
    def __init__(self, options: PoolOptions, bus: EventBus, loop: EngineLoop) -> None:
        self.options = options
        self.bus = bus
        self.loop = loop
        self.state = PoolState.UNOPENED
        self.wire = Wire(loop, options.max_result_bytes, self._drain)
        self.workers = WorkerSet(options, bus, loop, self.wire, self, self._worker_exited,
                                 self._respawned)
        self.jobs: dict[int, Job] = {}
        self.dispatch = Dispatcher(options, loop, self.wire, self.workers, self, self.jobs,
                                   self._forget_job)
        self._pump = self.dispatch.pump  # bound once: called after every read
        self.results = ResultPath(options, loop, self.wire, self.workers, self.dispatch, self)
        self._on_result = self.results.on_result  # bound once: called for every result
        self.recovery = Recovery(options, bus, loop, self.wire, self.workers, self.dispatch, self,
                                 self.jobs)
        self.caller_poll = BusyPoll(options.busy_poll)  # shared by callers, under the engine
        self.bad_messages = 0
        self.broken: BrokenPoolError | None = None
        self.closed_event: asyncio.Event = asyncio.Event()
        self.caller_drains = 0  # loops reading the data socket themselves (under the engine)
        self.caller_threads: collections.Counter[int] = collections.Counter()  # ... their threads
        self._unread_seen = False
        self._io_reads_data = True  # this thread watches the data socket (no loop reads it)
        self.take_backs: int = 0  # times this thread took the socket back from stopped loops
        self._data_poll = select.poll()
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
        self.loop.remove_hot_check(self._check_unread)
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
        try:
            for _ in range(DRAIN_BUDGET):
                if not proto.has_input(sock):
                    break
                frames = proto.recv_frames(sock, _NOBLOCK)
                ident = frames[0]
                try:
                    msg, payload = proto.decode_message(self.wire.key, frames[1:], self.wire.run_dir)
                except proto.BadSignature:
                    self.bad_messages += 1
                    continue
                w = self.workers.procs.get(_worker_id(ident))
                if w is not None and w.ident != ident:  # an impostor, or a stale token
                    self.bad_messages += 1
                    continue
                if w is None:
                    if isinstance(msg, proto.Result):
                        proto.discard_buffers(msg.buffers, self.wire.shm_dir)
                    continue
                w.last_seen = time.monotonic()
                if w.stalled:
                    w.stalled = False
                try:
                    self._handle(w, msg, payload)
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

    def busy_poll_results(self, done: Callable[[], bool], until: float, first: bool) -> bool:
        """Poll the data socket until ``until`` (a ``time.perf_counter`` deadline), reading
        what arrives, until ``done()``: for a caller that expects its result within
        microseconds and would otherwise sleep for it (see ``_spin``). Runs under the
        engine. ``first``: a new wait (the back-off may skip it), not the resumption of
        one. Returns True if it stopped early because the I/O thread needs the engine (a
        worker exited, a cancel or a timer is due): the caller lets go, then resumes."""
        poll = self.caller_poll
        if self.state != PoolState.RUNNING or (first and not poll.start()):
            return False
        sock = self.wire.data
        has_input = functools.partial(proto.has_input, sock)
        wants_engine = self.loop.engine_selector.wants_engine
        while not done():
            got = poll.poll(has_input, until, wants_engine)
            if got is None:
                return True
            if not got:
                return False
            self._drain(sock)
        return False

    def attach_caller(self) -> None:
        """A loop awaiting a ``run()`` reads the data socket itself from now on (under the
        engine; see ``_handles._CallerDrain``): this thread stops watching it, rather than
        race that loop for each result and hand it over. It only checks, at each hot tick,
        for results left unread; if a result waits through a whole tick, that loop is not
        turning (stopped, or stuck in synchronous code), and this thread takes the socket
        back (``take_backs`` counts it) until a loop awaits again (:meth:`reclaim`). Runs on
        the loop's thread."""
        self.caller_drains += 1
        self.caller_threads[threading.get_ident()] += 1
        self.reclaim()

    def reclaim(self) -> None:
        """An attached loop awaits again: leave the socket to the loops once more."""
        if self._io_reads_data and self.state in (PoolState.RUNNING, PoolState.CLOSING):
            self._io_reads_data = False
            self.loop.remove_reader(self.wire.data_fd)
            self._unread_seen = False
            self._data_poll.register(self.wire.data_fd, select.POLLIN)
            self.loop.add_hot_check(self._check_unread)

    def detach_caller(self) -> None:
        """The loop of this thread lets go of the socket."""
        self.caller_drains -= 1
        ident = threading.get_ident()
        self.caller_threads[ident] -= 1
        if self.caller_threads[ident] <= 0:
            del self.caller_threads[ident]
        if not self.caller_drains:
            self._read_data_here()

    def _read_data_here(self) -> None:
        if self._io_reads_data:
            return
        self._io_reads_data = True
        self.loop.remove_hot_check(self._check_unread)
        with contextlib.suppress(KeyError, ValueError):
            self._data_poll.unregister(self.wire.data_fd)
        if self.state in (PoolState.RUNNING, PoolState.CLOSING):
            self.loop.add_reader(self.wire.data_fd, self._drain, self.wire.data)
            self._drain(self.wire.data)

    def _check_unread(self) -> None:
        # The FD stays readable until someone reads the socket.
        unread = bool(self._data_poll.poll(0))
        if unread and self._unread_seen and not self._a_caller_loop_is_waking():
            self.take_backs += 1
            self._read_data_here()
            unread = False
        self._unread_seen = unread

    def _a_caller_loop_is_waking(self) -> bool:
        """Whether an attached loop's thread is turning: asleep in its selector (which the
        unread socket wakes), between callbacks, or taking or handing back the engine (to
        read). That loop reads the socket however long it then waits for a CPU (under load,
        longer than a tick). A loop in synchronous code, or stopped, is elsewhere."""
        frames = sys._current_frames()
        turning = _TURNING_CODES | {type(self.loop).borrow.__code__, type(self.loop).give_back.__code__}
        for ident in self.caller_threads:
            frame = frames.get(ident)
            if frame is not None and frame.f_code in turning:
                return True
        return False

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
# Where the thread of a turning asyncio loop is: asleep in its selector (the default ones),
# or between callbacks (see PoolCore._a_caller_loop_is_waking).
_TURNING_CODES = frozenset(
    [
        *(
            cls.select.__code__
            for name in ("EpollSelector", "PollSelector", "DevpollSelector", "KqueueSelector", "SelectSelector")
            if (cls := getattr(selectors, name, None)) is not None
        ),
        asyncio.BaseEventLoop._run_once.__code__,  # type: ignore[attr-defined]
    ]
)


def _worker_id(ident: proto.Frame) -> int:
    try:
        return int(bytes(ident)[1:].split(b"-", 1)[0])
    except ValueError:
        return -1
