"""The notebook layer in a real ipykernel: extension, widgets, background jobs, interrupts,
task output, %%orchestra, and no orphan workers. Assertions read the kernel's iopub messages."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from kernel_harness import Kernel, alive, numbers, wait_dead

pytestmark = [pytest.mark.kernel, pytest.mark.timeout(120)]

SLOW = textwrap.dedent("""\
    import os, time
    def slow(i, dt=0.05):
        time.sleep(dt)
        return os.getpid()
    """)


def _dedent(code: str) -> str:
    return textwrap.dedent(code).strip() + "\n"


def test_load_ext_injects_orchestra_and_warms_the_pool(bare_kernel: Kernel) -> None:
    k = bare_kernel
    mid, _ = k.execute("%load_ext orchestra_nb")
    text = k.stream(mid)
    assert "worker(s) starting in the background" in text and "%config Orchestra.workers" in text
    assert len(text.strip().splitlines()) == 1, text
    assert k.value("type(orchestra).__name__ == 'module' and orchestra.__name__ == 'orchestra_nb'")
    # Workers were spawned by %load_ext itself: their pids exist before any map is sent ...
    spawned = k.value("[w['pid'] for w in orchestra.status()['workers']]")
    assert spawned and all(alive(p) for p in spawned)
    # ... and they become ready in the background, with no work submitted.
    k.execute(
        _dedent("""
        import time
        __deadline = time.monotonic() + 30
        while not all(w['state'] == 'ready' for w in orchestra.status()['workers']):
            assert time.monotonic() < __deadline, orchestra.status()
            time.sleep(0.01)
        """)
    )
    ready = k.value(
        "sorted(w['pid'] for w in orchestra.status()['workers'] if w['state'] == 'ready')"
    )
    assert sorted(spawned) == ready
    # The first map runs on those warm workers: no new worker was started for it.
    k.execute(SLOW + "pids = await orchestra.map(slow, range(20), chunksize=1)")
    assert set(k.value("sorted(set(pids))")) <= set(ready)
    assert sorted(k.value("orchestra.default_pool().worker_pids()")) == ready


def test_config_resize_unload_and_reload(kernel: Kernel) -> None:
    k = kernel
    k.execute("orchestra.default_pool().wait_started(30)")
    before = k.value("orchestra.default_pool().worker_pids()")
    mid, _ = k.execute("%config Orchestra.workers = 3")
    assert "3 worker(s)" in k.stream(mid)
    k.execute("orchestra.default_pool().wait_started(30)")
    after = k.value("orchestra.default_pool().worker_pids()")
    assert len(after) == 3 and set(before) <= set(after)  # resized, the warm workers kept

    k.execute("%unload_ext orchestra_nb")
    assert wait_dead(after, 5) == []
    assert k.value("'orchestra' not in globals()")
    _, reply = k.execute("%orchestra status", ok=False)
    assert reply["status"] == "error"

    mid, _ = k.execute("%load_ext orchestra_nb")
    assert "worker(s) starting" in k.stream(mid)
    k.execute("orchestra.default_pool().wait_started(30)")
    fresh = k.value("orchestra.default_pool().worker_pids()")
    mid, _ = k.execute("%reload_ext orchestra_nb")
    assert wait_dead(fresh, 5) == []
    k.execute("orchestra.default_pool().wait_started(30)")
    assert k.value("sum(await orchestra.map(abs, range(-5, 5)))") == 25


def test_widget_reaches_final_counts_under_the_rate_limit(kernel: Kernel) -> None:
    k = kernel
    mid, _ = k.execute(
        _dedent("""
        import time
        def work(i):
            time.sleep(0.004)
            if i % 50 == 7:
                raise ValueError(f"bad item {i}")
            return i
        r = await orchestra.map(work, range(600), return_exceptions=True)
        """)
    )
    w = k.job_widgets(mid)
    final = k.wait_view(w["view"], lambda n: n["state"] == "failed")
    assert (final["succeeded"], final["failed"], final["total"]) == (588, 12, 600), final
    assert final["running"] == final["waiting"] == final["cancelled"] == 0
    # done counts successes only; zero counters are not shown
    assert "588/600 done · 12 failed · finished with errors in" in final["text"], final
    assert "cancelled" not in final["text"] and "running" not in final["text"]
    assert k.wait_state(w["button"], lambda s: s.get("disabled") is True)["description"] == "Failed"
    # At most ~10 updates per second per widget, in any one-second window.
    for comm_id in w.values():
        times = [t for t, _s, m in k.states(comm_id) if m["msg_type"] == "comm_msg"]
        worst = max((sum(1 for u in times if t <= u < t + 1.0) for t in times), default=0)
        print(f"widget {comm_id[:8]}: at most {worst} updates in any 1 s window")
        assert worst <= 12, (comm_id, worst)
    updates = [t for t, _s, m in k.states(w["view"]) if m["msg_type"] == "comm_msg"]
    assert len(updates) >= 3  # it was live, not just a final state


def test_background_job_updates_while_another_cell_runs(kernel: Kernel) -> None:
    k = kernel
    k.execute("orchestra.default_pool().wait_started(30)")
    mid1, _ = k.execute(SLOW + "h = orchestra.map(slow, range(60), [0.1] * 60, chunksize=1)")
    assert k.value("h.done()") is False  # the cell returned while the job runs
    view = k.job_widgets(mid1)["view"]
    mid2 = k.submit("time.sleep(1.2)")
    k.wait_reply(mid2)
    busy = k.wait_for(
        lambda m: (
            m["msg_type"] == "status"
            and m["parent_header"].get("msg_id") == mid2
            and m["content"]["execution_state"] == "busy"
        )
    )
    idle = k.wait_for(
        lambda m: (
            m["msg_type"] == "status"
            and m["parent_header"].get("msg_id") == mid2
            and m["content"]["execution_state"] == "idle"
        )
    )
    t_busy = next(t for t, m in k.snapshot() if m is busy)
    t_idle = next(t for t, m in k.snapshot() if m is idle)
    during = [
        numbers(s["value"])["succeeded"]
        for t, s, _m in k.states(view)
        if t_busy < t < t_idle and "value" in s
    ]
    assert len(during) >= 3 and during == sorted(during) and during[-1] > during[0], during
    mid3, _ = k.execute("r = await h\nprint(len(r), h.counts()[orchestra.TaskState.SUCCEEDED])")
    assert k.stream(mid3).split() == ["60", "60"]
    final = k.wait_view(view, lambda n: n["state"] == "done")
    assert final["succeeded"] == 60 and final["text"].startswith("slow 60/60 done · done in")


def _wait_lines(path: Path, n: int, timeout: float = 30) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        lines = path.read_text().split() if path.exists() else []
        if len(lines) >= n:
            return lines
        assert time.monotonic() < deadline, f"only {lines} started"
        time.sleep(0.005)


STARTS = """\
import os, time
def task(i, log={log!r}):
    with open(log, "a") as f:
        f.write(f"{{i}}\\n")
    time.sleep(30)
    return i
"""


def test_interrupt_cancels_within_half_a_second_and_keeps_the_pool_warm(
    kernel: Kernel, tmp_path: Path
) -> None:
    k = kernel
    log = tmp_path / "started.txt"
    k.execute("orchestra.default_pool().wait_started(30)")
    pids = k.value("sorted(orchestra.default_pool().worker_pids())")
    k.execute(STARTS.format(log=str(log)))
    mid = k.submit("h = orchestra.map(task, range(50), chunksize=1)\nawait h")
    started = _wait_lines(log, 2)  # both workers are inside a task; the rest is queued
    t0 = time.monotonic()
    k.km.interrupt_kernel()
    t_reply, reply = k.wait_reply(mid, timeout=10)
    latency = t_reply - t0
    print(f"interrupt latency: {latency * 1000:.0f} ms")
    assert reply["status"] == "error" and reply["ename"] == "JobInterrupted"
    assert latency < 0.5, f"the interrupted cell replied after {latency:.3f} s"
    k.wait_idle(mid)
    assert k.value("h.wait_finished(10)") is True
    assert k.value("h.counts()[orchestra.TaskState.CANCELLED]") == 50
    # The next map runs at once on the same warm workers ...
    k.execute(SLOW + "pids2 = await orchestra.map(slow, range(40), chunksize=1)")
    assert set(k.value("sorted(set(pids2))")) <= set(pids)
    assert sorted(k.value("orchestra.default_pool().worker_pids()")) == pids
    # ... and nothing of the interrupted job started after the interrupt.
    assert sorted(log.read_text().split()) == sorted(started)


def test_second_interrupt_kills_busy_workers(kernel: Kernel, tmp_path: Path) -> None:
    k = kernel
    log = tmp_path / "started.txt"
    k.execute("%config Orchestra.cancel_grace = 60.0")  # a stubborn task would hold its worker
    k.execute("orchestra.default_pool().wait_started(30)")
    pids = k.value("sorted(orchestra.default_pool().worker_pids())")
    k.execute(
        _dedent(f"""
        import time
        def stubborn(i, log={str(log)!r}):
            with open(log, "a") as f:
                f.write(f"{{i}}\\n")
            end = time.monotonic() + 60
            while time.monotonic() < end:
                try:
                    time.sleep(0.01)
                except KeyboardInterrupt:
                    pass  # ignores the cancel
        """)
    )
    mid = k.submit("h = orchestra.map(stubborn, range(10), chunksize=1)\nawait h")
    _wait_lines(log, 2)
    k.km.interrupt_kernel()
    _, reply = k.wait_reply(mid, timeout=10)
    assert reply["ename"] == "JobInterrupted"
    k.wait_idle(mid)
    assert k.value("h.finished()") is False  # the tasks ignore KeyboardInterrupt
    k.km.interrupt_kernel()  # the second one, within 2 s: kill the busy workers
    assert wait_dead(pids, 5) == []
    assert k.value("h.wait_finished(10)") is True
    k.execute("orchestra.default_pool().wait_started(30)")
    new = k.value("orchestra.default_pool().worker_pids()")
    assert len(new) == 2 and not set(new) & set(pids)
    assert k.value("sum(await orchestra.map(abs, range(10)))") == 45


def test_cancel_button_cancels_background_and_awaited_jobs(kernel: Kernel) -> None:
    k = kernel
    k.execute("orchestra.default_pool().wait_started(30)")
    k.execute(SLOW)
    mid1, _ = k.execute("bg = orchestra.map(slow, range(200), [0.05] * 200, chunksize=1)")
    w = k.job_widgets(mid1)
    k.wait_view(w["view"], lambda n: n["succeeded"] >= 2)
    k.click(w["button"])
    k.wait_state(w["button"], lambda s: s.get("description") == "Cancelled")
    assert k.value("bg.wait_finished(10) and bg.cancelled()") is True
    final = k.wait_view(w["view"], lambda n: n["state"] == "cancelled")
    done = k.value("bg.counts()[orchestra.TaskState.SUCCEEDED]")
    assert final["succeeded"] == done and 2 <= done < 200  # done = successes, not 200/200
    assert final["cancelled"] == 200 - done
    assert f"{done}/200 done · {200 - done} cancelled · cancelled in" in final["text"], final

    # The same while the cell awaits the job (ipykernel handles comm messages meanwhile).
    mid2 = k.submit("fg = orchestra.map(slow, range(200), [0.05] * 200, chunksize=1)\nawait fg")
    k.wait_for(
        lambda m: (
            m["msg_type"] == "comm_open"
            and m["parent_header"].get("msg_id") == mid2
            and m["content"]["data"]["state"].get("_model_name") == "ButtonModel"
        )
    )
    w2 = k.job_widgets(mid2)
    k.wait_view(w2["view"], lambda n: n["succeeded"] >= 2)
    k.click(w2["button"])
    _, reply = k.wait_reply(mid2, timeout=10)
    assert reply["status"] == "error" and reply["ename"] == "JobCancelled"
    assert k.value("fg.wait_finished(10) and fg.cancelled()") is True


def test_task_prints_arrive_under_the_launching_cell(kernel: Kernel) -> None:
    k = kernel
    k.execute("orchestra.default_pool().wait_started(30)")
    k.execute(
        _dedent("""
        import sys, time
        def chatty(i):
            print(f"out-{i}")
            print(f"err-{i}", file=sys.stderr)
            time.sleep(0.02)
            return i
        def flood(i):
            for j in range(100):
                print(f"line {i}.{j}")
            return i
        """)
    )
    mid1, _ = k.execute("h = orchestra.map(chatty, range(30), chunksize=1)")
    mid2, _ = k.execute("time.sleep(0.3)\nprint('cell two')")  # runs while the job prints
    k.execute("await h")
    # All of it under the launching cell, each line tagged with its worker and item: while
    # the cell ran, as its stream output; after it ended, in its display for later output
    # (both saved by headless runs too). None of it in cell two.
    def printed() -> str:
        return k.stream(mid1) + k.late_output(mid1)

    deadline = time.monotonic() + 30
    while not all(f"] out-{i}\n" in printed() and f"] err-{i}\n" in printed() for i in range(30)):
        assert time.monotonic() < deadline, printed()
        time.sleep(0.01)
    for i in range(30):
        assert f"item {i}] out-{i}\n" in printed()
    assert k.late_output(mid1), "the job ran on after its cell"
    assert not [line for line in k.stream(mid1, "stdout").splitlines() if "err-" in line]
    assert not [line for line in k.stream(mid1, "stderr").splitlines() if "out-" in line]
    lines = printed().splitlines()
    assert all(line.startswith("[w") and " item " in line for line in lines), lines[:3]
    assert printed().count("out-") == 30 and printed().count("err-") == 30
    assert "out-" not in k.stream(mid2) and k.stream(mid2) == "cell two\n"
    assert k.late_output(mid2) == ""

    # A flood is capped (200 lines per job) and rate-limited.
    mid3, _ = k.execute(
        "%config Orchestra.output_max_lines = 50\nawait orchestra.map(flood, range(20))"
    )
    # The awaited job finished inside its cell: all of its output came before the cell's end.
    assert len(k.stream(mid3, "stdout").splitlines()) == 50
    assert "1950 more line(s)" in k.stream(mid3, "stderr")
    times = [t for t, m in k.snapshot() if m["msg_type"] == "stream"
             and m["parent_header"].get("msg_id") == mid3]
    assert max(sum(1 for u in times if t <= u < t + 1.0) for t in times) <= 24


def test_errors_show_worker_frames_and_cell_source(kernel: Kernel) -> None:
    k = kernel
    mid, reply = k.execute(
        _dedent("""
        def inner(x):
            scale = 10
            return scale / (x - 3)
        def outer(x):
            return inner(x) + 1
        await orchestra.map(outer, range(5))
        """),
        ok=False,
    )
    assert reply["ename"] == "ZeroDivisionError"
    text = k.output(mid)
    assert "return scale / (x - 3)" in text.split("The above exception")[0]
    assert "return inner(x) + 1" in text.split("The above exception")[0]
    assert "raised in worker" in text and "task 3" in text


def test_orchestra_cell_magic_forms(kernel: Kernel) -> None:
    k = kernel
    k.execute("orchestra.default_pool().wait_started(30)")
    k.execute(
        _dedent("""
        %%orchestra --all
        import os, sys
        SETUP_PID = os.getpid()
        def helper(x):
            return x * 10
        print("setup on", os.getpid())
        """)
    )
    pids = k.value("sorted(orchestra.default_pool().worker_pids())")
    # Foreground: prints stream into the cell, -o copies names back, trailing expression = value.
    mid, _ = k.execute(
        _dedent("""
        %%orchestra -o a,b
        a = helper(4)
        b = [SETUP_PID == os.getpid()]
        print("remote print from", os.getpid())
        os.getpid()
        """)
    )
    assert k.value("[a, b]") == [40, [True]]
    assert "remote print from" in k.stream(mid, "stdout")
    result = [m for m in k.for_cell(mid) if m["msg_type"] == "execute_result"]
    assert result and int(result[0]["content"]["data"]["text/plain"]) in pids
    # The same worker serves the next cell: its names persist.
    k.execute("%%orchestra\nremembered = a_local = 7")
    assert k.value("await orchestra.default_pool().run(abs, 1)") == 1
    mid, _ = k.execute("%%orchestra -o back\nback = remembered * 6")
    assert k.value("back") == 42
    # Errors show the remote cell's source lines.
    mid, reply = k.execute("%%orchestra\nx = 1\nraise KeyError('nope')", ok=False)
    assert reply["ename"] == "KeyError" and "raise KeyError('nope')" in k.output(mid)
    # ... and only those: not the rewritten cell (`await __orchestra_cell__(...)`) or orchestra.
    assert "__orchestra_cell__" not in k.output(mid) and "_magics.py" not in k.output(mid)
    # --bg NAME: a background job bound to NAME.
    mid, _ = k.execute("%%orchestra --bg job\nimport time\ntime.sleep(0.2)\nhelper(5)")
    assert k.value("type(job).__name__") == "TaskHandle"
    assert k.value("await job") == 50
    # --all is replayed on a worker started later: kill one, its replacement has the setup.
    os.kill(pids[0], signal.SIGKILL)
    assert wait_dead([pids[0]], 5) == []
    k.execute(
        _dedent(f"""
        import time
        __deadline = time.monotonic() + 30
        def __respawned():
            now = orchestra.default_pool().worker_pids()
            return len(now) == 2 and {pids[0]} not in now
        while not __respawned():
            assert time.monotonic() < __deadline
            time.sleep(0.01)
        orchestra.default_pool().wait_started(30)
        def probe():
            import os, sys
            ns = sys.modules['__orchestra_main__'].__dict__
            return os.getpid(), ns.get('SETUP_PID') == os.getpid(), ns['helper'](2)
        checks = await orchestra.run_on_all(probe)
        """)
    )
    checks = k.value("checks")
    assert len(checks) == 2 and pids[0] not in [c[0] for c in checks]
    assert all(c[1] is True and c[2] == 20 for c in checks), checks


def test_orchestra_cell_is_interruptible(kernel: Kernel) -> None:
    k = kernel
    k.execute("orchestra.default_pool().wait_started(30)")
    mid = k.submit("%%orchestra\nimport time\nprint('sleeping', flush=True)\ntime.sleep(30)")
    k.wait_for(
        lambda m: (
            m["msg_type"] == "stream"
            and m["parent_header"].get("msg_id") == mid
            and "sleeping" in m["content"]["text"]
        )
    )
    t0 = time.monotonic()
    k.km.interrupt_kernel()
    t, reply = k.wait_reply(mid, timeout=10)
    assert reply["ename"] == "JobInterrupted" and t - t0 < 0.5
    assert "__orchestra_cell__" not in "\n".join(reply["traceback"])  # no kernel frames
    k.wait_idle(mid)
    assert k.value("sum(await orchestra.map(abs, range(4)))") == 6


def test_status_view(kernel: Kernel) -> None:
    k = kernel
    k.execute("orchestra.default_pool().wait_started(30)")
    k.execute(SLOW + "h = orchestra.map(slow, range(40), [0.1] * 40, chunksize=1, name='sweep')")
    mid, _ = k.execute("%orchestra status")
    html = k.comms(mid, "HTMLModel")[0]
    pids = k.value("orchestra.default_pool().worker_pids()")
    state = k.wait_state(
        html, lambda s: "sweep" in s.get("value", "") and "MiB" in s.get("value", "")
    )
    assert all(str(p) in state["value"] for p in pids)
    assert "%" in state["value"]  # CPU column
    mid, _ = k.execute("%orchestra status --once")
    k.execute("h.cancel(); h.wait_finished(10)")


def test_kernel_shutdown_and_sigkill_leave_no_worker() -> None:
    for how in ("shutdown", "sigkill"):
        k = Kernel()
        try:
            k.execute("%load_ext orchestra_nb")
            k.execute("orchestra.default_pool().wait_started(30)")
            pids = k.value("orchestra.default_pool().worker_pids()")
            assert pids and all(alive(p) for p in pids)
            if how == "sigkill":
                os.kill(k.pid, signal.SIGKILL)
                t0 = time.monotonic()
            else:
                k._stop = True
                k._drain_thread.join(2)
                k.kc.stop_channels()
                t0 = time.monotonic()
                k.km.shutdown_kernel()
            left = wait_dead(pids, 2.0)
            assert left == [], f"{how}: workers {left} alive {time.monotonic() - t0:.2f} s later"
        finally:
            k.shutdown(now=True)


def test_text_fallback_in_terminal_ipython_and_scripts(tmp_path: Path) -> None:
    code = _dedent("""
        %load_ext orchestra_nb
        import time
        def f(x):
            print("printed", x)
            return x * 2
        h = orchestra.map(f, range(10))
        r = h.result()
        assert r == [x * 2 for x in range(10)], r
        h._ipython_display_()
        %orchestra status --once
        """)
    script = tmp_path / "session.ipy"
    script.write_text(code)
    proc = subprocess.run(
        [sys.executable, "-m", "IPython", "--no-banner", "--quick", str(script)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    assert "[########################] f: 10/10" in proc.stdout
    assert "orchestra pool: running" in proc.stdout
    # A plain script: no extension, a displayed handle is its repr.
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "import orchestra_nb as o; h = o.map(abs, range(3)); h.result(); h._ipython_display_()",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0 and "MapHandle" in proc.stdout, proc.stdout + proc.stderr
