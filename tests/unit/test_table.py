"""The segmented task-table columns of a streamed job read and write like the bytearray
and list they replace, by absolute index, and drop whole segments only."""

from __future__ import annotations

import random

import pytest

from orchestra_nb._table import SEGMENT, ReleasedItemError, SegmentedList, SegmentedStates


def test_states_read_and_write_like_a_bytearray_across_segments() -> None:
    rng = random.Random(7)
    plain = bytearray(rng.randrange(7) for _ in range(2 * SEGMENT + 100))
    table = SegmentedStates(plain[:10])
    table.extend(bytes(plain[10 : SEGMENT + 3]))  # fills a segment and starts the next
    table.extend(plain[SEGMENT + 3 :])
    assert len(table) == len(plain)
    for start, stop in [(0, 1), (SEGMENT - 5, SEGMENT + 5), (3, 2 * SEGMENT + 50), (0, len(plain))]:
        assert table[start:stop] == plain[start:stop]
    for index in (0, SEGMENT - 1, SEGMENT, len(plain) - 1, -1):
        assert table[index] == plain[index]
    table[SEGMENT - 2 : SEGMENT + 2] = b"\x05" * 4
    plain[SEGMENT - 2 : SEGMENT + 2] = b"\x05" * 4
    table[7] = plain[7] = 6
    assert table[0 : len(plain)] == plain
    for value in range(7):
        assert table.count(value) == plain.count(value)
        assert table.count(value, SEGMENT - 9, SEGMENT + 9) == plain.count(value, SEGMENT - 9, SEGMENT + 9)
        assert table.find(value, 5) == plain.find(value, 5)
    assert table.find(9) == -1


def test_results_read_and_write_like_a_list_across_segments() -> None:
    plain = list(range(2 * SEGMENT + 3))
    table = SegmentedList(plain[:5])
    table.extend(plain[5:])
    assert table[SEGMENT - 1 : SEGMENT + 2] == plain[SEGMENT - 1 : SEGMENT + 2]
    table[SEGMENT - 1 : SEGMENT + 1] = ["a", "b"]
    plain[SEGMENT - 1 : SEGMENT + 1] = ["a", "b"]
    table[-1] = plain[-1] = "z"
    assert list(table) == plain
    with pytest.raises(ValueError, match="keeps its length"):
        table[0:2] = [1]


def test_release_drops_whole_segments_below_the_mark_only() -> None:
    table = SegmentedList(range(3 * SEGMENT + 10))
    assert table.release(SEGMENT - 1) == 0  # the first segment is not all taken yet
    assert table.release(2 * SEGMENT + 5) == 2 * SEGMENT
    assert table.held() == SEGMENT + 10
    assert table[2 * SEGMENT] == 2 * SEGMENT  # the items after the mark are untouched
    assert list(table) == list(range(2 * SEGMENT, 3 * SEGMENT + 10))
    with pytest.raises(ReleasedItemError, match="handed to the stream"):
        table[2 * SEGMENT - 1]
    with pytest.raises(ReleasedItemError):
        table[SEGMENT : 2 * SEGMENT + 1]
    assert table.release(SEGMENT) == 2 * SEGMENT  # never moves back
    states = SegmentedStates(b"\x02" * (2 * SEGMENT))
    states.release(SEGMENT)
    assert states.count(2) == SEGMENT
    assert states.find(2) == SEGMENT  # searches start after what was dropped
