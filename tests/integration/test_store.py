"""The result store on real SQLite files: concurrent writers, a writer killed mid-write,
corrupt and truncated entries, a full disk, a newer format, and management."""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psutil
import pytest

import orchestra_nb as orchestra
from orchestra_nb._store import (
    INLINE_LIMIT,
    ResultStore,
    StoreError,
    StoreFullError,
    StoreVersionError,
)

HANG_GUARD = 60


def key(i: int) -> bytes:
    return i.to_bytes(32, "little")


def large(i: int) -> np.ndarray:
    """A result big enough to be kept as a file (and different for every i)."""
    return np.full(INLINE_LIMIT // 8 + 100, float(i))


@pytest.fixture
def store(tmp_path: Path) -> Iterator[ResultStore]:
    s = ResultStore(tmp_path / "store.sqlite")
    try:
        yield s
    finally:
        s.close()


@contextlib.contextmanager
def raw_database(path: Path) -> Iterator[sqlite3.Connection]:
    """The store's SQLite file opened directly (to damage or age entries); committed and closed."""
    with contextlib.closing(sqlite3.connect(path)) as connection, connection:
        yield connection


def run_python(code: str, **kwargs: object) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            **kwargs)  # type: ignore[call-overload]


def test_round_trip_inline_and_file(store: ResultStore) -> None:
    store.put(key(1), b"f", "f", {"small": [1, 2, 3]})
    array = np.arange(50_000, dtype=np.float64).reshape(100, 500)
    store.put(key(2), b"f", "f", {"array": array, "label": "x"})
    found = store.get_many([key(1), key(2), key(3)])
    assert found[key(1)] == {"small": [1, 2, 3]}
    back = found[key(2)]["array"]
    assert np.array_equal(back, array) and back.flags.writeable
    assert key(3) not in found
    info = store.info()
    assert (info.entries, info.files) == (2, 1)
    assert len(list(store.files.glob("*/*.bin"))) == 1


def test_two_processes_write_the_same_keys_at_once(tmp_path: Path) -> None:
    path = tmp_path / "shared.sqlite"
    writer = f"""
        import sys, numpy as np
        from orchestra_nb._store import ResultStore, INLINE_LIMIT
        store = ResultStore({str(path)!r})
        sys.stdin.readline()  # both start together
        for i in range(200):
            value = np.full(INLINE_LIMIT // 8 + 100, float(i)) if i % 10 == 0 else ("v", i)
            store.put(i.to_bytes(32, "little"), b"f", "f", value)
        print("done", flush=True)
        """
    procs = [run_python(writer) for _ in range(2)]
    try:
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        for proc in procs:
            out, err = proc.communicate(timeout=HANG_GUARD)
            assert proc.returncode == 0, err
            assert out.strip() == "done"
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    with ResultStore(path) as store:
        found = store.get_many([key(i) for i in range(200)])
        assert len(found) == 200
        for i in range(200):
            if i % 10 == 0:
                assert np.array_equal(found[key(i)], large(i))
            else:
                assert found[key(i)] == ("v", i)
        # Each replaced entry's file was deleted by the writer that replaced it.
        assert len(list(store.files.glob("*/*.bin"))) == store.info().files == 20


def test_a_writer_killed_mid_write_leaves_no_entry(tmp_path: Path) -> None:
    path = tmp_path / "killed.sqlite"
    with ResultStore(path) as store:
        store.put(key(0), b"f", "f", "committed before")
    victim = run_python(f"""
        import os, signal, numpy as np
        from orchestra_nb._store import ResultStore, INLINE_LIMIT
        store = ResultStore({str(path)!r})
        # Stop between the file being in place and the row being committed.
        ResultStore.after_file_write = lambda file: os.kill(os.getpid(), signal.SIGSTOP)
        store.put((1).to_bytes(32, "little"), b"f", "f", np.full(INLINE_LIMIT // 8 + 100, 1.0))
        print("not reached", flush=True)
        """)
    try:
        process = psutil.Process(victim.pid)
        deadline = time.monotonic() + HANG_GUARD
        while process.status() != psutil.STATUS_STOPPED:
            assert victim.poll() is None, victim.communicate()[1]
            assert time.monotonic() < deadline, "the writer never reached the hook"
            time.sleep(0.01)
        with ResultStore(path) as store:
            # While it holds the write lock, readers go on (WAL) ...
            assert store.get(key(0)) == (True, "committed before")
            assert store.get(key(1)) == (False, None)
            orphans = list(store.files.glob("*/*.bin"))
            assert len(orphans) == 1  # the file was complete and in place
        victim.send_signal(signal.SIGKILL)
        victim.wait(HANG_GUARD)
    finally:
        if victim.poll() is None:
            victim.kill()
            victim.wait()
        out, _ = victim.communicate()
    assert "not reached" not in out
    with ResultStore(path) as store:
        # ... and after the kill the entry does not exist; the store takes writes again.
        assert store.get(key(1)) == (False, None)
        store.put(key(1), b"f", "f", large(1))
        assert np.array_equal(store.get(key(1))[1], large(1))
        store.evict(orphan_age=0)  # the dead writer's file goes; the live entry's stays
        assert orphans[0].exists() is False
        assert store.info().files == len(list(store.files.glob("*/*.bin"))) == 1


def test_truncated_or_corrupt_entries_are_misses(store: ResultStore) -> None:
    store.put(key(1), b"f", "f", large(1))
    store.put(key(2), b"f", "f", large(2))
    store.put(key(3), b"f", "f", "inline value")
    store.put(key(4), b"f", "f", "another inline value")
    (first,) = store.files.glob(f"{key(1).hex()[:2]}/{key(1).hex()}-*.bin")
    with open(first, "r+b") as f:
        f.truncate(first.stat().st_size // 2)  # a torn file
    (second,) = store.files.glob(f"{key(2).hex()[:2]}/{key(2).hex()}-*.bin")
    data = bytearray(second.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in a buffer
    second.write_bytes(bytes(data))
    # A damaged inline value, and one stored as text.
    with raw_database(store.path) as raw:
        (data,) = raw.execute("SELECT data FROM results WHERE key = ?", (key(3),)).fetchone()
        raw.execute("UPDATE results SET data = ? WHERE key = ?", (data[:-1] + b"\0", key(3)))
        raw.execute("UPDATE results SET data = CAST(data AS TEXT) || 'x' WHERE key = ?", (key(4),))
    assert store.get_many([key(1), key(2), key(3), key(4)]) == {}
    assert store.info().entries == 0  # the bad entries were deleted
    assert not first.exists() and not second.exists()
    store.put(key(1), b"f", "f", large(1))  # and are recomputed and stored again
    assert np.array_equal(store.get(key(1))[1], large(1))


def test_a_missing_file_is_a_miss(store: ResultStore) -> None:
    store.put(key(1), b"f", "f", large(1))
    for file in store.files.glob("*/*.bin"):
        file.unlink()
    assert store.get(key(1)) == (False, None)


def test_a_store_from_a_newer_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "future.sqlite"
    with ResultStore(path) as store:
        store.put(key(1), b"f", "f", 1)
    with raw_database(path) as raw:
        raw.execute("UPDATE meta SET value = '99' WHERE name = 'format_version'")
    with pytest.raises(StoreVersionError, match=rf"{path}.*version 99.*reads version 1"):
        ResultStore(path)


def test_a_file_that_is_not_a_store_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "notes.sqlite"
    path.write_bytes(b"these are my notes, not a database" * 100)
    with pytest.raises(StoreError, match=str(path)):
        ResultStore(path)


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A real file system of ``size`` (tmpfs), mounted at ``path`` (needs root)."""
    path.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "--lazy", str(path)], check=True)  # never leave it mounted
            raise AssertionError(f"files were still open on {path} at the end of the test")


def test_a_full_disk_is_a_clear_error_naming_the_store(tmp_path: Path) -> None:
    with small_tmpfs(tmp_path / "disk", "1m") as disk:
        store = ResultStore(disk / "store.sqlite")
        try:
            stored = 0
            with pytest.raises(StoreFullError, match=rf"result store at {disk / 'store.sqlite'} is full"):
                for i in range(100):  # 100 x 130 kB never fit in 1 MB
                    store.put(key(i), b"f", "f", large(i))
                    stored += 1
            assert 0 < stored < 100
            # What was stored before is intact; nothing partial was left.
            found = store.get_many([key(i) for i in range(100)])
            assert sorted(found) == [key(i) for i in range(stored)]
            assert not list(store.files.glob("*/.*.tmp"))
        finally:
            store.close()


def test_a_database_that_fills_the_disk_is_a_clear_error(tmp_path: Path) -> None:
    with small_tmpfs(tmp_path / "disk", "512k") as disk:
        store = ResultStore(disk / "store.sqlite")
        try:
            stored = 0
            with pytest.raises(StoreFullError, match=rf"result store at {disk / 'store.sqlite'} is full"):
                for i in range(100):  # inline results (in the database itself), 100 x 60 kB
                    store.put(key(i), b"f", "f", bytes([i]) * 60_000)
                    stored += 1
            assert stored > 0
            # Due for an access-time refresh, which fails on the full disk: the read still works.
            with raw_database(store.path) as raw:
                raw.execute("UPDATE results SET accessed = accessed - 7200")
            found = store.get_many([key(i) for i in range(stored)])
            assert all(found[key(i)] == bytes([i]) * 60_000 for i in range(stored))
        finally:
            store.close()


def big_result(i: int) -> np.ndarray:
    return np.full(40_000, float(i))  # 320 kB: 4 of them fill the 1 MB disk


@pytest.mark.timeout(120)
def test_a_full_disk_keeps_the_maps_results(tmp_path: Path, pool: orchestra.Pool) -> None:
    with small_tmpfs(tmp_path / "disk", "1m") as disk:
        path = disk / "store.sqlite"
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            handle = pool.map(big_result, range(12), cache=path)
            results = handle.result(HANG_GUARD)
        assert [r[0] for r in results] == [float(i) for i in range(12)]  # every result returned
        assert isinstance(handle.store_error, StoreFullError)
        assert str(path) in str(handle.store_error)
        assert any(str(path) in str(w.message) and "no longer cached" in str(w.message) for w in caught)
        assert 0 < handle.recorded < 12
        with warnings.catch_warnings(record=True):  # the disk is still full
            warnings.simplefilter("always")
            again = pool.map(big_result, range(12), cache=path)
            assert [r[0] for r in again.result(HANG_GUARD)] == [float(i) for i in range(12)]
        assert again.cached == handle.recorded  # what fitted is served from the store
        orchestra.store.close_all()  # before the disk is unmounted


def test_management_counts_evicts_clears_and_lists_runs(store: ResultStore) -> None:
    for i in range(10):
        store.put(key(i), b"f" if i < 6 else b"g", "f" if i < 6 else "g", large(i) if i == 0 else i)
    info = store.info()
    assert (info.entries, info.functions, info.files) == (10, 2, 1)
    assert info.bytes > INLINE_LIMIT
    store.record_run("sweep-1", b"f", "f", [key(i) for i in range(4)] + [key(50)])
    (run,) = store.runs()
    assert (run.name, run.function, run.total, run.done, run.missing) == ("sweep-1", "f", 5, 4, 1)
    assert store.clear(b"g") == 4
    assert store.info().entries == 6
    # Size cap: the least recently used go first (key 0, the large one, is the oldest).
    with raw_database(store.path) as raw:
        raw.execute("UPDATE results SET accessed = accessed - 1000 WHERE key = ?", (key(0),))
    assert store.evict(max_bytes=1000) == 1
    assert store.get(key(0)) == (False, None) and store.info().files == 0
    with raw_database(store.path) as raw:
        raw.execute("UPDATE results SET accessed = accessed - 7200 WHERE key IN (?, ?)", (key(1), key(2)))
    assert store.evict(max_age=3600) == 2
    assert store.runs()[0].done == 1
    assert store.delete_run("sweep-1", results=True)
    assert store.runs() == [] and store.info().entries == 2
    assert store.clear() == 2
    assert store.info().entries == 0


def test_default_location_and_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from orchestra_nb import _store

    monkeypatch.delenv("ORCHESTRA_STORE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert _store.default_store_path() == tmp_path / "xdg" / "orchestra_nb" / "store.sqlite"
    monkeypatch.setenv("ORCHESTRA_STORE", str(tmp_path / f"{uuid.uuid4().hex}.sqlite"))
    assert _store.default_store_path().parent == tmp_path
