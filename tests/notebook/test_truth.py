"""The notebook tells the truth: what a stopped job raises and keeps, failure tables,
tracebacks trimmed to the user's code, names from %%orchestra --all, hints. Real ipykernel."""

from __future__ import annotations

import re
import textwrap
import time
from pathlib import Path

import pytest
from kernel_harness import Kernel

pytestmark = [pytest.mark.kernel, pytest.mark.timeout(120)]


def _dedent(code: str) -> str:
    return textwrap.dedent(code).strip() + "\n"


def _wait_lines(path: Path, n: int, timeout: float = 30) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        lines = path.read_text().split() if path.exists() else []
        if len(lines) >= n:
            return lines
        assert time.monotonic() < deadline, f"only {lines} started"
        time.sleep(0.005)


# Items below 5 return at once; the others record that they started, then sleep.
TASK = """\
import time
def task(i, log={log!r}):
    if i < 5:
        return i * 10
    with open(log, "a") as f:
        f.write(f"{{i}}\\n")
    time.sleep(30)
    return i
"""


@pytest.mark.parametrize("form", ["await", "result"])
def test_interrupt_raises_keyboard_interrupt_with_partial_results(
    kernel: Kernel, tmp_path: Path, form: str
) -> None:
    k = kernel
    log = tmp_path / "started.txt"
    k.execute("orchestra.default_pool().wait_started(30)")
    k.execute(TASK.format(log=str(log)))
    wait = "await h" if form == "await" else "h.result()"
    mid = k.submit(
        "h = orchestra.map(task, range(40), chunksize=1)\n"
        f"try:\n    res = {wait}\nexcept KeyboardInterrupt as exc:\n    caught = exc\n    raise\n"
    )
    _wait_lines(log, 2)  # both workers are inside a slow task: items 0..4 are done
    k.km.interrupt_kernel()
    _, reply = k.wait_reply(mid, timeout=10)
    k.wait_idle(mid)
    assert reply["status"] == "error" and reply["ename"] == "JobInterrupted", reply
    # (the results of items 0..4 may still be on their way when the interrupt lands)
    said = re.search(r"'task' was interrupted and cancelled: (\d) of 40 items done", reply["evalue"])
    assert said and int(said.group(1)) <= 5, reply["evalue"]
    assert "exc.handle.partial_results()" in reply["evalue"]
    assert k.value("isinstance(caught, KeyboardInterrupt) and caught.handle is h") is True
    assert k.value("caught.handle.wait_finished(10)") is True
    partial = k.value("[r if r is not orchestra.MISSING else 'MISSING' for r in "
                      "caught.handle.partial_results()]")
    assert partial == [0, 10, 20, 30, 40] + ["MISSING"] * 35
    assert k.value("caught.handle.partial_results(fill=None)[5:]") == [None] * 35
    # Only the user's line shows: no frame of orchestra's own code.
    text = "\n".join(reply["traceback"])
    assert "_handles.py" not in text and "_jobs.py" not in text, text


def test_cancel_button_raises_job_cancelled_carrying_the_handle(kernel: Kernel) -> None:
    k = kernel
    k.execute("orchestra.default_pool().wait_started(30)")
    k.execute(
        _dedent("""
        import time
        def slow(i):
            time.sleep(0.05)
            return i
        """)
    )
    mid = k.submit(
        "fg = orchestra.map(slow, range(200), chunksize=1)\n"
        "try:\n    await fg\nexcept orchestra.JobCancelled as exc:\n    caught = exc\n    raise\n"
    )
    w = k.job_widgets(mid)
    k.wait_view(w["view"], lambda n: n["succeeded"] >= 4)
    k.click(w["button"])
    _, reply = k.wait_reply(mid, timeout=10)
    k.wait_idle(mid)
    assert reply["ename"] == "JobCancelled", reply
    assert "'slow' was cancelled (the Cancel button)" in reply["evalue"], reply["evalue"]
    assert "of 200 items done" in reply["evalue"]
    assert k.value("caught.handle is fg and fg.wait_finished(10)") is True
    done = k.value("fg.counts()[orchestra.TaskState.SUCCEEDED]")
    partial = k.value("[r for r in caught.handle.partial_results() if r is not orchestra.MISSING]")
    assert done >= 4 and len(partial) == done
    text = "\n".join(reply["traceback"])
    assert "_handles.py" not in text, text


def test_failures_table_and_retry_failed_through_the_exception(kernel: Kernel) -> None:
    k = kernel
    k.execute(
        _dedent("""
        FLAKY = {3, 7}
        def picky(i):
            if i in FLAKY:
                raise ValueError(f"item {i} is bad")
            return i * i
        h = orchestra.map(picky, list(range(10)))
        try:
            await h
        except ValueError as exc:
            err = exc
        """)
    )
    rows = k.value("[(f.index, f.input, type(f.exception).__name__, f.attempts, "
                   "f.worker in (1, 2), f.duration is not None) for f in h.failures()]")
    assert rows == [[3, 3, "ValueError", 1, True, True], [7, 7, "ValueError", 1, True, True]]
    durations = k.value("[f.duration_text for f in h.failures()]")
    mid, _ = k.execute("h.failures()")
    [shown] = [m["content"]["data"] for m in k.for_cell(mid) if m["msg_type"] == "execute_result"]
    html, text = shown.get("text/html", ""), shown["text/plain"]
    assert "<table>" in html and "item 3 is bad" in html and "<th>duration</th>" in html
    assert all(f"<td>{d}</td>" in html and d in text for d in durations), (durations, html)
    assert "duration" in text and "item 7 is bad" in text, text
    # The error raised by the awaited map says where the table is.
    assert "handle.failures()" in k.value("'\\n'.join(err.__notes__)")
    k.execute("FLAKY.clear()")  # the cause is fixed: rerun only the failed items
    assert k.value("await h.retry_failed()") == [9, 49]


def test_one_widget_per_job_and_its_saved_text_is_the_final_state(kernel: Kernel) -> None:
    k = kernel
    k.execute("orchestra.default_pool().wait_started(30)")
    k.execute(
        _dedent("""
        import time
        def slow(i):
            time.sleep(0.02)
            if i == 3:
                raise ValueError("bad")
            return i
        """)
    )
    # The handle is the cell's value: still one widget.
    mid, _ = k.execute("h = orchestra.map(slow, range(40), chunksize=1, return_exceptions=True)\nh")
    assert len(k.comms(mid, "HTMLModel")) == 1 and len(k.comms(mid, "ButtonModel")) == 1
    shown = [m for m in k.for_cell(mid) if m["msg_type"] == "display_data"
             and "application/vnd.jupyter.widget-view+json" in m["content"]["data"]]
    assert len(shown) == 1 and not [m for m in k.for_cell(mid) if m["msg_type"] == "execute_result"]
    display_id = shown[0]["content"]["transient"]["display_id"]
    k.execute("r = await h")
    # When the job ends, the display's text form (what a saved notebook keeps where the
    # widget cannot render) becomes the final state, in one line (at the cell's end, it
    # said how far the job had got).
    updates = [m["content"]["data"]["text/plain"] for m in k.for_cell(mid)
               if m["msg_type"] == "update_display_data"
               and m["content"]["transient"]["display_id"] == display_id]
    assert updates and updates[0].endswith(" · still running when its cell ended"), updates
    assert updates[0].startswith("[") and "slow: " in updates[0] and "\n" not in updates[0]
    update = k.wait_for(
        lambda m: m["msg_type"] == "update_display_data"
        and m["content"]["transient"]["display_id"] == display_id
        and "still running" not in m["content"]["data"]["text/plain"]
    )
    text = update["content"]["data"]["text/plain"]
    assert "\n" not in text and text.startswith("[")
    assert "slow: 39/40 done · 1 failed · finished with errors in" in text, text
    assert "VBox" not in text and "HBox" not in text
    # Shown again in a later cell: the job's line, not a second widget.
    mid, _ = k.execute("h")
    assert not k.comms(mid) and "slow: 39/40 done · 1 failed" in k.stream(mid)


def test_kill_is_explained_while_a_cancel_waits_for_running_tasks(kernel: Kernel) -> None:
    k = kernel
    k.execute("%config Orchestra.cancel_grace = 60.0")
    k.execute("orchestra.default_pool().wait_started(30)")
    k.execute(
        _dedent("""
        import time
        def stubborn(i):
            end = time.monotonic() + 60
            while time.monotonic() < end:
                try:
                    time.sleep(0.01)
                except KeyboardInterrupt:
                    pass
        """)
    )
    mid, _ = k.execute("h = orchestra.map(stubborn, range(4), chunksize=1)")
    w = k.job_widgets(mid)
    k.wait_view(w["view"], lambda n: n["running"] == 2)
    live = k.state(w["view"])["value"]
    assert "animation:orchestra-stale" in live  # a running view greys out if its updates stop
    k.click(w["button"])
    button = k.wait_state(w["button"], lambda s: s.get("description") == "Kill")
    assert "kill their workers" in button["tooltip"]
    view = k.wait_view(w["view"], lambda n: "cancelling" in n["text"])
    assert "2 still running (Kill stops their workers now)" in view["text"], view
    k.click(w["button"])  # the second click kills them
    final = k.wait_view(w["view"], lambda n: n["state"] == "cancelled", timeout=30)
    assert "animation:orchestra-stale" not in k.state(w["view"])["value"]  # a final view is not live
    assert final["succeeded"] == 0 and "0/4 done · 4 cancelled" in final["text"]


def test_setup_cell_names_reach_mapped_notebook_functions(kernel: Kernel) -> None:
    k = kernel
    k.execute("orchestra.default_pool().wait_started(30)")
    k.execute(
        _dedent("""
        %%orchestra --all
        import os
        TABLE = {i: i * 100 for i in range(10)}
        OFFSET = 1
        """)
    )
    k.execute(
        _dedent("""
        OFFSET = 5  # the notebook's own value wins over the worker's
        def lookup(i):
            return TABLE[i] + OFFSET
        def where(_):
            return os.getpid()
        """)
    )
    assert k.value("await orchestra.map(lookup, range(4))") == [5, 105, 205, 305]
    # After a crash, the replacement worker replays the setup and serves the same map.
    pids = k.value("sorted(orchestra.default_pool().worker_pids())")
    k.execute(f"import os, signal; os.kill({pids[0]}, signal.SIGKILL)")
    k.execute(
        _dedent(f"""
        import time
        __deadline = time.monotonic() + 30
        while {pids[0]} in orchestra.default_pool().worker_pids() or \\
                len(orchestra.default_pool().worker_pids()) < 2:
            assert time.monotonic() < __deadline
            time.sleep(0.01)
        orchestra.default_pool().wait_started(30)
        """)
    )
    new = k.value("sorted(orchestra.default_pool().worker_pids())")
    assert pids[0] not in new
    got = k.value("await orchestra.map(lookup, range(10), chunksize=1)")
    assert got == [i * 100 + 5 for i in range(10)]
    assert set(k.value("await orchestra.map(where, range(20), chunksize=1)")) <= set(new)
    # A name in neither place: the NameError says where it looked.
    mid, reply = k.execute("def broken(i):\n    return NOWHERE[i]\nawait orchestra.map(broken, [1])",
                           ok=False)
    assert reply["ename"] == "NameError"
    assert "looked for 'NOWHERE' in the notebook's globals" in k.output(mid)
    assert "%%orchestra namespace (__orchestra_main__)" in k.output(mid)


def test_discoverability(kernel: Kernel) -> None:
    k = kernel
    mid, _ = k.execute("%config Orchestra")
    assert "Current: 2" in k.stream(mid), k.stream(mid)  # the real worker count
    assert k.value("'chunksize' in str(__import__('inspect').signature(orchestra.map))")
    assert k.value("'chunksize' in orchestra.map.__doc__ and 'retries' in orchestra.map.__doc__")
    assert k.value("[n for n in dir(orchestra) if n in ('annotations', 'Any', 'importlib')]") == []
    mid, reply = k.execute("h = orchestra.map(abs, range(3))\nh[0]", ok=False)
    assert reply["ename"] == "TypeError"
    assert "did you forget `await` or `.result()`?" in reply["evalue"]


def test_interrupting_an_awaited_run_raises_keyboard_interrupt(kernel: Kernel, tmp_path: Path) -> None:
    k = kernel
    log = tmp_path / "started.txt"
    k.execute("orchestra.default_pool().wait_started(30)")
    k.execute(TASK.format(log=str(log)))
    mid = k.submit("t = orchestra.run(task, 7)\nawait t")
    _wait_lines(log, 1)
    k.km.interrupt_kernel()
    _, reply = k.wait_reply(mid, timeout=10)
    k.wait_idle(mid)
    assert reply["ename"] == "JobInterrupted", reply
    assert "'task' was interrupted and cancelled: 0 of 1 item done" in reply["evalue"], reply
    assert k.value("t.wait_finished(10) and t.cancelled()") is True
