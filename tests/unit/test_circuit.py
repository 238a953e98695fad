"""CircuitBreaker transitions, guard/decorator and pickling, driven by a fake clock."""

from __future__ import annotations

import asyncio
import pickle

import cloudpickle
import pytest

from orchestra_nb._circuit import (
    CircuitBreaker,
    CircuitChange,
    CircuitGroup,
    CircuitState,
    CircuitStatistics,
)
from orchestra_nb._exceptions import CircuitOpenError

CLOSED, OPEN, HALF_OPEN = CircuitState.CLOSED, CircuitState.OPEN, CircuitState.HALF_OPEN


class FakeClock:
    """A clock that moves only when the test says so."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Boom(Exception):
    pass


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def changes() -> list[CircuitChange]:
    return []


@pytest.fixture
def breaker(clock: FakeClock, changes: list[CircuitChange]) -> CircuitBreaker:
    return CircuitBreaker(
        "db", fail_max=3, window=10.0, reset_timeout=5.0, clock=clock, on_change=changes.append
    )


def fail(breaker: CircuitBreaker, times: int = 1) -> None:
    for _ in range(times):
        breaker.before_call()
        breaker.record_failure(Boom())


def trip(breaker: CircuitBreaker) -> None:
    fail(breaker, breaker.fail_max)
    assert breaker.state is OPEN


# --- transitions ------------------------------------------------------------------------------


def test_opens_after_fail_max_failures_within_window(breaker: CircuitBreaker) -> None:
    fail(breaker, 2)
    assert breaker.state is CLOSED
    fail(breaker)
    assert breaker.state is OPEN


def test_successes_do_not_reset_the_window(breaker: CircuitBreaker) -> None:
    fail(breaker, 2)
    breaker.before_call()
    breaker.record_success()
    fail(breaker)
    assert breaker.state is OPEN


def test_failures_outside_the_window_do_not_count(
    breaker: CircuitBreaker, clock: FakeClock
) -> None:
    fail(breaker, 2)  # at t=0
    clock.advance(10.0)  # exactly one window later: those two have aged out
    fail(breaker, 2)
    assert breaker.state is CLOSED
    assert breaker.statistics().failures == 2
    clock.advance(9.9)  # the last two are still inside the window
    fail(breaker)
    assert breaker.state is OPEN


def test_open_fails_fast_without_running(breaker: CircuitBreaker, clock: FakeClock) -> None:
    trip(breaker)
    clock.advance(1.5)
    calls: list[int] = []

    @breaker
    def work() -> int:
        calls.append(1)
        return 1

    with pytest.raises(CircuitOpenError) as info:
        work()
    assert calls == []
    message = str(info.value)
    assert "'db'" in message
    assert "3 failures" in message
    assert "3.5s" in message
    assert breaker.statistics().calls_rejected == 1


def test_half_open_admits_exactly_one_trial(breaker: CircuitBreaker, clock: FakeClock) -> None:
    trip(breaker)
    clock.advance(4.9)
    with pytest.raises(CircuitOpenError):
        breaker.before_call()
    clock.advance(0.1)
    assert breaker.state is OPEN  # a read does not move it ...
    assert breaker.statistics().retry_in == 0.0  # ... but shows the trial is due
    breaker.before_call()  # the trial
    assert breaker.state is HALF_OPEN
    for _ in range(3):
        with pytest.raises(CircuitOpenError, match="trial call is still running"):
            breaker.before_call()
    assert breaker.statistics().trial_in_flight


def test_trial_success_closes_and_clears_history(breaker: CircuitBreaker, clock: FakeClock) -> None:
    trip(breaker)
    clock.advance(5.0)
    breaker.before_call()
    breaker.record_success()
    assert breaker.state is CLOSED
    assert breaker.statistics().failures == 0
    fail(breaker, 2)  # the old failures no longer count towards fail_max
    assert breaker.state is CLOSED


def test_trial_failure_reopens_with_a_fresh_timer(
    breaker: CircuitBreaker, clock: FakeClock
) -> None:
    trip(breaker)
    clock.advance(6.0)
    breaker.before_call()
    breaker.record_failure(Boom())
    assert breaker.state is OPEN
    assert breaker.statistics().retry_in == 5.0
    clock.advance(4.9)
    with pytest.raises(CircuitOpenError):
        breaker.before_call()
    clock.advance(0.1)
    breaker.before_call()
    assert breaker.state is HALF_OPEN


def test_on_change_receives_every_transition_in_order(
    breaker: CircuitBreaker, clock: FakeClock, changes: list[CircuitChange]
) -> None:
    trip(breaker)  # t=1000
    clock.advance(5.0)
    fail(breaker)  # trial fails at t=1005
    clock.advance(5.0)
    breaker.before_call()  # trial at t=1010
    breaker.record_success()
    assert changes == [
        CircuitChange("db", CLOSED, OPEN, 1000.0, 3),
        CircuitChange("db", OPEN, HALF_OPEN, 1005.0, 3),
        CircuitChange("db", HALF_OPEN, OPEN, 1005.0, 4),
        CircuitChange("db", OPEN, HALF_OPEN, 1010.0, 1),  # the first three aged out
        CircuitChange("db", HALF_OPEN, CLOSED, 1010.0, 0),
    ]


def test_late_failure_while_open_keeps_the_timer(breaker: CircuitBreaker, clock: FakeClock) -> None:
    for _ in range(4):
        breaker.before_call()  # four calls admitted while closed
    for _ in range(3):
        breaker.record_failure(Boom())
    clock.advance(4.0)
    breaker.record_failure(Boom())  # the fourth reports after the breaker opened
    assert breaker.state is OPEN
    assert breaker.statistics().retry_in == pytest.approx(1.0)


# --- what counts as a failure -----------------------------------------------------------------


def test_excluded_exceptions_count_as_success(clock: FakeClock) -> None:
    breaker = CircuitBreaker("api", fail_max=1, clock=clock, exclude=(KeyError,))
    breaker.before_call()
    breaker.record_failure(KeyError("bad input"))
    assert breaker.state is CLOSED
    assert breaker.statistics().successes == 1
    trip(breaker)
    clock.advance(30.0)
    breaker.before_call()
    breaker.record_failure(KeyError("bad input"))  # the callee answered: close
    assert breaker.state is CLOSED


@pytest.mark.parametrize("exc", [asyncio.CancelledError(), KeyboardInterrupt(), SystemExit()])
def test_base_exceptions_are_neutral_and_release_the_trial(
    breaker: CircuitBreaker, clock: FakeClock, exc: BaseException
) -> None:
    fail(breaker, 2)
    breaker.before_call()
    breaker.record_failure(exc)
    assert breaker.state is CLOSED
    assert breaker.statistics().total_failures == 2
    fail(breaker)
    clock.advance(5.0)
    breaker.before_call()
    breaker.record_failure(exc)  # the trial was cancelled: no verdict
    assert breaker.state is HALF_OPEN
    assert not breaker.statistics().trial_in_flight
    breaker.before_call()  # so the next call becomes the trial
    breaker.record_success()
    assert breaker.state is CLOSED


# --- on_change errors -------------------------------------------------------------------------


class Flaky:
    """An on_change callback that raises while ``broken`` is set."""

    def __init__(self) -> None:
        self.broken = True
        self.seen: list[CircuitChange] = []

    def __call__(self, change: CircuitChange) -> None:
        self.seen.append(change)
        if self.broken:
            raise RuntimeError("callback bug")


def test_on_change_error_propagates_after_state_update(clock: FakeClock) -> None:
    callback = Flaky()
    breaker = CircuitBreaker("x", fail_max=1, reset_timeout=5.0, clock=clock, on_change=callback)
    breaker.before_call()
    with pytest.raises(RuntimeError, match="callback bug"):
        breaker.record_failure(Boom())
    assert breaker.state is OPEN
    with pytest.raises(CircuitOpenError):
        breaker.before_call()


def test_on_change_error_during_half_open_does_not_take_the_trial(clock: FakeClock) -> None:
    callback = Flaky()
    breaker = CircuitBreaker("x", fail_max=1, reset_timeout=5.0, clock=clock, on_change=callback)
    callback.broken = False
    fail(breaker)
    clock.advance(5.0)
    callback.broken = True
    ran: list[int] = []
    with pytest.raises(RuntimeError, match="callback bug"), breaker.guard():
        ran.append(1)
    assert ran == []  # the call was not admitted
    assert breaker.state is HALF_OPEN
    assert not breaker.statistics().trial_in_flight
    callback.broken = False
    with breaker.guard():  # the next call is the trial
        ran.append(1)
    assert ran == [1]
    assert breaker.state is CLOSED
    assert [(c.old, c.new) for c in callback.seen] == [
        (CLOSED, OPEN),
        (OPEN, HALF_OPEN),
        (HALF_OPEN, CLOSED),
    ]


# --- guard and decorator ----------------------------------------------------------------------


def test_guard_records_outcomes_and_never_suppresses(breaker: CircuitBreaker) -> None:
    with breaker.guard():
        pass
    for _ in range(3):
        with pytest.raises(Boom), breaker.guard():
            raise Boom
    assert breaker.state is OPEN
    stats = breaker.statistics()
    assert (stats.successes, stats.total_failures, stats.calls_admitted) == (1, 3, 4)


def test_sync_decorator(breaker: CircuitBreaker, clock: FakeClock) -> None:
    @breaker
    def divide(a: int, b: int) -> float:
        """Divide."""
        return a / b

    assert divide.__name__ == "divide"
    assert divide.__doc__ == "Divide."
    assert divide(6, b=3) == 2.0
    for _ in range(3):
        with pytest.raises(ZeroDivisionError):
            divide(1, 0)
    with pytest.raises(CircuitOpenError):
        divide(6, 3)
    clock.advance(5.0)
    assert divide(6, 3) == 2.0
    assert breaker.state is CLOSED


def test_async_decorator(breaker: CircuitBreaker, clock: FakeClock) -> None:
    calls: list[str] = []

    @breaker
    async def fetch(key: str) -> str:
        calls.append(key)
        await asyncio.sleep(0)
        if key == "bad":
            raise Boom(key)
        return key.upper()

    assert asyncio.iscoroutinefunction(fetch)

    async def scenario() -> None:
        assert await fetch("a") == "A"
        for _ in range(3):
            with pytest.raises(Boom):
                await fetch("bad")
        with pytest.raises(CircuitOpenError):
            await fetch("b")
        clock.advance(5.0)
        # Two concurrent calls: the first is the trial, the second fails fast.
        results = await asyncio.gather(fetch("c"), fetch("d"), return_exceptions=True)
        assert results[0] == "C"
        assert isinstance(results[1], CircuitOpenError)

    asyncio.run(scenario())
    assert calls == ["a", "bad", "bad", "bad", "c"]
    assert breaker.state is CLOSED


def test_async_cancellation_is_neutral(breaker: CircuitBreaker) -> None:
    @breaker
    async def hang() -> None:
        await asyncio.Event().wait()

    async def scenario() -> None:
        task = asyncio.create_task(hang())
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    stats = breaker.statistics()
    assert (stats.calls_admitted, stats.successes, stats.total_failures) == (1, 0, 0)


def test_decorator_rejects_generator_functions(breaker: CircuitBreaker) -> None:
    def gen() -> object:
        yield 1

    async def agen() -> object:
        yield 1

    for fn in (gen, agen):
        with pytest.raises(TypeError, match="generator"):
            breaker(fn)


# --- statistics, validation, pickling, group --------------------------------------------------


def test_statistics_snapshot(breaker: CircuitBreaker, clock: FakeClock) -> None:
    fail(breaker, 2)
    assert breaker.statistics() == CircuitStatistics(
        name="db",
        state=CLOSED,
        failures=2,
        fail_max=3,
        retry_in=None,
        trial_in_flight=False,
        calls_admitted=2,
        calls_rejected=0,
        successes=0,
        total_failures=2,
    )
    fail(breaker)
    clock.advance(2.0)
    assert breaker.statistics().retry_in == 3.0


@pytest.mark.parametrize(
    ("kwargs", "error", "field"),
    [
        ({"name": ""}, ValueError, "name"),
        ({"fail_max": 0}, ValueError, "fail_max"),
        ({"fail_max": 2.0}, TypeError, "fail_max"),
        ({"window": 0}, ValueError, "window"),
        ({"window": float("nan")}, ValueError, "window"),
        ({"window": "60"}, TypeError, "window"),
        ({"reset_timeout": -1}, ValueError, "reset_timeout"),
        ({"exclude": KeyError}, TypeError, "exclude"),
    ],
)
def test_invalid_settings_name_the_field(
    kwargs: dict[str, object], error: type[Exception], field: str
) -> None:
    settings: dict[str, object] = {"name": "x", **kwargs}
    with pytest.raises(error, match=f"CircuitBreaker.{field}"):
        CircuitBreaker(**settings)  # type: ignore[arg-type]


def test_default_breaker_pickles_with_its_history() -> None:
    breaker = CircuitBreaker("remote", fail_max=2)
    fail(breaker)
    for dumps in (pickle.dumps, cloudpickle.dumps):
        copy = pickle.loads(dumps(breaker))
        assert copy is not breaker
        assert copy.statistics().failures == 1
        fail(copy)
        assert copy.state is OPEN
    assert breaker.state is CLOSED  # each copy has its own history


def test_decorated_function_pickles_with_cloudpickle() -> None:
    breaker = CircuitBreaker("remote", fail_max=1)

    @breaker
    def double(x: int) -> int:
        return 2 * x

    copy = cloudpickle.loads(cloudpickle.dumps(double))
    assert copy(21) == 42


def test_group_shares_defaults_and_instances(clock: FakeClock) -> None:
    seen: list[CircuitChange] = []
    group = CircuitGroup(fail_max=1, reset_timeout=5.0, clock=clock, on_change=seen.append)
    db = group.breaker("db")
    assert group.breaker("db") is db
    api = group.breaker("api")
    assert (api.fail_max, api.reset_timeout, api.clock) == (1, 5.0, clock)
    fail(api)
    assert group.states() == {"db": CLOSED, "api": OPEN}
    assert [c.name for c in seen] == ["api"]
    with pytest.raises(ValueError, match=r"CircuitBreaker\.fail_max"):
        CircuitGroup(fail_max=0)
