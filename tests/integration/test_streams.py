"""A map consumed as a stream hands its results over: the handle keeps only what is in
flight, however long the stream, while an awaited map keeps the whole list (the list
itself, not a copy). Counted through ``partial_results()``, which shows every result the
handle still holds: deterministic, no memory sampling."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

import orchestra_nb as orchestra
from orchestra_nb import MISSING
from orchestra_nb._jobs import STREAM_WINDOW
from orchestra_nb._table import SEGMENT

HANG_GUARD = 60.0
N = 5 * SEGMENT
CHECK_AT = 4 * SEGMENT  # by then a handle that kept everything would hold 65,536 results
BOUND = STREAM_WINDOW + SEGMENT  # in flight (the backpressure window) + one partial segment


def inc(x: int) -> int:
    return x + 1


def gated(n: int, started: threading.Event) -> Iterator[int]:
    """``range(n)``, whose items after the first come once the consumer has started: so no
    item is read before the stream's backpressure applies."""
    yield 0
    started.wait(HANG_GUARD)
    yield from range(1, n)


def kept(handle: orchestra.MapHandle[int]) -> int:
    return sum(value is not MISSING for value in handle.partial_results())


@pytest.mark.timeout(120)
def test_a_stream_keeps_only_what_is_in_flight(pool: orchestra.Pool) -> None:
    started = threading.Event()
    h = pool.map(inc, gated(N, started))
    count = total = 0
    held_at_check = -1
    for value in h:
        count += 1
        total += value
        started.set()
        if count == CHECK_AT:
            held_at_check = kept(h)
    assert (count, total) == (N, N * (N + 1) // 2)
    assert 0 < held_at_check <= BOUND, f"{held_at_check:,} results kept after {CHECK_AT:,} were taken"
    assert h.counts()[orchestra.TaskState.SUCCEEDED] == N


@pytest.mark.timeout(120)
async def test_an_async_stream_keeps_only_what_is_in_flight(apool: orchestra.Pool) -> None:
    started = threading.Event()
    h = apool.map(inc, gated(N, started))
    count = total = 0
    held_at_check = -1
    async for value in h:
        assert value == count + 1  # in input order
        count += 1
        total += value
        started.set()
        if count == CHECK_AT:
            held_at_check = kept(h)
    assert (count, total) == (N, N * (N + 1) // 2)
    assert 0 < held_at_check <= BOUND, f"{held_at_check:,} results kept after {CHECK_AT:,} were taken"


@pytest.mark.timeout(120)
def test_an_unordered_stream_gives_every_item_once(pool: orchestra.Pool) -> None:
    started = threading.Event()
    h = pool.map(inc, gated(N, started), ordered=False)
    got = []
    for value in h:
        got.append(value)
        started.set()
    assert sorted(got) == list(range(1, N + 1))
    if pool.backend == "inline":
        # Items finish in input order there, so the prefix every result before was taken
        # from is the whole stream; on workers a slow chunk holds back the items after it.
        assert kept(h) <= BOUND


@pytest.mark.timeout(120)
def test_a_stream_that_took_a_segment_cannot_give_the_list_any_more(pool: orchestra.Pool) -> None:
    h = pool.map(inc, range(2 * SEGMENT))
    assert sum(h) == sum(range(1, 2 * SEGMENT + 1))
    with pytest.raises(RuntimeError, match="consumed as a stream") as info:
        h.result(timeout=HANG_GUARD)
    assert "Await the map (or call result()) instead of iterating it" in str(info.value)
    with pytest.raises(RuntimeError, match="cannot iterate it again"):
        next(iter(h))
    assert h.counts()[orchestra.TaskState.SUCCEEDED] == 2 * SEGMENT  # still true


async def test_awaiting_a_handed_over_stream_raises_the_same_error(apool: orchestra.Pool) -> None:
    h = apool.map(inc, range(2 * SEGMENT))
    assert [x async for x in h][-1] == 2 * SEGMENT
    with pytest.raises(RuntimeError, match="consumed as a stream"):
        await h


def test_a_short_stream_keeps_its_results(pool: orchestra.Pool) -> None:
    """Less than a segment taken: nothing is dropped, so the list is still whole."""
    h = pool.map(inc, range(100))
    first = []
    for value in h:
        first.append(value)
        if len(first) == 10:
            break
    assert first == list(range(1, 11))
    assert h.result(timeout=HANG_GUARD) == list(range(1, 101))
    assert list(h) == list(range(1, 101))  # and it can be iterated again


def test_an_awaited_map_keeps_every_result_for_a_later_stream(pool: orchestra.Pool) -> None:
    n = 2 * SEGMENT + 5
    h = pool.map(inc, range(n))
    results = h.result(timeout=HANG_GUARD)
    assert list(h) == results == list(range(1, n + 1))
    assert kept(h) == n
    # The job's own list, not a copy: a kept result list costs no more than the list.
    assert h.result(timeout=HANG_GUARD) is results


def test_item_callbacks_see_every_item_of_a_streamed_map(pool: orchestra.Pool) -> None:
    n = 2 * SEGMENT
    seen = bytearray(n)

    def record(index: int, value: int) -> None:
        assert value == index + 1
        seen[index] += 1

    h = pool.map(inc, range(n), on_item_success=record)
    assert sum(h) == sum(range(1, n + 1))
    assert h.result(timeout=HANG_GUARD)[-1] == n  # the callbacks kept the list whole
    assert orchestra.wait_callbacks(HANG_GUARD)
    assert seen == bytes([1]) * n
