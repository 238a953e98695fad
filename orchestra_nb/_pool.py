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
import math
import os
import pickle
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
from ._events import TaskOutput, WorkerExited, WorkerSpawnFailed, WorkerStalled, WorkerStarted
from ._exceptions import (
    BrokenPoolError,
    CircuitOpenError,
    MemoryLimitError,
    PoolClosedError,
    SerializationError,
    TaskTimeoutError,
    WorkerCrashedError,
    describe_exit,
)
from ._jobs import Chunk, Job, describe_input, next_job_id
from ._policy import MemoryPolicy
from ._procs import (
    START_DESCRIPTORS,
    RunDir,
    WorkerProc,
    check_descriptors,
    crash_cause,
    delete_worker_buffers,
    install_sigterm_cleanup,
    register_run_dir,
    spawn_worker,
    unregister_run_dir,
)
from ._serialize import ErrorRecord, describe_unpicklable_argument, dumps, rebuild_exception
from ._shared import Placements, function_frames
from ._spin import DEFAULT_BUSY_POLL, BusyPoll
from ._state import PoolState, TaskState, WorkerState
from ._stats import PoolStatistics, WorkerStatistics

if TYPE_CHECKING:
    from ._ioloop import EngineLoop

__all__ = ["PoolCore", "PoolOptions", "PoolState"]

TARGET_CHUNK_SECONDS = 0.02  # adaptive chunks aim at tens of ms: cheap dispatch, live progress
MAX_CHUNK = 16_384
SHORT_CHUNK_SECONDS = 0.005  # below this, queue several chunks per worker to hide latency
# A chunk with less work than this is not split further to balance a map's end: its
# dispatch (a message each way, a wake-up) would cost more than the balance gains.
MIN_CHUNK_SECONDS = 0.001
PREFETCH = 4
DRAIN_BUDGET = 64  # messages handled per I/O callback before other callbacks get a turn
FUNCTION_CACHE = 64  # callables cached per worker
MAX_START_FAILURES = 3  # consecutive workers exiting by themselves before Ready -> broken
SPAWN_RETRY_FIRST = 0.05  # seconds before retrying a failed worker start, doubling...
SPAWN_RETRY_MAX = 5.0  # ... up to this


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
        self.key = proto.new_key()
        self.frame_limit = proto.frame_limit(options.max_result_bytes)  # see _protocol
        # The caller's sys.path as last seen by a submit (set by the backend, in the caller's
        # thread): a worker whose sys_path_version is older gets it before its next chunk.
        self.sys_path: list[str] = list(sys.path)
        self.sys_path_version = 0
        self.target_workers = options.workers
        self.workers: dict[int, WorkerProc] = {}
        self.jobs: dict[int, Job] = {}
        self._worker_ids = 0
        self.ready_jobs: collections.deque[Job] = collections.deque()  # may have work
        self.fn_time: dict[bytes, float] = {}  # EMA of seconds per item, per callable
        self.caller_poll = BusyPoll(options.busy_poll)  # shared by callers, under the engine
        self.setups: list[tuple[str, bytes, bytes, Any]] = []  # (name, digest, payload, item)
        self.bad_messages = 0
        self.start_failures = 0
        self.spawn_failures = 0  # consecutive failed worker starts (retried with backoff)
        self.spawn_error: str | None = None
        self._respawn_handle: asyncio.TimerHandle | None = None
        self.broken: BrokenPoolError | None = None
        self.all_ready: asyncio.Event = asyncio.Event()
        self.closed_event: asyncio.Event = asyncio.Event()
        self._data_sent = False  # a drain of that socket is due after the current callback
        self._ctrl_sent = False
        self._released: collections.deque[tuple[int, str]] = collections.deque()
        self._release_scheduled = False
        self.segments: proto.Segments | None = None
        # Per job: its large buffers, written once into pinned segments (see _shared).
        self.placements: dict[int, Placements] = {}
        self.placed_bytes = 0  # written into pinned segments by jobs that ended
        self._tick_handle: asyncio.TimerHandle | None = None
        self.run_dir = ""
        self.shm_dir: str | None = None
        self.mappings: proto.Mappings | None = None
        self.data_fd = -1
        self.caller_drains = 0  # loops reading the data socket themselves (under the engine)
        self.caller_threads: collections.Counter[int] = collections.Counter()  # ... their threads
        self._unread_seen = False
        self._io_reads_data = True  # this thread watches the data socket (no loop reads it)
        self.take_backs = 0  # times this thread took the socket back from stopped loops
        self._data_poll = select.poll()
        install_sigterm_cleanup()  # here, on the caller's (usually the main) thread


    # --- lifecycle --------------------------------------------------------------------

    def start(self) -> None:
        check_descriptors(START_DESCRIPTORS, "a pool")
        self.owner = RunDir()
        self.run_dir, self.shm_dir = self.owner.path, self.owner.shm_dir
        try:
            self.segments = proto.Segments(self.run_dir, "p") if self.shm_dir else None
            self.mappings = proto.Mappings(self.shm_dir) if self.shm_dir else None  # results'
            self.ctx = zmq.Context(io_threads=1)
            self.data = self._router(f"ipc://{self.run_dir}/data")
            self.ctrl = self._router(f"ipc://{self.run_dir}/ctrl")
            self.data_fd = self.data.FD
            self.loop.add_reader(self.data_fd, self._drain, self.data)
            self.loop.add_reader(self.ctrl.FD, self._drain, self.ctrl)
        except BaseException:
            self._undo_start()  # out of descriptors: nothing of this pool may stay behind
            raise
        register_run_dir(self.run_dir, self._emergency_stop)
        self.state = PoolState.RUNNING
        for _ in range(self.target_workers):
            if self._spawn() is None:
                break  # retried with backoff
        self._tick_handle = self.loop.call_later(0.25, self._tick)

    def _undo_start(self) -> None:
        for name in ("data", "ctrl"):
            sock = getattr(self, name, None)
            if sock is not None:
                with contextlib.suppress(Exception):
                    self.loop.remove_reader(sock.FD)
                sock.close(linger=0)
        ctx = getattr(self, "ctx", None)
        if ctx is not None:
            ctx.term()
        for part in (self.segments, self.mappings):
            if part is not None:
                part.close()
        self.owner.remove()
        self.state = PoolState.CLOSED
        self.closed_event.set()

    def _emergency_stop(self) -> None:
        """The process is being terminated (SIGTERM) with no time for a shutdown: SIGKILL
        the workers and delete the run directory. Runs in a signal handler."""
        for w in list(self.workers.values()):
            w.kill("close", "the pool's process was terminated")
        self.owner.remove()

    def _router(self, addr: str) -> zmq.Socket[Any]:
        sock = self.ctx.socket(zmq.ROUTER)
        try:
            sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
            sock.setsockopt(zmq.SNDHWM, 0)
            sock.setsockopt(zmq.RCVHWM, 0)
            sock.setsockopt(zmq.LINGER, 0)
            # A peer sending a larger frame is disconnected before anything is allocated.
            sock.setsockopt(zmq.MAXMSGSIZE, self.frame_limit)
            sock.bind(addr)
        except BaseException:
            sock.close(linger=0)
            raise
        return sock

    def _spawn(self) -> WorkerProc | None:
        """Start one worker; None if that failed (out of descriptors or processes, the run
        directory gone...): then a retry is scheduled, with backoff, while the pool is open."""
        self._worker_ids += 1
        try:
            if not os.path.isdir(self.run_dir):
                self._restore_run_dir()
            w = spawn_worker(
                self._worker_ids, self.run_dir, self.key, self.shm_dir,
                python=self.options.python, env=self.options.env,
                threads=self.options.threads_per_worker, heartbeat=self.options.heartbeat,
                max_result_bytes=self.options.max_result_bytes, busy_poll=self.options.busy_poll,
                sys_path=self.sys_path,
            )
            w.sys_path_version = self.sys_path_version
        except (OSError, zmq.ZMQError) as exc:
            self._spawn_failed(exc)
            return None
        try:
            w.pidfd = os.pidfd_open(w.pid)
        except OSError as exc:  # started, but cannot be watched: not a worker we can use
            w.kill("close", "its exit could not be watched")
            w.close_stdin()
            w.proc.wait()
            self._spawn_failed(exc)
            return None
        self.spawn_failures = 0
        self.spawn_error = None
        self.workers[w.id] = w
        self.loop.add_reader(w.pidfd, self._on_exit, w)
        w.timers.append(self.loop.call_later(self.options.start_timeout, self._start_timeout, w))
        self.all_ready.clear()
        return w

    def _spawn_failed(self, exc: BaseException) -> None:
        self.spawn_failures += 1
        self.spawn_error = f"{type(exc).__name__}: {exc}"
        delay = min(SPAWN_RETRY_MAX, SPAWN_RETRY_FIRST * 2 ** (self.spawn_failures - 1))
        delay *= 0.5 + self.options.retry_random()  # several pools: not all at once
        alive = sum(1 for x in self.workers.values() if not x.retire)
        self.bus.publish(WorkerSpawnFailed(self.spawn_error, alive, self.target_workers, delay))
        if self._respawn_handle is None:
            self._respawn_handle = self.loop.call_later(delay, self._respawn_missing)

    def _respawn_missing(self) -> None:
        self._respawn_handle = None
        if self.state != PoolState.RUNNING:
            return
        alive = sum(1 for x in self.workers.values() if not x.retire)
        for _ in range(self.target_workers - alive):
            if self._spawn() is None:
                break  # the next try is scheduled
        self._pump()

    def _restore_run_dir(self) -> None:
        """Something deleted the run directory: make it again and bind the sockets anew
        (connected workers keep their connections; new ones need the socket files)."""
        os.mkdir(self.run_dir, 0o700)
        self.owner.lock()
        for sock, name in ((self.data, "data"), (self.ctrl, "ctrl")):
            addr = f"ipc://{self.run_dir}/{name}"
            with contextlib.suppress(zmq.ZMQError):
                sock.unbind(addr)
            sock.bind(addr)

    def _start_timeout(self, w: WorkerProc) -> None:
        if w.state == "starting":
            w.kill("start", f"no ready handshake within {self.options.start_timeout} s")

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
                self.cancel(job.id, kill=False)
        # Shutdown polls the tables (ASYNC110): they change in many places, and an Event for
        # each condition would cost every hot path something to serve this one-off wait.
        if mode in ("graceful", "cancel"):
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(None if mode == "graceful" else timeout):
                    while any(not j.internal for j in self.jobs.values()):  # noqa: ASYNC110
                        await asyncio.sleep(0.01)
        for w in list(self.workers.values()):
            if mode == "kill":
                w.kill("close", "pool killed")
            elif w.state != "dead":
                self._stop_worker(w)
        deadline = self.loop.time() + timeout
        while self.workers and self.loop.time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        for w in list(self.workers.values()):
            w.kill("close", "did not exit in time")
        while self.workers and self.loop.time() < deadline + 5:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        for job in list(self.jobs.values()):
            job.fail_all(PoolClosedError("the pool was shut down"))
        self._teardown()

    def _teardown(self) -> None:
        if self._tick_handle is not None:
            self._tick_handle.cancel()
        if self._respawn_handle is not None:
            self._respawn_handle.cancel()
        self.loop.remove_hot_check(self._check_unread)
        for fd, sock in ((self.data_fd, self.data), (self.ctrl.FD, self.ctrl)):
            with contextlib.suppress(Exception):
                self.loop.remove_reader(fd)
            sock.close(linger=0)
        self.ctx.term()
        for placed in self.placements.values():
            placed.close()
        self.placements.clear()
        if self.segments is not None:
            self.segments.close()
        if self.mappings is not None:
            self.mappings.close()
        unregister_run_dir(self.run_dir)
        self.owner.remove()
        self.state = PoolState.CLOSED
        self.closed_event.set()

    def resize(self, workers: int) -> None:
        if self.state != PoolState.RUNNING:
            raise self.broken or PoolClosedError(f"cannot resize a pool that is {self.state.value}")
        if workers < 1:
            raise ValueError(f"a pool needs at least 1 worker, got {workers}")
        self.target_workers = workers
        alive = [w for w in self.workers.values() if w.state in ("starting", "ready") and not w.retire]
        for _ in range(workers - len(alive)):
            if self._spawn() is None:
                break  # retried with backoff
        # Shrink: idle workers first, busy ones once their chunk is done.
        for w in sorted(alive, key=lambda w: len(w.inflight))[: max(0, len(alive) - workers)]:
            w.retire = True
            if not w.inflight:
                self._stop_worker(w)
        self._pump()

    def _stop_worker(self, w: WorkerProc) -> None:
        if w.state in ("stopping", "dead"):
            return
        w.state = WorkerState.STOPPING
        self._send(self.data, w, proto.Shutdown())
        w.close_stdin()

    # --- messages in ------------------------------------------------------------------

    def _drain(self, sock: zmq.Socket[Any]) -> None:
        # A ZeroMQ FD is edge-triggered: read while the socket reports input, but at most
        # DRAIN_BUDGET messages per call, then let the loop run other callbacks (a cancel,
        # a timer, a streaming consumer registering) and come back: a fast map would
        # otherwise keep the I/O thread in here until it ends.
        handled = False
        if sock is self.data:
            self._data_sent = False  # this read covers the check a send deferred (_after_send)
        try:
            for _ in range(DRAIN_BUDGET):
                if not proto.has_input(sock):
                    break
                frames = proto.recv_frames(sock, _NOBLOCK)
                ident = frames[0]
                try:
                    msg, payload = proto.decode_message(self.key, frames[1:], self.run_dir)
                except proto.BadSignature:
                    self.bad_messages += 1
                    continue
                w = self.workers.get(_worker_id(ident))
                if w is not None and w.ident != ident:  # an impostor, or a stale token
                    self.bad_messages += 1
                    continue
                if w is None:
                    if isinstance(msg, proto.Result):
                        proto.discard_buffers(msg.buffers, self.shm_dir)
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
            self._drain(self.data)

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
        sock = self.data
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
            self.loop.remove_reader(self.data_fd)
            self._unread_seen = False
            self._data_poll.register(self.data_fd, select.POLLIN)
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
            self._data_poll.unregister(self.data_fd)
        if self.state in (PoolState.RUNNING, PoolState.CLOSING):
            self.loop.add_reader(self.data_fd, self._drain, self.data)
            self._drain(self.data)

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
            if self.segments is not None:
                self.segments.release(msg.names)
            w.held.difference_update(msg.names)
        elif isinstance(msg, proto.Output):
            if self.bus.active:
                self.bus.publish(TaskOutput(msg.job, msg.index, w.id, msg.stream, msg.text))
        elif isinstance(msg, proto.Started):
            job = self.jobs.get(msg.job)
            if job is not None and job.timeout is not None:
                deadline = job.timeout + self.options.timeout_grace
                w.timers.append(
                    self.loop.call_later(deadline, self._hard_timeout, w, job, msg.index)
                )
        elif isinstance(msg, proto.Ready):
            if msg.worker_id != w.id or w.state != "starting":
                self.bad_messages += 1
                return
            w.state = WorkerState.READY
            self.start_failures = 0
            for timer in w.timers:
                timer.cancel()
            w.timers.clear()
            self.bus.publish(WorkerStarted(w.id, w.pid))
            for name, digest, payload_bytes, item in self.setups:
                self._assign_setup(w, name, digest, payload_bytes, item)
            if all(x.state != "starting" for x in self.workers.values()):
                self.all_ready.set()

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

    def _on_result(self, w: WorkerProc, msg: proto.Result, payload: list[Any]) -> None:
        chunk = _pop_chunk(w, msg.job, msg.start)
        if chunk is None:
            names = tuple(n for n in msg.buffers if n is not None)
            if names:
                self._send(self.data, w, proto.Release(names))
            self.bad_messages += 1
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
                    payload, msg.buffers, self.mappings, self._result_releaser(w.id)
                ) if msg.buffers else None,
            )
        except Exception as exc:
            if chunk.count > 1:
                # One result is to blame, unknown which: run the tasks again one by one, so
                # that only the culprit fails (as for arguments that cannot be unpickled).
                self._requeue_open_items(job, chunk)
            else:
                err = SerializationError(
                    f"cannot unpickle the result of task {chunk.start} in the pool: "
                    f"{type(exc).__name__}: {exc}"
                )
                self._fail_range(job, chunk, err)
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
                if job.states[start + offset] in _FINAL_BYTES:  # a call cancelled meanwhile
                    continue
                job.transition(start + offset, 1, TaskState.PENDING)
                self._requeue(job, Chunk(job, start + offset, [chunk.items[offset]]), front=True)
        else:
            for offset in range(count):
                if offset not in errors and job.states[start + offset] not in _FINAL_BYTES:
                    job.succeed(start + offset, [values[offset]], w.id)
            for offset, record in errors.items():
                if job.states[start + offset] not in _FINAL_BYTES:
                    self._on_error(job, chunk, offset, record, w)
        job.progress()
        if w.retire and not w.inflight:
            self._stop_worker(w)
        elif self.options.max_tasks_per_worker and w.tasks_done >= self.options.max_tasks_per_worker:
            w.retire = True
            if not w.inflight:
                self._recycle(w, "max_tasks_per_worker reached")

    def _circuit_outcome(self, job: Job, errors: dict[int, ErrorRecord] | None, count: int) -> None:
        breaker = job.circuit
        for offset in range(count):
            record = errors.get(offset) if errors else None
            if record is None:
                breaker.record_success()
            elif record.kind == "cancelled":
                breaker.record_failure(_NOT_RUN)
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
        self._fail_item(job, chunk, offset, exc, w, record.duration, record.duration_bound)

    def _fail_item(
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

    def _requeue_one(self, job: Job, index: int, item: Any) -> None:
        if job.cancelled or job.state_of(index) != TaskState.RETRYING:
            return
        job.transition(index, 1, TaskState.PENDING)
        self._requeue(job, Chunk(job, index, [item]))
        self._pump()

    # --- worker exits -----------------------------------------------------------------

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
            w = self.workers.get(worker_id)
            if w is not None and w.state in ("ready", "stopping"):
                self._send(self.data, w, proto.Release(tuple(names)))

    def _forget_segments(self, w: WorkerProc) -> None:
        """A worker is gone: the pool's segments it held are free, and its own are deleted
        (arrays still using one keep their mapping)."""
        if self.segments is not None:
            self.segments.release(list(w.held))
        w.held.clear()
        delete_worker_buffers(self.run_dir, w.id)
        if self.mappings is not None:
            self.mappings.sweep()  # unmap them: the mappings would keep their memory

    def _on_exit(self, w: WorkerProc) -> None:
        self._forget_segments(w)
        if w.pidfd is not None:
            self.loop.remove_reader(w.pidfd)
            os.close(w.pidfd)
            w.pidfd = None
        returncode = w.proc.wait()
        for timer in w.timers:
            timer.cancel()
        if w.proc.stdin is not None:
            with contextlib.suppress(OSError):
                w.proc.stdin.close()
        was_ready = w.state != "starting"
        expected = w.state == "stopping" and w.kill_kind is None
        w.state = WorkerState.DEAD
        self.workers.pop(w.id, None)
        if expected:
            reason = "recycled" if w.retire and self.state == PoolState.RUNNING else "shutdown"
        elif w.kill_kind is not None:
            reason = f"killed: {w.kill_reason}"
        else:
            reason = "crashed"
        self.bus.publish(WorkerExited(w.id, w.pid, returncode, reason))
        # Only a worker that exited by itself before its handshake (an import error, a bad
        # interpreter), or hung past start_timeout, says the environment is broken; one
        # killed by a signal from outside (or by the pool for another reason) is a crash.
        by_itself = w.kill_kind is None and returncode >= 0
        if not was_ready and (by_itself or w.kill_kind == "start") and self.state == PoolState.RUNNING:
            self.start_failures += 1
            if self.start_failures >= MAX_START_FAILURES:
                self._break(w, returncode)
                return
        self._recover_chunks(w, returncode)
        if self.state == PoolState.RUNNING:
            alive = sum(1 for x in self.workers.values() if not x.retire)
            for _ in range(self.target_workers - alive):
                if self._spawn() is None:
                    break  # retried with backoff
        self._pump()

    def _recover_chunks(self, w: WorkerProc, returncode: int) -> None:
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
                    WorkerCrashedError(w.id, w.pid, returncode, chunk.start) if running else _NOT_RUN
                )
            if job.cancelled or (self.state != PoolState.RUNNING and job.id not in self.jobs):
                self._cancel_range(job, chunk.start, chunk.count)
            elif chunk.count == 1 and chunk.start in job.cancelled_items:
                self._cancel_range(job, chunk.start, 1)  # a cancelled call: never re-run it
            elif w.kill_kind == "close":  # the pool killed it: not the task's fault, no crash
                job.transition(chunk.start, chunk.count, TaskState.PENDING, unfinished_only=True)
                self._requeue(job, chunk, front=True)  # close() fails it with PoolClosedError
            elif chunk.target is not None:
                self._fail_range(job, chunk, WorkerCrashedError(w.id, w.pid, returncode, chunk.start,
                                                                crash_cause(w, returncode)), ran, w)
            elif running and w.kill_kind == "timeout":
                exc: Exception = TaskTimeoutError(w.kill_reason)
                self._fail_range(job, chunk, exc, ran, w)
            elif running and w.kill_kind == "memory":
                exc = MemoryLimitError(w.id, w.pid, returncode, chunk.start, w.kill_reason)
                self._fail_range(job, chunk, exc, ran, w)
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
                    self._requeue(job, single, front=True)
            elif running:
                crashes = job.crashes.get(chunk.start, 0) + 1
                job.crashes[chunk.start] = crashes
                if crashes >= self.options.max_worker_crashes:
                    cause = crash_cause(w, returncode)
                    exc = WorkerCrashedError(w.id, w.pid, returncode, chunk.start, cause)
                    self._fail_range(job, chunk, exc, ran, w)
                else:
                    job.transition(chunk.start, 1, TaskState.PENDING)
                    self._requeue(job, chunk, front=True)
            elif any(job.states[chunk.start + k] in _FINAL_BYTES for k in range(chunk.count)):
                self._requeue_open_items(job, chunk)  # calls of it were cancelled meanwhile
            else:
                job.transition(chunk.start, chunk.count, TaskState.PENDING, unfinished_only=True)
                self._requeue(job, chunk, front=True)
            running = False
            job.progress()
        w.inflight.clear()
        w.assigned.clear()

    def _requeue_open_items(self, job: Job, chunk: Chunk) -> None:
        """Re-queue the items of ``chunk`` one by one, except those already final (a
        cancelled call of a batch) or cancelled since: those are never run again."""
        for offset in reversed(range(chunk.count)):
            index = chunk.start + offset
            if job.states[index] in _FINAL_BYTES:
                continue
            if index in job.cancelled_items:
                job.transition(index, 1, TaskState.CANCELLED)
                continue
            job.transition(index, 1, TaskState.PENDING)
            self._requeue(job, Chunk(job, index, [chunk.items[offset]]), front=True)

    def _fail_range(
        self, job: Job, chunk: Chunk, exc: BaseException, ran: tuple[float, bool] | None = None,
        w: WorkerProc | None = None,
    ) -> None:
        """Fail every open item of ``chunk`` with ``exc``; ``ran``: how long the chunk ran
        (seconds, at most?) on worker ``w``, when it ran."""
        duration, bound = ran if ran is not None else (None, False)
        for offset in range(chunk.count):
            if job.states[chunk.start + offset] not in _FINAL_BYTES:  # e.g. a cancelled call
                self._fail_item(job, chunk, offset, exc, w, duration, bound)

    def _cancel_range(self, job: Job, start: int, count: int) -> None:
        job.transition(start, count, TaskState.CANCELLED, unfinished_only=True)

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
        for other in list(self.workers.values()):
            other.kill("close", "pool broken")
        self.all_ready.set()

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
                    self._admit(job, chunk)
                return
        self._mark_ready(job)
        if job.targets is not None:
            for wid in job.targets:
                w = self.workers.get(wid)
                chunk = job.take(1)
                if chunk is None:
                    break
                if w is None:
                    self._fail_range(job, chunk, WorkerCrashedError(wid, None, None, chunk.start))
                else:
                    chunk.target = wid
                    w.assigned.append(chunk)
        self._pump()
        job.check_done()

    def input_ready(self, job: Job) -> None:
        """The job's feeder read more items (or its input ended): dispatch them."""
        if job.id in self.jobs:
            self._mark_ready(job)
            self._pump()
            job.check_done()

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

    def _pump(self) -> None:
        if self.state != PoolState.RUNNING and self.state != PoolState.CLOSING:
            return
        for w in list(self.workers.values()):
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
                    self._requeue(chunk.job, chunk, front=True)
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

    def _requeue(self, job: Job, chunk: Chunk, front: bool = False) -> None:
        """Put a chunk back in its job's queue (after a crash, a retry backoff...)."""
        if front:
            job.requeued.appendleft(chunk)
        else:
            job.requeued.append(chunk)
        self._mark_ready(job)

    def _mark_ready(self, job: Job) -> None:
        if not job.queued and job.targets is None:
            job.queued = True
            self.ready_jobs.append(job)

    def _chunk_size(self, job: Job) -> int:
        if job.timeout is not None or job.circuit is not None:
            return 1
        if job.chunksize is not None:
            return job.chunksize
        est = self.fn_time.get(job.digest)
        if est is None:
            return 1
        est = max(est, 1e-7)
        size = int(TARGET_CHUNK_SECONDS / est)
        remaining = job.remaining()
        if remaining is not None:
            # Several chunks per worker to the end, so the last ones balance the load; but
            # never below MIN_CHUNK_SECONDS of work (without that floor, the chunks shrank
            # geometrically: 12 chunks for a 50-item map of tiny tasks, 30 for 20,000).
            balanced = math.ceil(remaining / (2 * max(1, len(self.workers))))
            size = min(size, max(balanced, int(MIN_CHUNK_SECONDS / est)))
        return max(1, min(size, MAX_CHUNK))

    def _send_chunk(self, w: WorkerProc, chunk: Chunk) -> bool:
        """Send ``chunk`` to ``w``; False if ``w`` could not be reached (chunk re-queued)."""
        job = chunk.job
        if job.cancelled_items:
            trimmed = self._drop_cancelled_calls(job, chunk)
            if trimmed is None:
                return True
            chunk = trimmed
        if w.sys_path_version != self.sys_path_version:
            version = self.sys_path_version  # read first: the paths are at least as new
            if not self._send(self.data, w, proto.SysPath(tuple(self.sys_path))):
                self._requeue(job, chunk, front=True)
                return False
            w.sys_path_version = version
        try:
            if chunk.payload is not None:  # pickled by the caller; a re-send pickles afresh
                (frames, names), chunk.payload = chunk.payload, None
            else:
                placed = self._placements(job)
                if placed is not None:
                    placed.begin()
                frames, names = proto.pickle_payload(dumps, chunk.items, self.segments or self.shm_dir, placed)
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
                self._send(self.data, w, proto.Define(job.digest, tuple(forget), fn_names), fn_frames)
            except OSError as exc:
                return self._unsendable_chunk(job, chunk, names, "function", exc)
            w.functions[job.digest] = None
        run = proto.Run(job.id, chunk.start, chunk.count, job.digest, job.star, job.call,
                        job.timeout, names)
        if job.circuit is not None and not self._admit(job, chunk):
            self._discard(names)
            return True
        try:
            sent = self._send(self.data, w, run, frames)
        except OSError as exc:
            return self._unsendable_chunk(job, chunk, names, "arguments", exc)
        if not sent:
            self._discard(names)
            self._requeue(job, chunk, front=True)
            if job.circuit is not None:
                job.circuit.record_failure(_NOT_RUN)
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
        if self.shm_dir is None:
            return None
        placed = self.placements.get(job.id)
        if placed is None:
            placed = self.placements[job.id] = Placements(self.shm_dir)
        return placed

    def _unsendable_chunk(
        self, job: Job, chunk: Chunk, names: tuple[str | None, ...], what: str, exc: OSError
    ) -> bool:
        """The chunk's message has a frame above the frame limit, and the file that would
        carry it could not be written (ENOSPC...): its tasks fail, naming that."""
        self._discard(names)
        err = SerializationError(
            f"cannot send the {what} of {proto.task_range(chunk.start, chunk.count)} to "
            f"a worker: a frame carries at most {self.frame_limit:,} bytes, and writing the "
            f"message to {self.run_dir} failed: {type(exc).__name__}: {exc}"
        )
        self._fail_range(job, chunk, err)
        job.progress()
        return True

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
            self._discard(chunk.payload[1])
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
            self._requeue(job, later, front=True)
        job.progress()
        return runs[0] if runs else None

    def _admit(self, job: Job, chunk: Chunk) -> bool:
        """Ask the job's circuit breaker; a rejected task fails fast, never reaching a worker."""
        try:
            job.circuit.before_call()
        except CircuitOpenError as exc:
            self._fail_item(job, chunk, 0, exc, None)
            job.progress()
            return False
        return True

    def _discard(self, names: tuple[str | None, ...]) -> None:
        """Segments of a message that was not sent: back to the pool's free segments."""
        if self.segments is not None:
            self.segments.release([n for n in names if n is not None])

    def _unpicklable_chunk(self, job: Job, chunk: Chunk, exc: Exception) -> None:
        culprits = describe_unpicklable_argument(chunk.items, chunk.start, exc)
        for offset, item in enumerate(chunk.items):
            index = chunk.start + offset
            if index in culprits:
                job.fail(index, SerializationError(culprits[index]))
            else:
                self._requeue(job, Chunk(job, index, [item]))
        job.progress()

    def _send(self, sock: zmq.Socket[Any], w: WorkerProc, msg: proto.Message,
              payload: list[Any] | None = None) -> bool:
        if payload and w.spill is None:
            w.spill = proto.Spill(self.run_dir, self.frame_limit, f"w{w.id}")  # deleted with w
        try:
            proto.send_message(sock, self.key, msg, payload or (), w.ident, w.spill if payload else None)
        except zmq.ZMQError:  # EHOSTUNREACH: gone; its exit will be seen through its pidfd
            return False
        # Sending can leave inbound messages on the same socket unsignalled on its
        # edge-triggered FD: read them after the current callback.
        if sock is self.data:
            if not self._data_sent:
                self._data_sent = True
                self.loop.defer(self._after_send)  # after the current callback
        elif not self._ctrl_sent:
            self._ctrl_sent = True
            self.loop.defer(self._after_send)  # after the current callback
        return True

    def _after_send(self) -> None:
        if self._data_sent:
            self._data_sent = False
            self._drain(self.data)
        if self._ctrl_sent:
            self._ctrl_sent = False
            self._drain(self.ctrl)

    def set_paused(self, job_id: int, paused: bool) -> None:
        """Pause (hand out no new chunk of the job; sent ones run) or resume a job."""
        job = self.jobs.get(job_id)
        if job is None:
            return
        job.set_paused(paused)  # on the engine thread, which hands out chunks
        if not paused and job.has_work():
            self._mark_ready(job)
            self._pump()

    # --- cancellation, deadlines, health ---------------------------------------------

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
            w = self.workers.get(chunk.worker) if chunk.worker is not None else None
            if w is None or w.id in touched:
                continue
            touched.add(w.id)
            if kill:
                w.kill("cancel", f"job {job.id} was cancelled with kill=True")
                continue
            self._send(self.ctrl, w, proto.Cancel(job.id, -1))
            w.timers.append(self.loop.call_later(self.options.cancel_grace, self._escalate, w, job))
        job.progress()

    def cancel_item(self, job: Job, index: int) -> None:
        """Cancel one call of a batch of ``run`` calls, leaving the others alone."""
        if job.id not in self.jobs or index in job.cancelled_items:
            return
        job.cancelled_items.add(index)
        if index >= job.pulled:
            return  # not read from the batch yet: _send_chunk cancels it when it is
        state = job.states[index]
        if state in (TaskState.PENDING, TaskState.RETRYING):
            job.transition(index, 1, TaskState.CANCELLED)
        elif state == TaskState.RUNNING:
            for chunk in job.inflight.values():
                if chunk.start <= index < chunk.start + chunk.count and chunk.worker is not None:
                    w = self.workers.get(chunk.worker)
                    if w is not None:
                        self._send(self.ctrl, w, proto.Cancel(job.id, index))
                        w.timers.append(self.loop.call_later(
                            self.options.cancel_grace, self._escalate_item, w, job, index))
        job.progress()

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
            w = self.workers.get(chunk.worker) if chunk.worker is not None else None
            if w is not None:
                w.kill("cancel", f"job {job.id} was interrupted twice")

    def _escalate(self, w: WorkerProc, job: Job) -> None:
        running = w.running_chunk
        if w.state != "dead" and running is not None and running.job is job:
            w.kill("cancel", f"a task of cancelled job {job.id} ignored the interrupt "
                             f"for {self.options.cancel_grace} s")

    def _hard_timeout(self, w: WorkerProc, job: Job, index: int) -> None:
        running = w.running_chunk
        if w.state != "dead" and running is not None and running.job is job and running.start == index:
            w.kill("timeout",
                   f"task {index} exceeded its timeout of {job.timeout} s and did not respond "
                   f"to the interrupt within {self.options.timeout_grace} s; its worker was "
                   "killed and replaced")

    def _recycle(self, w: WorkerProc, why: str) -> None:
        w.retire = True
        self._stop_worker(w)
        if self.state == PoolState.RUNNING:
            self._spawn()

    def _tick(self) -> None:
        now = time.monotonic()
        stall = self.options.stall_timeout
        for w in list(self.workers.values()):
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
        if self.mappings is not None:
            self.mappings.sweep()  # segments the workers deleted since the last read
        if self.state in (PoolState.RUNNING, PoolState.CLOSING):
            self._tick_handle = self.loop.call_later(0.25, self._tick)

    def _check_memory(self) -> None:
        policy = self.options.memory
        if policy.soft_limit is None and policy.hard_limit is None:
            return
        import psutil  # only pools with a memory limit pay for it

        for w in list(self.workers.values()):
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
                    self._recycle(w, "soft memory limit")
                elif self.state == PoolState.RUNNING:
                    self._spawn()

    # --- completion -------------------------------------------------------------------

    def _forget_job(self, job: Job) -> None:
        """``job.on_finished``: the job is done; drop it and what it held."""
        if job.first_payload is not None and self.segments is not None:  # never sent
            self.segments.release([n for n in job.first_payload[1] if n is not None])
            job.first_payload = None
        placed = self.placements.pop(job.id, None)
        if placed is not None:
            self.placed_bytes += placed.written_bytes
            pinned = tuple(placed.names)
            placed.close()  # every task of the job is final: no chunk will name them again
            if job.fn_buffers:  # its digest is the job's own: never used again
                self.fn_time.pop(job.digest, None)
            for w in list(self.workers.values()):
                if job.fn_buffers:
                    w.functions.pop(job.digest, None)
                if pinned and w.state == "ready":  # unmap them now (and forget the function)
                    self._send(self.data, w, proto.Release(pinned))
        self.jobs.pop(job.id, None)

    # --- introspection ----------------------------------------------------------------

    def statistics(self) -> PoolStatistics:
        """A frozen snapshot of the workers, the jobs and the queue (on the engine)."""
        now = time.monotonic()
        workers = []
        for w in self.workers.values():
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
        return PoolStatistics("local", PoolState(self.state), self.target_workers, tuple(workers),
                              tuple(jobs), queued, self.bad_messages, self.spawn_error)


# Reported to a circuit breaker for an admitted call that never ran: neutral, not a failure.
_NOT_RUN = asyncio.CancelledError("the task did not run")


_FINAL_BYTES = bytes([TaskState.SUCCEEDED, TaskState.FAILED, TaskState.CANCELLED])
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


def _is_stopped(pid: int) -> bool:
    """Whether ``pid`` is stopped (state T) or traced (t), from /proc/<pid>/stat."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3] in (b"T", b"t")


def _worker_id(ident: proto.Frame) -> int:
    try:
        return int(bytes(ident)[1:].split(b"-", 1)[0])
    except ValueError:
        return -1


def _pop_chunk(w: WorkerProc, job_id: int, start: int) -> Chunk | None:
    for i, chunk in enumerate(w.inflight):
        if chunk.job.id == job_id and chunk.start == start:
            del w.inflight[i]
            return chunk
    return None
