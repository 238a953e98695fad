"""Large buffers cross to the workers once per job (layer 0: opens no socket, runs no loop).

A map whose items all use one big array (``pool.map(f, [arr] * 100)``, ``map(f, xs, arr)``
through ``itertools.repeat``, joblib's ``delayed(f)(X, y, ...)`` calls), or whose function
captures one (``lambda i: arr[i].sum()``), would otherwise pickle and copy that array into
shared memory once per chunk (the argument) or send it in the pickle stream to every worker
(the function). Instead each large out-of-band buffer (>= ``SHM_THRESHOLD``) is written
once, the first time the job sends it, into a *pinned* segment of the pool's
shared-memory directory; every later chunk of the job, and the function's ``Define`` on
every worker, carries only its name. A worker maps it copy-on-write for each message
(``MAP_PRIVATE``): the pages are the parent's, shared, until a task writes one, and a write
stays in that chunk's arrays as it would with a copy; mapping costs a system call, and
only the pages a task reads are faulted in. So a chunk's arguments cost a pickle stream of
a few hundred bytes, whatever the array's size.

"The same object" is the same exporting object (the array pickle hands its buffer out for),
alive, with the same size, within one job: the job keeps a reference to it, so its id
cannot be reused meanwhile. A job sees the array as it was when the job first sent it (like
joblib's memmapping, which dumps an argument once per ``Parallel`` call). Nothing is shared
across jobs: a second map writes the array again, so a mutation between two maps is always
seen, and no content digest (which costs more than the copy it would save) is needed.

Lifetime: a segment no chunk in flight and no recent chunk names is deleted as the next
chunk goes out (``Placements.evict``), the rest when the job ends (``Placements.close``),
and the pool then tells the workers (``Release``), which forget the job's function. A
worker maps a segment copy-on-write per message, so its memory goes with the arrays that
use it. A worker respawned midway maps the segments by name like any other (they outlive
their chunks in flight). Pool close removes the run directory with anything left in it.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import secrets
import threading
from collections.abc import Collection, Sequence
from typing import Any

from ._protocol import PINNED_PREFIX

__all__ = ["Placements", "function_frames"]


RECENT_CHUNKS = 8  # a buffer named by none of a job's last 8 chunks (nor in flight) goes


class Placements:
    """The pinned segments of one job: exporter -> segment name, written once each.

    A job over many *different* large arrays (a list of images) must not pin them all until
    it ends: a segment that neither a chunk in flight nor one of the last
    :data:`RECENT_CHUNKS` chunks sent names is deleted (:meth:`evict`), and written again
    if a later chunk names its exporter. A function's buffers stay for the whole job (a
    worker started later defines it from them)."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        # id(exporter) -> (exporter, size, name): the reference keeps the id from reuse.
        self._placed: dict[int, tuple[object, int, str]] = {}
        self._last_named: dict[str, int] = {}  # name -> the message that last named it
        self._function: set[str] = set()  # names kept for the whole job
        self._chunks: dict[int, tuple[str, ...]] = {}  # chunk start -> names it carries
        self._message = 0  # messages pickled so far
        self.written_bytes = 0  # copied into pinned segments so far

    def begin(self) -> None:
        """A message is about to be pickled: the names given from now on are its own."""
        self._message += 1

    def name_for(self, buf: pickle.PickleBuffer, for_function: bool = False) -> str | None:
        """The pinned segment holding ``buf``'s bytes, written now if this job has not
        placed them yet; None if the buffer has no exporter to know it by again. Raises
        OSError (a full /dev/shm) with no segment left behind."""
        raw = buf.raw()
        exporter = memoryview(buf).obj
        if exporter is None:
            return None
        hit = self._placed.get(id(exporter))
        if hit is not None and hit[0] is exporter and hit[1] == raw.nbytes:
            name = hit[2]
        else:
            name = _write_pinned(self.directory, raw)
            self._placed[id(exporter)] = (exporter, raw.nbytes, name)
            self.written_bytes += raw.nbytes
        self._last_named[name] = self._message
        if for_function:
            self._function.add(name)
        return name

    def sent(self, start: int, names: Sequence[str | None]) -> None:
        """The chunk starting at ``start`` went out carrying ``names``."""
        pinned = tuple(n for n in names if n is not None and n.startswith(PINNED_PREFIX))
        if pinned:
            self._chunks[start] = pinned
        elif self._chunks:
            self._chunks.pop(start, None)

    def evict(self, in_flight: Collection[int]) -> None:
        """Delete the segments no chunk in flight (by start) and no recent one names."""
        for start in [s for s in self._chunks if s not in in_flight]:
            del self._chunks[start]
        in_use = {n for names in self._chunks.values() for n in names} | self._function
        recent = self._message - RECENT_CHUNKS
        for key, (_, _, name) in list(self._placed.items()):
            if name not in in_use and self._last_named[name] <= recent:
                del self._placed[key]
                del self._last_named[name]
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(self.directory, name))

    @property
    def names(self) -> list[str]:
        return [name for _, _, name in self._placed.values()]

    def close(self) -> None:
        """The job ended: delete its segments (mappings still in use keep their memory
        until their arrays go) and drop the references to the exporters."""
        for _, _, name in self._placed.values():
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(self.directory, name))
        self._placed.clear()
        self._last_named.clear()
        self._chunks.clear()


def _write_pinned(directory: str, raw: memoryview) -> str:
    """A new pinned segment holding ``raw``. Written with pwrite(), not through a mapping:
    once, into fresh tmpfs pages, that costs about half (no zeroing pass, no page faults),
    and a full /dev/shm is an ENOSPC here, never a SIGBUS later. A large one is written by
    a thread per CPU, each its own part (pwrite releases the GIL; the workers wait for it)."""
    name = f"{PINNED_PREFIX}{secrets.token_hex(12)}"
    path = os.path.join(directory, name)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        data = raw.cast("B")
        size = data.nbytes
        ways = min(os.cpu_count() or 1, _MAX_WRITERS, max(1, size // _PER_WRITER))
        bounds = [size * k // ways for k in range(ways + 1)]
        failures: list[BaseException] = []

        def write_part(k: int) -> None:
            try:
                at, end = bounds[k], bounds[k + 1]
                while at < end:
                    at += os.pwrite(fd, data[at : min(end, at + _WRITE_STEP)], at)
            except BaseException as exc:  # (ENOSPC): raised by the caller below
                failures.append(exc)

        helpers = [
            threading.Thread(target=write_part, args=(k,), name="orchestra-place") for k in range(1, ways)
        ]
        for helper in helpers:
            helper.start()
        write_part(0)
        for helper in helpers:
            helper.join()
        if failures:
            raise failures[0]
    except BaseException:
        os.unlink(path)  # no half-made segment left holding memory
        raise
    finally:
        os.close(fd)
    return name


_WRITE_STEP = 64 * 2**20
_PER_WRITER = 32 * 2**20  # a buffer is split among writers only from this much each
_MAX_WRITERS = 4


def function_frames(
    payload: bytes, buffers: Sequence[pickle.PickleBuffer], placed: Placements | None
) -> tuple[list[Any], tuple[str | None, ...]]:
    """The frames and buffer names of a ``Define``: the function's stream, then each of
    its large buffers by the name of its pinned segment (placed the first time), or as a
    frame when there is no shared memory (or it is full)."""
    if not buffers:
        return [payload], ()
    frames: list[Any] = [payload]
    names: list[str | None] = []
    for buf in buffers:
        name = None
        if placed is not None:
            with contextlib.suppress(OSError):  # /dev/shm full: the buffer travels as a frame
                name = placed.name_for(buf, for_function=True)
        frames.append(b"" if name is not None else bytes(buf.raw()))
        names.append(name)
    return frames, tuple(names)
