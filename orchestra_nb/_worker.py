"""The worker process (layer 1): ``python -m orchestra_nb._worker``, one per pool slot.

A worker reads its configuration (with the pool's message-signing key) as one JSON line on stdin,
connects two DEALER sockets to the pool and says :class:`Ready`:

* the *data* socket, owned by the main thread: ``Define`` / ``Run`` / ``Shutdown`` in,
  ``Result`` / ``Output`` / ``Started`` out;
* the *control* socket, owned by the control thread: ``Cancel`` in, ``Heartbeat`` and
  periodic ``Output`` flushes out. Heartbeats come from this thread so that a task busy in
  C code that releases the GIL still looks alive, and one that holds it looks stalled.

Interrupting a task: the control thread picks a target (the chunk, or the item whose
deadline passed) and sends SIGINT to the main thread; the handler raises
``KeyboardInterrupt`` only if that target is still what the main thread runs, so a late
signal never hits the next task.

The worker never outlives its pool: PR_SET_PDEATHSIG(SIGKILL) (Linux), a parent-pid check,
and a thread that exits the process on EOF of stdin (the pool holds the write end).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import functools
import importlib
import io
import json
import os
import pickle
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import zmq

from . import _protocol as proto
from ._exceptions import SerializationError, TaskExitError, TaskTimeoutError
from ._namespace import NamespaceLink, link
from ._serialize import ErrorRecord, blame_results, capture_exception, dumps_result
from ._spin import BusyPoll

_OUTPUT_CAP = 1024 * 1024  # bytes of output kept per task; the rest is summarised
_OUTPUT_FLUSH = 0.05  # seconds between output flushes from a running task


class _State:
    """What the main thread is doing, read by the control thread and the SIGINT handler."""

    def __init__(self) -> None:
        self.chunk: tuple[int, int] | None = None  # (job, start) being run
        self.item: int | None = None  # index of the item being run (timeout jobs only)
        self.deadline: float | None = None
        self.target: tuple[int, int] | None = None  # chunk to interrupt
        self.target_item: int | None = None  # ... and only this item of it (None: any)
        self.values: list[Any] = []  # results so far of the chunk being run
        self.cancelled_items: set[tuple[int, int]] = set()  # (job, index) not to run
        self.reason = "cancel"
        self.cancelled_jobs: set[int] = set()


class _TaskStream(io.TextIOBase):
    """sys.stdout / sys.stderr of the worker: text written during a task becomes Output
    messages for that task; outside tasks it goes to the worker's log file."""

    def __init__(self, name: str, fallback: Any, buffer: _OutputBuffer) -> None:
        self.name = name
        self._fallback = fallback
        self._buffer = buffer

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        if not self._buffer.write(self.name, text):
            self._fallback.write(text)
            self._fallback.flush()
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


class _OutputBuffer:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.task: tuple[int, int] | None = None  # (job, index) that output belongs to
        self.pending: list[proto.Output] = []
        self.bytes_this_task = 0
        self.last_flush = time.monotonic()

    # A chunk's items run in a tight loop without a call per item here: the item that
    # writes is the chunk's start plus the values done so far (``values`` is that list).
    values: list[Any] | None = None
    base = 0

    def write(self, stream: str, text: str) -> bool:
        with self.lock:
            if self.task is None:
                return False
            job, index = self.task
            if self.values is not None:
                current = self.base + len(self.values)
                if current != index:
                    index = current
                    self.task = (job, index)
                    self.bytes_this_task = 0
            size = len(text)
            if self.bytes_this_task >= _OUTPUT_CAP:
                return True
            self.bytes_this_task += size
            if self.bytes_this_task > _OUTPUT_CAP:
                text = text[: max(0, size - (self.bytes_this_task - _OUTPUT_CAP))]
                text += f"\n[orchestra: output of task {index} truncated at {_OUTPUT_CAP} bytes]\n"
            last = self.pending[-1] if self.pending else None
            if last is not None and last[:3] == (job, index, stream):
                self.pending[-1] = last._replace(text=last.text + text)
            else:
                self.pending.append(proto.Output(job, index, stream, text))
            return True

    def begin(self, job: int, index: int, values: list[Any] | None = None) -> None:
        with self.lock:
            self.values = values
            self.base = index - (len(values) if values is not None else 0)
            if self.task != (job, index):
                self.task = (job, index)
                self.bytes_this_task = 0

    def end(self) -> None:
        with self.lock:
            self.task = None
            self.values = None

    def take(self) -> list[proto.Output]:
        with self.lock:
            out, self.pending = self.pending, []
            self.last_flush = time.monotonic()
            return out


class Worker:
    def __init__(self, config: dict[str, Any]) -> None:
        self.worker_id: int = config["worker_id"]
        self.key = bytes.fromhex(config["key"])
        self.shm_dir: str | None = config.get("shm_dir")
        self.heartbeat: float = config.get("heartbeat", 1.0)
        self.max_result_bytes: int | None = config.get("max_result_bytes")
        self.pool_paths: set[str] = set(config["sys_path"])  # the pool's sys.path, as sent
        # A chunk's results are pickled together, stopping once they pass the limit: then
        # they are checked one by one (see _send_result). The memory spent stays near it.
        self.dumps_result: Callable[..., bytes] = (
            dumps_result
            if self.max_result_bytes is None
            else functools.partial(dumps_result, limit=self.max_result_bytes)
        )
        self.busy_poll = BusyPoll(config.get("busy_poll", 0.0))
        # Results' large buffers go through warm, reused segments (see proto.Segments).
        self.segments = proto.Segments(self.shm_dir, f"w{self.worker_id}") if self.shm_dir else None
        self.released: list[str] = []  # argument segments the pool may reuse now
        # ... and the pool's segments, kept mapped for their next use (see proto.Mappings).
        self.mappings = proto.Mappings(self.shm_dir) if self.shm_dir else None
        # Frames above the limit go through a file of the run directory (see _protocol).
        self.run_dir: str = config["run_dir"]
        limit = proto.frame_limit(self.max_result_bytes)
        self.spill = proto.Spill(self.run_dir, limit, f"w{self.worker_id}")
        self.ctx = zmq.Context(io_threads=1)
        ident = config.get("ident", f"w{self.worker_id}").encode()
        self.data = self.ctx.socket(zmq.DEALER)
        self.data.setsockopt(zmq.IDENTITY, ident)
        self.data.setsockopt(zmq.LINGER, 2000)
        self.data.setsockopt(zmq.MAXMSGSIZE, limit)
        self.data.connect(config["data_addr"])
        self.ctrl = self.ctx.socket(zmq.DEALER)
        self.ctrl.setsockopt(zmq.IDENTITY, ident)
        self.ctrl.setsockopt(zmq.LINGER, 0)
        self.ctrl.setsockopt(zmq.MAXMSGSIZE, limit)
        self.ctrl.connect(config["ctrl_addr"])
        self.functions: dict[bytes, Callable[..., Any] | ErrorRecord] = {}
        # Functions whose captured arrays live in pinned segments of their job (_shared).
        self.function_segments: dict[bytes, tuple[str, ...]] = {}
        # Notebook functions using names of the %%orchestra namespace (see _namespace).
        self.namespace_links: dict[bytes, NamespaceLink] = {}
        self.state = _State()
        self.output = _OutputBuffer()
        self.main_ident = threading.get_ident()
        self.running = True
        # Processes a task started are killed when its chunk ends (their group with them,
        # as orphans come back to this subreaper), unless the pool's env sets this.
        self.keep_children = os.environ.get(KEEP_CHILDREN_ENV) == "1"
        self.pid = os.getpid()
        self._async_loop: Any = None  # an asyncio loop, made for the first async def task

    # --- main thread -----------------------------------------------------------------

    def send(self, msg: proto.Message, payload: list[Any] | None = None) -> None:
        proto.send_message(self.data, self.key, msg, payload or (), spill=self.spill)

    def serve(self) -> None:
        self.send(proto.Ready(self.worker_id, os.getpid(), sys.version.split()[0]))
        self.control = threading.Thread(target=self._control_loop, name="orchestra-control", daemon=True)
        self.control.start()
        data = self.data
        poll = self.busy_poll
        has_input = functools.partial(proto.has_input, data)
        mappings = self.mappings
        while self.running:
            # The next task often follows at once: catch it awake.
            if not poll.wait(has_input) and mappings is not None:
                self._sweep_shared()  # about to sleep: unmap segments the pool deleted
            frames = proto.recv_frames(data)
            try:
                msg, payload = proto.decode_message(self.key, frames, self.run_dir)
            except proto.BadSignature:
                continue  # the pool counts drops on its side; a worker just ignores them
            if isinstance(msg, proto.Run):
                self._run(msg, payload)
                del payload
                self._send_releases()  # arguments that a result referenced, now dropped
            elif isinstance(msg, proto.Release):
                if self.segments is not None:
                    self.segments.release(msg.names)
                if any(n.startswith(proto.PINNED_PREFIX) for n in msg.names):
                    self._sweep_shared()  # a job ended: its pinned segments are deleted
            elif isinstance(msg, proto.Define):
                self._define(msg, payload)
            elif isinstance(msg, proto.SysPath):
                self._set_sys_path(msg.paths)
            elif isinstance(msg, proto.Shutdown):
                self.running = False

    def _set_sys_path(self, paths: tuple[str, ...]) -> None:
        """The pool's ``sys.path`` now, followed by the entries tasks added here."""
        added_here = [p for p in sys.path if p not in self.pool_paths and p not in paths]
        sys.path[:] = [*paths, *added_here]
        self.pool_paths = set(paths)
        importlib.invalidate_caches()  # directories may be new since their finders looked

    def _define(self, msg: proto.Define, payload: list[Any]) -> None:
        for digest in msg.forget:
            self._forget_function(digest)
        try:
            buffers = None
            if msg.buffers:
                buffers = proto.read_buffers(payload, msg.buffers, self.mappings, self.released.append)
                pinned = tuple(n for n in msg.buffers if n is not None and n.startswith(proto.PINNED_PREFIX))
                if pinned:
                    self.function_segments[msg.digest] = pinned
            fn = pickle.loads(payload[0], buffers=buffers)
        except BaseException as exc:  # a crash here is the function's, not the worker's
            if isinstance(exc, ModuleNotFoundError):
                missing = SerializationError(
                    f"the function needs module {exc.name!r}, which the worker cannot import "
                    "(it exists only in the pool's process, or not on the worker's sys.path); "
                    "define the function in an importable module or in the notebook itself"
                )
                missing.__cause__ = exc
                exc = missing
            record = capture_exception(exc, "serialization")
            self.functions[msg.digest] = record._replace(
                evalue=f"cannot load the function in the worker: {record.evalue}"
            )
            return
        ns_link = link(fn)
        if ns_link is not None:
            self.namespace_links[msg.digest] = ns_link
        if _is_coroutine_function(fn):
            fn = self._sync_wrapper(fn)
        self.functions[msg.digest] = fn

    def _forget_function(self, digest: bytes) -> None:
        self.functions.pop(digest, None)
        self.namespace_links.pop(digest, None)
        self.function_segments.pop(digest, None)

    def _sweep_shared(self) -> None:
        """Forget the functions whose pinned segments the pool deleted (their job ended;
        the digest is that job's own), then unmap what is gone: before sleeping, and when
        the pool says a job's segments went."""
        if self.function_segments:
            directory = self.shm_dir or ""
            for digest, names in list(self.function_segments.items()):
                if not all(os.path.exists(os.path.join(directory, n)) for n in names):
                    self._forget_function(digest)
        if self.mappings is not None:
            self.mappings.sweep()

    def _sync_wrapper(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def run_coroutine(*args: Any, **kwargs: Any) -> Any:
            if self._async_loop is None:
                import asyncio  # only for async def tasks: it costs ~25 ms of start-up

                self._async_loop = asyncio.new_event_loop()
            return self._async_loop.run_until_complete(fn(*args, **kwargs))

        return run_coroutine

    def _run(self, msg: proto.Run, payload: list[Any]) -> None:
        t0 = time.perf_counter()
        job, count = msg.job, msg.count
        errors: dict[int, ErrorRecord] = {}
        values: list[Any] = []
        fn = self.functions.get(msg.digest)
        if job in self.state.cancelled_jobs:
            errors = dict.fromkeys(range(count), _CANCELLED)
        elif fn is None or isinstance(fn, ErrorRecord):
            record = fn or ErrorRecord(None, "KeyError", "function not defined", "", "error")
            errors = dict.fromkeys(range(count), record)
        else:
            try:
                items = pickle.loads(
                    payload[0],
                    buffers=proto.read_buffers(payload, msg.buffers, self.mappings, self.released.append)
                    if msg.buffers
                    else None,
                )
            except BaseException as exc:
                record = capture_exception(exc, "arguments")  # the pool isolates the culprit
                record = record._replace(evalue=f"cannot unpickle the arguments in the worker: {record.evalue}")
                errors = dict.fromkeys(range(count), record)
            else:
                ns_link = self.namespace_links.get(msg.digest)
                if ns_link is not None:
                    ns_link.refresh()
                values = self._call_all(fn, items, msg, errors)
                del items  # the arguments: their segments are released before the result
        if os.getpid() != self.pid:
            os._exit(0)  # a task's fork() child came back here: it must not act as the worker
        if not self.keep_children:
            _kill_children()
        self._flush_output(self.send)
        self._send_releases()
        self._send_result(msg, values, errors, time.perf_counter() - t0)

    def _send_releases(self) -> None:
        if self.released:
            names, self.released = tuple(self.released), []
            self.send(proto.Release(names))

    def _call_all(
        self,
        fn: Callable[..., Any],
        items: list[Any],
        msg: proto.Run,
        errors: dict[int, ErrorRecord],
    ) -> list[Any]:
        """Call ``fn`` on every item; failures become ``errors[offset]``, values stay aligned.

        A failure carries how long its call ran. Items are timed one by one where a clock
        read costs nothing next to the call (timeouts, call batches, chunks of at most
        ``_TIMED_ITEMS``); a large chunk is one of fast items, timed per block of
        ``_CLOCK_BLOCK`` (a clock read per item would slow the fastest maps by about 10%),
        so a failure inside a block carries an upper bound."""
        state = self.state
        values: list[Any] = []
        append = values.append
        n = len(items)
        watched = msg.timeout is not None
        state.values = values
        clock = time.perf_counter
        mark, mark_offset = clock(), 0  # the call of item ``mark_offset`` started at ``mark``
        while len(values) < n:
            offset = len(values)
            self.output.begin(msg.job, msg.start + offset, values)
            state.chunk = (msg.job, msg.start)
            try:
                if watched:
                    # One item at a time: the pool and the control thread watch its clock.
                    assert msg.timeout is not None
                    index = msg.start + offset
                    state.item = index
                    state.deadline = time.monotonic() + msg.timeout
                    self.send(proto.Started(msg.job, index))
                    mark, mark_offset = clock(), offset
                    append(self._call_one(fn, items[offset], msg))
                    state.deadline = None
                elif msg.call:
                    # A batch of independent calls, each of which may be cancelled alone.
                    cancelled = state.cancelled_items
                    for args, kwargs in items[len(values) :]:
                        if cancelled and (msg.job, msg.start + len(values)) in cancelled:
                            errors[len(values)] = _CANCELLED
                            append(None)
                            continue
                        mark, mark_offset = clock(), len(values)
                        append(fn(*args, **kwargs))
                else:
                    step = 1 if n - offset <= _TIMED_ITEMS else _CLOCK_BLOCK
                    star = msg.star
                    for block in range(offset, n, step):
                        mark, mark_offset = clock(), block
                        if star:
                            for item in items[block : block + step]:
                                append(fn(*item))
                        else:
                            for item in items[block : block + step]:
                                append(fn(item))
            except PoolInterrupt as exc:
                ran = clock() - mark
                state.deadline = None
                failed = len(values)
                if state.reason == "item" and state.target == state.chunk:
                    state.target = state.target_item = None
                    errors[failed] = _CANCELLED  # only this call was cancelled
                    append(None)
                    continue
                if state.reason == "timeout" and state.target == state.chunk:
                    state.target = None
                    timeout_exc = TaskTimeoutError(
                        f"task {msg.start + failed} exceeded its timeout of {msg.timeout} s and was interrupted"
                    )
                    timeout_exc.__cause__ = exc
                    record = capture_exception(timeout_exc, "timeout")
                    errors[failed] = _timed(record, ran, failed != mark_offset)
                    append(None)
                    continue
                for rest in range(failed, n):
                    errors[rest] = _CANCELLED
                values.extend([None] * (n - failed))
            except (KeyboardInterrupt, SystemExit) as exc:  # the task's own, not the pool's
                ran = clock() - mark
                state.deadline = None
                index = msg.start + len(values)
                exit_exc = TaskExitError(
                    f"task {index} raised {type(exc).__name__}{_args(exc)}: a task's "
                    f"{type(exc).__name__} is its failure, not a cancel nor the caller's exit"
                )
                exit_exc.__cause__ = exc
                record = capture_exception(exit_exc, "error")
                errors[len(values)] = _timed(record, ran, len(values) != mark_offset)
                append(None)
            except BaseException as exc:
                ran = clock() - mark
                state.deadline = None
                if isinstance(exc, NameError):
                    ns_link = self.namespace_links.get(msg.digest)
                    if ns_link is not None:
                        ns_link.explain(exc)
                record = capture_exception(exc, "error", skip_frames=1)
                errors[len(values)] = _timed(record, ran, len(values) != mark_offset)
                append(None)
            finally:
                state.chunk = None
                state.item = None
                self.output.end()
            if msg.job in state.cancelled_jobs and len(values) < n:
                for rest in range(len(values), n):
                    errors[rest] = _CANCELLED
                values.extend([None] * (n - len(values)))
        return values

    def _call_one(self, fn: Callable[..., Any], item: Any, msg: proto.Run) -> Any:
        if msg.call:
            args, kwargs = item
            return fn(*args, **kwargs)
        return fn(*item) if msg.star else fn(item)

    def _send_result(
        self, msg: proto.Run, values: list[Any], errors: dict[int, ErrorRecord], elapsed: float
    ) -> None:
        if len(values) < msg.count:  # nothing ran (arguments, function or job failed)
            values.extend([None] * (msg.count - len(values)))
        for offset in errors:
            values[offset] = None
        shm = self.segments or self.shm_dir
        try:
            frames, names = proto.pickle_payload(self.dumps_result, (values, errors or None), shm)
        except Exception:
            # A result cannot be pickled, or the chunk's passed max_result_bytes (and
            # pickling stopped there): find the culprits one by one; the others travel.
            blame_results(values, errors, msg.start, self.max_result_bytes)
            frames, names = proto.pickle_payload(dumps_result, (values, errors or None), shm)
        try:
            self.send(proto.Result(msg.job, msg.start, msg.count, elapsed, names), frames)
        except OSError as exc:  # too large for a frame, and its file could not be written
            if self.segments is not None:
                self.segments.release([n for n in names if n is not None])
            size = sum(memoryview(f).nbytes for f in frames)
            err = SerializationError(
                f"the results of {proto.task_range(msg.start, msg.count)} take {size:,} "
                f"bytes, more than a message frame carries ({self.spill.limit:,} bytes), and "
                f"writing them to {self.run_dir} failed: {type(exc).__name__}: {exc}"
            )
            record = capture_exception(err, "serialization")
            body = ([None] * msg.count, dict.fromkeys(range(msg.count), record))
            self.send(proto.Result(msg.job, msg.start, msg.count, elapsed, ()), [dumps_result(body)])

    def _flush_output(self, send: Callable[[proto.Message], None]) -> None:
        output = self.output
        if not output.pending:
            # The usual case at the end of a task, after which nothing more can be added
            # (writes then go to the log): skip the lock, but restart the flush clock.
            output.last_flush = time.monotonic()
            return
        for out in output.take():
            send(out)

    # --- control thread ---------------------------------------------------------------

    def _control_loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self.ctrl, zmq.POLLIN)
        next_beat = 0.0

        def send_ctrl(msg: proto.Message) -> None:
            proto.send_message(self.ctrl, self.key, msg)

        while self.running:
            now = time.monotonic()
            state = self.state
            if state.deadline is not None and now >= state.deadline and state.chunk is not None:
                state.deadline = None
                self._interrupt(state.chunk, "timeout")
            if now >= next_beat:
                send_ctrl(proto.Heartbeat(self.worker_id, state.chunk is not None))
                next_beat = now + self.heartbeat
            if self.output.pending and now - self.output.last_flush >= _OUTPUT_FLUSH:
                self._flush_output(send_ctrl)
            wait = min(next_beat - now, _OUTPUT_FLUSH)
            if state.deadline is not None:
                wait = min(wait, max(0.0, state.deadline - now))
            if not poller.poll(max(1, int(wait * 1000))):
                continue
            try:
                msg, _ = proto.decode_message(self.key, proto.recv_frames(self.ctrl), self.run_dir)
            except proto.BadSignature:
                continue
            if isinstance(msg, proto.Cancel) and msg.start >= 0:
                # One call of a batch: interrupt it if it runs now, else skip it later.
                state.cancelled_items.add((msg.job, msg.start))
                if len(state.cancelled_items) > 4096:
                    state.cancelled_items.discard(min(state.cancelled_items))
                chunk = state.chunk
                if chunk is not None and chunk[0] == msg.job and chunk[1] + len(state.values) == msg.start:
                    self._interrupt(chunk, "item", msg.start)
            elif isinstance(msg, proto.Cancel):
                if msg.start == -1:
                    state.cancelled_jobs.add(msg.job)
                    if len(state.cancelled_jobs) > 4096:  # job ids only grow: drop the oldest
                        state.cancelled_jobs.discard(min(state.cancelled_jobs))
                chunk = state.chunk
                if chunk is not None and chunk[0] == msg.job and msg.start in (-1, chunk[1]):
                    self._interrupt(chunk, "cancel")

    def _interrupt(self, chunk: tuple[int, int], reason: str, item: int | None = None) -> None:
        self.state.reason = reason
        self.state.target_item = item
        self.state.target = chunk
        signal.pthread_kill(self.main_ident, signal.SIGINT)


class PoolInterrupt(KeyboardInterrupt):
    """The pool's own interrupt of a task (cancel, timeout): a ``KeyboardInterrupt``, so
    that a task's cleanup for Ctrl-C runs, but told apart from one the task raises."""


def _args(exc: BaseException) -> str:
    return f"({', '.join(map(repr, exc.args))})" if exc.args else ""


_CO_COROUTINE = 0x80  # inspect.CO_COROUTINE, without importing inspect at start-up


def _is_coroutine_function(fn: Any) -> bool:
    code = getattr(getattr(fn, "__func__", fn), "__code__", None)
    return code is not None and bool(code.co_flags & _CO_COROUTINE)


_CANCELLED = ErrorRecord(None, "CancelledError", "cancelled", "", "cancelled")

# Chunks up to this size time every item; larger ones (fast items) time blocks of items.
_TIMED_ITEMS = 16
_CLOCK_BLOCK = 64


def _timed(record: ErrorRecord, seconds: float, bound: bool) -> ErrorRecord:
    """``record`` with how long its call ran (``bound``: at most that long)."""
    return record._replace(duration=seconds, duration_bound=bound)


KEEP_CHILDREN_ENV = "ORCHESTRA_KEEP_TASK_CHILDREN"
_EXIT_GRACE = 5.0  # seconds the main thread has to exit after the pool closed our stdin


def _kill_children() -> None:
    """SIGKILL every process the tasks left running (and reap them): their children come
    back to this process (a subreaper) when their parent dies, so none escapes."""
    try:
        os.waitpid(-1, os.WNOHANG)  # reaps one that ended, if any
    except ChildProcessError:
        return  # the usual case: no child at all (one cheap system call)
    for _ in range(64):  # each round takes one generation of orphans
        children = _child_pids()
        if not children:
            break
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for pid in children:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass


def _child_pids() -> list[int]:
    pids: list[int] = []
    with contextlib.suppress(OSError):
        for tid in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{tid}/children", "rb") as f:
                pids.extend(int(p) for p in f.read().split())
    return pids


def _die_with_parent(parent_pid: int) -> None:
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        PR_SET_CHILD_SUBREAPER = 36
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(0)

    # The pool's pipe moves off descriptor 0: a task's stdin (and its children's) is
    # /dev/null, so reading it ends at once instead of blocking on the pool's pipe.
    watched = os.dup(0)  # not inherited by the tasks' children
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)

    def watch_stdin() -> None:
        while os.read(watched, 4096):
            pass
        if os.getppid() == parent_pid:
            # An orderly stop (Shutdown came first): let the main thread finish its exit
            # (its atexit work) for a moment; the pool kills a worker that takes longer.
            threading.Event().wait(_EXIT_GRACE)
        os._exit(0)

    threading.Thread(target=watch_stdin, name="orchestra-stdin-watch", daemon=True).start()


def main() -> None:
    config = json.loads(sys.stdin.buffer.readline())
    if config.get("log_path"):  # started ahead of its pool (_prespawn): output to its log now
        log = os.open(config["log_path"], os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(log)
    _die_with_parent(config["parent_pid"])
    sys.path[:] = config["sys_path"]
    with contextlib.suppress(OSError):
        os.chdir(config["cwd"])
    worker = Worker(config)
    state = worker.state

    def on_sigint(signum: int, frame: Any) -> None:
        # Only the chunk the control thread targeted, and only while it still runs.
        if state.target is not None and state.target == state.chunk:
            item = state.target_item
            if item is None or item == state.target[1] + len(state.values):
                raise PoolInterrupt
        return None

    signal.signal(signal.SIGINT, on_sigint)
    out_fallback, err_fallback = sys.stdout, sys.stderr
    sys.stdout = _TaskStream("stdout", out_fallback, worker.output)
    sys.stderr = _TaskStream("stderr", err_fallback, worker.output)
    exit_code = 0
    try:
        worker.serve()
    except BaseException:  # the worker's own failure: in its log, and not "exit code 0"
        import traceback

        traceback.print_exc(file=err_fallback)
        exit_code = 70  # EX_SOFTWARE
    finally:
        # The control thread owns its socket: it stops within one poll, then closes it.
        worker.running = False
        control = getattr(worker, "control", None)
        if control is not None:
            control.join(timeout=1.0)
        if control is None or not control.is_alive():
            worker.ctrl.close(linger=0)
            worker.data.close(linger=2000)
            worker.ctx.term()  # sends what is still queued (the last results), within linger
        # No interpreter finalization: the stdin watchdog thread is still blocked in a read
        # of stdin, and finalizing under it aborts the process. The exit functions run,
        # though: those of tasks, and the shutdown of pools that tasks started (nested
        # pools), which would leave their run directories behind.
        with contextlib.suppress(BaseException):
            atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(exit_code)


if __name__ == "__main__":
    main()
