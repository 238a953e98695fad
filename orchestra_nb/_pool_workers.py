"""The local pool's worker processes (layer 2): starting, retrying, stopping, reaping.

:class:`WorkerSet` owns the pool's processes (``procs``, by worker id) and how many there
should be (``target``): it spawns them (``_procs.spawn_worker``), retries a failed start with
backoff, replaces the missing ones, stops, recycles and resizes, notes a worker's ready
handshake, and reaps a worker whose pidfd reports its exit. What happens to the exited
worker's chunks is the recovery's business (``_pool_recovery``); the core wires the two.
It also keeps the caller's ``sys.path`` as the workers should see it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import zmq

from . import _protocol as proto
from ._bus import EventBus
from ._events import WorkerExited, WorkerSpawnFailed, WorkerStarted
from ._procs import WorkerProc, delete_worker_buffers, spawn_worker
from ._state import PoolState, WorkerState

if TYPE_CHECKING:
    from ._ioloop import EngineLoop
    from ._pool import PoolOptions
    from ._pool_wire import Wire

__all__ = ["MAX_START_FAILURES", "WorkerSet"]

MAX_START_FAILURES = 3  # consecutive workers exiting by themselves before Ready -> broken
SPAWN_RETRY_FIRST = 0.05  # seconds before retrying a failed worker start, doubling...
SPAWN_RETRY_MAX = 5.0  # ... up to this


class PoolStatus(Protocol):
    """What a part of the pool reads of the core that owns it: the pool's state; and the
    count of messages it refused, which a part may add to."""

    state: PoolState
    bad_messages: int


class WorkerSet:
    def __init__(
        self, options: PoolOptions, bus: EventBus, loop: EngineLoop, wire: Wire, pool: PoolStatus,
        on_exit: Callable[[WorkerProc], None], on_respawned: Callable[[], None],
    ) -> None:
        self.options = options
        self.bus = bus
        self.loop = loop
        self.wire = wire
        self.pool = pool
        self._on_exit = on_exit  # a worker's pidfd is readable: it exited
        self._on_respawned = on_respawned  # a retried start ran: there may be work for it
        self.procs: dict[int, WorkerProc] = {}
        self.target = options.workers
        self._ids = 0
        # The caller's sys.path as last seen by a submit (set by the backend, in the caller's
        # thread): a worker whose sys_path_version is older gets it before its next chunk.
        self.sys_path: list[str] = list(sys.path)
        self.sys_path_version = 0
        self.start_failures = 0
        self.spawn_failures = 0  # consecutive failed worker starts (retried with backoff)
        self.spawn_error: str | None = None
        self._respawn_handle: asyncio.TimerHandle | None = None
        self.all_ready: asyncio.Event = asyncio.Event()

    def spawn(self) -> WorkerProc | None:
        """Start one worker; None if that failed (out of descriptors or processes, the run
        directory gone...): then a retry is scheduled, with backoff, while the pool is open."""
        self._ids += 1
        options = self.options
        try:
            self.wire.ensure_run_dir()
            w = spawn_worker(
                self._ids, self.wire.run_dir, self.wire.key, self.wire.shm_dir,
                python=options.python, env=options.env,
                threads=options.threads_per_worker, heartbeat=options.heartbeat,
                max_result_bytes=options.max_result_bytes, busy_poll=options.busy_poll,
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
        self.procs[w.id] = w
        self.loop.add_reader(w.pidfd, self._on_exit, w)
        w.timers.append(self.loop.call_later(options.start_timeout, self._start_timeout, w))
        self.all_ready.clear()
        return w

    def alive(self) -> int:
        """Workers that are not retiring."""
        return sum(1 for x in self.procs.values() if not x.retire)

    def replenish(self) -> None:
        """Start workers until ``target`` are alive (a failed start is retried later)."""
        for _ in range(self.target - self.alive()):
            if self.spawn() is None:
                break  # retried with backoff

    def _spawn_failed(self, exc: BaseException) -> None:
        self.spawn_failures += 1
        self.spawn_error = f"{type(exc).__name__}: {exc}"
        delay = min(SPAWN_RETRY_MAX, SPAWN_RETRY_FIRST * 2 ** (self.spawn_failures - 1))
        delay *= 0.5 + self.options.retry_random()  # several pools: not all at once
        self.bus.publish(WorkerSpawnFailed(self.spawn_error, self.alive(), self.target, delay))
        if self._respawn_handle is None:
            self._respawn_handle = self.loop.call_later(delay, self._respawn_missing)

    def _respawn_missing(self) -> None:
        self._respawn_handle = None
        if self.pool.state != PoolState.RUNNING:
            return
        self.replenish()  # the next try is scheduled if one fails
        self._on_respawned()

    def _start_timeout(self, w: WorkerProc) -> None:
        if w.state == "starting":
            w.kill("start", f"no ready handshake within {self.options.start_timeout} s")

    def ready(self, w: WorkerProc, worker_id: int) -> bool:
        """``w`` sent its ready handshake; False if it was not expected (a bad message)."""
        if worker_id != w.id or w.state != "starting":
            return False
        w.state = WorkerState.READY
        self.start_failures = 0
        for timer in w.timers:
            timer.cancel()
        w.timers.clear()
        self.bus.publish(WorkerStarted(w.id, w.pid))
        return True

    def note_all_ready(self) -> None:
        if all(x.state != "starting" for x in self.procs.values()):
            self.all_ready.set()

    def resize(self, workers: int) -> None:
        """Grow at once; shrink by retiring idle workers first, busy ones once their chunk
        is done."""
        self.target = workers
        alive = [w for w in self.procs.values() if w.state in ("starting", "ready") and not w.retire]
        for _ in range(workers - len(alive)):
            if self.spawn() is None:
                break  # retried with backoff
        for w in sorted(alive, key=lambda w: len(w.inflight))[: max(0, len(alive) - workers)]:
            w.retire = True
            if not w.inflight:
                self.stop(w)

    def stop(self, w: WorkerProc) -> None:
        if w.state in ("stopping", "dead"):
            return
        w.state = WorkerState.STOPPING
        self.wire.send(self.wire.data, w, proto.Shutdown())
        w.close_stdin()

    def recycle(self, w: WorkerProc, why: str) -> None:
        w.retire = True
        self.stop(w)
        if self.pool.state == PoolState.RUNNING:
            self.spawn()

    def kill_all(self, kind: str, reason: str) -> None:
        for w in list(self.procs.values()):
            w.kill(kind, reason)

    def reap(self, w: WorkerProc) -> tuple[int, bool]:
        """``w`` exited: collect it, free what it held, publish ``WorkerExited``. Returns its
        exit code and whether it was the last straw of ``MAX_START_FAILURES`` workers in a
        row that died before their handshake (the worker environment is broken)."""
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
        self.procs.pop(w.id, None)
        running = self.pool.state == PoolState.RUNNING
        if expected:
            reason = "recycled" if w.retire and running else "shutdown"
        elif w.kill_kind is not None:
            reason = f"killed: {w.kill_reason}"
        else:
            reason = "crashed"
        self.bus.publish(WorkerExited(w.id, w.pid, returncode, reason))
        # Only a worker that exited by itself before its handshake (an import error, a bad
        # interpreter), or hung past start_timeout, says the environment is broken; one
        # killed by a signal from outside (or by the pool for another reason) is a crash.
        by_itself = w.kill_kind is None and returncode >= 0
        if not was_ready and (by_itself or w.kill_kind == "start") and running:
            self.start_failures += 1
            if self.start_failures >= MAX_START_FAILURES:
                return returncode, True
        return returncode, False

    def _forget_segments(self, w: WorkerProc) -> None:
        """A worker is gone: the pool's segments it held are free, and its own are deleted
        (arrays still using one keep their mapping)."""
        wire = self.wire
        if wire.segments is not None:
            wire.segments.release(list(w.held))
        w.held.clear()
        delete_worker_buffers(wire.run_dir, w.id)
        if wire.mappings is not None:
            wire.mappings.sweep()  # unmap them: the mappings would keep their memory

    def close(self) -> None:
        if self._respawn_handle is not None:
            self._respawn_handle.cancel()
