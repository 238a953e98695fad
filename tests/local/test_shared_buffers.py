"""A large argument or captured array crosses to the workers once per job (``_shared``).

The tasks report where their array's memory lives, read from ``/proc/self/maps`` in the
worker: the file backing it (a pinned segment ``buf-k-*``, the same for every task and every
worker of the map), or none when the array was copied into the worker's own memory. The
pool's counters say how many bytes it copied into shared memory, and for which purpose.
"""

from __future__ import annotations

import functools
import gc
import os
import time
from pathlib import Path

import numpy as np
import pytest
from localkit import local_core

from orchestra_nb import _protocol as proto

HANG_GUARD = 60.0
BIG = 8 * 2**20 // 8  # float64s: 8 MiB, past SHM_THRESHOLD
ITEMS = 100


def where(arr: np.ndarray, i: int) -> tuple[int, str, bool, float]:
    """(pid, file backing ``arr``'s memory or "", writable?, the sum of its share)."""
    address = arr.__array_interface__["data"][0]
    backing = ""
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            low, high = (int(x, 16) for x in fields[0].split("-"))
            if low <= address < high:
                if len(fields) == 6:
                    backing = os.path.basename(fields[5].strip().removesuffix(" (deleted)"))
                break
    part = len(arr) // ITEMS
    return os.getpid(), backing, bool(arr.flags.writeable), float(arr[i * part : (i + 1) * part].sum())


def where_on_both(marks: str, arr: np.ndarray, i: int) -> tuple[int, str, bool, float]:
    """:func:`where`; item 0 waits until another worker ran an item, so both take part."""
    Path(marks, str(os.getpid())).touch()
    deadline = time.monotonic() + HANG_GUARD
    while i == 0 and not any(int(p) != os.getpid() for p in os.listdir(marks)):
        assert time.monotonic() < deadline, "no other worker ran an item"
        time.sleep(0.01)  # polls for the other worker's mark (the event), bounded
    return where(arr, i)


def where_or_die(marker: str, arr: np.ndarray, i: int) -> tuple[int, str, bool, float]:
    """:func:`where`; item 5 kills its worker the first time it runs."""
    if i == 5 and not os.path.exists(marker):
        Path(marker).touch()
        os._exit(3)
    return where(arr, i)


def pinned_mappings() -> list[str]:
    """In a worker: the pinned segments it still maps (after collecting cycles)."""
    gc.collect()
    with open("/proc/self/maps") as maps:
        return sorted({line.split()[-1] for line in maps if "/buf-k-" in line})


def expected(arr: np.ndarray) -> list[float]:
    part = len(arr) // ITEMS
    return [float(arr[i * part : (i + 1) * part].sum()) for i in range(ITEMS)]


def pinned_files(core: object) -> list[str]:
    return [n for n in os.listdir(core.wire.run_dir) if n.startswith(proto.PINNED_PREFIX)]  # type: ignore[attr-defined]


def check_crossed_once(out: list[tuple[int, str, bool, float]], arr: np.ndarray) -> set[int]:
    files = {backing for _, backing, _, _ in out}
    assert len(files) == 1, f"the tasks read {len(files)} copies: {sorted(files)}"
    (name,) = files
    assert name.startswith(proto.PINNED_PREFIX), f"the array was not read from a pinned segment: {name!r}"
    assert all(writable for _, _, writable, _ in out), "an argument stays writable (copy-on-write)"
    assert [total for *_, total in out] == expected(arr)
    return {pid for pid, *_ in out}


def test_the_same_argument_to_every_item_is_placed_once(make_pool, tmp_path: Path) -> None:
    pool = make_pool(workers=2)
    core = local_core(pool)
    arr = np.arange(BIG, dtype=np.float64)
    copied = core.wire.segments.written_bytes
    fn = functools.partial(where_on_both, str(tmp_path))
    out = pool.map(fn, [arr] * ITEMS, range(ITEMS)).result(timeout=HANG_GUARD)
    assert len(check_crossed_once(out, arr)) == 2  # one segment, mapped by both workers
    assert core.dispatch.placed_bytes == arr.nbytes  # written once for the whole map
    assert core.wire.segments.written_bytes == copied  # and never copied per chunk
    assert not core.dispatch.placements and not pinned_files(core)  # deleted with its job


def test_an_array_captured_by_the_function_is_placed_once(make_pool, tmp_path: Path) -> None:
    pool = make_pool(workers=2)
    core = local_core(pool)
    arr = np.arange(BIG, dtype=np.float64)
    fn = functools.partial(where_on_both, str(tmp_path), arr)
    out = pool.map(fn, range(ITEMS)).result(timeout=HANG_GUARD)
    assert len(check_crossed_once(out, arr)) == 2  # the function was defined on both
    assert core.dispatch.placed_bytes == arr.nbytes
    assert not core.dispatch.placements and not pinned_files(core)
    # The pool told the workers: neither keeps the function, nor the mapping.
    assert pool.run_on_all(pinned_mappings).result(timeout=HANG_GUARD) == [[], []]


def test_a_mutation_between_two_maps_is_seen(make_pool) -> None:
    pool = make_pool(workers=2)
    core = local_core(pool)
    arr = np.arange(BIG, dtype=np.float64)
    first = pool.map(where, [arr] * ITEMS, range(ITEMS)).result(timeout=HANG_GUARD)
    check_crossed_once(first, arr)
    arr *= 2  # in place: the same object, other contents
    second = pool.map(where, [arr] * ITEMS, range(ITEMS)).result(timeout=HANG_GUARD)
    check_crossed_once(second, arr)
    assert [t for *_, t in second] == [2 * t for *_, t in first]
    captured = pool.map(functools.partial(where, arr), range(ITEMS)).result(timeout=HANG_GUARD)
    arr += 1
    again = pool.map(functools.partial(where, arr), range(ITEMS)).result(timeout=HANG_GUARD)
    check_crossed_once(again, arr)
    assert [t for *_, t in again] != [t for *_, t in captured]
    assert core.dispatch.placed_bytes == 4 * arr.nbytes  # once per map, none stale


@pytest.mark.parametrize("captured", [False, True], ids=["argument", "captured"])
def test_a_respawned_worker_reads_the_placed_array(make_pool, tmp_path: Path, captured: bool) -> None:
    pool = make_pool(workers=1)  # the replacement runs every item after the crash
    core = local_core(pool)
    arr = np.arange(BIG, dtype=np.float64)
    marker = str(tmp_path / "died")
    if captured:
        handle = pool.map(functools.partial(where_or_die, marker, arr), range(ITEMS), chunksize=1)
    else:
        handle = pool.map(functools.partial(where_or_die, marker), [arr] * ITEMS, range(ITEMS), chunksize=1)
    out = handle.result(timeout=HANG_GUARD)
    assert os.path.exists(marker)
    assert len(check_crossed_once(out, arr)) == 2  # the first worker and its replacement
    assert core.dispatch.placed_bytes == arr.nbytes


def test_a_failed_map_deletes_its_segments(make_pool) -> None:
    pool = make_pool(workers=2)
    core = local_core(pool)
    arr = np.arange(BIG, dtype=np.float64)
    with pytest.raises(ZeroDivisionError):
        pool.map(lambda a, i: 1 / (i - 50), [arr] * ITEMS, range(ITEMS)).result(timeout=HANG_GUARD)
    assert core.dispatch.placed_bytes == arr.nbytes
    assert not core.dispatch.placements and not pinned_files(core)
    pool.shutdown()
    assert not os.path.exists(core.wire.run_dir)  # and /dev/shm is clean (the leak check)


def bump_first(a: np.ndarray, i: int) -> float:
    a[0] += 1  # in place: seen by this chunk's arrays only
    return float(a[0])


def test_a_task_writing_to_a_placed_argument_changes_only_its_own_chunk(make_pool) -> None:
    pool = make_pool(workers=2)
    arr = np.zeros(BIG)
    out = pool.map(bump_first, [arr] * ITEMS, range(ITEMS), chunksize=1).result(timeout=HANG_GUARD)
    assert out == [1.0] * ITEMS  # every chunk started from the parent's array
    assert arr[0] == 0.0  # which is untouched
    assert local_core(pool).dispatch.placed_bytes == arr.nbytes


def test_small_arguments_are_not_placed(make_pool) -> None:
    pool = make_pool(workers=1)
    core = local_core(pool)
    arr = np.arange(proto.SHM_THRESHOLD // 8 - 1, dtype=np.float64)
    assert pool.map(lambda a: float(a.sum()), [arr] * 10).result(timeout=HANG_GUARD) == [float(arr.sum())] * 10
    assert core.dispatch.placed_bytes == 0


def test_without_shared_memory_the_function_travels_in_its_payload() -> None:
    from orchestra_nb._serialize import dumps_callable_shared
    from orchestra_nb._shared import function_frames

    arr = np.arange(BIG, dtype=np.float64)
    payload, digest, buffers = dumps_callable_shared(functools.partial(where, arr))
    assert len(buffers) == 1 and len(payload) < 64 * 1024  # left out of the stream, uncopied
    frames, names = function_frames(payload, buffers, None)
    assert names == (None,) and len(frames[1]) == arr.nbytes
    again = dumps_callable_shared(functools.partial(where, arr))[1]
    assert again != digest  # each job's own: the stream does not say what the buffer held


def pinned_now(run_dir: str, a: np.ndarray) -> tuple[int, float]:
    """How many pinned segments the pool holds while this task runs, and its array's sum."""
    return sum(n.startswith(proto.PINNED_PREFIX) for n in os.listdir(run_dir)), float(a.sum())


def test_a_map_over_many_different_arrays_does_not_pin_them_all(make_pool) -> None:
    from orchestra_nb._pool_dispatch import PREFETCH
    from orchestra_nb._shared import RECENT_CHUNKS

    pool = make_pool(workers=2)
    core = local_core(pool)
    arrays = [np.full(proto.SHM_THRESHOLD // 8, float(k)) for k in range(40)]
    fn = functools.partial(pinned_now, core.wire.run_dir)
    out = pool.map(fn, arrays, chunksize=1).result(timeout=HANG_GUARD)
    assert [total for _, total in out] == [float(a.sum()) for a in arrays]
    most = max(held for held, _ in out)
    assert most <= RECENT_CHUNKS + 2 * PREFETCH, f"{most} of {len(arrays)} arrays pinned at once"
    assert not pinned_files(core)


def test_a_large_buffer_is_written_by_parts_exactly(tmp_path: Path) -> None:
    from orchestra_nb._shared import _PER_WRITER, _write_pinned

    data = np.random.default_rng(0).integers(0, 255, 2 * _PER_WRITER + 12345, dtype=np.uint8)
    name = _write_pinned(str(tmp_path), memoryview(data))
    assert name.startswith(proto.PINNED_PREFIX)
    assert (tmp_path / name).read_bytes() == data.tobytes()
