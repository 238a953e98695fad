"""Blocking waits on the main thread that a SIGINT can always break.

Python runs a signal's handler (``KeyboardInterrupt`` for SIGINT) in the main thread, between
bytecodes or when a blocking call returns ``EINTR``. A signal that lands after the
interpreter's last check but before the thread blocks (in the instant between releasing the
GIL and ``sem_timedwait``: exactly when another thread, woken by that release, sends it)
interrupts nothing; its handler runs only when the wait ends, which for ``result()`` with no
timeout is never. So on the main thread every wait is cut into slices of
``SIGNAL_CHECK_INTERVAL``: an "interrupt kernel" is honoured within one slice whenever it
lands. Other threads never run signal handlers and wait in one piece.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

__all__ = ["SIGNAL_CHECK_INTERVAL", "wait_interruptibly"]

# Long enough to cost nothing while a cell waits (10 wake-ups a second), short enough that a
# late-landing interrupt feels immediate.
SIGNAL_CHECK_INTERVAL = 0.1

_main_thread = threading.main_thread()


def wait_interruptibly(wait: Callable[[float | None], bool], timeout: float | None) -> bool:
    """``wait(timeout)`` (true once the awaited thing is done), in slices on the main thread."""
    if threading.current_thread() is not _main_thread:
        return wait(timeout)
    if timeout is None:
        while not wait(SIGNAL_CHECK_INTERVAL):
            pass
        return True
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if wait(max(0.0, min(remaining, SIGNAL_CHECK_INTERVAL))):
            return True
        if remaining <= SIGNAL_CHECK_INTERVAL:
            return False
