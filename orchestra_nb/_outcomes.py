"""What a stopped or failed job leaves behind (layer 0: pure, no pool, no IPython).

* :data:`MISSING`: the placeholder ``partial_results()`` puts where an item has no value
  (not finished, failed or cancelled). It is one object, compared with ``is``, and no task
  can return it (it pickles as a reference to itself, so a result never *is* it).
* :class:`JobCancelled` and :class:`JobInterrupted`: what awaiting (or blocking on) a
  ``map`` raises when the job was cancelled (``handle.cancel()``, the widget's Cancel
  button) or the wait was interrupted ("Interrupt kernel", Ctrl+C). The message says what
  happened and how many items were done; ``exc.handle`` is the job's handle, so
  ``exc.handle.partial_results()`` and ``exc.handle.failures()`` are one attribute away.
  ``JobCancelled`` is a ``CancelledError`` (both the ``asyncio`` and the
  ``concurrent.futures`` one); ``JobInterrupted`` is a ``KeyboardInterrupt``.
* :class:`Failure` / :class:`Failures`: one row per failed item, as ``handle.failures()``
  returns them; a notebook shows the table as HTML.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import functools
import html
import reprlib
from collections.abc import Callable, Iterable
from typing import Any, Final

__all__ = ["MISSING", "Failure", "Failures", "JobCancelled", "JobInterrupted", "progress_words"]


class _Missing:
    """The type of :data:`MISSING` (one instance)."""

    _instance: _Missing | None = None

    def __new__(cls) -> _Missing:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "orchestra.MISSING"

    def __reduce__(self) -> str:
        return "MISSING"  # pickled by reference: unpickling gives this very object


MISSING: Final = _Missing()


def progress_words(counts: dict[Any, int], total: int | None) -> str:
    """``'88 of 200 items done, 2 failed, 110 cancelled'`` from a handle's ``counts()``."""
    by_name = {getattr(state, "name", str(state)): n for state, n in counts.items()}
    done = by_name.get("SUCCEEDED", 0)
    of = "?" if total is None else f"{total:,}"
    parts = [f"{done:,} of {of} item{'s' if total != 1 else ''} done"]
    for name, word in (("FAILED", "failed"), ("CANCELLED", "cancelled")):
        if by_name.get(name):
            parts.append(f"{by_name[name]:,} {word}")
    unfinished = sum(
        by_name.get(n, 0) for n in ("PENDING", "SCHEDULED", "RUNNING", "RETRYING")
    )
    if unfinished:
        parts.append(f"{unfinished:,} stopping")
    return ", ".join(parts)


def _stop_message(handle: Any, what: str) -> str:
    name = getattr(handle, "name", "job")
    try:
        words = progress_words(handle.counts(), handle.total)
    except Exception:  # a message must never fail
        words = "progress unknown"
    return (
        f"{name!r} {what}: {words}. The finished results are in exc.handle.partial_results() "
        "(orchestra.MISSING where an item has none)"
    )


# How IPython shows these exceptions: set by the notebook layer to a renderer that leaves
# out orchestra's own frames (IPython calls ``exc._render_traceback_()`` when it exists).
render_hook: Callable[[BaseException, bool], list[str]] | None = None


class _TrimmedInIPython:
    # False: show no frame of the kernel at all (code that ran wholly in a worker).
    local_frames = True

    @property
    def _render_traceback_(self) -> Callable[[], list[str]]:
        hook = render_hook
        if hook is None or not isinstance(self, BaseException):
            raise AttributeError("_render_traceback_")  # hasattr() is False: the usual view
        return functools.partial(hook, self, self.local_frames)


class JobCancelled(_TrimmedInIPython, concurrent.futures.CancelledError, asyncio.CancelledError):
    """The awaited job was cancelled; ``handle`` is its handle (its results so far stay).

    A ``CancelledError`` of both kinds, so ``except asyncio.CancelledError`` and
    ``except concurrent.futures.CancelledError`` both catch it. Because the latter is an
    ``Exception``, so is this: ``except Exception`` catches a cancelled job too.
    """

    def __init__(self, handle: Any, by: str = "handle.cancel()") -> None:
        self.handle = handle
        self.by = by
        super().__init__(_stop_message(handle, f"was cancelled ({by})"))

    def __reduce__(self) -> tuple[object, ...]:
        return (concurrent.futures.CancelledError, (str(self),))  # handles stay home


class JobInterrupted(_TrimmedInIPython, KeyboardInterrupt):
    """Waiting for a job was interrupted ("Interrupt kernel", Ctrl+C); the job was
    cancelled, and ``handle`` keeps what finished."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle
        super().__init__(_stop_message(handle, "was interrupted and cancelled"))

    def __reduce__(self) -> tuple[object, ...]:
        return (KeyboardInterrupt, (str(self),))


@dataclasses.dataclass(frozen=True, slots=True)
class Failure:
    """One failed item of a map. ``input`` is the item's argument (``MISSING`` when the
    handle did not keep its input: a one-shot iterator); ``worker`` the id of the worker it
    failed on, when known; ``attempts`` how many times it ran; ``duration`` how long its
    failing attempt ran, in seconds (None: it never ran, or nobody timed it), and
    ``duration_bound`` whether that is an upper bound (the item was one of a block of fast
    items timed together, or of a chunk that died with its worker)."""

    index: int
    input: Any
    exception: BaseException
    attempts: int
    worker: int | None
    duration: float | None = None
    duration_bound: bool = False

    @property
    def error(self) -> str:
        return f"{type(self.exception).__name__}: {self.exception}"

    @property
    def duration_text(self) -> str:
        """``'1.24 s'``, ``'≤ 0.8 ms'`` (an upper bound) or ``'?'``."""
        if self.duration is None:
            return "?"
        return ("≤ " if self.duration_bound else "") + _seconds(self.duration)


def _seconds(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} µs"
    if seconds < 1:
        return f"{seconds * 1e3:.1f} ms"
    if seconds < 60:
        return f"{seconds:.2f} s"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


_short = reprlib.Repr()
_short.maxstring = 60
_short.maxother = 60


_HEAD = ("index", "input", "exception", "attempts", "worker", "duration")


class Failures(list[Failure]):
    """The failed items of a job (a list of :class:`Failure`), shown as a table."""

    def __init__(self, rows: Iterable[Failure] = (), name: str = "job") -> None:
        super().__init__(rows)
        self.name = name

    @property
    def indices(self) -> list[int]:
        return [f.index for f in self]

    def _rows(self) -> list[tuple[str, ...]]:
        return [
            (
                str(f.index),
                "?" if f.input is MISSING else _short.repr(f.input),
                _short.repr(f.error)[1:-1] if len(f.error) > 120 else f.error,
                str(f.attempts),
                "?" if f.worker is None else f"w{f.worker}",
                f.duration_text,
            )
            for f in self
        ]

    def __repr__(self) -> str:
        if not self:
            return f"<no failed items in {self.name!r}>"
        head = _HEAD
        rows = [head, *self._rows()]
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        lines = [f"{len(self)} failed item(s) of {self.name!r}:"]
        lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        if not self:
            return f"<i>no failed items in {html.escape(self.name)}</i>"
        head = "".join(f"<th>{h}</th>" for h in _HEAD)
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
            for row in self._rows()
        )
        caption = f"{len(self)} failed item(s) of <b>{html.escape(self.name)}</b>"
        return f"<table><caption>{caption}</caption><tr>{head}</tr>{body}</table>"
