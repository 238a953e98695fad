"""Shared fixtures: every test must leave nothing behind.

The leak check compares, before and after each test, this process's children, its threads,
its open files and this process's entries in /dev/shm; a test that leaves a worker (or any
child) alive, a thread running, a file open or a run directory or segment behind fails, and
stray processes are killed by pid. The pool engine's own I/O and event-delivery threads are
shared by all pools and may outlive a test.

Under load: ``--load N`` (or ``ORCHESTRA_TEST_LOAD=N``) keeps N CPU-bound processes running
for the whole session, started first and killed by pid at its end, so that a test which
depends on timing fails here rather than on a busy laptop or CI runner.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import psutil
import pytest

import orchestra_nb as orchestra
from orchestra_nb.testing.fault_run import open_files


def _children() -> dict[int, psutil.Process]:
    return {p.pid: p for p in psutil.Process().children(recursive=True)}


def wait_gone(pids: list[int], timeout: float = 5.0) -> list[int]:
    """Pids still alive (and not zombies) after waiting up to ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        alive = [pid for pid in alive if _alive(pid)]
        if alive:
            time.sleep(0.01)
    return alive


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--load",
        type=int,
        default=int(os.environ.get("ORCHESTRA_TEST_LOAD", "0")),
        help="keep N CPU-bound processes busy for the whole session",
    )


@pytest.fixture(scope="session", autouse=True)
def cpu_load(request: pytest.FixtureRequest) -> Iterator[list[int]]:
    count = request.config.getoption("--load")
    procs = [
        subprocess.Popen([sys.executable, "-c", "while True: pass"], stdin=subprocess.DEVNULL)
        for _ in range(count)
    ]
    try:
        yield [p.pid for p in procs]
    finally:
        for p in procs:
            p.kill()  # by its own pid
            p.wait()


def _threads() -> set[threading.Thread]:
    # pyzmq's garbage collector thread (zero-copy sends) lives as long as the process. The
    # package's own threads (the I/O thread and the bus's included) end with their pools.
    return {t for t in threading.enumerate() if type(t).__name__ != "GarbageCollectorThread"}


def _shm_entries() -> set[str]:
    with contextlib.suppress(OSError):
        return {e for e in os.listdir("/dev/shm") if e.startswith(f"orchestra-{os.getpid()}-")}
    return set()


# How long the leak check waits for what a test left to end by itself (a pool's callback
# thread, a worker exiting): a hang guard, generous because the wait ends as soon as it
# is all gone, and a loaded machine (--load) may take seconds to get there.
SETTLE_GUARD = 30.0


def _settle(check: Any, timeout: float = SETTLE_GUARD) -> Any:
    """``check()`` until it is empty (things close asynchronously), at most ``timeout``."""
    deadline = time.monotonic() + timeout
    left = check()
    while left and time.monotonic() < deadline:
        time.sleep(0.01)
        left = check()
    return left


@pytest.fixture(autouse=True)
def no_leaked_processes() -> Iterator[None]:
    before = set(_children())
    threads, files, shm = _threads(), open_files(), _shm_entries()
    yield
    orchestra.shutdown()  # the default pool, if a test used it
    new = [pid for pid in _children() if pid not in before]
    leaked = wait_gone(new, timeout=SETTLE_GUARD)
    for pid in leaked:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert not leaked, f"test left processes alive: {leaked}"
    stray_threads = _settle(lambda: {t.name for t in _threads() - threads if t.is_alive()})
    assert not stray_threads, f"test left threads running: {sorted(stray_threads)}"
    stray_files = _settle(lambda: open_files() - files)
    assert not stray_files, f"test left files open: {sorted(stray_files)}"
    stray_shm = _settle(lambda: _shm_entries() - shm)
    assert not stray_shm, f"test left entries in /dev/shm: {sorted(stray_shm)}"


def _pool_options(request: pytest.FixtureRequest) -> dict[str, Any]:
    """``@pytest.mark.pool_options(busy_poll=0)``: options for the pool fixtures."""
    marker = request.node.get_closest_marker("pool_options")
    return {"workers": 2, **(marker.kwargs if marker else {})}


@pytest.fixture
def pool(request: pytest.FixtureRequest) -> Iterator[orchestra.Pool]:
    p = orchestra.Pool(**_pool_options(request))
    p.wait_started(timeout=30)
    try:
        yield p
    finally:
        p.shutdown(cancel_pending=True)


@pytest.fixture
async def apool(request: pytest.FixtureRequest) -> AsyncIterator[orchestra.Pool]:
    p = orchestra.Pool(**_pool_options(request))
    await asyncio.wait_for(p.started(), 30)
    try:
        yield p
    finally:
        await p.aclose(cancel_pending=True)


@pytest.fixture
def make_pool() -> Iterator[object]:
    """``make_pool(**options)``: started pools, shut down (cancelling) after the test."""
    pools: list[orchestra.Pool] = []

    def make(**options: object) -> orchestra.Pool:
        options.setdefault("workers", 2)
        p = orchestra.Pool(**options)  # type: ignore[arg-type]
        pools.append(p)
        p.wait_started(timeout=30)
        return p

    yield make
    for p in pools:
        p.shutdown(cancel_pending=True)
