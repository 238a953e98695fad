"""Shared fixtures: every test must leave no process behind.

The leak check compares this process's children before and after each test; a test that
leaves a worker (or any child) alive fails, and the stray processes are killed by pid.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import psutil
import pytest

import orchestra_nb as orchestra


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


def _package_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("orchestra")]


@pytest.fixture(autouse=True)
def no_leaked_processes() -> Iterator[None]:
    before = set(_children())
    threads_before = set(_package_threads())
    yield
    orchestra.shutdown()  # the default pool, if a test used it
    new = [pid for pid in _children() if pid not in before]
    leaked = wait_gone(new, timeout=5.0)
    for pid in leaked:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert not leaked, f"test left processes alive: {leaked}"
    # Every thread of the package ends with the pool that owns it (joined: a hang guard).
    for thread in set(_package_threads()) - threads_before:
        thread.join(10.0)
    stray = [t.name for t in set(_package_threads()) - threads_before if t.is_alive()]
    assert not stray, f"test left threads of the package running: {stray}"


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
