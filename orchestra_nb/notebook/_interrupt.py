"""A second "interrupt kernel" within 2 s hard-kills the workers still busy with a cancelled job.

The first interrupt cancels the awaited job (the handle does that on ``CancelledError`` /
``KeyboardInterrupt``): its queue is drained and its running tasks get ``KeyboardInterrupt``.
A task that ignores it would hold its worker for the pool's ``cancel_grace``; an impatient
second interrupt kills such workers at once (they are respawned).

After a cell ends with an interrupt, the kernel is idle and ipykernel ignores SIGINT
(``SIG_IGN``), so the second signal would be lost. For 2 s we install our own handler as the
one ipykernel restores after each request (``kernel.saved_sigint_handler``); it acts only
inside that window, and otherwise ignores SIGINT exactly like the kernel did.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from typing import Any

from . import _progress

__all__ = ["CellInterrupts", "SecondInterrupt"]

WINDOW = 2.0


class SecondInterrupt:
    def __init__(self, shell: Any) -> None:
        self.shell = shell
        self.deadline = 0.0
        self.kills = 0
        self._original: Any = None
        self._installed = False

    def register(self) -> None:
        self.shell.events.register("post_run_cell", self.post_run_cell)

    def unregister(self) -> None:
        with contextlib.suppress(ValueError):
            self.shell.events.unregister("post_run_cell", self.post_run_cell)
        self._uninstall()

    def post_run_cell(self, result: Any) -> None:
        error = getattr(result, "error_in_exec", None)
        if isinstance(error, (asyncio.CancelledError, KeyboardInterrupt)):
            self.deadline = time.monotonic() + WINDOW
            self._install()
        elif self._installed and time.monotonic() > self.deadline:
            self._uninstall()

    def _install(self) -> None:
        kernel = getattr(self.shell, "kernel", None)
        if kernel is None or not hasattr(kernel, "saved_sigint_handler") or self._installed:
            return
        self._original = kernel.saved_sigint_handler
        kernel.saved_sigint_handler = self._on_sigint  # restored by ipykernel after this request
        self._installed = True

    def _uninstall(self) -> None:
        if not self._installed:
            return
        self._installed = False
        kernel = getattr(self.shell, "kernel", None)
        if kernel is not None and getattr(kernel, "saved_sigint_handler", None) is self._on_sigint:
            kernel.saved_sigint_handler = self._original
        with contextlib.suppress(ValueError, TypeError):  # only possible on the main thread
            if signal.getsignal(signal.SIGINT) is self._on_sigint:
                signal.signal(signal.SIGINT, self._original)

    def _on_sigint(self, signum: int, frame: Any) -> None:
        if time.monotonic() <= self.deadline:
            self.deadline = 0.0
            for handle in _cancelling():
                if handle.cancel(kill=True):
                    self.kills += 1
            return
        original = self._original
        if callable(original):
            original(signum, frame)


class CellInterrupts:
    """Tells "Interrupt kernel" apart from any other cancel of an awaiting cell.

    ipykernel turns an interrupt during an awaiting cell into a cancel of the cell's task,
    so the wait for a handle sees a plain ``CancelledError``. Before each cell this wraps
    the SIGINT handler ipykernel installed for it (ipykernel puts its own back after the
    cell) to note that a SIGINT came, and remembers the cell's task. ``interrupted()`` is
    then true only in that task after a SIGINT: ``asyncio.timeout`` and other cancels keep
    their meaning, and a task the cell started (``gather``) never gets a KeyboardInterrupt,
    which would escape into the kernel's event loop.
    """

    def __init__(self, shell: Any) -> None:
        self.shell = shell
        self.cell_task: asyncio.Task[Any] | None = None
        self.sigint_seen = False

    def register(self) -> None:
        self.shell.events.register("pre_run_cell", self.pre_run_cell)

    def unregister(self) -> None:
        with contextlib.suppress(ValueError):
            self.shell.events.unregister("pre_run_cell", self.pre_run_cell)

    def pre_run_cell(self, _info: Any = None) -> None:
        self.sigint_seen = False
        try:
            self.cell_task = asyncio.current_task()
        except RuntimeError:  # no running loop: a sync cell outside a kernel
            self.cell_task = None
        current = signal.getsignal(signal.SIGINT)
        if not callable(current) or getattr(current, "_orchestra_wrapper", False):
            return

        def note_sigint(signum: int, frame: Any) -> None:
            self.sigint_seen = True
            current(signum, frame)

        note_sigint._orchestra_wrapper = True  # type: ignore[attr-defined]
        with contextlib.suppress(ValueError, TypeError):  # only possible on the main thread
            signal.signal(signal.SIGINT, note_sigint)

    def interrupted(self) -> bool:
        if not self.sigint_seen or self.cell_task is None:
            return False
        try:
            return asyncio.current_task() is self.cell_task
        except RuntimeError:
            return False


def _cancelling() -> list[Any]:
    """Handles that were cancelled and whose tasks have not all stopped yet."""
    return [h for h in _progress.unfinished_handles() if h.cancelled()]
