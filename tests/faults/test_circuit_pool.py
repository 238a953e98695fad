"""Circuit breakers in the pool (issue 4): transitions published as CircuitChanged events,
tasks through an open circuit fail fast with CircuitOpenError without reaching a worker."""

from __future__ import annotations

import pytest
from faultkit import assert_serves

from orchestra_nb import (
    CircuitBreaker,
    CircuitChanged,
    CircuitOpenError,
    CircuitState,
    TaskState,
    TaskStateChanged,
    WorkerCrashedError,
)
from orchestra_nb.testing import EventRecorder, crash


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def call_resource(ok: bool) -> str:
    if not ok:
        raise ConnectionError("resource down")
    return "ok"


def segfault() -> None:
    crash()


def _tasks_done(pool) -> int:
    return sum(w["tasks_done"] for w in pool.status()["workers"])


def _changes(rec: EventRecorder, n: int) -> list[tuple[str, str]]:
    rec.wait(lambda _: len(rec.of(CircuitChanged)) >= n)
    return [(e.old, e.new) for e in rec.of(CircuitChanged)]


def test_circuit_transitions_are_events_and_open_fails_fast(make_pool) -> None:
    pool = make_pool(workers=1)
    clock = FakeClock()
    breaker = pool.circuit("db", fail_max=2, window=60, reset_timeout=10, clock=clock)
    assert isinstance(breaker, CircuitBreaker)
    assert pool.circuit("db") is breaker  # one breaker per name
    via = pool.options(circuit=breaker)
    with EventRecorder(pool) as rec:
        with pytest.raises(ConnectionError):
            via.run(call_resource, False).result(timeout=30)
        assert breaker.state is CircuitState.CLOSED
        with pytest.raises(ConnectionError):
            via.run(call_resource, False).result(timeout=30)
        assert breaker.state is CircuitState.OPEN
        assert _changes(rec, 1) == [("closed", "open")]
        (event,) = rec.of(CircuitChanged)
        assert event.name == "db"
        assert event.failures == 2

        # Open: fails fast, and no worker sees the task.
        done = _tasks_done(pool)
        handle = via.run(call_resource, True)
        with pytest.raises(CircuitOpenError, match="'db' is open"):
            handle.result(timeout=30)
        results = pool.map(call_resource, [True] * 5, circuit=breaker,
                           return_exceptions=True).result(timeout=30)
        assert all(isinstance(r, CircuitOpenError) for r in results)
        assert _tasks_done(pool) == done
        running = [e for e in rec.of(TaskStateChanged)
                   if e.job_id == handle.job_id and e.state == TaskState.RUNNING]
        assert running == []

        # After reset_timeout: one trial; success closes the circuit.
        clock.now += 10
        assert via.run(call_resource, True).result(timeout=30) == "ok"
        assert breaker.state is CircuitState.CLOSED
        assert _changes(rec, 3) == [("closed", "open"), ("open", "half_open"),
                                    ("half_open", "closed")]

        # A failed trial reopens it.
        for _ in range(2):
            with pytest.raises(ConnectionError):
                via.run(call_resource, False).result(timeout=30)
        clock.now += 10
        with pytest.raises(ConnectionError):
            via.run(call_resource, False).result(timeout=30)
        assert _changes(rec, 6)[3:] == [("closed", "open"), ("open", "half_open"),
                                        ("half_open", "open")]
        stats = breaker.statistics()
        assert stats.state is CircuitState.OPEN
        assert stats.calls_rejected == 6
    assert_serves(pool)


def test_a_worker_crash_counts_as_a_circuit_failure(make_pool) -> None:
    pool = make_pool(workers=1, max_worker_crashes=1)
    breaker = pool.circuit("native", fail_max=1, reset_timeout=60)
    with EventRecorder(pool) as rec:
        with pytest.raises(WorkerCrashedError):
            pool.options(circuit=breaker).run(segfault).result(timeout=30)
        assert _changes(rec, 1) == [("closed", "open")]
    assert breaker.state is CircuitState.OPEN
    assert_serves(pool)


def test_a_pool_breaker_used_in_the_callers_thread_publishes_too(make_pool) -> None:
    pool = make_pool(workers=1)
    breaker = pool.circuit("local", fail_max=1, reset_timeout=60)
    with EventRecorder(pool) as rec:
        with pytest.raises(OSError), breaker.guard():
            raise OSError("nope")
        assert _changes(rec, 1) == [("closed", "open")]
    with pytest.raises(TypeError):
        pool.options(circuit="db")  # type: ignore[arg-type]
