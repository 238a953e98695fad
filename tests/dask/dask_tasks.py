"""Task functions for the Dask tests, imported by name on the workers (PYTHONPATH).

Tasks that must be watched write marker files in a directory the test gives them:
``started-<i>`` (content: the worker's pid) when they begin, ``stopped-<i>`` when an
interrupt reached them. Blocking tasks wait for a file that only the test creates.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path


def mark(d: str, name: str, text: str = "") -> None:
    """Create ``d/name`` atomically: whoever sees it exist sees its content too."""
    tmp = Path(d, f".tmp-{name}-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, Path(d, name))


def wait_file(path: Path, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: {path} did not appear within {timeout} s")
        time.sleep(0.005)


def square(x: int) -> int:
    return x * x


def add(x: int, y: int) -> int:
    return x + y


def fail_on(x: int, bad: int) -> int:
    if x == bad:
        raise KeyError(f"bad item {x}")
    return x


def gated(i: int, d: str) -> int:
    """Starts, prints, then waits for ``go-<i>`` (or ``go``)."""
    mark(d, f"started-{i}", str(os.getpid()))
    print(f"item {i} says hello")
    while not (Path(d, f"go-{i}").exists() or Path(d, "go").exists()):
        time.sleep(0.005)
    return i


def cooperative(i: int, d: str) -> int:
    """Runs until interrupted (pure-Python loop: an asynchronous exception reaches it)."""
    try:
        mark(d, f"started-{i}", str(os.getpid()))
        while True:
            time.sleep(0.005)
    finally:
        mark(d, f"stopped-{i}", str(os.getpid()))


def stubborn(i: int, d: str) -> int:
    """Swallows every interrupt: only a restart of its worker ends it."""
    mark(d, f"started-{i}", str(os.getpid()))
    while True:
        try:
            time.sleep(0.005)
        except Exception:
            mark(d, f"ignored-{i}", str(os.getpid()))


def sleeper(i: int, d: str) -> int:
    """One long sleep: interrupts reach it only when it returns."""
    mark(d, f"started-{i}", str(os.getpid()))
    time.sleep(120)
    return i


def flaky(i: int, d: str) -> int:
    """Fails the first time it runs for each item, then succeeds."""
    path = Path(d, f"tried-{i}")
    if not path.exists():
        mark(d, f"tried-{i}")
        raise ConnectionError(f"transient failure of item {i}")
    return i


def slow_square(x: int, seconds: float) -> int:
    time.sleep(seconds)
    return x * x


def record_pid(d: str) -> int:
    mark(d, f"replayed-{os.getpid()}")
    return os.getpid()


def suicide(x: int) -> int:
    os.kill(os.getpid(), signal.SIGKILL)
    return x
