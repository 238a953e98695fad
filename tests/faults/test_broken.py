"""A broken worker environment stops the respawning with BrokenPoolError (issue 4)."""

from __future__ import annotations

from pathlib import Path

import pytest

import orchestra_nb as orchestra
from orchestra_nb import BrokenPoolError, WorkerExited
from orchestra_nb.testing import EventRecorder


def _script(tmp_path: Path, body: str) -> str:
    path = tmp_path / "fake-python"
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return str(path)


def square(x: int) -> int:
    return x * x


def test_workers_dying_at_start_break_the_pool_with_their_stderr(tmp_path: Path) -> None:
    python = _script(tmp_path, 'echo "ImportError: libfoo.so: cannot open shared object" >&2\n'
                               "exit 3\n")
    pool = orchestra.Pool(workers=2, python=python)
    try:
        with EventRecorder(pool) as rec:
            handle = pool.map(square, range(10))
            with pytest.raises(BrokenPoolError) as info:
                pool.wait_started(timeout=30)
            message = str(info.value)
            assert "libfoo.so: cannot open shared object" in message
            assert "3 workers in a row died" in message
            assert "exit code 3" in message
            assert "stopped respawning" in message
            assert "libfoo.so" in info.value.stderr
            with pytest.raises(BrokenPoolError):
                handle.result(timeout=10)
            assert pool.state == "broken"
            with pytest.raises(BrokenPoolError):
                pool.map(square, range(3)).result(timeout=10)
            # (the recorder subscribed after the Pool started: it may miss the first death)
            rec.wait(lambda _: len(rec.of(WorkerExited)) >= 2)
            assert pool.status()["workers"] == [] or all(
                w["state"] != "ready" for w in pool.status()["workers"]
            )
            exits = rec.of(WorkerExited)
        assert 2 <= len(exits) <= 4, exits  # bounded: no respawn loop
        # The 3rd death breaks the pool; a 4th worker still starting is killed (or died alone).
        assert sum(e.returncode == 3 for e in exits) >= 1, exits
        assert all(e.returncode == 3 or e.reason == "killed: pool broken" for e in exits)
    finally:
        pool.shutdown()
    # A fresh pool with a sound environment works.
    with orchestra.Pool(workers=1) as fresh:
        assert fresh.map(square, range(5)).result(timeout=30) == [0, 1, 4, 9, 16]


def test_workers_hanging_at_start_break_the_pool_after_start_timeout(tmp_path: Path) -> None:
    # It would hang for 10 min: only start_timeout can break the pool within the guard.
    python = _script(tmp_path, 'echo "stuck before the handshake" >&2\nexec sleep 600\n')
    pool = orchestra.Pool(workers=1, python=python, start_timeout=0.3)
    try:
        with pytest.raises(BrokenPoolError, match="stuck before the handshake"):
            pool.wait_started(timeout=30)
    finally:
        pool.shutdown()
