"""A job's task table (layer 2): which items exist, their states, results and errors.

A job is one ``map`` or one ``run``. It pulls items lazily from its input, so a generator
of a million items is never materialised; ``results`` grows as items are pulled. Every
item's state is one byte of ``states``; transitions are applied to ranges (a chunk), so
per-item accounting costs a slice assignment per chunk, not a Python call per item.

Only the I/O thread mutates a job. Other threads read ``counts`` (a list of ints, each read
atomic under the GIL) and wait on ``finished`` / the handle's future.
"""

from __future__ import annotations

import collections
import concurrent.futures
import itertools
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from ._policy import RetryPolicy
from ._state import TaskState

__all__ = ["Chunk", "Job"]

_NOT_DONE: Any = object()  # placeholder in ``results`` for items without an outcome yet

_STATE_BYTES = {s: bytes([s]) for s in TaskState}
_FINAL = (TaskState.SUCCEEDED, TaskState.FAILED, TaskState.CANCELLED)


class Chunk:
    """Consecutive items of one job sent to one worker in one ``Run`` message."""

    __slots__ = ("attempt", "count", "job", "start", "started_at", "target", "items", "worker")

    def __init__(self, job: Job, start: int, items: list[Any], target: int | None = None) -> None:
        self.job = job
        self.start = start
        self.items = items
        self.count = len(items)
        self.target = target  # a worker id this chunk must run on (setup broadcasts)
        self.worker: int | None = None
        self.started_at = 0.0
        self.attempt = 0


class Job:
    def __init__(
        self,
        job_id: int,
        name: str,
        digest: bytes,
        fn_payload: bytes,
        source: Iterator[Any] | None,
        total: int | None,
        *,
        star: bool = False,
        call: bool = False,
        chunksize: int | None = None,
        ordered: bool = True,
        return_exceptions: bool = False,
        timeout: float | None = None,
        retry: RetryPolicy | None = None,
        targets: list[int] | None = None,
    ) -> None:
        self.id = job_id
        self.name = name
        self.digest = digest
        self.fn_payload = fn_payload
        self.source = source
        self.total = total
        self.star = star
        self.call = call
        self.chunksize = chunksize
        self.ordered = ordered
        self.return_exceptions = return_exceptions
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self.targets = targets
        self.pulled = 0
        self.results: list[Any] = []
        self.states = bytearray()
        self.counts = [0] * len(TaskState)
        self.errors: dict[int, BaseException] = {}
        self.attempts: dict[int, int] = {}  # failures so far, for retries
        self.crashes: dict[int, int] = {}  # workers killed so far, per item
        self.requeued: collections.deque[Chunk] = collections.deque()
        self.inflight: dict[int, Chunk] = {}  # start -> chunk
        self.cancelled = False
        self.finished = threading.Event()
        self.future: concurrent.futures.Future[list[Any]] = concurrent.futures.Future()
        self.started_at = time.monotonic()
        self.ended_at: float | None = None
        # Streaming consumers: called on the I/O thread with (start, count) of finished items.
        self.watchers: list[Callable[[int, int], None]] = []
        self.first_error: int | None = None
        self.internal = False  # setup replays: no handle, not waited for by close()
        self.completion_order: list[int] = []  # only kept for ordered=False

    # --- pulling work -----------------------------------------------------------------

    @property
    def exhausted(self) -> bool:
        return self.source is None

    def has_work(self) -> bool:
        return bool(self.requeued) or (self.source is not None and not self.cancelled)

    def take(self, size: int, target: int | None = None) -> Chunk | None:
        """The next chunk of at most ``size`` items (re-queued ones first), or None."""
        if self.requeued:
            return self.requeued.popleft()
        if self.source is None or self.cancelled:
            return None
        items = list(itertools.islice(self.source, size))
        if len(items) < size:
            self.source = None
            self.total = self.pulled + len(items)
        if not items:
            return None
        start = self.pulled
        self.pulled += len(items)
        self.results.extend([_NOT_DONE] * len(items))
        self.states.extend(_STATE_BYTES[TaskState.PENDING] * len(items))
        self.counts[TaskState.PENDING] += len(items)
        return Chunk(self, start, items, target)

    def remaining(self) -> int | None:
        if self.total is None:
            return None
        return self.total - self.pulled + sum(c.count for c in self.requeued)

    # --- transitions ------------------------------------------------------------------

    def set_state(self, start: int, count: int, new: TaskState) -> None:
        """Move items ``start..start+count-1`` to ``new``, keeping ``counts`` exact."""
        states = self.states
        if count == 1:
            old = states[start]
            self.counts[old] -= 1
            states[start] = new
        else:
            segment = states[start : start + count]
            first = segment[0]
            if segment.count(first) == count:
                self.counts[first] -= count
            else:
                for old in segment:
                    self.counts[old] -= 1
            states[start : start + count] = _STATE_BYTES[new] * count
        self.counts[new] += count
        if not self.ordered and new in _FINAL:
            self.completion_order.extend(range(start, start + count))

    def state_of(self, index: int) -> TaskState:
        return TaskState(self.states[index])

    def done_count(self) -> int:
        c = self.counts
        return c[TaskState.SUCCEEDED] + c[TaskState.FAILED] + c[TaskState.CANCELLED]

    def is_complete(self) -> bool:
        return self.source is None and self.done_count() == self.pulled

    def record_failure(self, index: int, exc: BaseException) -> None:
        self.errors[index] = exc
        self.results[index] = exc if self.return_exceptions else None
        if self.first_error is None or index < self.first_error:
            self.first_error = index
        self.set_state(index, 1, TaskState.FAILED)

    def cancel_pending(self) -> list[int]:
        """Mark every item not sent to a worker (PENDING or RETRYING) CANCELLED.

        Items are RUNNING from the moment their chunk is sent, so in-flight chunks are left
        to the worker's answer (or its death). Returns the cancelled indices.
        """
        self.cancelled = True
        self.source = None
        unread = 0 if self.total is None else max(0, self.total - self.pulled)
        if unread:  # a sized input: its unread items are tasks too, and now cancelled
            self.results.extend([None] * unread)
            self.states.extend(_STATE_BYTES[TaskState.CANCELLED] * unread)
            self.counts[TaskState.CANCELLED] += unread
            if not self.ordered:
                self.completion_order.extend(range(self.pulled, self.pulled + unread))
            self.pulled += unread
        self.total = self.pulled
        self.requeued.clear()
        out: list[int] = []
        for state in (TaskState.PENDING, TaskState.RETRYING):
            marker = _STATE_BYTES[state]
            index = self.states.find(marker)
            while index != -1:
                self.set_state(index, 1, TaskState.CANCELLED)
                out.append(index)
                index = self.states.find(marker, index + 1)
        return out

    def notify(self, start: int, count: int) -> None:
        for watch in self.watchers:
            watch(start, count)

    def outcome(self) -> list[Any]:
        return self.results
