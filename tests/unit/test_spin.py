"""BusyPoll: polls until ready or the window passes, and backs off after misses."""

from __future__ import annotations

import time

import pytest

from orchestra_nb import _spin
from orchestra_nb._spin import MAX_SKIP, BusyPoll

HANG_GUARD = 20.0  # a window that only bounds a failure


class Never:
    """A ``ready`` that is never true, counting how often it was asked."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> bool:
        self.calls += 1
        return False


def polled(poll: BusyPoll, ready: Never) -> bool:
    """Whether this wait polled at all (a backing-off wait returns without asking)."""
    before = ready.calls
    assert not poll.wait(ready)
    return ready.calls > before


def test_a_zero_window_never_polls() -> None:
    ready = Never()
    poll = BusyPoll(0)
    assert not poll.wait(ready)
    assert ready.calls == 0


def test_it_returns_as_soon_as_ready(monkeypatch: pytest.MonkeyPatch) -> None:
    # A yield that lets another process run gives up (tested below): here none does, so
    # that the outcome does not depend on the machine's load.
    monkeypatch.setattr(_spin, "yield_cpu", lambda: None)
    answers = iter([False, False, True])
    poll = BusyPoll(HANG_GUARD)
    assert poll.wait(lambda: next(answers))
    assert (poll.hits, poll.misses) == (1, 0)


def test_misses_double_the_waits_that_sleep_at_once_up_to_max_skip() -> None:
    ready = Never()
    poll = BusyPoll(1e-5)
    pattern = [polled(poll, ready) for _ in range(1 + 1 + 1 + 2 + 1 + 4 + 1)]
    assert pattern == [True, False, True, False, False, True, False, False, False, False, True]
    for _ in range(10):  # keep missing: the back-off saturates
        while not polled(poll, ready):
            pass
    skipped = 0
    while not polled(poll, ready):
        skipped += 1
    assert skipped == MAX_SKIP


def test_a_hit_resets_the_back_off() -> None:
    ready = Never()
    poll = BusyPoll(1e-5)
    assert [polled(poll, ready) for _ in range(5)] == [True, False, True, False, False]
    assert poll.wait(lambda: True)
    assert [polled(poll, ready) for _ in range(3)] == [True, False, True]


def test_a_deadline_bounds_a_poll() -> None:
    ready = Never()
    poll = BusyPoll(HANG_GUARD)
    assert poll.start()
    assert poll.poll(ready, until=time.perf_counter()) is False
    assert ready.calls == 1 and poll.misses == 1


def test_a_stopped_poll_is_neither_a_hit_nor_a_miss_and_the_wait_goes_on() -> None:
    ready = Never()
    poll = BusyPoll(1e-5)
    assert poll.start()
    assert poll.poll(ready, until=time.perf_counter() + HANG_GUARD, stop=lambda: True) is None
    assert (poll.hits, poll.misses) == (0, 0)
    # The same wait resumes (no new start(), so no back-off is consumed) and then hits.
    assert poll.poll(lambda: True, until=time.perf_counter() + HANG_GUARD) is True
    assert (poll.hits, poll.misses) == (1, 0)
    assert [polled(poll, ready) for _ in range(3)] == [True, False, True]


def test_a_negative_window_is_refused() -> None:
    with pytest.raises(ValueError, match="busy_poll must be >= 0"):
        BusyPoll(-0.001)


def test_a_yield_that_lets_another_process_run_ends_the_poll_as_a_miss(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The CPUs are busy: polling would only take turns from the threads that answer."""
    monkeypatch.setattr(_spin, "yield_cpu", lambda: time.sleep(_spin.CONTENDED * 5))
    ready = Never()
    poll = BusyPoll(HANG_GUARD)
    assert not poll.wait(ready)  # not after the 20 s window: after the first yield
    assert ready.calls == 1
    assert (poll.hits, poll.misses, poll.contended) == (0, 1, 1)
    assert not polled(poll, ready)  # and it backs off like any miss
