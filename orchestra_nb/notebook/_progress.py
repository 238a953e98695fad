"""Live progress: one widget per job, updated from a thread, never faster than 10 Hz.

Every handle created while the extension is loaded gets a :class:`JobView` (through
``orchestra_nb._handles.create_hook``), shown in the cell that created it::

    [███████▒▒░░░░]  f  37% · 37/100 done · 2 running · 59 waiting · 2 failed · 41/s
                     · 0.9 s · ETA 1.5 s                                      [Cancel]

The numbers: *done* counts successes only; the bar is split by state (cached teal,
succeeded green, failed red, cancelled grey, running light blue); the percent is done /
total; the rate is computed successes per second; a counter at zero is not shown. The line
never wraps: the label is cut with an ellipsis, the button keeps its size.

A cached map (``cache=True``) is one view of all its items: those the result store served
are done and counted as "cached N" (``handle.cached``), with a bar segment of their own;
the rate and the ETA count only what workers compute.

Reads only public handle methods (``counts()``, ``total``, ``elapsed``, ``done()``,
``cancelled()``, ``job_id``, ``name``, ``events``): the job's counts are the source of
truth; the event bus wakes the thread when a job finishes and carries what tasks print
(``TaskOutput``).

What a notebook keeps: the widget is displayed with a display id, and when the job ends its
plain-text form is replaced by the final one-line summary (what a notebook viewer, a saved
file or ``jupyter execute`` shows where widgets do not render). While the launching cell
runs, task output is written as ordinary ``stream`` output of that cell (addressed by its
parent header), so headless runs (nbclient, papermill) save it too; for a job that finished
before its cell ends, the output and the summary are flushed before the cell completes. A
job still running when its cell ends gets a second display in that cell, empty at first:
what its tasks print later updates it by display id, sent as the cell running then (a
headless runner reads only that cell, and applies the update to the earlier one; JupyterLab
applies display updates by id in every cell). See docs/design.md. While a job runs,
the view greys out and says so if no update came for a few seconds (a restarted kernel
leaves its widgets behind, and they must not look live).

All updates come from one thread (``orchestra-progress``), not from the kernel's event loop,
so they keep flowing while a synchronous cell blocks. Each view is refreshed at most once
per ``update_interval`` (0.1 s), one ``comm_msg`` per refresh, and all views together at
most ``_MAX_VIEWS_PER_TICK`` per tick: far below jupyter_server's limit of 1000 iopub
messages per second.

Where widgets cannot render (terminal IPython, no front end), ``progress='auto'`` falls
back to text: a displayed handle prints a one-line bar, and task output is printed.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import datetime
import html
import sys
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

from .._events import JobFinished, TaskOutput
from .._state import TaskState
from ._output import OutputBuffer, enrich_exception, show_trimmed

__all__ = [
    "JobView",
    "Snapshot",
    "StatusView",
    "finish_cell",
    "format_duration",
    "on_create",
    "on_display",
    "suppress_auto",
]

_MAX_VIEWS_PER_TICK = 20
_OUTPUT_GRACE = 0.5  # seconds to keep a finished job's output route open (late flushes)
_MAX_STATUS_VIEWS = 3
_STALE_AFTER = 6.0  # seconds without an update before a running view greys out
_FINISH_WAIT = 2.0  # at most this long, at the end of a cell, for a finished job's output

# Set while the notebook layer creates a handle it displays its own way (%%orchestra).
_suppress: contextvars.ContextVar[bool] = contextvars.ContextVar("orchestra_suppress", default=False)

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


_COLORS = {
    "cached": "#00897b",
    "succeeded": "#43a047",
    "failed": "#e53935",
    "cancelled": "#9e9e9e",
    "running": "#90caf9",
}


class Snapshot:
    """One consistent reading of a job through its handle's public methods."""

    __slots__ = (
        "cached",
        "cancelled",
        "elapsed",
        "failed",
        "finished",
        "name",
        "read",
        "running",
        "succeeded",
        "total",
        "waiting",
    )

    def __init__(self, handle: Any, finished_seen: bool = False) -> None:
        counts = handle.counts()
        self.succeeded: int = counts[TaskState.SUCCEEDED]  # the cached items among them
        self.cached: int = int(getattr(handle, "cached", 0) or 0)
        self.failed: int = counts[TaskState.FAILED]
        self.cancelled: int = counts[TaskState.CANCELLED]
        self.running: int = counts[TaskState.RUNNING]
        self.waiting: int = counts[TaskState.PENDING] + counts[TaskState.RETRYING] + counts[TaskState.SCHEDULED]
        self.read: int = sum(counts.values())
        self.total: int | None = handle.total
        self.elapsed: float = handle.elapsed
        self.name: str = handle.name
        final = self.running == 0 and self.waiting == 0 and (self.total is not None and self.read >= self.total)
        self.finished = bool(finished_seen or (handle.done() and final))

    # --- numbers ---------------------------------------------------------------------

    @property
    def size(self) -> int:
        """The bar's 100%: the total, or what was read so far of a lazy input."""
        return max(1, self.total if self.total is not None else self.read)

    @property
    def percent(self) -> int:
        return int(100 * self.succeeded / self.size) if self.total is not None else 0

    @property
    def computed(self) -> int:
        """Successes that workers computed (not served by the result store)."""
        return self.succeeded - self.cached

    def rate(self) -> float:
        return self.computed / self.elapsed if self.elapsed > 0 else 0.0

    def eta(self) -> float | None:
        rate = self.rate()
        if self.total is None or rate <= 0:
            return None
        return max(0.0, (self.total - self.succeeded - self.failed - self.cancelled) / rate)

    def verdict(self, cancelled: bool) -> str:
        """'running', 'done', 'failed' (done with errors) or 'cancelled'."""
        if not self.finished:
            return "running"
        if cancelled or self.cancelled:
            return "cancelled"
        return "failed" if self.failed else "done"

    # --- words -----------------------------------------------------------------------

    def _counters(self, live: bool) -> list[str]:
        total = "?" if self.total is None else f"{self.total:,}"
        parts = [f"{self.succeeded:,}/{total} done"]
        if self.cached:
            parts.append(f"{self.cached:,} cached")
        if live:
            if self.running:
                parts.append(f"{self.running:,} running")
            if self.waiting:
                parts.append(f"{self.waiting:,} waiting")
        if self.failed:
            parts.append(f"{self.failed:,} failed")
        if self.cancelled:
            parts.append(f"{self.cancelled:,} cancelled")
        return parts

    def words(self, cancelled: bool, note: str = "") -> list[str]:
        """The label's parts after the name."""
        verdict = self.verdict(cancelled)
        if verdict == "running":
            head = [f"{self.percent}%"] if self.total is not None else []
            parts = head + self._counters(live=True)
            parts += [_rate(self.rate()), format_duration(self.elapsed)]
            eta = self.eta()
            if eta is not None and self.computed:
                parts.append(f"ETA {format_duration(eta)}")
        else:
            how = {"done": "done", "failed": "finished with errors", "cancelled": "cancelled"}
            parts = self._counters(live=False)
            parts.append(f"{how[verdict]} in {format_duration(self.elapsed)}")
            if self.computed:
                parts.append(_rate(self.rate()))
        if note:
            parts.append(note)
        return parts

    def text(self, cancelled: bool) -> str:
        """One readable line: ``f: 98/100 done · 2 failed · finished with errors in 2.4 s``."""
        return f"{self.name}: " + " · ".join(self.words(cancelled))

    def bar_text(self, width: int = 24) -> str:
        """``[==###x---]``: ``=`` cached, ``#`` computed, ``x`` failed, ``.`` cancelled,
        ``-`` the rest."""
        hit, ok, bad, gone, rest = self._cells(width)
        return "[" + "=" * hit + "#" * ok + "x" * bad + "." * gone + "-" * rest + "]"

    def _cells(self, width: int) -> tuple[int, int, int, int, int]:
        size = self.size
        parts = [width * n // size for n in (self.cached, self.computed, self.failed, self.cancelled)]
        if self.finished and self.total is not None and sum(parts) < width:
            # rounding: a finished job's bar is full, the largest part takes the rest
            largest = max(range(4), key=lambda i: parts[i])
            parts[largest] += width - sum(parts)
        return parts[0], parts[1], parts[2], parts[3], width - sum(parts)

    def line(self, cancelled: bool) -> str:
        return f"{self.bar_text()} {self.text(cancelled)}"

    def html(self, cancelled: bool, note: str = "") -> str:
        verdict = self.verdict(cancelled)
        size = self.size
        segments = []
        for part, n in (
            ("cached", self.cached),
            ("succeeded", self.computed),
            ("failed", self.failed),
            ("cancelled", self.cancelled),
            ("running", self.running if verdict == "running" else 0),
        ):
            if n:
                width = 100.0 * n / size
                # (with cached items beside them, the other successes are the computed ones)
                word = "computed" if part == "succeeded" and self.cached else part
                segments.append(
                    f'<div class="orchestra-{part}" title="{n:,} {word}" '
                    f'style="width:{width:.2f}%;background:{_COLORS[part]}"></div>'
                )
        data = (
            f'data-state="{verdict}" data-succeeded="{self.succeeded}" data-cached="{self.cached}" '
            f'data-failed="{self.failed}" data-cancelled="{self.cancelled}" '
            f'data-running="{self.running}" data-waiting="{self.waiting}" '
            f'data-total="{"" if self.total is None else self.total}"'
        )
        label = html.escape(" · ".join(self.words(cancelled, note)))
        # A running view greys out when its updates stop (each update restarts the timer).
        stale = (
            f"animation:orchestra-stale 0.3s linear {_STALE_AFTER:.0f}s forwards;"
            if verdict == "running"
            else ""
        )
        stale_note = (
            '<span class="orchestra-stale-note" style="opacity:0;animation:'
            f'orchestra-show 0.3s linear {_STALE_AFTER:.0f}s forwards"> · no update from the '
            "kernel (restarted or busy?)</span>"
            # ... and so does its Cancel button: a veil over the whole row (clicks go through)
            '<div class="orchestra-stale-cover" style="position:absolute;inset:0;opacity:0;'
            "background:rgba(255,255,255,0.6);pointer-events:none;animation:orchestra-show "
            f'0.3s linear {_STALE_AFTER:.0f}s forwards"></div>'
            if verdict == "running"
            else ""
        )
        return (
            "<style>@keyframes orchestra-stale{to{opacity:.45;filter:grayscale(1)}}"
            "@keyframes orchestra-show{to{opacity:1}}.orchestra-row{position:relative}</style>"
            f'<div class="orchestra-job" {data} style="display:flex;align-items:center;'
            f'gap:0.6em;white-space:nowrap;overflow:hidden;{stale}">'
            '<div class="orchestra-bar" style="flex:0 0 30%;min-width:120px;height:0.9em;'
            'display:flex;background:#e0e0e0;border-radius:3px;overflow:hidden">' + "".join(segments) + "</div>"
            '<span class="orchestra-label" style="overflow:hidden;text-overflow:ellipsis;'
            f'min-width:0"><b>{html.escape(self.name)}</b> {label}{stale_note}</span></div>'
        )


_shared_lock = threading.Lock()
_shared: dict[str, Any] = {}


def _shared_models() -> dict[str, Any]:
    """The layouts and styles every job's row uses, made once per kernel. Each is a widget
    model of its own (a comm_open, its state serialised): made per job they were five of
    the row's eight models, most of what showing a job cost the cell that awaits it. They
    are never changed after creation, so all rows can share them."""
    import ipywidgets as W
    from ipywidgets.widgets.widget_string import HTMLStyle

    with _shared_lock:
        if not _shared or any(getattr(m, "comm", None) is None for m in _shared.values()):
            _shared.clear()
            _shared.update(
                html_layout=W.Layout(flex="1 1 auto", min_width="0", width="auto"),
                html_style=HTMLStyle(),
                button_layout=W.Layout(flex="0 0 auto", width="auto", min_width="7em"),
                button_style=W.ButtonStyle(),
                row_layout=W.Layout(align_items="center", width="100%", overflow="hidden"),
            )
        return dict(_shared)


class JobView:
    """The live view of one job: a split progress bar with its numbers, a Cancel button;
    the job's task output goes to the launching cell as stream output.

    ``widgets=False`` gives an output-only view, used by the text fallback and by
    foreground ``%%orchestra`` cells.
    """

    def __init__(
        self,
        handle: Any,
        *,
        widgets: bool = True,
        output: str = "stream",
        mark: str | None = "task",
    ) -> None:
        self.handle: Any = handle
        self.job_id = handle.job_id
        self.bus = handle.events
        self.ctx = contextvars.copy_context()  # the launching cell's (parent header)
        self.cell = _execution_count()
        self.interval = max(0.1, float(_setting("update_interval", 0.1)))
        self.output_mode = output
        self.out = OutputBuffer(
            int(_setting("output_max_lines", 200)),
            int(_setting("output_max_line_length", 2000)),
            mark=mark,
        )
        # The first refresh after one interval: the widget is built with the state of now,
        # and a refresh at once would compete with the job's start for the interpreter.
        self.due = time.monotonic() + self.interval
        self.finished_at: float | None = None
        self.final_sent = False
        self.closed = False
        self._lock = threading.Lock()  # the progress thread and the kernel's end of cell
        self._last: tuple[Any, ...] | None = None
        self._cancel_clicked = False
        self.finished_seen = threading.Event()
        self.widget: Any = None
        self.display: Any = None  # the DisplayHandle, once shown
        # Set when the launching cell ended with the job still running: from then on task
        # output goes to ``late``, a display of that cell updated by display id.
        self.cell_ended = False
        self.late: Any = None
        self.late_text = ""
        if widgets:
            self._build()

    # --- widgets (built in the caller's thread: comm_open goes to the launching cell) -----

    def _build(self) -> None:
        import ipywidgets as W

        shared = _shared_models()
        snap = Snapshot(self.handle)
        self.view = W.HTML(value=snap.html(False), layout=shared["html_layout"], style=shared["html_style"])
        self.button = W.Button(
            description="Cancel",
            icon="stop",
            button_style="",
            tooltip="Cancel this job: queued items are dropped, running ones interrupted",
            layout=shared["button_layout"],
            style=shared["button_style"],
        )
        self.button.on_click(self._on_click)
        self.widget = W.HBox([self.view, self.button], layout=shared["row_layout"])
        self.widget.add_class("orchestra-row")  # the stale veil covers the row

    def show(self) -> None:
        """Display the widget in the current cell (with a display id, for the final text)."""
        self.display = _display_at_once(self._bundle(Snapshot(self.handle).line(False)))

    def _bundle(self, text: str) -> dict[str, Any]:
        return {
            "text/plain": text,
            "application/vnd.jupyter.widget-view+json": {
                "version_major": 2,
                "version_minor": 0,
                "model_id": self.widget.model_id,
            },
        }

    def _on_click(self, _button: Any) -> None:
        handle = self.handle
        if handle is None:
            return
        if self._cancel_clicked:
            handle.cancel_by("the Cancel button", kill=True)
            with self.button.hold_sync():
                self.button.description = "Killing"
                self.button.disabled = True
            return
        if handle.cancel_by("the Cancel button"):
            self._cancel_clicked = True
            with self.button.hold_sync():
                self.button.description = "Kill"
                self.button.icon = "skull"
                self.button.button_style = "danger"
                self.button.tooltip = (
                    "The job is cancelled; tasks still running were interrupted. Click to "
                    "kill their workers now (they are restarted) instead of waiting for them."
                )
        _ticker().poke(self)

    # --- the progress thread ----------------------------------------------------------

    def tick(self, now: float) -> bool:
        """Refresh (called on the progress thread when due); True when the view is done."""
        with self._lock:
            handle = self.handle
            if handle is None or self.closed:
                return True
            snap = Snapshot(handle, self.finished_seen.is_set())
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

    def _note(self, snap: Snapshot) -> str:
        if self._cancel_clicked and not snap.finished:
            return "cancelling" + (
                f": {snap.running} still running (Kill stops their workers now)" if snap.running else ""
            )
        return ""

    def _send(self, snap: Snapshot) -> None:
        cancelled = bool(self.handle.cancelled())
        value = snap.html(cancelled, self._note(snap))
        state = (value, snap.finished)
        last = self._last
        if state == last:
            return
        self._last = state

        def apply() -> None:
            self.view.value = value
            if snap.finished and (last is None or not last[1]):
                with self.button.hold_sync():
                    verdict = snap.verdict(cancelled)
                    self.button.description = {"cancelled": "Cancelled", "failed": "Failed"}.get(
                        verdict, "Done"
                    )
                    self.button.icon = {"cancelled": "ban", "failed": "times"}.get(verdict, "check")
                    self.button.button_style = ""
                    self.button.tooltip = ""
                    self.button.disabled = True
                if self.display is not None:  # the saved text form: the final state
                    self.display.update(self._bundle(snap.line(cancelled)), raw=True)
                self.final_sent = True

        self.ctx.copy().run(apply)
        if snap.finished and self.display is not None and self.cell != _execution_count():
            # A headless runner (nbclient) reads only the cell running now, and applies a
            # display update found there to the display's earlier cell by its id. A job that
            # ends under a later cell: once more as that cell (JupyterLab applies both
            # copies by display id; they are the same).
            self.display.update(self._bundle(snap.line(cancelled)), raw=True)

    def _flush_output(self, in_context: bool = True) -> None:
        if not self.out.pending() or self.output_mode == "none":
            return
        batch = self.out.take()
        if not batch:
            return
        if self.late is not None:
            # The launching cell is over: update its display (sent as the cell running now,
            # the only one a headless runner still reads; a front end applies a display
            # update by its id, whichever cell carries it).
            self.late_text += "".join(text for _stream, text in batch)
            self.late.update({"text/plain": self.late_text}, raw=True)
            return

        def apply() -> None:
            for stream, text in batch:
                target = sys.stderr if stream == "stderr" else sys.stdout
                target.write(text)
            sys.stdout.flush()
            sys.stderr.flush()

        if in_context:
            self.ctx.copy().run(apply)
        else:
            apply()

    def _close(self) -> None:
        self.closed = True
        _unroute(self)
        self.handle = None  # the finished job's handle may be collected now

    def end_of_cell(self) -> None:
        """The launching cell ends with the job still running. A headless runner (nbclient,
        papermill) saves only what arrives for a cell until the kernel is idle after it, so
        what the tasks print later cannot be stream output of that cell. Instead the cell
        gets an (empty) display now, which later output updates by its display id, and the
        widget's text form says how far the job got."""
        with self._lock:
            handle = self.handle
            if handle is None or self.closed or self.cell_ended:
                return
            self._flush_output()  # what the tasks printed so far: still the cell's stream output
            self.cell_ended = True
            if self.output_mode == "none" or not _kernel_present():
                return  # no front end: output is printed as it comes (terminal IPython)
            self.late = self.ctx.copy().run(_show_late_output)
            if self.display is not None:
                line = Snapshot(handle).line(bool(handle.cancelled()))
                bundle = self._bundle(f"{line} · still running when its cell ended")
                self.ctx.copy().run(self.display.update, bundle, raw=True)

    def cancel_pending(self) -> bool:
        """Cancelled, with tasks still stopping: the view stays live (its Kill button)."""
        snap = Snapshot(self.handle, self.finished_seen.is_set())
        return bool(self.handle.cancelled()) and not snap.finished

    def finish_now(self) -> None:
        """As a cell ends: a finished job's last output, final state and summary are sent
        now, before the cell completes (headless runs keep only what arrives before that).
        Output goes to the launching cell; the final text form to it and to the cell
        running now."""
        deadline = time.monotonic() + _FINISH_WAIT
        while not self.finished_seen.is_set() and time.monotonic() < deadline:
            time.sleep(0.005)  # (set on the bus's delivery thread: poll briefly)
        with self._lock:
            handle = self.handle
            if handle is None or self.closed:
                return
            self.out.close()
            self._flush_output()  # to the launching cell (a front end shows it there)
            if self.widget is not None:
                self._send(Snapshot(handle, self.finished_seen.is_set()))
            self._close()

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
        with self._lock:
            self.out.close()
            self._flush_output(in_context=False)

    # --- text ------------------------------------------------------------------------------

    def text_line(self) -> str:
        handle = self.handle
        if handle is None:
            return ""
        return Snapshot(handle, self.finished_seen.is_set()).line(handle.cancelled())


def _display_at_once(bundle: dict[str, Any]) -> Any:
    """``display(bundle, raw=True, display_id=True)``, with IPython's own flush of stdout and
    stderr first. That flush waits for a round trip through the kernel's output thread (about
    a millisecond per job), but it is what keeps the widget between what the cell printed
    before it and after it: a display sent from the output thread without it went out after
    a print that followed it in the cell (tests/notebook/test_widget_cost.py)."""
    from IPython.display import display

    return display(bundle, raw=True, display_id=True)  # type: ignore[no-untyped-call]


def _show_late_output() -> Any:
    """An empty display for a job's later task output (see ``JobView.end_of_cell``)."""
    from IPython.display import display

    return display({"text/plain": ""}, raw=True, display_id=True)  # type: ignore[no-untyped-call]


def _kernel_present() -> bool:
    try:
        from IPython import get_ipython

        shell = get_ipython()
    except Exception:
        return False
    return shell is not None and getattr(shell, "kernel", None) is not None


def _execution_count() -> int | None:
    try:
        from IPython import get_ipython

        shell = get_ipython()
    except Exception:
        return None
    return None if shell is None else int(getattr(shell, "execution_count", 0))


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
        if _ticker_instance is None or not _ticker_instance.thread.is_alive() or _ticker_instance._stop:
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


def start_view(handle: Any, show: bool = False, **kw: Any) -> JobView:
    """A live view of ``handle`` (``show``: its widget displayed in this cell first, so
    that the progress thread's first refresh finds the display: the job may be over by
    then, e.g. a cached map served whole by the store)."""
    view = JobView(handle, **kw)
    if show:
        view.show()
    _views[handle] = view
    _route(view)
    _ticker().add(view)
    return view


def finish_cell(_result: Any = None) -> None:
    """``post_run_cell``: jobs that are over (awaited, or quick; this cell's and earlier
    ones) send their last output, final state and summary now, while the cell is still the
    current one: nbclient and papermill save only what arrives before the cell completes.
    Jobs of this cell still running get a display for what their tasks print later
    (``JobView.end_of_cell``)."""
    with _routes_lock:
        views = list(_routes.values())  # every open view, this cell's and earlier ones
    for view in views:
        handle = view.handle
        if handle is None or view.closed:
            continue
        try:
            if handle.done() and not view.cancel_pending():
                view.finish_now()
            else:
                view.end_of_cell()
        except Exception:  # the end of a cell must never fail because of a view
            pass


def adopt(handle: Any, local_frames: bool = True) -> None:
    """Track ``handle`` (second interrupt) and decorate its errors: cell source lines, and
    a traceback without orchestra's frames (``local_frames=False``: without any frame of
    the kernel, for code that ran wholly in a worker)."""
    _track(handle)
    handle.on_done(lambda h: _enrich(h, local_frames))


def on_create(handle: Any) -> None:
    """``_handles.create_hook``: track the handle, show its live view in this cell."""
    try:
        adopt(handle)
        if _suppress.get():
            return
        mode = resolve_mode()
        if mode == "widget":
            try:
                start_view(handle, show=True)
            except Exception:
                mode = "text"
            else:
                return
        if mode == "text":
            start_view(handle, widgets=False, output="stream")
    except Exception:  # a progress display must never break the call that made the job
        pass


def _enrich(handle: Any, local_frames: bool = True) -> None:
    for exc in list(handle.exceptions().values()):
        enrich_exception(exc)
        show_trimmed(exc, local_frames)


def on_display(handle: Any) -> None:
    """``_handles.display_hook``: a handle shown as a cell's value. Its job's widget is
    shown once, where the job started: in that cell, nothing more; in a later cell, the
    job's one-line state."""
    view = _views.get(handle)
    mode = resolve_mode()
    if view is not None and view.widget is not None:
        if view.cell == _execution_count():
            return  # the widget is already under this cell
        print(view.text_line() or Snapshot(handle).line(handle.cancelled()))
        return
    if mode == "widget" and view is None:
        try:
            start_view(handle, show=True)
            return
        except Exception:
            pass
    if mode == "none":
        print(repr(handle))
        return
    print(Snapshot(handle).line(handle.cancelled()))


# --- %orchestra status -------------------------------------------------------------------

_status_lock = threading.Lock()
_status_views: list[StatusView] = []


def _scheduled_texts(task: dict[str, Any]) -> dict[str, Any]:
    """One row of the scheduled tasks' table, formatted once for both views."""
    when, due_in = task["next_start"], task["next_start_in"]
    if when is None:
        next_text = "running" if task["state"] == "RUNNING" else "-"
    else:
        clock = datetime.datetime.fromisoformat(when).strftime("%H:%M:%S")
        next_text = f"in {format_duration(due_in)} ({clock})"
    interval = task["interval"]
    count = task["count"]
    return {
        **task,
        "state_text": task["state"].lower(),
        "next_text": next_text,
        "period_text": "once" if interval is None else f"every {format_duration(interval)}",
        "runs_text": f"{task['runs']}" if count is None else f"{task['runs']}/{count}",
    }


class StatusView:
    """A live table of the pool: workers (pid, state, current task, CPU, memory), queued
    tasks, jobs, and the scheduled tasks (cancel one with ``orchestra.cancel_scheduled(id)``
    or ``%orchestra unschedule ID|NAME``). Refreshed every ``interval`` seconds by the progress thread; only the
    newest ``_MAX_STATUS_VIEWS`` views stay live."""

    def __init__(self, pool_getter: Callable[[], Any], interval: float = 1.0, widget: bool = True) -> None:
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
        if pool is None:  # work may be scheduled on the default pool before it exists
            from .. import _api

            scheduled = [_scheduled_texts(t.as_dict()) for t in _api.scheduled_on(None)]
            return {"state": "no pool", "workers": [], "jobs": [], "scheduled": scheduled}
        status: dict[str, Any] = pool.status()  # Pool.statistics() as plain data
        status["scheduled"] = [_scheduled_texts(t) for t in status["scheduled"]]
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
            done = c.get("SUCCEEDED", 0)  # done means succeeded, as in the job widget
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
        scheduled = "".join(
            f"<tr><td>{t['id']}</td><td>{html.escape(t['name'])}</td><td>{t['state_text']}</td>"
            f"<td>{t['next_text']}</td><td>{t['period_text']}</td><td>{t['runs_text']}</td>"
            f"<td>{t['skipped']}</td></tr>"
            for t in s["scheduled"]
        )
        scheduled_html = (
            "<table><tr><th>scheduled</th><th>name</th><th>state</th><th>next start</th>"
            "<th>period</th><th>runs</th><th>skipped</th></tr>" + scheduled + "</table>"
            if scheduled
            else ""
        )
        return f"<div>{head}{workers}{jobs_html}{scheduled_html}</div>"

    def render_text(self) -> str:
        s = self.snapshot()
        n = len(s["workers"])
        lines = [f"orchestra pool: {s['state']}, {n} worker(s), {s.get('queued', 0)} queued"]
        lines.append(f"  {'worker':>6} {'pid':>7} {'state':<9} {'cpu':>5} {'memory':>9}  current task")
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
        for t in s["scheduled"]:
            lines.append(
                f"  scheduled {t['id']} {t['name']}: {t['state_text']}, next {t['next_text']},"
                f" {t['period_text']}, runs {t['runs_text']}, skipped {t['skipped']}"
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
    from IPython.display import display

    bundle = {  # the text form (a saved notebook, a headless run): the table as text
        "text/plain": view.render_text(),
        "application/vnd.jupyter.widget-view+json": {
            "version_major": 2,
            "version_minor": 0,
            "model_id": view.widget.model_id,
        },
    }
    display(bundle, raw=True)  # type: ignore[no-untyped-call]
    if live:
        with _status_lock:
            _status_views.append(view)
            while len(_status_views) > _MAX_STATUS_VIEWS:
                _status_views.pop(0).closed = True
        view.due = time.monotonic() + view.interval
        _ticker().add(view)
    return view
