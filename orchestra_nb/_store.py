"""The result store (layer 2): results by key in SQLite, large ones in files beside it.

Layout (``docs/store.md`` has the full description)::

    store.sqlite          SQLite in WAL mode: the index, small results inline, named runs
    store.sqlite-files/   one file per large result: <key hex[:2]>/<key hex>-<random>.bin

Every entry has a BLAKE2b checksum of its stored bytes; an entry whose bytes do not match
(a torn or corrupted file, a file deleted by hand) is deleted and reported as a miss, so
a corrupt result is never returned. A large result's file is written to a temporary name,
fsynced and renamed before its row is committed: a writer killed at any point leaves
either no row (the file is an orphan, swept by :meth:`ResultStore.evict`) or a complete
entry. Two processes may use one store at once: writes are ``BEGIN IMMEDIATE``
transactions and a busy database is waited for (``busy_timeout``).

Values are pickled with protocol 5; their out-of-band buffers (numpy arrays) are stored
after the pickle stream, 64-byte aligned, and read back as views of one buffer, without a
copy per array.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import hashlib
import os
import pickle
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

import cloudpickle

from ._exceptions import OrchestraError

__all__ = [
    "FORMAT_VERSION",
    "INLINE_LIMIT",
    "ResultStore",
    "RunInfo",
    "StoreError",
    "StoreFullError",
    "StoreInfo",
    "StoreVersionError",
    "UnpicklableValueError",
    "default_store_path",
]

FORMAT_VERSION = 1
INLINE_LIMIT = 64 * 1024  # results up to this many bytes live in the database row
BUSY_TIMEOUT = 60.0  # seconds a writer waits for another process's transaction
_ALIGN = 64
_BATCH = 900  # keys per SELECT ... IN (...): below every SQLite's variable limit (999)
_TOUCH_AFTER = 3600.0  # a hit refreshes its entry's access time once per hour at most
_ORPHAN_AGE = 3600.0  # files without a row, older than this, are a dead writer's
_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


class StoreError(OrchestraError):
    """The result store cannot be used (the message names its path)."""


class StoreVersionError(StoreError):
    """The store was written by a newer orchestra_nb, with a format this one cannot read."""


class StoreFullError(StoreError):
    """The disk (or quota) holding the store is full; nothing partial was stored."""


class UnpicklableValueError(StoreError):
    """A value that cannot be pickled, so cannot be stored (the store itself is fine)."""


@dataclasses.dataclass(frozen=True, slots=True)
class StoreInfo:
    path: str
    entries: int
    bytes: int  # stored result bytes (inline and in files)
    files: int  # entries kept as files
    functions: int
    runs: int
    database_bytes: int  # the SQLite file and its write-ahead log


@dataclasses.dataclass(frozen=True, slots=True)
class RunInfo:
    """A named run (``checkpoint=``): its items and how many have a stored result."""

    name: str
    function: str
    total: int
    done: int
    created: float
    updated: float

    @property
    def missing(self) -> int:
        return self.total - self.done


def default_store_path() -> Path:
    """``$ORCHESTRA_STORE``, else ``$XDG_CACHE_HOME/orchestra_nb/store.sqlite`` (default
    ``~/.cache/orchestra_nb/store.sqlite``)."""
    explicit = os.environ.get("ORCHESTRA_STORE")
    if explicit:
        return Path(explicit).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "orchestra_nb" / "store.sqlite"


_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS results (
    key BLOB PRIMARY KEY,
    function BLOB NOT NULL,
    function_name TEXT NOT NULL,
    created REAL NOT NULL,
    accessed REAL NOT NULL,
    size INTEGER NOT NULL,
    checksum BLOB NOT NULL,
    layout TEXT NOT NULL,
    data BLOB,
    file TEXT
);
CREATE INDEX IF NOT EXISTS results_by_function ON results (function);
CREATE INDEX IF NOT EXISTS results_by_access ON results (accessed);
CREATE TABLE IF NOT EXISTS runs (
    name TEXT PRIMARY KEY,
    function BLOB NOT NULL,
    function_name TEXT NOT NULL,
    total INTEGER NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS run_items (
    run TEXT NOT NULL,
    idx INTEGER NOT NULL,
    key BLOB NOT NULL,
    PRIMARY KEY (run, idx)
) WITHOUT ROWID;
"""


_P = ParamSpec("_P")
_R = TypeVar("_R")


def _store_errors(
    method: Callable[Concatenate[ResultStore, _P], _R],
) -> Callable[Concatenate[ResultStore, _P], _R]:
    """SQLite's errors as :class:`StoreError` (:class:`StoreFullError` for a full disk),
    naming the store."""

    @functools.wraps(method)
    def translated(self: ResultStore, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return method(self, *args, **kwargs)
        except sqlite3.Error as exc:
            if "full" in str(exc).lower():
                raise StoreFullError(f"the result store at {self.path} is full: {exc}") from exc
            raise StoreError(f"the result store at {self.path} failed: {exc}") from exc

    return translated


class ResultStore:
    """One store on disk. Thread-safe (one connection, used under a lock); several
    processes may open the same path at once.

    ``after_file_write``: a fault-injection seam for tests, called with the entry's file
    path inside the write transaction, after the file is in place and before the commit.
    """

    after_file_write: Callable[[Path], object] | None = None

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path).expanduser().resolve()
        self.files = self.path.with_name(self.path.name + "-files")
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT, isolation_level=None,
                                       check_same_thread=False)
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open the result store at {self.path}: {exc}") from exc
        try:
            self._setup()
        except BaseException:
            self._db.close()
            raise

    def _setup(self) -> None:
        db = self._db
        try:
            mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            db.execute("PRAGMA synchronous=NORMAL")  # WAL: a killed process loses nothing committed
            if self._version() is None:  # a new store (others only read: no write lock)
                self._create()
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{self.path} is not a usable result store: {exc}") from exc
        found = self._version()
        if found is not None and found > FORMAT_VERSION:
            raise StoreVersionError(
                f"the result store at {self.path} has format version {found}, written by a newer "
                f"orchestra_nb; this one reads version {FORMAT_VERSION} at most. Upgrade orchestra_nb, "
                f"or use another store: orchestra.configure(store='other/path.sqlite')"
            )
        if mode.lower() != "wal":
            raise StoreError(f"the result store at {self.path} cannot use WAL mode (got {mode!r})")

    def _create(self) -> None:
        db = self._db
        with self._transaction():
            if self._version() is None:  # another process may have created it meanwhile
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.execute("INSERT OR IGNORE INTO meta VALUES ('format_version', ?)",
                           (str(FORMAT_VERSION),))

    def _version(self) -> int | None:
        try:
            row = self._db.execute("SELECT value FROM meta WHERE name = 'format_version'").fetchone()
        except sqlite3.OperationalError:  # no meta table yet
            return None
        return None if row is None else int(row[0])

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction, taken at once (no deadlock upgrading a read lock)."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> ResultStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<ResultStore {self.path}>"

    # --- reading ------------------------------------------------------------------------

    @_store_errors
    def get_many(self, keys: list[bytes], function: bytes | None = None) -> dict[bytes, Any]:
        """The stored values of those ``keys`` that have a valid entry. An entry that fails
        its checksum or cannot be unpickled is deleted: it is a miss, never an error.
        ``function``: the fingerprint all ``keys`` belong to, if they do (faster)."""
        found: dict[bytes, Any] = {}
        bad: list[bytes] = []
        stale: list[bytes] = []
        now = time.time()
        for rows in self._rows(keys, function):
            for key, checksum, layout, data, file, accessed in rows:
                try:
                    found[key] = self._load(checksum, layout, data, file)
                except _Corrupt:
                    bad.append(key)
                    continue
                if accessed < now - _TOUCH_AFTER:
                    stale.append(key)
        # Both are housekeeping: on a full disk or a read-only store, reading still works.
        with contextlib.suppress(sqlite3.Error):
            if bad:
                self._delete_keys(bad)
            if stale:
                with self._lock, self._transaction() as db:
                    db.executemany("UPDATE results SET accessed = ? WHERE key = ?", [(now, k) for k in stale])
        return found

    def _rows(self, keys: list[bytes], function: bytes | None) -> Iterator[list[Any]]:
        columns = "key, checksum, layout, CAST(data AS BLOB), file, accessed"
        if function is not None and len(keys) > _BATCH:
            with self._lock:
                stored = self._db.execute("SELECT count(*) FROM results WHERE function = ?",
                                          (function,)).fetchone()[0]
            if stored <= 2 * len(keys):
                # Most of the function's entries are wanted: one scan of them beats a
                # B-tree search per key (three times faster).
                wanted = set(keys)
                with self._lock:
                    rows = self._db.execute(f"SELECT {columns} FROM results WHERE function = ?",
                                            (function,)).fetchall()
                yield [row for row in rows if row[0] in wanted]
                return
        for start in range(0, len(keys), _BATCH):
            batch = keys[start:start + _BATCH]
            with self._lock:
                yield self._db.execute(
                    f"SELECT {columns} FROM results WHERE key IN ({','.join('?' * len(batch))})", batch
                ).fetchall()

    def get(self, key: bytes) -> tuple[bool, Any]:
        """``(True, value)`` for a valid entry, ``(False, None)`` otherwise."""
        found = self.get_many([key])
        return (True, found[key]) if key in found else (False, None)

    def _load(self, checksum: bytes, layout: str, data: bytes | None, file: str | None) -> Any:
        if file is not None:
            path = self.files / file
            try:
                with open(path, "rb") as f:
                    size = os.fstat(f.fileno()).st_size
                    raw = bytearray(size)
                    if f.readinto(raw) != size:
                        raise _Corrupt
            except OSError as exc:
                raise _Corrupt from exc
        elif data is not None:
            if _checksum(data) != checksum:
                raise _Corrupt
            if " " not in layout:  # no out-of-band buffers: the common, small case
                try:
                    return pickle.loads(data)
                except Exception as exc:
                    raise _Corrupt from exc
            raw = bytearray(data)  # writable buffers: arrays read back are writable
        else:
            raise _Corrupt
        if file is not None and _checksum(raw) != checksum:
            raise _Corrupt
        try:
            numbers = [int(n) for n in layout.split()]
            view = memoryview(raw)
            buffers = [view[numbers[i]:numbers[i] + numbers[i + 1]] for i in range(1, len(numbers), 2)]
            return pickle.loads(view[:numbers[0]], buffers=buffers)
        except Exception as exc:  # e.g. a class that no longer exists: recompute
            raise _Corrupt from exc

    @_store_errors
    def count(self, keys: Iterable[bytes] | None = None) -> int:
        """Entries in the store (or: how many of ``keys`` have one, valid or not)."""
        with self._lock:
            if keys is None:
                return int(self._db.execute("SELECT count(*) FROM results").fetchone()[0])
        wanted = list(keys)
        total = 0
        for start in range(0, len(wanted), _BATCH):
            batch = wanted[start:start + _BATCH]
            with self._lock:
                total += self._db.execute(
                    f"SELECT count(*) FROM results WHERE key IN ({','.join('?' * len(batch))})", batch
                ).fetchone()[0]
        return total

    # --- writing ------------------------------------------------------------------------

    @_store_errors
    def put(self, key: bytes, function: bytes, function_name: str, value: Any) -> None:
        """Store ``value`` under ``key`` (replacing an entry with that key).

        Raises :class:`StoreFullError` when the disk is full (nothing is stored then),
        :class:`UnpicklableValueError` if the value cannot be pickled, :class:`StoreError`
        for other failures.
        """
        try:
            raw, layout = _serialize(value)
        except Exception as exc:
            raise UnpicklableValueError(
                f"cannot store a {type(value).__qualname__}: it cannot be pickled ({exc})") from exc
        checksum = _checksum(raw)
        try:
            self._put(key, function, function_name, raw, layout, checksum)
        except OSError as exc:
            if exc.errno in _FULL_ERRNOS:
                raise StoreFullError(
                    f"the result store at {self.path} is full: no space left for a result of "
                    f"{len(raw)} bytes ({os.strerror(exc.errno or 0)})"
                ) from exc
            raise StoreError(f"cannot write to the result store at {self.path}: {exc}") from exc

    def _put(self, key: bytes, function: bytes, function_name: str, raw: bytearray, layout: str,
             checksum: bytes) -> None:
        file: str | None = None
        path: Path | None = None
        if len(raw) > INLINE_LIMIT:
            file = f"{key.hex()[:2]}/{key.hex()}-{secrets.token_hex(4)}.bin"
            path = self.files / file
            _write_atomically(path, raw)
        now = time.time()
        old: str | None = None
        try:
            with self._lock, self._transaction() as db:
                row = db.execute("SELECT file FROM results WHERE key = ?", (key,)).fetchone()
                old = None if row is None else row[0]
                db.execute(
                    "INSERT OR REPLACE INTO results VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (key, function, function_name, now, now, len(raw), checksum, layout,
                     None if file is not None else bytes(raw), file),
                )
                hook = type(self).after_file_write  # a plain function, not a method
                if hook is not None and path is not None:
                    hook(path)
        except BaseException:
            if path is not None:
                with contextlib.suppress(OSError):
                    path.unlink()
            raise
        if old is not None and old != file:
            with contextlib.suppress(OSError):
                (self.files / old).unlink()

    def _delete_keys(self, keys: list[bytes]) -> int:
        files: list[str] = []
        deleted = 0
        for start in range(0, len(keys), _BATCH):
            batch = keys[start:start + _BATCH]
            marks = ",".join("?" * len(batch))
            with self._lock, self._transaction() as db:
                files += [r[0] for r in db.execute(
                    f"SELECT file FROM results WHERE file IS NOT NULL AND key IN ({marks})", batch)]
                deleted += db.execute(f"DELETE FROM results WHERE key IN ({marks})", batch).rowcount
        self._unlink(files)
        return deleted

    def _unlink(self, files: list[str]) -> None:
        for name in files:
            with contextlib.suppress(OSError):
                (self.files / name).unlink()

    # --- named runs ---------------------------------------------------------------------

    @_store_errors
    def record_run(self, name: str, function: bytes, function_name: str, keys: list[bytes]) -> None:
        """Remember run ``name`` as these item keys (replacing what the name held)."""
        now = time.time()
        with self._lock, self._transaction() as db:
            row = db.execute("SELECT created FROM runs WHERE name = ?", (name,)).fetchone()
            db.execute("DELETE FROM run_items WHERE run = ?", (name,))
            db.execute("INSERT OR REPLACE INTO runs VALUES (?, ?, ?, ?, ?, ?)",
                       (name, function, function_name, len(keys), now if row is None else row[0], now))
            db.executemany("INSERT INTO run_items VALUES (?, ?, ?)",
                           [(name, index, key) for index, key in enumerate(keys)])

    @_store_errors
    def runs(self) -> list[RunInfo]:
        with self._lock:
            rows = self._db.execute(
                "SELECT r.name, r.function_name, r.total, r.created, r.updated, "
                "(SELECT count(*) FROM run_items i JOIN results s ON s.key = i.key WHERE i.run = r.name) "
                "FROM runs r ORDER BY r.updated DESC"
            ).fetchall()
        return [RunInfo(name, fn, total, done, created, updated)
                for name, fn, total, created, updated, done in rows]

    @_store_errors
    def run_keys(self, name: str) -> list[bytes]:
        with self._lock:
            return [r[0] for r in self._db.execute(
                "SELECT key FROM run_items WHERE run = ? ORDER BY idx", (name,))]

    @_store_errors
    def delete_run(self, name: str, *, results: bool = False) -> bool:
        """Forget run ``name`` (and with ``results=True`` its stored results too)."""
        keys = self.run_keys(name) if results else []
        with self._lock, self._transaction() as db:
            found = db.execute("DELETE FROM runs WHERE name = ?", (name,)).rowcount > 0
            db.execute("DELETE FROM run_items WHERE run = ?", (name,))
        if keys:
            self._delete_keys(keys)
        return found

    # --- management ---------------------------------------------------------------------

    @_store_errors
    def info(self) -> StoreInfo:
        with self._lock:
            entries, size, files, functions = self._db.execute(
                "SELECT count(*), coalesce(sum(size), 0), count(file), count(DISTINCT function) FROM results"
            ).fetchone()
            runs = self._db.execute("SELECT count(*) FROM runs").fetchone()[0]
        database = sum(p.stat().st_size for p in (self.path, Path(f"{self.path}-wal")) if p.exists())
        return StoreInfo(str(self.path), entries, size, files, functions, runs, database)

    @_store_errors
    def clear(self, function: bytes | None = None) -> int:
        """Delete every entry (or those of one function fingerprint); returns how many."""
        with self._lock, self._transaction() as db:
            where, params = ("WHERE function = ?", (function,)) if function is not None else ("", ())
            files = [r[0] for r in db.execute(f"SELECT file FROM results {where} "
                                              f"{'AND' if where else 'WHERE'} file IS NOT NULL", params)]
            deleted = int(db.execute(f"DELETE FROM results {where}", params).rowcount)
            if function is None:
                db.execute("DELETE FROM run_items")
                db.execute("DELETE FROM runs")
        self._unlink(files)
        return deleted

    @_store_errors
    def evict(self, *, max_age: float | None = None, max_bytes: int | None = None,
              orphan_age: float = _ORPHAN_AGE) -> int:
        """Delete entries not used for ``max_age`` seconds, then the least recently used
        ones until the results take at most ``max_bytes``; delete files no entry refers to
        (a killed writer's) once they are ``orphan_age`` seconds old (younger ones may be
        a live writer's, about to commit). Returns the number of entries deleted."""
        victims: list[bytes] = []
        with self._lock:
            if max_age is not None:
                victims += [r[0] for r in self._db.execute(
                    "SELECT key FROM results WHERE accessed < ?", (time.time() - max_age,))]
            if max_bytes is not None:
                total = 0
                seen = set(victims)
                for key, size in self._db.execute("SELECT key, size FROM results ORDER BY accessed DESC"):
                    if key in seen:
                        continue
                    total += size
                    if total > max_bytes:
                        victims.append(key)
        deleted = self._delete_keys(victims) if victims else 0
        self._sweep_orphans(orphan_age)
        return deleted

    def _sweep_orphans(self, orphan_age: float) -> None:
        if not self.files.exists():
            return
        with self._lock:
            known = {r[0] for r in self._db.execute("SELECT file FROM results WHERE file IS NOT NULL")}
        cutoff = time.time() - orphan_age
        for path in self.files.glob("*/*"):
            name = f"{path.parent.name}/{path.name}"
            with contextlib.suppress(OSError):
                if name not in known and path.stat().st_mtime <= cutoff:
                    path.unlink()


class _Corrupt(Exception):
    """An entry whose bytes are missing, torn or do not unpickle."""


def _checksum(raw: bytes | bytearray) -> bytes:
    return hashlib.blake2b(raw, digest_size=16).digest()


def _serialize(value: Any) -> tuple[bytearray, str]:
    """(stored bytes, layout): the pickle stream, then each out-of-band buffer at a
    64-byte boundary; the layout is ``"<body length> <offset> <length> ..."``."""
    buffers: list[pickle.PickleBuffer] = []
    try:
        body = pickle.dumps(value, protocol=5, buffer_callback=buffers.append)
    except Exception:
        # A value holding a notebook-defined function or a local class: by value.
        buffers.clear()
        body = cloudpickle.dumps(value, protocol=5, buffer_callback=buffers.append)
    raw = bytearray(body)
    layout = [len(body)]
    for buffer in buffers:
        view = buffer.raw()
        raw.extend(bytes(-len(raw) % _ALIGN))
        layout += [len(raw), view.nbytes]
        raw.extend(view)
    return raw, " ".join(map(str, layout))


def _write_atomically(path: Path, raw: bytearray) -> None:
    """Write, fsync, rename, fsync the directory: after a crash the file is complete or absent."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        with open(temporary, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
