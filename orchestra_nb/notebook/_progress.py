"""Live progress: one widget per job, updated from a thread, never faster than 10 Hz.

Every handle created while the extension is loaded gets a :class:`JobView` (through
``orchestra_nb._handles.create_hook``), shown in the cell that created it:

    [██████░░░░]  f: 37/100 · failed 2 · retrying 1 · cancelled 0 · 41/s · elapsed 0.9 s
                  · ETA 1.5 s  [Cancel]
    [w1 #3] what task 3 printed ...

All updates come from one thread (``orchestra-progress``), not from the kernel's event loop,
so they keep flowing while a synchronous cell blocks. Each view is refreshed at most once
per ``update_interval`` (0.1 s), one ``comm_msg`` per widget per refresh, and all views
together at most ``_MAX_VIEWS_PER_TICK`` per tick: far below jupyter_server's 1000 msg/s
iopub limit (``jupyter-runtime.md`` section 3). A view is dropped only after it has sent
the job's final state.

Counts are read from the job's table (the source of truth); the event bus wakes the thread
when a job finishes and carries what tasks print (``TaskOutput``).

Where widgets cannot render (terminal IPython, no front end), ``progress='auto'`` falls
back to text: a displayed handle prints a one-line bar, and task output is printed.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import html
import sys
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

from .._events import JobFinished, TaskOutput
from .._state import TaskState
from ._output import OutputBuffer, enrich_exception, stream_message

__all__ = ["JobView", "StatusView", "format_duration", "on_create", "on_display", "suppress_auto"]

_MAX_VIEWS_PER_TICK = 20
_OUTPUT_GRACE = 0.5  # seconds to keep a finished job's output route open (late flushes)
_MAX_STATUS_VIEWS = 3

# Set while the notebook layer creates a handle it displays its own way (%%orchestra).
_suppress: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "orchestra_suppress", default=False
)

settings: Any = None  # the extension's Orchestra configurable (set by _extension.load)


@contextlib.contextmanager
def suppress_auto() -> Any:
    token = _suppress.set(True)
    try:
        yield
    finally:
        _suppress.reset(token)


def _setting(name: str, default: Any) -> Any:
    return getattr(settings, name, default) if settings is not None else default


def resolve_mode() -> str:
    """'widget', 'text' or 'none' for the current process."""
    mode = str(_setting("progress", "auto")).lower()
    if mode != "auto":
        return mode
    try:
        from IPython import get_ipython

        ip = get_ipython()
    except Exception:
        return "text"
    if ip is None or getattr(ip, "kernel", None) is None:
        return "text"
    try:
        import ipywidgets  # noqa: F401
    except Exception:
        return "text"
    return "widget"


def format_duration(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "?"
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}:{secs:02d}"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def _rate(rate: float) -> str:
    if rate >= 100:
        return f"{rate:,.0f}/s"
    if rate >= 1:
        return f"{rate:.1f}/s"
    return f"{rate:.2f}/s"


class _Snapshot:
    __slots__ = (
        "cancelled",
        "counts",
        "done",
        "elapsed",
        "failed",
        "finished",
        "name",
        "retrying",
        "total",
    )

    def __init__(self, handle: Any) -> None:
        job = handle._job
        c = list(job.counts)
        self.finished = job.finished.is_set()
        if self.finished:
            c = list(job.counts)  # read again: final now
        self.counts = c
        self.failed = c[TaskState.FAILED]
        self.retrying = c[TaskState.RETRYING]
        self.cancelled = c[TaskState.CANCELLED]
        self.done: int = c[TaskState.SUCCEEDED] + self.failed + self.cancelled
        self.total: int | None = job.total
        self.elapsed: float = handle.elapsed
        self.name = job.name

    def fraction_text(self) -> str:
        total = "?" if self.total is None else f"{self.total:,}"
        return f"{self.done:,}/{total}"

    def rate(self) -> float:
        return self.done / self.elapsed if self.elapsed > 0 else 0.0

    def eta(self) -> float | None:
        rate = self.rate()
        if self.total is None or rate <= 0:
            return None
        return max(0.0, (self.total - self.done) / rate)

    def _timing(self, cancelled: bool) -> list[str]:
        """The end of the summary: the verdict once finished, else rate, elapsed and ETA."""
        if self.finished:
            verdict = "cancelled" if cancelled else ("done with errors" if self.failed else "done")
            return [f"{verdict} in {format_duration(self.elapsed)} ({_rate(self.rate())})"]
        return [
            _rate(self.rate()),
            f"elapsed {format_duration(self.elapsed)}",
            f"ETA {format_duration(self.eta())}",
        ]

    def text(self, cancelled: bool) -> str:
        parts = [f"{self.name}: {self.fraction_text()}"]
        parts.append(f"failed {self.failed}")
        parts.append(f"retrying {self.retrying}")
        parts.append(f"cancelled {self.cancelled}")
        parts.extend(self._timing(cancelled))
        return " · ".join(parts)

    def html(self, cancelled: bool) -> str:
        def count(label: str, n: int, color: str) -> str:
            style = f"color:{color};font-weight:bold" if n else "color:#888"
            return f'<span style="{style}">{label} {n}</span>'

        parts = [
            f"<b>{html.escape(self.name)}</b>: {self.fraction_text()}",
            count("failed", self.failed, "#c62828"),
            count("retrying", self.retrying, "#ef6c00"),
            count("cancelled", self.cancelled, "#6d4c41"),
        ]
        parts.extend(self._timing(cancelled))
        return " · ".join(parts)

    def bar_text(self, width: int = 24) -> str:
        total = self.total or max(self.done, 1)
        filled = int(width * min(1.0, self.done / total)) if total else width
        return "[" + "#" * filled + "-" * (width - filled) + "]"


class JobView:
    """The live view of one job: a progress bar + label + Cancel button, and its output.

    ``widgets=False`` gives an output-only view (task output as stream messages), used by
    the text fallback and by foreground ``%%orchestra`` cells.
    """

    def __init__(
        self,
        handle: Any,
        *,
        widgets: bool = True,
        output: str = "widget",
        mark: str | None = "task",
    ) -> None:
        self.handle: Any = handle
        self.job_id = handle.job_id
        self.bus = handle.events
        self.ctx = contextvars.copy_context()  # the launching cell's (parent header)
        self.interval = max(0.1, float(_setting("update_interval", 0.1)))
        self.output_mode = output
        self.out = OutputBuffer(
            int(_setting("output_max_lines", 200)),
            int(_setting("output_max_line_length", 2000)),
            mark=mark,
        )
        self.due = 0.0
        self.finished_at: float | None = None
        self.final_sent = False
        self.closed = False
        self._last: tuple[Any, ...] | None = None
        self._kill_armed_until = 0.0
        self.finished_seen = threading.Event()
        self.widget: Any = None
        if widgets:
            self._build()

    # --- widgets (built in the caller's thread: comm_open goes to the launching cell) -----

    def _build(self) -> None:
        import ipywidgets as W

        job = self.handle._job
        total = job.total
        self.bar = W.IntProgress(
            value=0,
            min=0,
            max=max(1, total or 1),
            bar_style="info",
            layout=W.Layout(width="30%", min_width="120px"),
        )
        self.label = W.HTML(
            value=html.escape(f"{job.name}: 0/{'?' if total is None else total}"),
            layout=W.Layout(flex="1 1 auto"),
        )
        self.button = W.Button(
            description="Cancel",
            icon="stop",
            button_style="",
            tooltip="Cancel this job (click again to kill busy workers)",
            layout=W.Layout(width="auto"),
        )
        self.button.on_click(self._on_click)
        self.output = W.Output(layout=W.Layout(max_height="20em", overflow="auto"))
        row = W.HBox(
            [self.bar, self.label, self.button], layout=W.Layout(align_items="center", width="100%")
        )
        self.widget = W.VBox([row, self.output])

    def _on_click(self, _button: Any) -> None:
        handle = self.handle
        if handle is None:
            return
        now = time.monotonic()
        if now < self._kill_armed_until:
            handle.cancel(kill=True)
            self.button.description = "Killed"
            self.button.disabled = True
            return
        if handle.cancel():
            self._kill_armed_until = now + 2.0
            self.button.description = "Kill"
            self.button.button_style = "danger"
        _ticker().poke(self)

    # --- the progress thread ----------------------------------------------------------

    def tick(self, now: float) -> bool:
        """Refresh (called on the progress thread when due); True when the view is done."""
        handle = self.handle
        if handle is None:
            return True
        snap = _Snapshot(handle)
        if snap.finished and self.finished_at is None:
            self.finished_at = now
        if self.widget is not None:
            self._send(snap)
        if snap.finished and now - (self.finished_at or now) >= _OUTPUT_GRACE:
            self.out.close()
            self._flush_output()
            self._close()
            return True
        self._flush_output()
        self.due = now + self.interval
        return False

    def _send(self, snap: _Snapshot) -> None:
        cancelled = self.handle.cancelled()
        total = snap.total
        bar_max = max(1, total if total is not None else max(snap.done, self.handle._job.pulled, 1))
        if snap.finished:
            style = "warning" if cancelled else ("danger" if snap.failed else "success")
        else:
            style = "danger" if snap.failed else "info"
        label = snap.html(cancelled)
        state = (snap.done, bar_max, style, label, snap.finished)
        last = self._last
        if state == last:
            return
        self._last = state

        def apply() -> None:
            if last is None or last[:3] != state[:3]:
                with self.bar.hold_sync():
                    self.bar.max = bar_max
                    self.bar.value = min(snap.done, bar_max)
                    self.bar.bar_style = style
            if last is None or last[3] != label:
                self.label.value = label
            if snap.finished and (last is None or not last[4]):
                with self.button.hold_sync():
                    self.button.description = "Cancelled" if cancelled else "Done"
                    self.button.icon = "ban" if cancelled else "check"
                    self.button.button_style = ""
                    self.button.disabled = True
                self.final_sent = True

        self.ctx.copy().run(apply)

    def _flush_output(self, in_context: bool = True) -> None:
        if not self.out.pending():
            return
        batch = self.out.take()
        if not batch:
            return
        if self.output_mode == "widget" and self.widget is not None:

            def apply() -> None:
                outputs = list(self.output.outputs)
                for stream, text in batch:
                    if outputs and outputs[-1].get("name") == stream:
                        outputs[-1] = stream_message(stream, outputs[-1]["text"] + text)
                    else:
                        outputs.append(stream_message(stream, text))
                self.output.outputs = tuple(outputs)
        elif self.output_mode in ("stream", "widget"):

            def apply() -> None:
                for stream, text in batch:
                    target = sys.stderr if stream == "stderr" else sys.stdout
                    target.write(text)
                sys.stdout.flush()
                sys.stderr.flush()
        else:
            return
        if in_context:
            self.ctx.copy().run(apply)
        else:
            apply()

    def _close(self) -> None:
        self.closed = True
        _unroute(self)
        self.handle = None  # the finished job's handle may be collected now

    # --- event bus (delivery thread) ---------------------------------------------------

    def on_event(self, event: Any) -> None:
        if isinstance(event, TaskOutput):
            self.out.add(event.worker_id, event.index, event.stream, event.text)
            _ticker().poke(self, output=True)
        elif isinstance(event, JobFinished):
            self.finished_seen.set()
            _ticker().poke(self)

    async def drain_output(self, wait: float = 0.5) -> None:
        """In the awaiting cell, after the job: show its output now, before the cell ends."""
        import asyncio

        deadline = time.monotonic() + wait
        while not self.finished_seen.is_set() and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.005)  # (set on the delivery thread: poll briefly)
        self.out.close()
        self._flush_output(in_context=False)

    # --- text ------------------------------------------------------------------------------

    def text_line(self) -> str:
        handle = self.handle
        if handle is None:
            return ""
        snap = _Snapshot(handle)
        return f"{snap.bar_text()} {snap.text(handle.cancelled())}"


class _Ticker:
    """The one progress thread: refreshes due views, a bounded number per tick."""

    def __init__(self) -> None:
        self._views: list[Any] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = False
        self.errors = 0
        self.thread = threading.Thread(target=self._run, name="orchestra-progress", daemon=True)
        self.thread.start()

    def add(self, view: Any) -> None:
        with self._lock:
            self._views.append(view)
        self._wake.set()

    def poke(self, view: Any, output: bool = False) -> None:
        """Refresh ``view`` as soon as its rate limit allows (``due`` already says when)."""
        self._wake.set()

    def stop(self) -> None:
        self._stop = True
        self._wake.set()

    def _run(self) -> None:
        while not self._stop:
            now = time.monotonic()
            with self._lock:
                views = sorted(self._views, key=lambda v: v.due)
            budget = _MAX_VIEWS_PER_TICK
            next_wake = now + 1.0
            finished: list[Any] = []
            for view in views:
                if view.due <= now and budget > 0:
                    budget -= 1
                    try:
                        if view.tick(now):
                            finished.append(view)
                            continue
                    except Exception:
                        self.errors += 1
                        finished.append(view)
                        if self.errors <= 3:
                            import traceback

                            traceback.print_exc(file=sys.__stderr__)
                        continue
                next_wake = min(next_wake, max(view.due, now + 0.01))
            if finished:
                with self._lock:
                    self._views = [v for v in self._views if v not in finished]
            self._wake.wait(max(0.0, next_wake - time.monotonic()))
            self._wake.clear()


_ticker_lock = threading.Lock()
_ticker_instance: _Ticker | None = None


def _ticker() -> _Ticker:
    global _ticker_instance
    with _ticker_lock:
        if (
            _ticker_instance is None
            or not _ticker_instance.thread.is_alive()
            or _ticker_instance._stop
        ):
            _ticker_instance = _Ticker()
        return _ticker_instance


def stop_ticker() -> None:
    global _ticker_instance
    with _ticker_lock:
        ticker, _ticker_instance = _ticker_instance, None
    if ticker is not None:
        ticker.stop()


# --- routing events to views ------------------------------------------------------------

_routes_lock = threading.Lock()
_routes: dict[tuple[int, int], JobView] = {}
_subscriptions: dict[int, Any] = {}  # id(bus) -> Subscription


# Events of jobs without a view yet (a view may be routed just after its job started),
# kept briefly so that the view gets them when it is routed.
_ORPHAN_SECONDS = 10.0
_ORPHAN_MAX = 2000
_orphans: collections.deque[tuple[float, int, Any]] = collections.deque(maxlen=_ORPHAN_MAX)


def _route(view: JobView) -> None:
    bus = view.bus
    with _routes_lock:
        _routes[(id(bus), view.job_id)] = view
        early = [e for _t, key, e in _orphans if key == id(bus) and e.job_id == view.job_id]
        if id(bus) not in _subscriptions:

            def deliver(event: Any, key: int = id(bus)) -> None:
                target = _routes.get((key, event.job_id))
                if target is None:
                    with _routes_lock:
                        target = _routes.get((key, event.job_id))
                        if target is None:
                            now = time.monotonic()
                            while _orphans and _orphans[0][0] < now - _ORPHAN_SECONDS:
                                _orphans.popleft()
                            _orphans.append((now, key, event))
                            return
                target.on_event(event)

            _subscriptions[id(bus)] = bus.subscribe(deliver, types=(TaskOutput, JobFinished))
    for event in early:
        view.on_event(event)


def _unroute(view: JobView) -> None:
    with _routes_lock:
        if _routes.get((id(view.bus), view.job_id)) is view:
            del _routes[(id(view.bus), view.job_id)]


def close_all() -> None:
    """Unsubscribe from every bus and stop the progress thread (extension unload)."""
    with _routes_lock:
        subs = list(_subscriptions.values())
        _subscriptions.clear()
        _routes.clear()
    for sub in subs:
        with contextlib.suppress(Exception):
            sub.close()
    with _status_lock:
        for view in _status_views:
            view.closed = True
        _status_views.clear()
    stop_ticker()


# --- hooks ------------------------------------------------------------------------------

_views: weakref.WeakKeyDictionary[Any, JobView] = weakref.WeakKeyDictionary()
_live_lock = threading.Lock()
_live_handles: set[Any] = set()  # unfinished handles (strong refs: a cancel must reach them)


_prune_at = 64


def _track(handle: Any) -> None:
    global _prune_at
    with _live_lock:
        _live_handles.add(handle)
        if len(_live_handles) >= _prune_at:  # amortised: O(1) per handle
            for h in [h for h in _live_handles if h.finished()]:
                _live_handles.discard(h)
            _prune_at = max(64, 2 * len(_live_handles))


def unfinished_handles() -> list[Any]:
    with _live_lock:
        for h in [h for h in _live_handles if h.finished()]:
            _live_handles.discard(h)
        return list(_live_handles)


def _display(obj: Any) -> None:
    from IPython.display import display

    show: Callable[[Any], object] = display  # IPython's display() is unannotated
    show(obj)


def start_view(handle: Any, **kw: Any) -> JobView:
    view = JobView(handle, **kw)
    _views[handle] = view
    _route(view)
    _ticker().add(view)
    return view


def adopt(handle: Any) -> None:
    """Track ``handle`` (second interrupt) and decorate its errors (cell source lines)."""
    _track(handle)
    job = handle._job
    job.future.add_done_callback(lambda _f, job=job: _enrich(job))


def on_create(handle: Any) -> None:
    """``_handles.create_hook``: track the handle, show its live view in this cell."""
    try:
        adopt(handle)
        if _suppress.get():
            return
        mode = resolve_mode()
        if mode == "widget":
            try:
                view = start_view(handle)
            except Exception:
                mode = "text"
            else:
                _display(view.widget)
                return
        if mode == "text":
            start_view(handle, widgets=False, output="stream")
    except Exception:  # a progress display must never break the call that made the job
        pass


def _enrich(job: Any) -> None:
    for exc in list(job.errors.values()):
        enrich_exception(exc)
    with contextlib.suppress(Exception):
        exc = job.future.exception(timeout=0)
        if exc is not None:
            enrich_exception(exc)


def on_display(handle: Any) -> None:
    """``_handles.display_hook``: a handle shown as a cell's value shows its live widget."""
    view = _views.get(handle)
    mode = resolve_mode()
    if mode == "widget":
        try:
            if view is None or view.widget is None:
                view = start_view(handle)
            _display(view.widget)
            return
        except Exception:
            pass
    if mode == "none":
        print(repr(handle))
        return
    snap = _Snapshot(handle)
    print(f"{snap.bar_text()} {snap.text(handle.cancelled())}")


# --- %orchestra status -------------------------------------------------------------------

_status_lock = threading.Lock()
_status_views: list[StatusView] = []


class StatusView:
    """A live table of the pool: workers (pid, state, current task, CPU, memory), queued
    tasks, jobs. Refreshed every ``interval`` seconds by the progress thread; only the
    newest ``_MAX_STATUS_VIEWS`` views stay live."""

    def __init__(
        self, pool_getter: Callable[[], Any], interval: float = 1.0, widget: bool = True
    ) -> None:
        self.pool_getter = pool_getter
        self.interval = max(0.5, interval)
        self.ctx = contextvars.copy_context()
        self.due = 0.0
        self.closed = False
        self._last = ""
        self.widget: Any = None
        if widget:
            import ipywidgets as W

            self.widget = W.HTML(value=self.render())

    def snapshot(self) -> dict[str, Any]:
        pool = self.pool_getter()
        if pool is None:
            return {"state": "no pool", "workers": [], "jobs": []}
        status: dict[str, Any] = pool.status()  # Pool.statistics() as plain data
        names = {j["id"]: j["name"] for j in status["jobs"]}
        for w in status["workers"]:
            w["cpu"], w["rss"] = w["cpu_percent"], w["memory_bytes"]
            w["state"] = w["activity"]  # busy / idle rather than "ready"
            if w["job"] is not None:
                w["current_text"] = f"{names.get(w['job'], 'job')} (job {w['job']}) item {w['item']}"
            else:
                w["current_text"] = ""
        for w in status["workers"]:  # formatted once here, for both views
            w["cpu_text"] = "" if w.get("cpu") is None else f"{w['cpu']:.0f}%"
            w["rss_text"] = "" if w.get("rss") is None else f"{w['rss'] / 2**20:.0f} MiB"
        for j in status["jobs"]:
            c = j["counts"]
            done = c.get("SUCCEEDED", 0) + c.get("FAILED", 0) + c.get("CANCELLED", 0)
            j["done_text"] = f"{done}/{'?' if j['total'] is None else j['total']}"
        status["queued"] = sum(
            j["counts"].get("PENDING", 0) + j["counts"].get("RETRYING", 0) for j in status["jobs"]
        )
        return status

    def render(self) -> str:
        s = self.snapshot()
        rows = []
        for w in s["workers"]:
            cpu, rss = w["cpu_text"], w["rss_text"]
            state = w["state"] + (" (stalled)" if w.get("stalled") else "")
            rows.append(
                f"<tr><td>{w['id']}</td><td>{w['pid']}</td><td>{html.escape(state)}</td>"
                f"<td>{html.escape(w['current_text'])}</td><td>{w.get('tasks_done', '')}</td>"
                f"<td>{cpu}</td><td>{rss}</td></tr>"
            )
        jobs = []
        for j in s["jobs"]:
            c = j["counts"]
            jobs.append(
                f"<tr><td>{j['id']}</td><td>{html.escape(str(j['name']))}</td><td>{j['done_text']}</td>"
                f"<td>{c.get('RUNNING', 0)}</td><td>{c.get('PENDING', 0)}</td>"
                f"<td>{c.get('FAILED', 0)}</td></tr>"
            )
        head = (
            f"<b>orchestra pool</b>: {html.escape(str(s['state']))}, "
            f"{len(s['workers'])} worker(s), {s.get('queued', 0)} task(s) queued"
        )
        workers = (
            "<table><tr><th>worker</th><th>pid</th><th>state</th><th>current task</th>"
            "<th>tasks done</th><th>CPU</th><th>memory</th></tr>" + "".join(rows) + "</table>"
        )
        jobs_html = (
            (
                "<table><tr><th>job</th><th>name</th><th>done</th><th>running</th><th>pending</th>"
                "<th>failed</th></tr>" + "".join(jobs) + "</table>"
            )
            if jobs
            else "<i>no running jobs</i>"
        )
        return f"<div>{head}{workers}{jobs_html}</div>"

    def render_text(self) -> str:
        s = self.snapshot()
        n = len(s["workers"])
        lines = [f"orchestra pool: {s['state']}, {n} worker(s), {s.get('queued', 0)} queued"]
        lines.append(
            f"  {'worker':>6} {'pid':>7} {'state':<9} {'cpu':>5} {'memory':>9}  current task"
        )
        for w in s["workers"]:
            cpu, rss, current = w["cpu_text"], w["rss_text"], w["current_text"]
            wid, pid, state = w["id"], w["pid"], w["state"]
            lines.append(f"  {wid:>6} {pid:>7} {state:<9} {cpu:>5} {rss:>9}  {current}")
        for j in s["jobs"]:
            c = j["counts"]
            lines.append(
                f"  job {j['id']} {j['name']}: {j['done_text']} running {c.get('RUNNING', 0)}"
                f" pending {c.get('PENDING', 0)} failed {c.get('FAILED', 0)}"
            )
        return "\n".join(lines)

    def tick(self, now: float) -> bool:
        if self.closed:
            return True
        pool = self.pool_getter()
        try:
            value = self.render()
        except Exception:
            value = self._last
        if value != self._last and self.widget is not None:
            self._last = value
            self.ctx.copy().run(setattr, self.widget, "value", value)
        self.due = now + self.interval
        return pool is None or pool.state != "running"


def show_status(pool_getter: Callable[[], Any], live: bool = True) -> Any:
    mode = resolve_mode()
    if mode != "widget":
        view = StatusView(pool_getter, widget=False)
        print(view.render_text())
        return None
    view = StatusView(pool_getter)
    _display(view.widget)
    if live:
        with _status_lock:
            _status_views.append(view)
            while len(_status_views) > _MAX_STATUS_VIEWS:
                _status_views.pop(0).closed = True
        view.due = time.monotonic() + view.interval
        _ticker().add(view)
    return view
