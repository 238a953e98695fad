"""The composite widget: one compact block per composite, its steps with states and counts.

::

    etl · running · 12/40 tasks · failed 1     [Pause] [Cancel]
      0:load            succeeded   1/1
      1:map(clean)      running     11/37  ██████░░░░
      2:report          pending     0/1

A composite handle shown as a cell's value (:func:`on_display`, its display hook) shows
its block once: nothing more in the cell where its block is already, a one-line summary in
a later cell, a new live block otherwise.

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

import threading
import weakref
from collections.abc import Callable
from typing import Any

from .._driver import render_html, summary_line
from ._progress import _execution_count, resolve_mode, suppress_auto

__all__ = ["CompositeView", "on_display", "render_html", "run_composite", "show_composite"]

_SETTLE_TIMEOUT = 10.0  # s a finished composite's parts may take to reach their final counts

# The cell (execution count) where each handle's block was last shown.
_shown_in: weakref.WeakKeyDictionary[Any, int | None] = weakref.WeakKeyDictionary()


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
        self.cell: int | None = None  # the execution count of the cell it was shown in
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

    def show(self) -> None:
        """Display the block in the current cell (and remember where)."""
        self.cell = _shown_in[self.handle] = _execution_count()
        _display(self.widget)

    def _ipython_display_(self) -> None:
        self.show()


def _display(obj: Any) -> None:
    from IPython.display import display

    show: Callable[[Any], object] = display  # IPython's display() is unannotated
    show(obj)


def show_composite(handle: Any, *, interval: float = 0.25) -> CompositeView:
    """Display the live block of ``handle`` in the current cell; returns the view."""
    view = CompositeView(handle, interval=interval)
    view.show()
    return view


def on_display(handle: Any) -> None:
    """``_driver.display_hook``: a composite handle shown as a cell's value. Its block is
    shown once: in the cell that shows it already, nothing more; in a later cell, the
    one-line summary; a handle without a block gets a live one (text where there are no
    widgets, its repr with ``progress = "none"``)."""
    if handle in _shown_in:
        if _shown_in[handle] != _execution_count():
            print(summary_line(handle))
        return
    mode = resolve_mode()
    if mode == "widget":
        try:
            show_composite(handle)
            return
        except Exception:  # no widgets after all: the text below
            pass
    print(repr(handle) if mode == "none" else summary_line(handle))


def run_composite(step: Any, pool: Any = None, *, interval: float = 0.25, **options: Any) -> Any:
    """``step.run(pool, **options)`` with one composite block instead of a progress widget
    per part; returns the handle."""
    with suppress_auto():  # the parts' jobs inherit this context: no per-job views
        handle = step.run(pool, **options)
    show_composite(handle, interval=interval)
    return handle
