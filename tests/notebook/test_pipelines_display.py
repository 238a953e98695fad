"""How scheduled tasks and composite handles show themselves in the notebook layer.

``%orchestra status`` (its view, in this process and in a real kernel) lists the scheduled
tasks and ``%orchestra unschedule`` cancels one; a composite handle shown as a cell's value
shows its block once per cell, as a job handle does."""

from __future__ import annotations

import datetime
import textwrap

import pytest
from kernel_harness import Kernel

import orchestra_nb as orchestra
from orchestra_nb import Scheduler
from orchestra_nb.notebook._progress import StatusView
from orchestra_nb.testing import FakeClock

WALL = datetime.datetime(2030, 1, 1, 12, 0, tzinfo=datetime.UTC)


def inc(x: int) -> int:
    return x + 1


def test_the_status_view_lists_the_scheduled_tasks(pool: orchestra.Pool) -> None:
    clock = FakeClock(start=100.0, wall=WALL)
    with Scheduler(clock) as scheduler:
        refresh = scheduler.every(90, inc, 1, count=3, pool=pool, name="refresh")
        once = scheduler.run_after(5, inc, 2, pool=pool)
        view = StatusView(lambda: pool, widget=False)
        text = view.render_text()
        assert (
            f"scheduled {once.id} inc: scheduled, next in 5.0 s (12:00:05), once, runs 0/1, skipped 0" in text
        )
        assert (
            f"scheduled {refresh.id} refresh: scheduled, next in 1:30 (12:01:30), every 1:30, runs 0/3,"
            " skipped 0"
        ) in text
        assert text.index(f"scheduled {once.id} ") < text.index(f"scheduled {refresh.id} ")  # soonest first
        html = view.render()
        assert "<th>next start</th><th>period</th><th>runs</th>" in html
        assert (
            f"<tr><td>{refresh.id}</td><td>refresh</td><td>scheduled</td><td>in 1:30 (12:01:30)</td>"
            "<td>every 1:30</td><td>0/3</td><td>0</td></tr>"
        ) in html
        assert pool.cancel_scheduled(refresh.id)
        assert "refresh" not in view.render_text() and "refresh" not in view.render()
        # Before the default pool exists, what is scheduled on it is listed all the same.
        later = scheduler.run_after(60, inc, 3, name="for the default pool")
        no_pool = StatusView(lambda: None, widget=False).render_text()
        assert f"scheduled {later.id} for the default pool: scheduled, next in" in no_pool


STEPS = textwrap.dedent("""\
    import time
    from orchestra_nb import Sequence, Task
    from orchestra_nb.notebook._composite import run_composite
    def slow(i, dt=0.01):
        time.sleep(dt)
        return i
    """)


def _results(k: Kernel, mid: str) -> list[dict[str, object]]:
    return [m for m in k.for_cell(mid) if m["msg_type"] == "execute_result"]


def _blocks(k: Kernel, mid: str, name: str) -> list[str]:
    """The composite blocks (their HTML widgets) named ``name`` that cell ``mid`` opened."""
    return [c for c in k.comms(mid, "HTMLModel") if f"<b>{name}</b>" in k.state(c).get("value", "")]


@pytest.mark.kernel
@pytest.mark.timeout(120)
def test_status_lists_scheduled_tasks_and_unschedule_cancels_one(kernel: Kernel) -> None:
    k = kernel
    k.execute("s = orchestra.every(3600, abs, -1, name='hourly')")
    sid = k.value("s.id")
    mid, _ = k.execute("%orchestra status --once")
    assert f"scheduled {sid} hourly: scheduled, next in" in k.output(mid)
    assert "every 1:00:00, runs 0, skipped 0" in k.output(mid)
    (view,) = k.comms(mid, "HTMLModel")
    assert f"<td>{sid}</td><td>hourly</td><td>scheduled</td>" in k.state(view)["value"]
    mid, _ = k.execute("%orchestra unschedule hourly")
    assert k.stream(mid).strip() == "orchestra: scheduled task hourly cancelled"
    assert k.value("s.cancelled()") is True
    mid, _ = k.execute("%orchestra status --once")
    assert "hourly" not in k.output(mid)
    mid, _ = k.execute(f"%orchestra unschedule {sid}")
    assert k.stream(mid).strip() == f"orchestra: no scheduled task '{sid}' pending on the default pool"


@pytest.mark.kernel
@pytest.mark.timeout(120)
def test_a_composite_handle_as_a_cell_value_shows_its_block_once(kernel: Kernel) -> None:
    k = kernel
    k.execute(STEPS)
    # Its block is in this cell already (run_composite showed it): nothing more.
    mid, _ = k.execute("h = run_composite(Sequence(Task(slow, 1), Task(slow), name='shown'))\nh")
    assert len(_blocks(k, mid, "shown")) == 1 and _results(k, mid) == []
    # In a later cell: its one-line state, no second block.
    mid, _ = k.execute("r = await h\nh")
    assert k.stream(mid).strip() == "shown · succeeded · 2/2 tasks"
    assert _blocks(k, mid, "shown") == [] and _results(k, mid) == []
    # A handle with no block yet gets a live one.
    mid, _ = k.execute("h2 = Sequence(Task(slow, 2), name='fresh').run()\nh2")
    (block,) = _blocks(k, mid, "fresh")
    assert _results(k, mid) == []
    k.execute("r2 = await h2")
    k.wait_state(block, lambda s: "succeeded" in s.get("value", "") and "1/1 tasks" in s.get("value", ""))
    assert k.value("repr(h2)") == "<CompositeHandle 'fresh' (sequence of 1 step) succeeded 1/1 tasks failed=0>"
