"""What tasks print, on its way to the cell that launched them.

``TaskOutput`` events arrive on the event bus's delivery thread. :class:`OutputBuffer`
splits them into lines, marks each line with its worker and item (``[w2 item 17] ...``), keeps
at most ``max_lines`` lines per job (the rest is only counted) and hands the lines over in
batches: the progress thread flushes a batch at most ten times a second, so a task that
prints in a tight loop cannot flood the notebook (jupyter_server drops iopub messages above
1000 per second).

Two ways to show a batch, both addressed to the launching cell even after it finished:

* into the job's ``ipywidgets.Output`` (widgets are addressed by comm id), or
* as ``stream`` messages, written inside the launching cell's ``contextvars`` context, which
  carries ipykernel's parent header (docs/design.md, "Output goes to the right cell").

Also: :func:`enrich_traceback` adds the source lines of cell-defined functions, which only
the kernel knows, to a worker's traceback text.
"""

from __future__ import annotations

import contextlib
import functools
import linecache
import os
import re
import threading
import types
from typing import Any

__all__ = [
    "OutputBuffer",
    "enrich_exception",
    "enrich_traceback",
    "render_trimmed",
    "show_trimmed",
]


class OutputBuffer:
    """Thread-safe line buffer for one job's output."""

    def __init__(
        self, max_lines: int = 200, max_line_length: int = 2000, mark: str | None = "task"
    ) -> None:
        self.max_lines = max_lines
        self.max_line_length = max_line_length
        self.mark = mark
        self._lock = threading.Lock()
        self._partial: dict[tuple[int, int, str], str] = {}
        self._ready: list[tuple[str, str]] = []  # (stream, text) not yet shown
        self.lines = 0  # lines accepted (shown or waiting)
        self.dropped = 0  # lines over the cap
        self._dropped_reported = 0

    def add(self, worker_id: int, index: int, stream: str, text: str) -> None:
        with self._lock:
            key = (worker_id, index, stream)
            text = self._partial.pop(key, "") + text
            parts = text.split("\n")
            if parts[-1]:
                self._partial[key] = parts[-1]
            for line in parts[:-1]:
                self._accept(key, line)

    def _accept(self, key: tuple[int, int, str], line: str) -> None:
        if self.lines >= self.max_lines:
            self.dropped += 1
            return
        self.lines += 1
        if len(line) > self.max_line_length:
            line = (
                line[: self.max_line_length]
                + f" ... [{len(line) - self.max_line_length} characters cut]"
            )
        worker_id, index, stream = key
        if self.mark == "task":
            prefix = f"[w{worker_id} item {index}] "
        elif self.mark == "worker":
            prefix = f"[w{worker_id}] "
        else:
            prefix = ""
        text = prefix + line + "\n"
        if self._ready and self._ready[-1][0] == stream:
            self._ready[-1] = (stream, self._ready[-1][1] + text)
        else:
            self._ready.append((stream, text))

    def close(self) -> None:
        """The job is over: lines without a final newline are complete now."""
        with self._lock:
            partial, self._partial = self._partial, {}
            for key, line in partial.items():
                self._accept(key, line)

    def take(self) -> list[tuple[str, str]]:
        """The batch to show now: [(stream, text)], with a note when lines were dropped."""
        with self._lock:
            ready, self._ready = self._ready, []
            if self.dropped > self._dropped_reported:
                new = self.dropped - self._dropped_reported
                self._dropped_reported = self.dropped
                ready.append(
                    (
                        "stderr",
                        f"[orchestra: {new} more line(s) of task output not shown; "
                        f"at most {self.max_lines} lines per job "
                        "(%config Orchestra.output_max_lines)]\n",
                    )
                )
            return ready

    def pending(self) -> bool:
        return bool(self._ready) or self.dropped > self._dropped_reported


_FRAME = re.compile(r'^(\s*)File "(?P<file>[^"]+)", line (?P<line>\d+)(?:, in (?P<name>.+))?$')


def enrich_traceback(text: str) -> str:
    """Insert the source lines the worker could not know (cell-defined functions).

    A worker formats its traceback without the source of functions defined in notebook
    cells; the kernel has those cells in ``linecache``.
    """
    lines = text.splitlines()
    out: list[str] = []
    changed = False
    for i, line in enumerate(lines):
        out.append(line)
        m = _FRAME.match(line)
        if m is None:
            continue
        nxt = lines[i + 1] if i + 1 < len(lines) else ""
        indent = m.group(1)
        if nxt.startswith(indent + "  ") and not _FRAME.match(nxt):
            continue  # the worker already showed the source line
        source = linecache.getline(m.group("file"), int(m.group("line"))).strip()
        if source:
            out.append(f"{indent}  {source}")
            changed = True
    if not changed:
        return text
    return "\n".join(out) + ("\n" if text.endswith("\n") else "")


def enrich_exception(exc: BaseException) -> None:
    """Enrich, in place, the worker traceback carried by ``exc`` (RemoteTraceback cause or
    RemoteError)."""
    from .._exceptions import RemoteError, RemoteTraceback

    try:
        cause = exc.__cause__
        if isinstance(cause, RemoteTraceback):
            tb = enrich_traceback(cause.tb)
            if tb is not cause.tb:
                cause.tb = tb
                cause.args = (tb,)
        if isinstance(exc, RemoteError):
            exc.traceback = enrich_traceback(exc.traceback)
    except Exception:  # never let decoration break error reporting
        pass


def stream_message(stream: str, text: str) -> dict[str, Any]:
    return {"output_type": "stream", "name": stream, "text": text}


# --- tracebacks trimmed to the user's code ----------------------------------------------

_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep


def _internal(tb: types.TracebackType) -> bool:
    """A frame of orchestra_nb itself, or one marked ``__tracebackhide__`` (IPython's own
    bottom frame is, and so are orchestra's)."""
    frame = tb.tb_frame
    if os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE_DIR):
        return True
    return bool(frame.f_locals.get("__tracebackhide__", False))


def user_frames(tb: types.TracebackType | None) -> types.TracebackType | None:
    """The traceback without orchestra's (and IPython's hidden) frames, rebuilt."""
    kept = []
    while tb is not None:
        if not _internal(tb):
            kept.append(tb)
        tb = tb.tb_next
    out: types.TracebackType | None = None
    for entry in reversed(kept):
        out = types.TracebackType(out, entry.tb_frame, entry.tb_lasti, entry.tb_lineno)
    return out


def render_trimmed(exc: BaseException, local_frames: bool = True) -> list[str]:
    """What IPython shows for ``exc``: its usual coloured traceback, minus orchestra's
    frames (``local_frames=False``: minus every frame of this process, for a
    ``%%orchestra`` cell whose code ran in a worker: the remote traceback says it all)."""
    from IPython import get_ipython

    shell = get_ipython()
    tb = user_frames(exc.__traceback__) if local_frames else None
    if shell is None:
        import traceback

        return traceback.format_exception(type(exc), exc, tb)
    lines: list[str] = shell.InteractiveTB.structured_traceback(type(exc), exc, tb, tb_offset=0)
    return lines


def show_trimmed(exc: BaseException, local_frames: bool = True) -> None:
    """Make IPython show ``exc`` trimmed (the ``_render_traceback_`` protocol)."""
    with contextlib.suppress(AttributeError, TypeError):  # no __dict__: shown as usual
        exc._render_traceback_ = functools.partial(  # type: ignore[attr-defined]
            render_trimmed, exc, local_frames
        )
