"""Workers started ahead of their pool (``_prespawn``): a plain local pool made on the main
thread runs on the processes started before its engine, their output reaches their logs,
and what the pool does not use is not left behind."""

from __future__ import annotations

import os
import threading
from typing import Any

import psutil
import pytest
from localkit import local_core

import orchestra_nb as orchestra
from orchestra_nb import _prespawn

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def started_ahead(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The pids ``_prespawn.prespawn`` started (it runs as usual; this only reads them)."""
    pids: list[int] = []
    real = _prespawn.prespawn

    def recording(count: int) -> None:
        before = {proc.pid for proc, _python, _environ in _prespawn._waiting}
        real(count)
        pids.extend(proc.pid for proc, _python, _environ in _prespawn._waiting if proc.pid not in before)

    monkeypatch.setattr(_prespawn, "prespawn", recording)
    return pids


def _worker_pids(pool: orchestra.Pool) -> set[int]:
    return {w.pid for w in local_core(pool).workers.procs.values()}


def _write_to_fd(text: str) -> int:
    return os.write(1, text.encode())  # below sys.stdout: straight to the worker's log


def test_a_plain_pool_runs_on_workers_started_ahead_and_they_log(started_ahead: list[int]) -> None:
    with orchestra.Pool(workers=2) as pool:
        pool.wait_started(60)
        assert len(started_ahead) == 2 and _worker_pids(pool) == set(started_ahead)
        assert not _prespawn._waiting
        pool.run_on_all(_write_to_fd, "written below sys.stdout\n").result(60)
        for w in local_core(pool).workers.procs.values():
            with open(w.log_path) as log:
                assert "written below sys.stdout" in log.read()


def test_workers_the_pool_does_not_use_are_killed(started_ahead: list[int]) -> None:
    _prespawn.prespawn(2)  # two more than the pool (one worker) takes
    with orchestra.Pool(workers=1) as pool:
        pool.wait_started(60)
        used = _worker_pids(pool)
        assert len(used) == 1 and used <= set(started_ahead)
        assert not _prespawn._waiting
        left = [pid for pid in started_ahead if pid not in used]
        assert len(started_ahead) == 3 and len(left) == 2
        assert not [pid for pid in left if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]
        assert pool.run(abs, -3).result(60) == 3


def test_a_pool_with_its_own_environment_or_thread_starts_its_own(started_ahead: list[int]) -> None:
    with orchestra.Pool(workers=1, env={"ORCHESTRA_TEST_VAR": "1"}) as pool:
        pool.wait_started(60)
        assert not started_ahead and pool.run(os.getenv, "ORCHESTRA_TEST_VAR").result(60) == "1"

    # Off the main thread: a worker dies with the thread that started it (PDEATHSIG).
    made: list[Any] = []
    thread = threading.Thread(target=lambda: made.append(orchestra.Pool(workers=1)))
    thread.start()
    thread.join(60)
    (pool,) = made
    try:
        pool.wait_started(60)
        assert not started_ahead
    finally:
        pool.shutdown()
