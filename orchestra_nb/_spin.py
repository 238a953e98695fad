"""Busy polling (layer 0): check for a message for a short while before sleeping on it.

A round trip to a worker crosses six thread wake-ups (ZeroMQ moves each message through an
I/O thread on either side). Waking a sleeping thread costs tens of µs here, and far more
when its CPU went idle (in a VM an idle vCPU halts and must be rescheduled by the host).
A thread that expects an answer soon therefore keeps polling for up to ``window`` seconds,
yielding its CPU between checks so that the threads doing the work still run.

Adaptive, so that idle or slow work costs almost no CPU: a window that passes with nothing
doubles the number of following waits that sleep at once (up to ``MAX_SKIP``); a message
that arrives within the window resets it. A poll whose CPU went to another process while it
yielded counts as a miss too: when the CPUs are busy, polling only takes turns from the
threads that would answer (measured with one CPU-bound process beside a 2-worker pool on
2 cores: 240 µs round trips polling, against 100 µs sleeping). Measured on the 2-core benchmark machine, a raw
ZeroMQ ping-pong took 102 µs sleeping and 40 µs with the worker polling.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

__all__ = ["DEFAULT_BUSY_POLL", "MAX_SKIP", "BusyPoll", "yield_cpu"]

# Seconds: about two uncontended round trips here. Longer windows did no better when the
# CPUs were free, and far worse when another process kept one busy (a window that long is
# no longer missed, so the back-off never starts): median round trips with one CPU-bound
# process beside the pool, 0.5 ms window 203-336 µs; 0.3 ms 106-124 µs; no polling 115-154 µs.
DEFAULT_BUSY_POLL = 0.0003
MAX_SKIP = 64  # after repeated misses, one wait in 65 still polls, to notice a faster pace
# A yield of the CPU that lasted this long (s) means another process ran meanwhile: a yield
# that finds nothing else to run, or only this process's own threads, takes microseconds;
# a busy process gets a scheduler slice of a millisecond or more.
CONTENDED = 0.0002

_clock = time.perf_counter
yield_cpu = os.sched_yield if hasattr(os, "sched_yield") else (lambda: time.sleep(0))


class BusyPoll:
    """Polls ``ready()`` for up to ``window`` seconds (0: never), with an adaptive back-off."""

    __slots__ = ("_backoff", "_skip", "contended", "hits", "misses", "window")

    def __init__(self, window: float) -> None:
        if window < 0:
            raise ValueError(f"busy_poll must be >= 0 seconds, got {window}")
        self.window = window
        self._skip = 0  # waits left that sleep at once
        self._backoff = 1  # what the next miss sets _skip to
        self.hits = 0
        self.misses = 0  # windows that passed, and polls given up for a busy CPU ...
        self.contended = 0  # ... which are these

    def start(self) -> bool:
        """Whether a new wait polls at all: False while backing off, or with no window."""
        if not self.window:
            return False
        if self._skip:
            self._skip -= 1
            return False
        return True

    def poll(
        self, ready: Callable[[], object], until: float, stop: Callable[[], object] | None = None
    ) -> bool | None:
        """Poll ``ready()`` until it is true (True: a hit), until ``until`` (a
        ``time.perf_counter`` deadline) passes (False: a miss, and the back-off grows), or
        until ``stop()`` is true (None: neither; the caller has to let go for a moment, and
        may then poll again within the same wait)."""
        while not ready():
            now = _clock()
            if now >= until:
                return self._miss()
            if stop is not None and stop():
                return None
            yield_cpu()  # releases the GIL too
            if _clock() - now > CONTENDED:
                # Another process got this CPU for a while: the CPUs are busy, and polling
                # only takes turns from the work that would answer. Sleep instead.
                self.contended += 1
                return self._miss()
        self.hits += 1
        self._backoff = 1
        return True

    def _miss(self) -> bool:
        self.misses += 1
        self._skip = self._backoff
        self._backoff = min(2 * self._backoff, MAX_SKIP)
        return False

    def wait(self, ready: Callable[[], object]) -> bool:
        """One wait of up to ``window``: True as soon as ``ready()`` is true."""
        return self.start() and bool(self.poll(ready, _clock() + self.window))
