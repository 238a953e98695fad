"""The composite widget: one compact block per composite, its steps with states and counts.

::

    etl · running · 12/40 tasks · failed 1     [Pause] [Cancel]
      0:load            succeeded   1/1
      1:map(clean)      running     11/37  ██████░░░░
      2:report          pending     0/1

Fed only by the :class:`~orchestra_nb.CompositeHandle`'s public state (``steps()``,
``state``, ``paused``, ``counts()``) and driven by its own thread, which refreshes the block
at most every ``interval`` seconds (0.25 by default: one comm message per refresh, far under
jupyter_server's iopub rate limit) and ends after the final refresh once the composite is
done (or when :meth:`CompositeView.close` is called). The buttons call ``pause()``,
``resume()`` and ``cancel()`` on the handle.

:func:`run_composite` starts a step with the per-job progress widgets of its parts
suppressed (the composite block shows them all) and displays the block.
"""

from __future__ import annotations

import html
import threading
from collections.abc import Callable
from typing import Any

from .._state import TaskState
from ._progress import suppress_auto

__all__ = ["CompositeView", "render_html", "run_composite", "show_composite"]

_COLORS = {
    TaskState.SUCCEEDED: "#2e7d32",
    TaskState.FAILED: "#c62828",
    TaskState.CANCELLED: "#757575",
    TaskState.RUNNING: "#1565c0",
    TaskState.PENDING: "#616161",
    TaskState.SCHEDULED: "#6a1b9a",
    TaskState.RETRYING: "#ef6c00",
}
_BAR_WIDTH = 10
_SETTLE_TIMEOUT = 10.0  # s a finished composite's parts may take to reach their final counts


def _bar(done: int, total: int | None) -> str:
    if not total:
        return ""
    filled = min(_BAR_WIDTH, round(_BAR_WIDTH * done / total))
    return "█" * filled + "░" * (_BAR_WIDTH - filled)


def _state_label(state: TaskState, paused: bool) -> str:
    return "paused" if paused and state is TaskState.RUNNING else state.name.lower()


def render_html(handle: Any) -> str:
    """The block's HTML for ``handle`` as it is now (a title line, then one row per step)."""
    steps = handle.steps()
    counts = handle.counts()
    paused = bool(handle.paused)
    done = counts[TaskState.SUCCEEDED] + counts[TaskState.FAILED] + counts[TaskState.CANCELLED]
    total = handle.total
    state = handle.state
    title = (f"<b>{html.escape(handle.name)}</b> · "
             f"<span style='color:{_COLORS[state]}'>{_state_label(state, paused)}</span> · "
             f"{done}/{'?' if total is None else total} tasks")
    if counts[TaskState.FAILED]:
        title += f" · failed {counts[TaskState.FAILED]}"
    rows = []
    for step in steps[1:]:
        label = html.escape(step.path.rsplit(" / ", 1)[-1])
        pad = 1.2 * (step.depth - 1)
        tally = f"{step.done}/{'?' if step.total is None else step.total}"
        rows.append(
            f"<tr><td style='padding-left:{pad:.1f}em'>{label}</td>"
            f"<td style='color:{_COLORS[step.state]}'>{_state_label(step.state, paused)}</td>"
            f"<td style='text-align:right'>{tally}</td>"
            f"<td style='font-family:monospace'>{_bar(step.done, step.total)}</td></tr>"
        )
    table = "<table style='border-collapse:collapse'>" + "".join(rows) + "</table>"
    return f"<div>{title}</div>{table}"


class CompositeView:
    """The live block for one composite handle (see the module docstring)."""

    def __init__(self, handle: Any, *, interval: float = 0.25) -> None:
        import ipywidgets as W

        self.handle = handle
        self.interval = max(0.1, float(interval))
        self.html = W.HTML(render_html(handle))
        self.pause_button = W.Button(description="Pause", layout=W.Layout(width="6em"))
        self.cancel_button = W.Button(description="Cancel", button_style="danger", layout=W.Layout(width="6em"))
        self.pause_button.on_click(self._toggle_pause)
        self.cancel_button.on_click(lambda _: self.handle.cancel())
        self.widget = W.HBox([self.html, W.VBox([self.pause_button, self.cancel_button])])
        self._wake = threading.Event()
        self._closed = False
        self._last = ""
        handle.on_done(lambda _: self._wake.set())  # the final refresh comes at once
        self._thread = threading.Thread(target=self._run, name="orchestra-composite-view", daemon=True)
        self._thread.start()

    def _toggle_pause(self, _: Any = None) -> None:
        if self.handle.paused:
            self.handle.resume()
        else:
            self.handle.pause()
        self._wake.set()

    def refresh(self) -> None:
        text = render_html(self.handle)
        if text != self._last:  # one comm message only when something changed
            self._last = text
            self.html.value = text
        self.pause_button.description = "Resume" if self.handle.paused else "Pause"
        if self.handle.done() and self.handle.finished():
            self.pause_button.disabled = self.cancel_button.disabled = True

    def _run(self) -> None:
        while not self._closed:
            self._wake.wait(self.interval)
            self._wake.clear()
            if self.handle.done():
                # The parts' last counts (a cancel takes effect in the pool a moment later).
                self.handle.wait_finished(_SETTLE_TIMEOUT)
                self.refresh()
                return
            self.refresh()

    def close(self, timeout: float = 5.0) -> None:
        """Stop refreshing (the block keeps its last state)."""
        self._closed = True
        self._wake.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def _ipython_display_(self) -> None:
        _display(self.widget)


def _display(obj: Any) -> None:
    from IPython.display import display

    show: Callable[[Any], object] = display  # IPython's display() is unannotated
    show(obj)


def show_composite(handle: Any, *, interval: float = 0.25) -> CompositeView:
    """Display the live block of ``handle`` in the current cell; returns the view."""
    view = CompositeView(handle, interval=interval)
    _display(view.widget)
    return view


def run_composite(step: Any, pool: Any = None, *, interval: float = 0.25, **options: Any) -> Any:
    """``step.run(pool, **options)`` with one composite block instead of a progress widget
    per part; returns the handle."""
    with suppress_auto():  # the parts' jobs inherit this context: no per-job views
        handle = step.run(pool, **options)
    show_composite(handle, interval=interval)
    return handle
