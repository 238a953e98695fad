"""Composites (Task, Sequence, Parallel, Map), handles as arguments, callbacks, pause/resume,
and a circuit breaker for a group, against real worker processes.

Tasks that must be *running* at a given moment are gated on marker files in a per-test
directory: a task creates ``started-<i>`` when it begins and waits for ``release-<i>``
(with a hang guard). Concurrency and ordering are read from the pool's events.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import orchestra_nb as orchestra
from orchestra_nb import (
    CallbackWarning,
    CircuitOpenError,
    JobStarted,
    Map,
    Parallel,
    Sequence,
    StepFailed,
    Task,
    TaskState,
    TaskStateChanged,
)
from orchestra_nb.testing import EventRecorder, wait_for

HANG_GUARD = 30.0
FINAL = (TaskState.SUCCEEDED, TaskState.FAILED, TaskState.CANCELLED)


# --- tasks (module level: workers import this module to find them) ---------------------------


def make_range(n: int) -> list[int]:
    return list(range(n))


def square(x: int) -> int:
    return x * x


def total(xs: list[int]) -> int:
    return sum(xs)


def inc(x: int) -> int:
    return x + 1


def double(x: Any) -> Any:
    return x * 2


def add(a: int, b: int) -> int:
    return a + b


def tag(items: list[str], label: str) -> list[str]:
    return [*items, label]


def fail_on(x: int, bad: int = 2) -> int:
    if x == bad:
        raise ValueError(f"bad item {x}")
    return x


def fail_if_even(i: int) -> int:
    if i % 2 == 0:
        raise ValueError(f"even {i}")
    return i


def always_fail(i: int) -> int:
    raise ValueError(f"down {i}")


def _wait_file(path: str, timeout: float = HANG_GUARD) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.002)


def gated(i: int, d: str) -> int:
    """Marks itself started, then waits for ``d/release-<i>``."""
    Path(d, f"started-{i}").touch()
    _wait_file(os.path.join(d, f"release-{i}"))
    return i


def wait_forever(i: int, d: str) -> None:
    Path(d, f"started-{i}").touch()
    _wait_file(os.path.join(d, "never"), timeout=600)


# --- helpers ------------------------------------------------------------------------------------


def started(d: Path) -> set[int]:
    return {int(p.name.split("-")[1]) for p in d.glob("started-*")}


def release(d: Path, i: int) -> None:
    Path(d, f"release-{i}").touch()


def max_running(events: list[Any], job_ids: set[int] | None = None) -> int:
    """The most tasks RUNNING at once, replayed from TaskStateChanged events."""
    running: set[tuple[int, int]] = set()
    most = 0
    for e in events:
        if not isinstance(e, TaskStateChanged) or (job_ids is not None and e.job_id not in job_ids):
            continue
        keys = {(e.job_id, i) for i in range(e.start, e.start + e.count)}
        if e.state is TaskState.RUNNING:
            running |= keys
        elif e.state in FINAL or e.state in (TaskState.PENDING, TaskState.RETRYING):
            running -= keys
        most = max(most, len(running))
    return most


def wait_events(rec: EventRecorder, predicate: Any, n: int) -> None:
    """Wait until ``n`` recorded events match ``predicate``."""
    after = 0
    for _ in range(n):
        found = rec.wait(predicate, HANG_GUARD, after=after)[1]
        after = rec.events.index(found) + 1


def states(handle: Any) -> dict[str, TaskState]:
    return {s.path: s.state for s in handle.steps()}


# --- Sequence, Parallel, Map, nesting ------------------------------------------------------------


def test_sequence_passes_results_on(pool: orchestra.Pool) -> None:
    h = Sequence(Task(make_range, 6), Map(square), Task(total), name="etl").run(pool)
    assert h.result(HANG_GUARD) == sum(x * x for x in range(6))
    assert h.state is TaskState.SUCCEEDED
    steps = {s.path: s for s in h.steps()}
    assert list(steps) == ["etl", "etl / 0:make_range", "etl / 1:map(square)", "etl / 2:total"]
    assert all(s.state is TaskState.SUCCEEDED for s in steps.values())
    assert steps["etl / 1:map(square)"].done == steps["etl / 1:map(square)"].total == 6
    assert h.counts()[TaskState.SUCCEEDED] == 8 and h.total == 8  # 1 + 6 items + 1


def test_each_step_gets_the_previous_result_in_order(pool: orchestra.Pool) -> None:
    chain = Sequence(Task(tag, [], "a"), Task(tag, "b"), Task(tag, "c"))
    assert chain.run(pool).result(HANG_GUARD) == ["a", "b", "c"]
    # pass_results=False: every step runs as given; the result is the last one's
    as_given = Sequence(Task(inc, 1), Task(inc, 10), pass_results=False)
    assert as_given.run(pool).result(HANG_GUARD) == 11


def test_parallel_results_in_the_order_given(pool: orchestra.Pool) -> None:
    h = Sequence(Task(inc, 4), Parallel(Task(inc), Task(double), Task(square), Map(inc, [1, 2])))
    assert h.run(pool).result(HANG_GUARD) == [6, 10, 25, [2, 3]]


@pytest.mark.pool_options(workers=4)
@pytest.mark.local_only("the limit is checked with children running at once")
def test_parallel_limit_two_never_more_than_two_running(pool: orchestra.Pool, tmp_path: Path) -> None:
    n = 5
    with EventRecorder(pool, types=(JobStarted, TaskStateChanged)) as rec:
        h = Parallel(*[Task(gated, i, str(tmp_path)) for i in range(n)], limit=2).run(pool)
        released: set[int] = set()
        while len(released) < n:
            # Two children hold their slots (gated) until released, one at a time; without
            # the limit the four workers would run four of them at once.
            want = min(2, n - len(released))
            live = wait_for(
                lambda want=want: (s := started(tmp_path) - released) and len(s) >= want and s,
                HANG_GUARD,
                what=f"{want} gated children running",
            )
            first = min(live)
            release(tmp_path, first)
            released.add(first)
        assert h.result(HANG_GUARD) == list(range(n))
        wait_events(rec, lambda e: isinstance(e, TaskStateChanged) and e.state is TaskState.SUCCEEDED, n)
        jobs = {e.job_id for e in rec.of(JobStarted) if e.name == "gated"}
        assert len(jobs) == n
        assert max_running(rec.events, jobs) == 2


def test_nesting_three_levels(pool: orchestra.Pool) -> None:
    deep = Sequence(
        Task(inc, 1),  # 2
        Parallel(
            Task(double),  # 4
            Sequence(Task(inc), Parallel(Task(square), Sequence(Task(double), Task(inc)))),  # [9, 7]
        ),
        name="deep",
    )
    h = deep.run(pool)
    assert h.result(HANG_GUARD) == [4, [9, 7]]
    depths = {s.path: s.depth for s in h.steps()}
    # composites three deep (Parallel > Sequence > Parallel > Sequence), their tasks below
    assert max(depths.values()) == 5
    assert depths["deep / 1:parallel / 1:sequence / 1:parallel / 1:sequence / 1:inc"] == 5
    assert all(s.state is TaskState.SUCCEEDED for s in h.steps())


def test_failing_step_names_itself(pool: orchestra.Pool) -> None:
    etl = Sequence(Task(inc, 1), Parallel(Task(inc), Task(fail_on)), Task(inc), name="etl")
    h = etl.run(pool)
    with pytest.raises(StepFailed) as info:
        h.result(HANG_GUARD)
    assert info.value.step == "etl / 1:parallel / 1:fail_on"
    assert isinstance(info.value.__cause__, ValueError)
    assert "bad item 2" in str(info.value.__cause__)
    assert "etl / 1:parallel / 1:fail_on" in str(info.value)
    assert h.state is TaskState.FAILED
    s = states(h)
    assert s["etl / 1:parallel / 1:fail_on"] is TaskState.FAILED
    assert s["etl / 2:inc"] is TaskState.CANCELLED  # never started
    assert list(h.exceptions()) == ["etl / 1:parallel / 1:fail_on"]


def test_failing_map_step(pool: orchestra.Pool) -> None:
    h = Sequence(Task(make_range, 4), Map(fail_on), name="m").run(pool)
    with pytest.raises(StepFailed) as info:
        h.result(HANG_GUARD)
    assert info.value.step == "m / 1:map(fail_on)"
    assert isinstance(info.value.__cause__, ValueError)


@pytest.mark.local_only("a sibling running at the same time is interrupted")
def test_parallel_fails_fast_and_cancels_running_siblings(pool: orchestra.Pool, tmp_path: Path) -> None:
    with EventRecorder(pool, types=(JobStarted, TaskStateChanged)) as rec:
        h = Parallel(
            Task(wait_forever, 0, str(tmp_path)), Sequence(Task(gated, 1, str(tmp_path)), Task(always_fail))
        ).run(pool)
        wait_for(lambda: started(tmp_path) == {0, 1}, HANG_GUARD, what="both children running")
        release(tmp_path, 1)
        with pytest.raises(StepFailed) as info:
            h.result(HANG_GUARD)
        assert info.value.step == "parallel / 1:sequence / 1:always_fail"
        forever = rec.wait(lambda e: isinstance(e, JobStarted) and e.name == "wait_forever")[1].job_id
        rec.wait(
            lambda e: (
                isinstance(e, TaskStateChanged) and e.job_id == forever and e.state is TaskState.CANCELLED
            ),
            HANG_GUARD,
        )
    assert states(h)["parallel / 0:wait_forever"] is TaskState.CANCELLED


def test_return_exceptions_collects_failures_in_place(pool: orchestra.Pool) -> None:
    h = Parallel(*[Task(fail_if_even, i) for i in range(4)], return_exceptions=True).run(pool)
    out = h.result(HANG_GUARD)
    assert [type(x) for x in out] == [ValueError, int, ValueError, int]
    assert out[1] == 1 and out[3] == 3
    assert h.state is TaskState.SUCCEEDED


def test_stop_after_stops_the_rest(pool: orchestra.Pool) -> None:
    with EventRecorder(pool, types=(JobStarted,)) as rec:
        h = Parallel(
            *[Task(fail_if_even, i) for i in range(8)], limit=1, return_exceptions=True, stop_after=2
        ).run(pool)
        with pytest.raises(StepFailed) as info:
            h.result(HANG_GUARD)
        assert info.value.step == "parallel"
        group = info.value.__cause__
        assert isinstance(group, ExceptionGroup)
        assert [str(e) for e in group.exceptions] == ["even 0", "even 2"]
        children = [s.state for s in h.steps()[1:]]
        assert children[:3] == [TaskState.FAILED, TaskState.SUCCEEDED, TaskState.FAILED]
        assert children[3:] == [TaskState.CANCELLED] * 5
        # a barrier: a job submitted now starts after any the Parallel could still submit
        assert pool.run(inc, 0).result(HANG_GUARD) == 1
        rec.wait(lambda e: isinstance(e, JobStarted) and e.name == "inc", HANG_GUARD)
        assert len([e for e in rec.of(JobStarted) if e.name == "fail_if_even"]) == 3


def test_bad_composites_raise_naming_the_culprit() -> None:
    with pytest.raises(TypeError, match="Sequence step 1"):
        Sequence(Task(inc, 1), 42)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="limit"):
        Parallel(Task(inc, 1), limit=0)
    with pytest.raises(ValueError, match="return_exceptions"):
        Parallel(Task(inc, 1), stop_after=2)
    with pytest.raises(TypeError, match="callable"):
        Task(3)  # type: ignore[arg-type]


def test_map_without_input_fails_naming_the_step(pool: orchestra.Pool) -> None:
    with pytest.raises(StepFailed, match="no input") as info:
        Sequence(Map(inc), name="s").run(pool).result(HANG_GUARD)
    assert info.value.step == "s / 0:map(inc)"


async def test_await_a_composite(apool: orchestra.Pool) -> None:
    assert await Sequence(Task(inc, 1), Task(double)).run(apool) == 4
    assert await Parallel(Task(inc, 1), Map(square, [1, 2])).run(apool) == [2, [1, 4]]


@pytest.mark.local_only("two parts running at once are interrupted")
async def test_cancel_a_composite_by_cancelling_the_await(apool: orchestra.Pool, tmp_path: Path) -> None:
    with EventRecorder(apool, types=(JobStarted, TaskStateChanged)) as rec:
        h = Parallel(Task(wait_forever, 0, str(tmp_path)), Task(wait_forever, 1, str(tmp_path))).run(apool)
        waiter = asyncio.ensure_future(h)
        await asyncio.to_thread(wait_for, lambda: started(tmp_path) == {0, 1}, HANG_GUARD)
        waiter.cancel()  # what an interrupted notebook cell does
        with pytest.raises(asyncio.CancelledError):
            await waiter
        jobs = {e.job_id for e in rec.of(JobStarted) if e.name == "wait_forever"}
        for job in jobs:
            await asyncio.to_thread(
                rec.wait,
                lambda e, j=job: (
                    isinstance(e, TaskStateChanged) and e.job_id == j and e.state is TaskState.CANCELLED
                ),
                HANG_GUARD,
            )
    assert len(jobs) == 2
    assert h.state is TaskState.CANCELLED and h.cancelled()


@pytest.mark.local_only("two parts running at once are interrupted")
def test_cancel_a_composite_cancels_every_part(pool: orchestra.Pool, tmp_path: Path) -> None:
    with EventRecorder(pool, types=(JobStarted, TaskStateChanged)) as rec:
        h = Sequence(
            Parallel(Task(wait_forever, 0, str(tmp_path)), Task(wait_forever, 1, str(tmp_path))),
            Task(inc),
            name="c",
        ).run(pool)
        wait_for(lambda: started(tmp_path) == {0, 1}, HANG_GUARD, what="both parts running")
        assert h.cancel()
        with pytest.raises(concurrent.futures.CancelledError):
            h.result(HANG_GUARD)
        jobs = {e.job_id for e in rec.of(JobStarted) if e.name == "wait_forever"}
        for job in jobs:
            rec.wait(
                lambda e, j=job: (
                    isinstance(e, TaskStateChanged) and e.job_id == j and e.state is TaskState.CANCELLED
                ),
                HANG_GUARD,
            )
    assert len(jobs) == 2
    assert set(states(h).values()) == {TaskState.CANCELLED}
    assert not h.cancel()  # already done


def test_a_composite_handle_says_what_it_is(
    pool: orchestra.Pool, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    h = Sequence(Task(inc, 1), Task(double), name="etl").run(pool)
    assert h.result(HANG_GUARD) == 4
    assert repr(h) == "<CompositeHandle 'etl' (sequence of 2 steps) succeeded 2/2 tasks failed=0>"
    block = h._repr_html_()  # the composite block, for front ends that render HTML
    assert block.startswith("<div><b>etl</b>") and "succeeded" in block
    assert ">0:inc</td>" in block and ">1:double</td>" in block and "2/2 tasks" in block
    h._ipython_display_()  # without the notebook layer: its repr
    assert capsys.readouterr().out == repr(h) + "\n"
    one = Task(inc, 1, name="one").run(pool)
    assert one.result(HANG_GUARD) == 2 and repr(one).startswith("<CompositeHandle 'one' (task) succeeded 1/1")
    failed = Parallel(Task(fail_on, 2), name="p").run(pool)
    with pytest.raises(StepFailed):
        failed.result(HANG_GUARD)
    assert repr(failed) == "<CompositeHandle 'p' (parallel of 1 step) failed 1/1 tasks failed=1>"


# --- handles and steps as arguments --------------------------------------------------------------


def test_a_handle_as_argument_is_awaited_first(pool: orchestra.Pool, tmp_path: Path) -> None:
    with EventRecorder(pool, types=(JobStarted,)) as rec:
        first = pool.run(gated, 3, str(tmp_path))
        second = pool.run(add, first, 10)
        wait_for(lambda: started(tmp_path) == {3}, HANG_GUARD, what="the first task running")
        assert not second.done() and second.job_id is None  # not submitted: waits for `first`
        wait_for(lambda: second.state is TaskState.SCHEDULED, HANG_GUARD, what="SCHEDULED")
        assert repr(second) == (
            "<CompositeHandle 'add' (a call waiting for its arguments) scheduled 0/1 tasks failed=0>"
        )
        release(tmp_path, 3)
        assert second.result(HANG_GUARD) == 13
        rec.wait(lambda e: isinstance(e, JobStarted) and e.name == "add", HANG_GUARD)  # delivered later
        names = [e.name for e in rec.of(JobStarted)]
        assert names.index("gated") < names.index("add")
    # a map over a handle's result, a step as an argument, a keyword argument
    assert pool.map(square, pool.run(make_range, 4)).result(HANG_GUARD) == [0, 1, 4, 9]
    assert pool.run(add, Task(inc, 1), b=pool.run(inc, 9)).result(HANG_GUARD) == 12
    assert Task(add, pool.run(inc, 1), 5).run(pool).result(HANG_GUARD) == 7


def test_a_failed_dependency_fails_the_call_naming_the_argument(pool: orchestra.Pool) -> None:
    bad = pool.run(fail_on, 2)
    h = pool.run(inc, bad)
    with pytest.raises(StepFailed) as info:
        h.result(HANG_GUARD)
    assert info.value.step == "inc / argument 0"
    assert isinstance(info.value.__cause__, ValueError)


@pytest.mark.local_only("the argument runs in a worker while the test cancels the call waiting for it")
def test_cancelling_a_waiting_call_leaves_its_argument_running(pool: orchestra.Pool, tmp_path: Path) -> None:
    first = pool.run(gated, 0, str(tmp_path))
    waiting = pool.run(inc, first)
    wait_for(lambda: waiting.state is TaskState.SCHEDULED, HANG_GUARD, what="waiting for its argument")
    assert waiting.cancel()
    with pytest.raises(concurrent.futures.CancelledError):
        waiting.result(HANG_GUARD)
    assert not first.done()  # someone else's handle: not cancelled from here
    # a cancelled argument fails the call that needs it, naming the argument
    needs = pool.run(inc, first)
    first.cancel()
    with pytest.raises(StepFailed) as info:
        needs.result(HANG_GUARD)
    assert info.value.step == "inc / argument 0"
    assert isinstance(info.value.__cause__, concurrent.futures.CancelledError)


# --- callbacks ---------------------------------------------------------------------------------------


def test_callbacks_once_each_off_the_io_thread(pool: orchestra.Pool) -> None:
    calls: list[tuple[str, Any, str]] = []
    lock = threading.Lock()
    cell = contextvars.ContextVar("cell", default="none")
    cell.set("cell 7")  # the registering caller's context travels with its callbacks

    def record(kind: str) -> Any:
        def callback(*args: Any) -> None:
            with lock:
                calls.append((kind, args, f"{threading.current_thread().name}|{cell.get()}"))

        return callback

    ok = pool.map(
        square,
        range(5),
        on_item_success=record("item ok"),
        on_success=record("job ok"),
        on_error=record("job error"),
    )
    assert ok.result(HANG_GUARD) == [0, 1, 4, 9, 16]
    failing = pool.map(
        fail_on,
        range(4),
        on_item_success=record("f item ok"),
        on_item_error=record("f item error"),
        on_error=record("f job error"),
    )
    with pytest.raises(ValueError):
        failing.result(HANG_GUARD)
    one = pool.options(on_success=record("run ok")).run(inc, 41)
    assert one.result(HANG_GUARD) == 42
    composite = Sequence(Task(inc, 1), Task(fail_on)).run(pool, on_error=record("composite error"))
    with pytest.raises(StepFailed):
        composite.result(HANG_GUARD)
    assert orchestra.wait_callbacks(HANG_GUARD)

    kinds = [k for k, _, _ in calls]
    assert sorted(a[0] for k, a, _ in calls if k == "item ok") == [0, 1, 2, 3, 4]
    assert sorted(a for k, a, _ in calls if k == "item ok") == [(i, i * i) for i in range(5)]
    assert [a for k, a, _ in calls if k == "job ok"] == [([0, 1, 4, 9, 16],)]
    assert kinds.index("job ok") > max(i for i, k in enumerate(kinds) if k == "item ok")
    assert "job error" not in kinds
    assert sorted(a[0] for k, a, _ in calls if k == "f item ok") == [0, 1, 3]
    errors = [a for k, a, _ in calls if k == "f item error"]
    assert len(errors) == 1 and errors[0][0] == 2 and isinstance(errors[0][1], ValueError)
    assert kinds.count("f job error") == 1
    assert [a for k, a, _ in calls if k == "run ok"] == [(42,)]
    (composite_error,) = [a for k, a, _ in calls if k == "composite error"]
    assert isinstance(composite_error[0], StepFailed)
    places = {p for _, _, p in calls}
    assert places == {"orchestra-callbacks|cell 7"}  # never the I/O thread, always our context


def test_a_raising_callback_is_reported_and_breaks_nothing(pool: orchestra.Pool) -> None:
    seen: list[int] = []

    def broken(index: int, value: int) -> None:
        if index == 1:
            raise RuntimeError("callback bug")
        seen.append(index)

    def run_both() -> None:
        h = pool.map(inc, range(3), on_item_success=broken, on_success=lambda r: seen.append(-1))
        assert h.result(HANG_GUARD) == [1, 2, 3]
        bad = pool.options(on_success=lambda v: 1 / 0).run(inc, 1)
        assert bad.result(HANG_GUARD) == 2
        assert orchestra.wait_callbacks(HANG_GUARD)

    with pytest.warns(CallbackWarning) as warned:
        run_both()
    assert sorted(seen) == [-1, 0, 2]  # the other callbacks still ran, once each
    messages = sorted(str(w.message) for w in warned)
    assert len(messages) == 2
    assert "on_item_success of inc raised RuntimeError: callback bug" in messages
    assert "on_success of inc raised ZeroDivisionError: division by zero" in messages
    assert isinstance(warned[0].message, CallbackWarning)


# --- pause / resume -----------------------------------------------------------------------------------


def test_pause_a_composite_starts_nothing_until_resumed(pool: orchestra.Pool, tmp_path: Path) -> None:
    d = str(tmp_path)
    with EventRecorder(pool, types=(JobStarted, TaskStateChanged)) as rec:
        h = Sequence(Task(gated, 0, d), Task(gated, 1, d), Task(gated, 2, d), pass_results=False).run(pool)
        wait_for(lambda: started(tmp_path) == {0}, HANG_GUARD, what="step 0 running")
        h.pause()
        assert h.paused
        release(tmp_path, 0)
        # step 0 finishes; step 1 waits at the gate instead of being submitted
        wait_for(lambda: h.held == 1, HANG_GUARD, what="step 1 held at the pause gate")
        assert states(h)["sequence / 0:gated"] is TaskState.SUCCEEDED
        assert states(h)["sequence / 1:gated"] is TaskState.PENDING  # held: not submitted
        assert pool.run(inc, 0).result(HANG_GUARD) == 1  # a barrier on the event stream
        barrier = rec.wait(lambda e: isinstance(e, JobStarted) and e.name == "inc", HANG_GUARD)[1]
        paused_until = rec.events.index(barrier)
        h.resume()
        release(tmp_path, 1)
        release(tmp_path, 2)
        assert h.result(HANG_GUARD) == 2
        wait_events(rec, lambda e: isinstance(e, JobStarted) and e.name == "gated", 3)
        gated_starts = [i for i, e in enumerate(rec.events) if isinstance(e, JobStarted) and e.name == "gated"]
        assert len(gated_starts) == 3
        assert gated_starts[0] < paused_until < gated_starts[1]  # nothing started while paused


@pytest.mark.local_only("two items running at once while the map is paused")
def test_pause_a_map_hands_out_no_new_item(pool: orchestra.Pool, tmp_path: Path) -> None:
    d = str(tmp_path)
    with EventRecorder(pool, types=(JobStarted, TaskStateChanged)) as rec:
        h = pool.map(gated, range(6), [d] * 6, chunksize=1)
        wait_for(lambda: started(tmp_path) == {0, 1}, HANG_GUARD, what="two items running")
        h.pause()
        release(tmp_path, 0)
        release(tmp_path, 1)
        for i in (0, 1):
            rec.wait(
                lambda e, i=i: (
                    isinstance(e, TaskStateChanged)
                    and e.job_id == h.job_id
                    and e.state is TaskState.SUCCEEDED
                    and e.start <= i < e.start + e.count
                ),
                HANG_GUARD,
            )
        # Both workers are free now. A barrier job: had the map handed out an item, it would
        # hold a worker (gated) and its RUNNING event would come before the barrier's.
        assert pool.run(inc, 0).result(HANG_GUARD) == 1
        barrier = rec.wait(lambda e: isinstance(e, JobStarted) and e.name == "inc", HANG_GUARD)[1]
        upto = rec.events.index(barrier)
        ran = {
            i
            for e in rec.events[:upto]
            if isinstance(e, TaskStateChanged) and e.job_id == h.job_id and e.state is TaskState.RUNNING
            for i in range(e.start, e.start + e.count)
        }
        assert ran == {0, 1}
        assert h.paused and h.counts()[TaskState.RUNNING] == 0
        assert started(tmp_path) == {0, 1}
        h.resume()
        for i in range(2, 6):
            release(tmp_path, i)
        assert h.result(HANG_GUARD) == list(range(6))


@pytest.mark.local_only("two workers held by gates opened from the test thread")
def test_a_call_on_every_worker_cannot_be_paused(pool: orchestra.Pool, tmp_path: Path) -> None:
    h = pool.run_on_all(gated, 0, str(tmp_path))
    with pytest.raises(ValueError, match=rf"job {h.job_id} \(on all workers: gated\) runs on chosen workers"):
        pool.pause_job(h.job_id)
    with pytest.raises(ValueError, match="cannot be paused"):
        h.pause()
    assert not h.paused
    release(tmp_path, 0)
    assert h.result(HANG_GUARD) == [0, 0]


# --- one circuit breaker for a group -----------------------------------------------------------------


def test_every_task_of_a_composite_goes_through_one_breaker(pool: orchestra.Pool) -> None:
    breaker = pool.circuit("group", fail_max=2, window=60, reset_timeout=600)
    group = Parallel(*[Task(always_fail, i) for i in range(5)], limit=1, return_exceptions=True)
    out = group.run(pool, circuit=breaker).result(HANG_GUARD)
    assert [type(x) for x in out[:2]] == [ValueError, ValueError]
    assert all(isinstance(x, CircuitOpenError) for x in out[2:])
    assert breaker.state.value == "open"


# --- the threads' shutdown path ------------------------------------------------------------------------


@pytest.mark.local_only("a running task is interrupted")
def test_closing_the_driver_cancels_what_runs_and_it_starts_again(pool: orchestra.Pool, tmp_path: Path) -> None:
    with EventRecorder(pool, types=(JobStarted, TaskStateChanged)) as rec:
        h = Sequence(Task(wait_forever, 0, str(tmp_path)), Task(inc)).run(pool, on_error=lambda e: None)
        wait_for(lambda: started(tmp_path) == {0}, HANG_GUARD, what="the task running")
        orchestra._driver.close()
        assert h.cancelled() and h.state is TaskState.CANCELLED
        names = {t.name for t in threading.enumerate()}
        assert "orchestra-pipelines" not in names and "orchestra-callbacks" not in names
        job = rec.wait(lambda e: isinstance(e, JobStarted) and e.name == "wait_forever")[1].job_id
        rec.wait(
            lambda e: isinstance(e, TaskStateChanged) and e.job_id == job and e.state is TaskState.CANCELLED,
            HANG_GUARD,
        )
    assert Sequence(Task(inc, 1), Task(double)).run(pool).result(HANG_GUARD) == 4  # on a new driver
