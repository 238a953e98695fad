"""A fake clock for exact schedule tests (``Scheduler(clock=FakeClock())``)."""

from __future__ import annotations

import datetime
import threading
from collections.abc import Callable

__all__ = ["FakeClock"]


class FakeClock:
    """Time that moves only when told: :meth:`advance` jumps it forward, then returns once
    every scheduler on this clock has started the work due by the new time.

    ``monotonic()`` starts at ``start`` (seconds); ``now()`` is ``wall`` plus the time
    advanced so far. Waiting on this clock never times out by itself: a scheduler sleeping
    on it is woken by ``advance`` (or by new work).
    """

    def __init__(self, start: float = 0.0,
                 wall: datetime.datetime = datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC)) -> None:
        if wall.tzinfo is None:
            raise ValueError("FakeClock's wall time must be timezone-aware")
        self._start = start
        self._time = start
        self._wall = wall
        self._lock = threading.Lock()
        self._listeners: list[Callable[[], None]] = []

    def monotonic(self) -> float:
        return self._time

    def now(self) -> datetime.datetime:
        return self._wall + datetime.timedelta(seconds=self._time - self._start)

    def wait(self, cond: threading.Condition, deadline: float | None) -> None:
        cond.wait()

    def attach(self, on_advance: Callable[[], None]) -> None:
        with self._lock:
            self._listeners.append(on_advance)

    def detach(self, on_advance: Callable[[], None]) -> None:
        with self._lock:
            if on_advance in self._listeners:
                self._listeners.remove(on_advance)

    def advance(self, seconds: float) -> None:
        """Move time forward by ``seconds`` (>= 0) and let the schedulers catch up."""
        if not seconds >= 0:
            raise ValueError(f"a clock only moves forward, got {seconds!r}")
        with self._lock:
            self._time += seconds
            listeners = list(self._listeners)
        for listener in listeners:
            listener()
