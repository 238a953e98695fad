"""The kernel side of the "Orchestra" side panel (the ``labextension/`` front end).

``%load_ext orchestra_nb`` registers one comm target, :data:`TARGET`. The panel opens a comm
to it while it is visible and closes it when hidden; the messages are in ``docs/panel.md``
and are validated here (:func:`parse_command`) and in the front end.

What it costs:

* no comm open (panel closed, or a front end without the extension): nothing but one weak
  reference per job handle (so that a panel opened later can list the job's failures and
  final counts); no thread, no timer, no event subscription;
* a comm open: one thread (``orchestra-panel``) that reads every open pool's
  ``statistics()`` and sends one ``state`` message per panel at most every
  :data:`SEND_INTERVAL` seconds while jobs run, and about once a second otherwise (only if
  something changed), whatever the number of pools and jobs; plus a subscription to each
  pool's job and worker events, which only wakes it.

It reads the pools (``orchestra.pools()``: the default pool and every ``Pool(...)`` not shut
down) through their public API only: ``statistics()``, ``capabilities``, ``subscribe()``,
``resize()``, ``cancel_job()``, ``pause_job()``, and the job handles' ``exceptions()`` /
``counts()`` / ``events`` (which tells a handle's pool).
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
import threading
import time
import traceback
import weakref
from collections.abc import Callable
from typing import Any

from .._events import JobFinished, JobPaused, JobStarted, WorkerExited, WorkerStarted
from .._state import TaskState, done_count

__all__ = [
    "PROTOCOL_VERSION",
    "TARGET",
    "PanelProtocolError",
    "open_panels",
    "parse_command",
    "register",
    "unregister",
]

TARGET = "orchestra_nb.panel"
PROTOCOL_VERSION = 2
SEND_INTERVAL = 0.25  # seconds between state messages to one panel: at most 4/s
IDLE_INTERVAL = 1.0  # no job running: poll once a second (worker CPU and memory move)
ACK_TIMEOUT = 30.0  # a panel that acknowledged nothing for this long is probably gone...
STALE_INTERVAL = 5.0  # ...and gets a state only this often until it answers again
MAX_JOBS = 50  # jobs listed (newest first); older finished ones are forgotten
MAX_FAILURES = 20  # failures listed per job (the count is always exact)
MAX_TEXT = 300  # characters of an exception message in a state message
MAX_WORKERS = 1024  # the largest pool the panel may ask for


class PanelProtocolError(ValueError):
    """A panel message that does not follow docs/panel.md."""


# --- the messages from the panel --------------------------------------------------------

_COMMANDS: dict[str, dict[str, Callable[[Any], bool]]] = {
    "cancel": {"job_id": lambda v: _is_int(v) and v >= 0},
    "pause": {"job_id": lambda v: _is_int(v) and v >= 0, "paused": lambda v: isinstance(v, bool)},
    "resize": {"pool": lambda v: _is_int(v) and v >= 1,
               "workers": lambda v: _is_int(v) and 1 <= v <= MAX_WORKERS},
    "traceback": {"job_id": lambda v: _is_int(v) and v >= 0, "item": lambda v: _is_int(v) and v >= 0},
    "ack": {"seq": lambda v: _is_int(v) and v >= 0},
}
_EXPECTED = {
    "job_id": "an integer >= 0",
    "item": "an integer >= 0",
    "paused": "true or false",
    "pool": "an integer >= 1 (a pool's id)",
    "workers": f"an integer from 1 to {MAX_WORKERS}",
    "seq": "an integer >= 0",
}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_command(data: Any) -> dict[str, Any]:
    """Check one message from the panel; return it, or raise :class:`PanelProtocolError`
    naming the culprit."""
    if not isinstance(data, dict):
        raise PanelProtocolError(f"a panel message must be a JSON object, got {data!r}")
    kind = data.get("type")
    fields = _COMMANDS.get(kind) if isinstance(kind, str) else None
    if fields is None:
        raise PanelProtocolError(
            f"unknown panel message type {kind!r} (expected one of {', '.join(sorted(_COMMANDS))})"
        )
    for name, valid in fields.items():
        if name not in data:
            raise PanelProtocolError(f"panel message {kind!r} lacks {name!r}")
        if not valid(data[name]):
            raise PanelProtocolError(
                f"panel message {kind!r}: {name!r} must be {_EXPECTED[name]}, got {data[name]!r}"
            )
    extra = sorted(set(data) - set(fields) - {"type"})
    if extra:
        raise PanelProtocolError(f"panel message {kind!r} has unknown field(s) {', '.join(extra)}")
    return data


def _check_hello(data: Any) -> None:
    if not isinstance(data, dict) or data.get("type") != "hello":
        raise PanelProtocolError(f"a panel comm opens with {{'type': 'hello', ...}}, got {data!r}")
    if data.get("version") != PROTOCOL_VERSION:
        raise PanelProtocolError(
            f"the panel speaks protocol version {data.get('version')!r}, this kernel "
            f"{PROTOCOL_VERSION}: reinstall orchestra_nb and reload the page"
        )


# --- handles by job id (fed by the create hook, always on: it is one weak reference) ----

_handles_lock = threading.Lock()
_by_job: weakref.WeakValueDictionary[int, Any] = weakref.WeakValueDictionary()


def track(handle: Any) -> None:
    with _handles_lock:
        _by_job[handle.job_id] = handle


def _handle(job_id: int) -> Any:
    with _handles_lock:
        return _by_job.get(job_id)


def _tracked() -> list[Any]:
    with _handles_lock:
        return list(_by_job.values())


def _open_pools() -> list[Any]:
    """Every open pool, the default one (the pool ``orchestra.map`` uses) first, then by
    age; never starts one."""
    from .. import _api

    default = _api._default
    return sorted(_api.pools(), key=lambda pool: (pool is not default, pool.id))


def _pool_by_id(pool_id: int) -> Any:
    return next((pool for pool in _open_pools() if pool.id == pool_id), None)


def _pool_of(handle: Any, pools: list[Any]) -> Any:
    """The pool a handle's job runs on (a handle's ``events`` is its pool's bus)."""
    return next((pool for pool in pools if pool.events is handle.events), None)


def _pause_reason(pool: Any) -> str:
    return "" if pool.capabilities.pause else f"the {pool.backend} backend cannot pause a job"


def _resize_reason(pool: Any) -> str:
    return "" if pool.capabilities.resize else f"the {pool.backend} backend cannot resize"


# --- what a state message carries ----------------------------------------------------------


def _short(text: str) -> str:
    text = text.strip().splitlines()[0] if text.strip() else ""
    return text if len(text) <= MAX_TEXT else text[: MAX_TEXT - 1] + "…"


def _exception_type(exc: BaseException) -> str:
    from .._exceptions import RemoteError

    return exc.ename if isinstance(exc, RemoteError) else type(exc).__qualname__


def _exception_message(exc: BaseException) -> str:
    from .._exceptions import RemoteError

    return _short(exc.evalue if isinstance(exc, RemoteError) else str(exc))


def traceback_text(exc: BaseException) -> str:
    """The worker's traceback of a task's exception, as the cell would show it."""
    from .._exceptions import RemoteError, RemoteTraceback
    from ._output import enrich_exception

    enrich_exception(exc)
    if isinstance(exc, RemoteError):
        return exc.traceback.rstrip("\n") + f"\n(raised in a worker as {exc.ename})"
    cause = exc.__cause__
    if isinstance(cause, RemoteTraceback):
        return cause.tb.rstrip("\n") + "\n\n" + "".join(traceback.format_exception_only(exc)).rstrip("\n")
    return "".join(traceback.format_exception(exc)).rstrip("\n")


def _failures(handle: Any) -> list[dict[str, Any]]:
    if handle is None:
        return []
    errors = handle.exceptions()
    return [
        {"item": index, "type": _exception_type(exc), "message": _exception_message(exc)}
        for index, exc in sorted(errors.items())[:MAX_FAILURES]
    ]


def _record_from_handle(handle: Any, pool_id: int) -> dict[str, Any]:
    """A job the panel learns of only from its handle (it finished before the panel opened)."""
    counts = handle.counts()
    done = done_count([counts[s] for s in TaskState])
    return {
        "id": handle.job_id, "pool": pool_id, "name": handle.name, "total": handle.total,
        "read": done, "counts": {s.name: counts[s] for s in TaskState}, "done": done,
        "elapsed": None, "finished": handle.done(), "cancelled": handle.cancelled(),
        "paused": False, "failures": _failures(handle) if counts[TaskState.FAILED] else [],
    }


def _finished_record(record: dict[str, Any], event: JobFinished | None, handle: Any) -> dict[str, Any]:
    """A job left the pool's table between two polls: its final state, as a new record (a
    panel's last state message may share the old one)."""
    record = dict(record, finished=True, paused=False)
    if event is not None:
        record.update(
            counts={s.name: event.counts[s] for s in TaskState}, done=done_count(event.counts),
            elapsed=event.elapsed, cancelled=event.cancelled,
        )
    elif handle is not None:
        fresh = _record_from_handle(handle, record["pool"])
        record.update(counts=fresh["counts"], done=fresh["done"], cancelled=fresh["cancelled"])
    if record["counts"][TaskState.FAILED.name]:
        record["failures"] = _failures(handle)
    return record


# --- the thread that feeds open panels -----------------------------------------------------


class _Session:
    """One open comm (one visible panel).

    The panel thread sends in ``context``, the one the comm was opened in: ipykernel takes a
    message's parent header (and from it, which shell the front end's next messages are routed
    to) from the sending context, and a thread of its own would fall back to whatever cell
    ran last."""

    def __init__(self, comm: Any, context: contextvars.Context) -> None:
        self.comm = comm
        self.context = context
        self.seq = 0
        self.last_payload: dict[str, Any] | None = None
        self.last_sent = 0.0
        self.last_ack = time.monotonic()

    def send(self, message: dict[str, Any]) -> None:
        """Reply from a comm handler (it runs in the message's own context)."""
        with contextlib.suppress(Exception):  # a kernel shutting down: nothing left to tell
            self.comm.send(message)

    def send_from_thread(self, message: dict[str, Any]) -> None:
        with contextlib.suppress(Exception):
            self.context.run(self.comm.send, message)

    def offer(self, payload: dict[str, Any], now: float) -> bool:
        """Send ``payload`` as the next state if it changed; True if it was sent."""
        if payload == self.last_payload:
            return False
        if now - self.last_ack > ACK_TIMEOUT and now - self.last_sent < STALE_INTERVAL:
            return False
        self.seq += 1
        self.last_payload = payload
        self.last_sent = now
        self.send_from_thread({"type": "state", "version": PROTOCOL_VERSION, "seq": self.seq, **payload})
        return True


class _Hub:
    """Owns the ``orchestra-panel`` thread: started with the first open comm, stopped (and
    joined) when the last one closes or the extension unloads."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._sessions: dict[str, _Session] = {}
        self._wake = False
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._followed: dict[int, tuple[Any, Any]] = {}  # pool id -> (pool, subscription)
        self._finished: dict[int, JobFinished] = {}
        self._jobs: dict[int, dict[str, Any]] = {}  # every job shown, by id
        self._catch_up = True  # list the tracked handles' jobs at the next poll
        self.sent = 0  # state messages sent, over all panels (for tests and docs)

    # main thread (comm handlers) ------------------------------------------------------

    def add(self, comm: Any, context: contextvars.Context) -> _Session:
        session = _Session(comm, context)
        with self._cond:
            self._sessions[comm.comm_id] = session
            self._wake = self._catch_up = True
            if self._thread is None:
                self._stopping = False
                self._thread = threading.Thread(target=self._run, name="orchestra-panel", daemon=True)
                self._thread.start()
            self._cond.notify()
        return session

    def remove(self, comm_id: str) -> None:
        with self._cond:
            self._sessions.pop(comm_id, None)
            if self._sessions:
                return
        self.stop()

    def sessions(self) -> list[_Session]:
        with self._cond:
            return list(self._sessions.values())

    def poke(self) -> None:
        with self._cond:
            self._wake = True
            self._cond.notify()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            thread, self._thread = self._thread, None
            self._cond.notify()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=10)
        self._unsubscribe()

    # the panel thread ----------------------------------------------------------------

    def _on_event(self, event: Any) -> None:  # the pool's event delivery thread: be quick
        if isinstance(event, JobFinished):
            with self._cond:
                self._finished[event.job_id] = event
        self.poke()

    def _unsubscribe(self) -> None:
        followed, self._followed = self._followed, {}
        for _pool, sub in followed.values():
            sub.close()

    def _follow(self, pools: list[Any]) -> None:
        """Subscribe to the pools opened since the last poll, let go of those closed."""
        open_ids = {pool.id for pool in pools}
        for pool_id in [i for i in self._followed if i not in open_ids]:
            self._followed.pop(pool_id)[1].close()
        for pool in pools:
            if pool.id not in self._followed:
                sub = pool.subscribe(
                    self._on_event, types=(JobStarted, JobFinished, JobPaused, WorkerStarted, WorkerExited)
                )
                self._followed[pool.id] = (pool, sub)

    def _run(self) -> None:
        last_tick = 0.0
        busy = False
        while True:
            with self._cond:
                while not self._stopping:
                    due = last_tick + (SEND_INTERVAL if busy or self._wake else IDLE_INTERVAL)
                    if time.monotonic() >= due:
                        break
                    self._cond.wait(due - time.monotonic())
                if self._stopping:
                    break
                self._wake = False
                sessions = list(self._sessions.values())
            last_tick = time.monotonic()
            try:
                payload, busy = self._collect()
            except Exception:  # never into a cell's output: the kernel's own stderr (server log)
                traceback.print_exc(file=sys.__stderr__)
                continue
            for session in sessions:
                if session.offer(payload, last_tick):
                    self.sent += 1
        self._unsubscribe()

    def _collect(self) -> tuple[dict[str, Any], bool]:
        from .. import _api

        pools = _open_pools()
        self._follow(pools)
        default = _api._default
        entries: list[dict[str, Any]] = []
        live: set[int] = set()
        for pool in pools:
            try:
                stats = pool.statistics().as_dict()
            except Exception:  # closed between the listing and the call
                continue
            for job in stats["jobs"]:
                job["pool"] = pool.id
                live.add(job["id"])
                previous = self._jobs.get(job["id"])
                failed = job["counts"][TaskState.FAILED.name]
                if previous is not None and previous["counts"][TaskState.FAILED.name] == failed:
                    job["failures"] = previous["failures"]
                else:
                    job["failures"] = _failures(_handle(job["id"])) if failed else []
                self._jobs[job["id"]] = job
            entries.append({
                "id": pool.id, "name": pool.name, "default": pool is default,
                "backend": stats["backend"], "state": stats["state"],
                "target_workers": stats["target_workers"], "queued": stats["queued"],
                "can_pause": pool.capabilities.pause, "pause_reason": _pause_reason(pool),
                "can_resize": pool.capabilities.resize, "resize_reason": _resize_reason(pool),
                "max_workers": MAX_WORKERS,
                "workers": [
                    {key: w[key] for key in ("id", "pid", "state", "activity", "job", "item",
                                             "tasks_done", "cpu_percent", "memory_bytes", "stalled")}
                    for w in stats["workers"]
                ],
            })
        with self._cond:
            finished = dict(self._finished)
        open_ids = {pool.id for pool in pools}
        for job_id, record in list(self._jobs.items()):
            if record["pool"] not in open_ids:  # its pool was shut down: it drops out with it
                del self._jobs[job_id]
            elif job_id not in live and not record["finished"]:
                self._jobs[job_id] = _finished_record(record, finished.get(job_id), _handle(job_id))
        for job_id, event in finished.items():  # started and ended between two polls
            handle = _handle(job_id)
            pool = None if handle is None or job_id in self._jobs else _pool_of(handle, pools)
            if pool is not None:
                with contextlib.suppress(Exception):
                    self._jobs[job_id] = _finished_record(_record_from_handle(handle, pool.id), event, handle)
        if self._catch_up:  # jobs that ended before this panel opened
            self._catch_up = False
            for handle in _tracked():
                if handle.job_id in self._jobs:
                    continue
                pool = _pool_of(handle, pools)
                if pool is not None:
                    with contextlib.suppress(Exception):
                        self._jobs[handle.job_id] = _record_from_handle(handle, pool.id)
        for job_id in sorted(self._jobs)[:-MAX_JOBS]:
            if self._jobs[job_id]["finished"]:
                del self._jobs[job_id]
        with self._cond:
            for job_id in list(self._finished):
                shown = self._jobs.get(job_id)
                if shown is None or shown["finished"]:
                    del self._finished[job_id]
        jobs = [self._jobs[j] for j in sorted(self._jobs, reverse=True)]
        busy = any(not job["finished"] for job in jobs)
        return {"pools": entries, "jobs": jobs}, busy

    def pool_of_job(self, job_id: int) -> int | None:
        """The id of the pool a shown job runs on (from any thread: one dict read)."""
        record = self._jobs.get(job_id)
        return None if record is None else int(record["pool"])


_hub = _Hub()
_state: dict[str, Any] = {}


def open_panels() -> int:
    """How many panels have a comm open to this kernel."""
    return len(_hub.sessions())


# --- commands ------------------------------------------------------------------------------


def _handle_command(session: _Session, data: Any) -> None:
    try:
        command = parse_command(data)
    except PanelProtocolError as exc:
        session.send({"type": "error", "message": str(exc)})
        return
    kind = command["type"]
    if kind == "ack":
        session.last_ack = time.monotonic()
        return
    reply: dict[str, Any] = {"type": "result", "request": kind, "ok": False, "message": ""}
    if kind == "traceback":
        handle = _handle(command["job_id"])
        error = None if handle is None else handle.exceptions().get(command["item"])
        if error is None:
            reply["message"] = f"no failure of item {command['item']} of job {command['job_id']} is known"
        else:
            session.send({"type": "traceback", "job_id": command["job_id"], "item": command["item"],
                          "exception": f"{_exception_type(error)}: {_exception_message(error)}",
                          "text": traceback_text(error)})
            return
    elif kind == "cancel":
        job_id = reply["job_id"] = command["job_id"]
        reply["ok"] = any(pool.cancel_job(job_id) for pool in _pools_to_ask(job_id))
        reply["message"] = "cancelling" if reply["ok"] else f"job {job_id} is not running"
    elif kind == "pause":
        job_id = reply["job_id"] = command["job_id"]
        reply["paused"] = paused = command["paused"]
        verb = "pausing" if paused else "resuming"
        reply["message"] = f"job {job_id} is not running"
        try:
            reply["ok"] = any(pool.pause_job(job_id, paused) for pool in _pools_to_ask(job_id))
        except ValueError as exc:  # this backend (or this job) cannot pause
            reply["message"] = str(exc)
        if reply["ok"]:
            reply["message"] = f"{verb} job {job_id}"
    elif kind == "resize":
        reply["pool"] = command["pool"]
        pool = _pool_by_id(command["pool"])
        if pool is None:
            reply["message"] = f"pool {command['pool']} is not open"
        elif not pool.capabilities.resize:
            reply["message"] = _resize_reason(pool)
        else:
            try:
                pool.resize(command["workers"])
            except Exception as exc:  # closed meanwhile, or the backend refused: say so
                reply["message"] = f"resizing {pool.name} failed: {exc}"
            else:
                reply["ok"] = True
                reply["message"] = f"{pool.name} now keeps {command['workers']} worker(s)"
    session.send(reply)
    _hub.poke()


def _pools_to_ask(job_id: int) -> list[Any]:
    """The pool the panel shows the job in, else every open pool (job ids are unique in
    the process, so at most one has it)."""
    pools = _open_pools()
    shown = _hub.pool_of_job(job_id)
    return [pool for pool in pools if pool.id == shown] or pools


def _on_open(comm: Any, msg: dict[str, Any]) -> None:
    data = msg.get("content", {}).get("data")
    try:
        _check_hello(data)
    except PanelProtocolError as exc:
        comm.send({"type": "error", "message": str(exc)})
        comm.close()
        return
    session = _hub.add(comm, contextvars.copy_context())
    comm.on_msg(lambda m: _handle_command(session, m.get("content", {}).get("data")))
    comm.on_close(lambda _m: _hub.remove(comm.comm_id))


# --- %load_ext / %unload_ext ------------------------------------------------------------------


def register(ip: Any) -> None:
    """Register the comm target, if this shell has a kernel (a front end may open a panel),
    and start tracking job handles."""
    from .. import _handles

    if _state.get("shell") is ip:
        return
    previous = _handles.create_hook

    def create_hook(handle: Any) -> None:
        with contextlib.suppress(Exception):  # the panel must never break the call that made the job
            track(handle)
        if previous is not None:
            previous(handle)

    _handles.create_hook = create_hook
    _state.update(shell=ip, hook=create_hook, previous=previous)
    if getattr(ip, "kernel", None) is None:
        return  # terminal IPython: no front end can open a panel
    import comm

    manager = comm.get_comm_manager()
    manager.register_target(TARGET, _on_open)
    _state["manager"] = manager


def unregister(ip: Any) -> None:
    """Close every open panel comm, stop the thread, unregister the target."""
    from .. import _handles

    if _state.get("shell") is not ip:
        return
    if _handles.create_hook is _state["hook"]:
        _handles.create_hook = _state["previous"]
    manager = _state.get("manager")
    _state.clear()
    for session in _hub.sessions():
        with contextlib.suppress(Exception):
            session.comm.close()
    _hub.stop()
    with _hub._cond:
        _hub._sessions.clear()
    if manager is not None:
        with contextlib.suppress(KeyError):
            manager.unregister_target(TARGET, _on_open)
    with _handles_lock:
        _by_job.clear()
