"""Data volume: 64 MB numpy arrays each way, and a 1,000,000-item map over a generator
with streamed submission and bounded parent memory."""

from __future__ import annotations

import threading

import numpy as np
import psutil
import pytest

import orchestra_nb as orchestra

HANG_GUARD = 60.0
N64 = 8 * 2**20  # int64 items in 64 MiB


def summarise(a: np.ndarray) -> tuple[int, str, tuple[int, ...], bool]:
    return int(a.sum()), a.dtype.str, a.shape, bool(a.flags.writeable)


def make_array(n: int) -> np.ndarray:
    return np.arange(n, dtype=np.int64)


def double(a: np.ndarray) -> np.ndarray:
    a *= 2  # in place: the worker's copy must be writable
    return a


def filled(n: int, value: float) -> np.ndarray:
    return np.full(n, value)


@pytest.mark.timeout(120)
def test_reused_segments_carry_each_messages_own_content(pool: orchestra.Pool) -> None:
    """Segments are reused by their writer and kept mapped by their reader: each message
    must still see its own data, and an array kept alive must keep its own."""
    n = 2**20  # 8 MiB of float64: through shared memory
    for k in range(1, 5):  # parent -> worker, one segment reused
        assert pool.run(summarise, np.full(n, k, dtype=np.int64)).result(HANG_GUARD)[0] == k * n
    kept = [pool.run(filled, n, float(k)).result(HANG_GUARD) for k in range(1, 4)]
    assert [float(a.min()) for a in kept] == [float(a.max()) for a in kept] == [1.0, 2.0, 3.0]
    for k in range(4, 8):  # worker -> parent, with older arrays alive
        got = pool.run(filled, n, float(k)).result(HANG_GUARD)
        assert float(got.min()) == float(got.max()) == k
        del got
    assert [float(a.min()) for a in kept] == [float(a.max()) for a in kept] == [1.0, 2.0, 3.0]


def inc(x: int) -> int:
    return x + 1


@pytest.mark.timeout(120)
@pytest.mark.local_only("arguments are copied to the worker")
def test_numpy_64mb_each_way(pool: orchestra.Pool) -> None:
    a = np.arange(N64, dtype=np.int64)
    assert a.nbytes == 64 * 2**20
    expected_sum = N64 * (N64 - 1) // 2
    # parent -> worker
    assert pool.run(summarise, a).result(HANG_GUARD) == (expected_sum, "<i8", (N64,), True)
    # worker -> parent
    b = pool.run(make_array, N64).result(HANG_GUARD)
    assert isinstance(b, np.ndarray) and b.dtype == np.int64 and b.shape == (N64,)
    assert np.array_equal(b, a)
    assert b.flags.writeable
    b[0] = -1  # and really writable
    assert b[0] == -1
    # both ways at once, with a float array
    f = np.linspace(0.0, 1.0, N64, dtype=np.float64)
    g = pool.run(double, f).result(HANG_GUARD)
    assert g.dtype == np.float64 and np.array_equal(g, f * 2)
    assert f[-1] == 1.0  # the caller's array is untouched


@pytest.mark.timeout(120)
async def test_million_item_generator_map(apool: orchestra.Pool) -> None:
    n = 1_000_000
    consumed = [0]

    def source():
        for i in range(n):
            consumed[0] = i + 1
            yield i

    proc = psutil.Process()
    baseline = proc.memory_info().rss
    peak = [baseline]
    stop = threading.Event()
    handle: list[orchestra.MapHandle[int]] = []
    in_flight = [0]  # max of (items read from the input) - (items finished)
    final = (orchestra.TaskState.SUCCEEDED, orchestra.TaskState.FAILED,
             orchestra.TaskState.CANCELLED)

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            if handle:
                c = handle[0].counts()
                finished = sum(c[s] for s in final)
                in_flight[0] = max(in_flight[0], consumed[0] - finished)  # over-estimates
            stop.wait(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        h = apool.map(inc, source())
        handle.append(h)
        assert h.total is None  # a generator has no length
        first_seen_at = None
        total = 0
        count = 0
        async for value in h:
            if first_seen_at is None:
                first_seen_at = consumed[0]
            assert value == count + 1  # in input order
            total += value
            count += 1
    finally:
        stop.set()
        sampler.join()
    assert count == n
    assert total == n * (n + 1) // 2
    assert h.total == n
    assert h.counts()[orchestra.TaskState.SUCCEEDED] == n
    # submission is streamed: the first result came before the input was read to its end,
    # and at no time were more than a fraction of the items read but unfinished
    assert first_seen_at is not None and first_seen_at < n
    assert 0 < in_flight[0] < n // 4, f"up to {in_flight[0]} items in flight"
    growth = peak[0] - baseline
    # a stream hands its results over, so only what is in flight stays (a few MB; counted
    # exactly in test_streams); a materialised input or kept results would go well past this
    assert growth < 300 * 2**20, f"parent RSS grew by {growth / 2**20:.0f} MiB"
