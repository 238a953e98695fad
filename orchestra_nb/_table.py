"""Segmented task-table columns (layer 2) for a map consumed as a stream.

A job keeps one byte of state and one result slot per item (``_jobs.Job.states`` and
``Job.results``), indexed by the item's position in the input. For a job awaited as a whole
those are a plain ``bytearray`` and ``list``: the list *is* the result the caller gets. A job
whose results go to a stream (``for`` / ``async for`` over its handle) swaps them for the
columns here, which hold the same data in fixed segments of :data:`SEGMENT` items, indexed
by the same absolute positions, so that segments every consumer has taken can be dropped:
the parent then holds what is in flight, not every item the stream ever had.

Why segments and not an offset into one buffer: the I/O thread drops segments while a
consumer thread reads the items after them. Dropping a segment moves nothing, so a
concurrent read of a live item always finds it where it was.

Only the operations the engine and the handles use are offered (int and contiguous-slice
reads and writes, ``extend``, ``len``, and ``count``/``find`` on states). Reading a dropped
item raises :class:`ReleasedItemError`: the engine only touches items that are not final,
and a dropped item is final and handed over.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Generic, SupportsIndex, TypeVar, overload

__all__ = ["SEGMENT", "ReleasedItemError", "SegmentedList", "SegmentedStates"]

SHIFT = 14
SEGMENT = 1 << SHIFT  # items per segment (_jobs.MAX_CHUNK: a chunk spans at most two)
MASK = SEGMENT - 1

S = TypeVar("S", bytearray, list[Any])


class ReleasedItemError(IndexError):
    """An item of a streamed job was read after its stream had taken it and the table had
    dropped it (a bug in the caller: only items not handed over are ever read)."""


class _Segmented(Generic[S]):
    __slots__ = ("_len", "_segs", "released")

    def __init__(self) -> None:
        self._segs: dict[int, S] = {}  # segment number -> its items
        self._len = 0
        self.released = 0  # items below this index were dropped (a multiple of SEGMENT)

    def _empty(self) -> S:
        raise NotImplementedError

    def __len__(self) -> int:
        return self._len

    def _index(self, key: SupportsIndex) -> int:
        index = key.__index__()
        if index < 0:
            index += self._len
        if not 0 <= index < self._len:
            raise IndexError(f"task {key} is out of range (the table has {self._len})")
        if index < self.released:
            raise ReleasedItemError(f"task {index} was handed to the stream and dropped")
        return index

    def _range(self, key: slice) -> tuple[int, int]:
        start, stop, step = key.indices(self._len)
        if step != 1:
            raise ValueError("a task table is sliced in steps of 1")
        stop = max(start, stop)
        if start < self.released and stop > start:
            raise ReleasedItemError(f"tasks {start}..{stop - 1} include dropped ones (< {self.released})")
        return start, stop

    def _pieces(self, start: int, stop: int) -> Iterator[tuple[S, int, int]]:
        """(segment, offset in it, end offset) covering ``start..stop-1``."""
        while start < stop:
            number, offset = start >> SHIFT, start & MASK
            end = min(SEGMENT, offset + stop - start)
            yield self._segs[number], offset, end
            start += end - offset

    def _get(self, key: SupportsIndex | slice) -> Any:
        """One item, or a contiguous slice as the column's own type (bytearray or list)."""
        if isinstance(key, slice):
            start, stop = self._range(key)
            out = self._empty()
            for segment, a, b in self._pieces(start, stop):
                out += segment[a:b]
            return out
        index = self._index(key)
        return self._segs[index >> SHIFT][index & MASK]

    def _set(self, key: SupportsIndex | slice, value: Any) -> None:
        if isinstance(key, slice):
            start, stop = self._range(key)
            if len(value) != stop - start:
                raise ValueError("a task table slice keeps its length")
            done = 0
            for segment, a, b in self._pieces(start, stop):
                segment[a:b] = value[done : done + b - a]
                done += b - a
            return
        index = self._index(key)
        self._segs[index >> SHIFT][index & MASK] = value

    def extend(self, values: Sequence[Any]) -> None:
        taken = 0
        while taken < len(values):
            number, offset = self._len >> SHIFT, self._len & MASK
            segment = self._segs.get(number)
            if segment is None:
                segment = self._segs[number] = self._empty()
            room = SEGMENT - offset
            piece = values[taken : taken + room]
            segment.extend(piece)
            taken += len(piece)
            self._len += len(piece)

    def release(self, upto: int) -> int:
        """Drop the whole segments below item ``upto``; returns the new :attr:`released`."""
        first = self.released >> SHIFT
        last = min(upto, self._len) >> SHIFT  # segments before this one are complete
        for number in range(first, last):
            self._segs.pop(number, None)
        self.released = max(self.released, last << SHIFT)
        return self.released

    def held(self) -> int:
        """Items still in the table (not dropped)."""
        return self._len - self.released


class SegmentedStates(_Segmented[bytearray]):
    """``Job.states`` of a streamed job: one byte (a ``TaskState``) per item."""

    __slots__ = ()

    def __init__(self, data: bytes | bytearray = b"") -> None:
        super().__init__()
        self.extend(bytearray(data))

    def _empty(self) -> bytearray:
        return bytearray()

    @overload
    def __getitem__(self, key: SupportsIndex) -> int: ...
    @overload
    def __getitem__(self, key: slice) -> bytearray: ...
    def __getitem__(self, key: SupportsIndex | slice) -> int | bytearray:
        return self._get(key)  # type: ignore[no-any-return]

    @overload
    def __setitem__(self, key: SupportsIndex, value: SupportsIndex) -> None: ...
    @overload
    def __setitem__(self, key: slice, value: bytes | bytearray) -> None: ...
    def __setitem__(self, key: SupportsIndex | slice, value: Any) -> None:
        self._set(key, value)

    def count(self, value: SupportsIndex | bytes, start: int = 0, end: int | None = None) -> int:
        stop = self._len if end is None else min(end, self._len)
        start = max(start, self.released)
        return sum(segment.count(value, a, b) for segment, a, b in self._pieces(start, stop))

    def find(self, value: SupportsIndex | bytes, start: int = 0, end: int | None = None) -> int:
        """The first index in ``[start, end)`` (and not dropped) in state ``value``, or -1."""
        position = max(start, self.released)
        stop = self._len if end is None else min(end, self._len)
        if position >= stop:
            return -1
        for segment, a, b in self._pieces(position, stop):
            found = segment.find(value, a, b)
            if found != -1:
                return position + found - a
            position += b - a
        return -1


class SegmentedList(_Segmented[list[Any]]):
    """``Job.results`` of a streamed job: one slot per item."""

    __slots__ = ()

    def __init__(self, data: Iterable[Any] = ()) -> None:
        super().__init__()
        self.extend(list(data))

    def _empty(self) -> list[Any]:
        return []

    @overload
    def __getitem__(self, key: SupportsIndex) -> Any: ...
    @overload
    def __getitem__(self, key: slice) -> list[Any]: ...
    def __getitem__(self, key: SupportsIndex | slice) -> Any:
        return self._get(key)

    def __setitem__(self, key: SupportsIndex | slice, value: Any) -> None:
        self._set(key, value)

    def __iter__(self) -> Iterator[Any]:
        for segment, a, b in self._pieces(self.released, self._len):
            yield from segment[a:b]
