"""The side panel's kernel side (orchestra_nb/notebook/_panel.py) in a real ipykernel, spoken
to as the labextension does: a comm to ``orchestra_nb.panel`` (messages in docs/panel.md)."""

from __future__ import annotations

import textwrap
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from kernel_harness import Kernel

pytestmark = [pytest.mark.kernel, pytest.mark.timeout(180)]

TARGET = "orchestra_nb.panel"
HANG_GUARD = 60.0

TASKS = textwrap.dedent("""\
    import time
    def slow(i, dt=0.05):
        time.sleep(dt)
        return i
    def fails_on_odd(i):
        if i % 2:
            raise ValueError(f"odd item {i}")
        return i
    def forever(i):
        time.sleep(600)
    def gated(i, d):
        # marks itself started, then waits for the test to write d/release-<i>
        import os
        open(os.path.join(d, f"started-{i}"), "w").close()
        deadline = time.monotonic() + 120
        while not os.path.exists(os.path.join(d, f"release-{i}")) and time.monotonic() < deadline:
            time.sleep(0.005)
        return i
    """)


class Panel:
    """One comm to the panel target, opened from the test as the front end opens it."""

    def __init__(self, kernel: Kernel, hello: dict[str, Any] | None = None) -> None:
        self.k = kernel
        self.comm_id = uuid.uuid4().hex
        data = {"type": "hello", "version": 2} if hello is None else hello
        self._send("comm_open", {"comm_id": self.comm_id, "target_name": TARGET, "data": data})

    def _send(self, msg_type: str, content: dict[str, Any]) -> None:
        self.k.kc.shell_channel.send(self.k.kc.session.msg(msg_type, content))

    def send(self, data: dict[str, Any]) -> None:
        self._send("comm_msg", {"comm_id": self.comm_id, "data": data})

    def close(self) -> None:
        self._send("comm_close", {"comm_id": self.comm_id, "data": {}})

    def messages(self, kind: str | None = None) -> list[tuple[float, dict[str, Any]]]:
        out = []
        for t, m in self.k.snapshot():
            c = m["content"]
            if (m["msg_type"] == "comm_msg" and c.get("comm_id") == self.comm_id
                    and (kind is None or c["data"].get("type") == kind)):
                out.append((t, c["data"]))
        return out

    def closed(self) -> bool:
        return any(
            m["msg_type"] == "comm_close" and m["content"].get("comm_id") == self.comm_id
            for _, m in self.k.snapshot()
        )

    def wait(self, kind: str, pred: Callable[[dict[str, Any]], bool] = lambda d: True) -> dict[str, Any]:
        deadline = time.monotonic() + HANG_GUARD
        while True:
            for _, data in self.messages(kind):
                if pred(data):
                    return data
            if time.monotonic() > deadline:
                last = self.messages(kind)[-1:] or self.messages()[-1:]
                raise TimeoutError(f"no {kind!r} message matched; last: {last}")
            time.sleep(0.01)

    def wait_job(self, job_id: int, pred: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        state = self.wait("state", lambda d: any(j["id"] == job_id and pred(j) for j in d["jobs"]))
        return next(j for j in state["jobs"] if j["id"] == job_id)


def pool_named(state: dict[str, Any], name: str) -> dict[str, Any]:
    return next(p for p in state["pools"] if p["name"] == name)


def default(state: dict[str, Any]) -> dict[str, Any]:
    """The default pool's entry of a state message (listed first)."""
    assert state["pools"] and state["pools"][0]["default"] is True, state["pools"]
    return state["pools"][0]


def ready_workers(pool: dict[str, Any]) -> int:
    return sum(w["activity"] in ("idle", "busy") for w in pool["workers"])


def panel_threads(k: Kernel) -> list[str]:
    return k.value("[t.name for t in __import__('threading').enumerate() if t.name == 'orchestra-panel']")


def test_ten_jobs_stay_under_the_message_budget_and_end_final(kernel: Kernel) -> None:
    k = kernel
    k.execute("orchestra.default_pool().wait_started(30)")
    k.execute(TASKS)
    assert panel_threads(k) == []  # nothing runs for a panel until one opens
    panel = Panel(k)
    first = panel.wait("state")
    assert first["version"] == 2 and [p["name"] for p in first["pools"]] == ["default"]
    pool = default(first)
    assert pool["backend"] == "local" and pool["id"] == k.value("orchestra.default_pool().id")
    assert pool["target_workers"] == 2 and len(pool["workers"]) == 2
    assert {w["activity"] for w in pool["workers"]} <= {"idle", "busy", "starting"}
    assert pool["can_pause"] is True and pool["pause_reason"] == ""
    assert pool["can_resize"] is True and pool["resize_reason"] == ""
    assert panel_threads(k) == ["orchestra-panel"]

    k.execute("jobs = [orchestra.map(slow, range(30), chunksize=1) for _ in range(10)]")
    ids = k.value("[h.job_id for h in jobs]")
    k.execute("for h in jobs: h.wait_finished(120)", timeout=150)
    # The final state of every job reaches the panel, newest first.
    final = panel.wait("state", lambda d: all(
        any(j["id"] == i and j["finished"] and j["done"] == 30 for j in d["jobs"]) for i in ids))
    shown = [j["id"] for j in final["jobs"] if j["id"] in ids]
    assert shown == sorted(ids, reverse=True)
    assert all(j["counts"]["SUCCEEDED"] == 30 and not j["cancelled"] and not j["paused"]
               and j["pool"] == pool["id"] for j in final["jobs"] if j["id"] in ids)

    states = panel.messages("state")
    during = [(t, d) for t, d in states if any(j["id"] in ids and not j["finished"] for j in d["jobs"])]
    assert len(during) >= 2, "the run was too short to see it progress"
    # counts rise from one state to the next
    done_of_last = [next(j["done"] for j in d["jobs"] if j["id"] == ids[-1]) for _, d in during
                    if any(j["id"] == ids[-1] for j in d["jobs"])]
    assert done_of_last == sorted(done_of_last) and done_of_last[-1] > done_of_last[0]
    seqs = [d["seq"] for _, d in states]
    assert seqs == list(range(1, len(seqs) + 1))
    # The budget: the panel's comm carries < 20 messages per second with 10 jobs running
    # (the cells' own progress widgets are other comms, throttled on their own).
    window = during[-1][0] - during[0][0]
    mine = [t for t, _ in panel.messages() if during[0][0] <= t <= during[-1][0]]
    rate = (len(mine) - 1) / window
    print(f"panel: {len(mine)} messages over {window:.2f} s with 10 jobs: {rate:.1f}/s")
    assert rate < 20, rate

    panel.close()
    k.execute("import orchestra_nb.notebook._panel as P")
    assert k.value("P.open_panels()") == 0
    assert panel_threads(k) == []


def test_cancel_resize_failures_and_catch_up(kernel: Kernel) -> None:
    k = kernel
    k.execute("orchestra.default_pool().wait_started(30)")
    k.execute(TASKS)
    # Jobs that started (and one that ended) before the panel opened are shown at once.
    k.execute("failing = orchestra.map(fails_on_odd, range(6), return_exceptions=True)\n"
              "failing.wait_finished(30)\n"
              "bg = orchestra.map(forever, range(8), chunksize=1)")
    failing_id, bg_id = k.value("[failing.job_id, bg.job_id]")
    panel = Panel(k)
    failing = panel.wait_job(failing_id, lambda j: j["finished"])
    assert failing["counts"]["FAILED"] == 3 and failing["counts"]["SUCCEEDED"] == 3
    assert [(f["item"], f["type"], f["message"]) for f in failing["failures"]] == [
        (1, "ValueError", "odd item 1"), (3, "ValueError", "odd item 3"), (5, "ValueError", "odd item 5")]
    panel.wait_job(bg_id, lambda j: j["counts"]["RUNNING"] == 2 and not j["finished"])
    state = panel.wait("state", lambda d: sum(w["activity"] == "busy" for w in default(d)["workers"]) == 2)
    assert {w["job"] for w in default(state)["workers"]} == {bg_id}

    # Show a traceback.
    panel.send({"type": "traceback", "job_id": failing_id, "item": 3})
    tb = panel.wait("traceback")
    assert tb["item"] == 3 and tb["exception"] == "ValueError: odd item 3"
    assert "fails_on_odd" in tb["text"] and "odd item 3" in tb["text"]

    # Cancel from the panel: the job ends cancelled, and the handle says so too.
    panel.send({"type": "cancel", "job_id": bg_id})
    assert panel.wait("result", lambda d: d["request"] == "cancel") == {
        "type": "result", "request": "cancel", "ok": True, "message": "cancelling", "job_id": bg_id}
    ended = panel.wait_job(bg_id, lambda j: j["finished"])
    assert ended["cancelled"] and ended["counts"]["CANCELLED"] == 8
    assert k.value("bg.wait_finished(30) and bg.cancelled()") is True
    panel.send({"type": "cancel", "job_id": bg_id})
    assert panel.wait("result", lambda d: d["request"] == "cancel" and not d["ok"])["message"] == (
        f"job {bg_id} is not running")

    # Resize from the panel.
    pool_id = k.value("orchestra.default_pool().id")
    panel.send({"type": "resize", "pool": pool_id, "workers": 3})
    panel.wait("result", lambda d: d["request"] == "resize" and d["ok"])
    grown = panel.wait("state", lambda d: default(d)["target_workers"] == 3 and ready_workers(default(d)) == 3)
    assert len({w["pid"] for w in default(grown)["workers"] if w["activity"] in ("idle", "busy")}) == 3
    assert k.value("orchestra.default_pool().workers") == 3
    panel.send({"type": "resize", "pool": pool_id, "workers": 1})
    panel.wait("state", lambda d: default(d)["target_workers"] == 1 and ready_workers(default(d)) == 1)

    # Bad messages get an error naming the culprit; the comm stays usable.
    panel.send({"type": "resize", "pool": pool_id, "workers": 0})
    assert "'workers' must be an integer from 1 to 1024, got 0" in panel.wait("error")["message"]
    panel.send({"type": "resize", "workers": 2})
    panel.wait("error", lambda d: "panel message 'resize' lacks 'pool'" in d["message"])
    panel.send({"type": "pause", "job_id": bg_id, "paused": "yes"})
    panel.wait("error", lambda d: "'paused' must be true or false, got 'yes'" in d["message"])
    # Pausing a job that ended is refused, naming it.
    panel.send({"type": "pause", "job_id": bg_id, "paused": True})
    assert panel.wait("result", lambda d: d["request"] == "pause")["message"] == f"job {bg_id} is not running"
    panel.send({"type": "explode"})
    panel.wait("error", lambda d: "unknown panel message type 'explode'" in d["message"])
    panel.send({"type": "cancel", "job_id": 1, "why": "x"})
    panel.wait("error", lambda d: "unknown field(s) why" in d["message"])
    panel.send({"type": "ack", "seq": 1})
    assert not panel.closed()

    # %unload_ext closes the panel's comm and stops its thread.
    k.execute("%unload_ext orchestra_nb")
    deadline = time.monotonic() + HANG_GUARD
    while not panel.closed():
        assert time.monotonic() < deadline, "the kernel did not close the panel's comm"
        time.sleep(0.01)
    assert panel_threads(k) == []


def test_jobs_that_start_and_end_between_two_updates_are_listed(kernel: Kernel) -> None:
    """The panel polls the pools' statistics a few times a second; a job that ran in
    between is listed from its JobFinished event and its handle."""
    k = kernel
    k.execute("orchestra.default_pool().wait_started(30)")
    k.execute(TASKS)
    panel = Panel(k)
    panel.wait("state")
    k.execute("quick = []\nfor i in range(20):\n    quick.append(orchestra.map(slow, [i], [0]))\n"
              "    assert quick[-1].result(30) == [i]")
    ids = k.value("[h.job_id for h in quick]")
    last = panel.wait("state", lambda d: {j["id"] for j in d["jobs"] if j["finished"]} >= set(ids))
    shown = {j["id"]: j for j in last["jobs"]}
    assert all(shown[i]["counts"]["SUCCEEDED"] == 1 and shown[i]["done"] == 1 for i in ids)
    panel.close()


def test_wrong_version_or_no_extension_closes_the_comm(bare_kernel: Kernel) -> None:
    k = bare_kernel
    # Without %load_ext there is no target: ipykernel closes the comm (the panel says so).
    nobody = Panel(k)
    k.execute("1")
    deadline = time.monotonic() + HANG_GUARD
    while not nobody.closed():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    k.execute("import orchestra_nb; orchestra_nb.configure(workers=1)\n%load_ext orchestra_nb")
    old = Panel(k, hello={"type": "hello", "version": 99})
    error = old.wait("error")
    assert "protocol version 99" in error["message"]
    deadline = time.monotonic() + HANG_GUARD
    while not old.closed():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert panel_threads(k) == []


def test_cancel_while_a_cell_awaits_the_job(kernel: Kernel) -> None:
    """The panel's commands reach the kernel while a cell awaits (its comm talks to the main
    shell, docs/panel.md): a Cancel from the panel ends the job the cell is awaiting."""
    k = kernel
    k.execute("orchestra.default_pool().wait_started(30)")
    k.execute(TASKS)
    panel = Panel(k)
    panel.wait("state")
    k.execute("bg = orchestra.map(forever, range(4), chunksize=1)")
    bg_id = k.value("bg.job_id")
    panel.wait_job(bg_id, lambda j: j["counts"]["RUNNING"] == 2)
    awaiting = k.submit("import asyncio\ntry:\n    await bg\nexcept asyncio.CancelledError:\n"
                        "    print('awaited job cancelled', bg.cancelled())")
    k.wait_for(lambda m: m["msg_type"] == "status" and m["content"]["execution_state"] == "busy"
               and m["parent_header"].get("msg_id") == awaiting)
    panel.send({"type": "cancel", "job_id": bg_id})
    assert panel.wait("result", lambda d: d["request"] == "cancel")["ok"] is True
    _, content = k.wait_reply(awaiting, timeout=HANG_GUARD)
    assert content["status"] == "ok"
    k.wait_idle(awaiting)
    assert k.stream(awaiting) == "awaited job cancelled True\n"
    assert panel.wait_job(bg_id, lambda j: j["finished"])["cancelled"] is True
    # the state messages carry the comm_open's parent (not the cells'), so replies route back
    # to the shell the panel talks to
    opened = next(m for _, m in k.snapshot() if m["msg_type"] == "comm_msg"
                  and m["content"]["comm_id"] == panel.comm_id and m["content"]["data"]["type"] == "state")
    assert opened["parent_header"]["msg_type"] == "comm_open"


RECORD = textwrap.dedent("""\
    import threading
    rec, watched, ended = [], {}, threading.Event()
    def record(e):
        rec.append(e)
        if isinstance(e, orchestra.JobFinished) and e.job_id == watched.get("id"):
            ended.set()
    sub = orchestra.default_pool().subscribe(record, types=(
        orchestra.JobStarted, orchestra.JobPaused, orchestra.TaskStateChanged, orchestra.JobFinished))
    """)
JOURNAL = (
    "[(type(e).__name__, e.job_id, getattr(e, 'paused', None), "
    "e.state.name if isinstance(e, orchestra.TaskStateChanged) else None, "
    "getattr(e, 'start', None), getattr(e, 'count', None)) for e in rec]"
)


def test_pause_and_resume_from_the_panel_start_nothing_while_paused(kernel: Kernel, tmp_path: Path) -> None:
    k = kernel
    k.execute("orchestra.default_pool().wait_started(30)")
    k.execute(TASKS)
    k.execute(RECORD)
    panel = Panel(k)
    panel.wait("state")
    k.execute(f"gate = {str(tmp_path)!r}\nh = orchestra.map(gated, range(6), [gate] * 6, chunksize=1)\n"
              "watched['id'] = h.job_id")
    h_id = k.value("h.job_id")
    panel.wait_job(h_id, lambda j: j["counts"]["RUNNING"] == 2 and not j["paused"])

    panel.send({"type": "pause", "job_id": h_id, "paused": True})
    assert panel.wait("result", lambda d: d["request"] == "pause") == {
        "type": "result", "request": "pause", "ok": True, "message": f"pausing job {h_id}",
        "job_id": h_id, "paused": True}
    panel.wait_job(h_id, lambda j: j["paused"])  # the job's state says it is paused
    assert k.value("h.paused") is True
    for i in (0, 1):
        (tmp_path / f"release-{i}").touch()
    # Both running items finish and both workers are free; nothing of the job starts.
    panel.wait_job(h_id, lambda j: j["counts"]["SUCCEEDED"] == 2 and j["counts"]["RUNNING"] == 0)
    # A barrier: the pool runs another job meanwhile (had the paused job handed out an
    # item, its RUNNING event would come before the barrier's).
    k.execute("barrier = orchestra.run(slow, 0, 0)\nassert barrier.result(60) == 0")
    barrier_id = k.value("barrier.job_id")
    shown_paused = [j for _, d in panel.messages("state") for j in d["jobs"] if j["id"] == h_id and j["paused"]]
    # every state that showed it paused: at most the two items that ran before the pause
    assert shown_paused and all(j["done"] <= 2 and j["counts"]["RUNNING"] <= 2 for j in shown_paused)
    assert shown_paused[-1]["done"] == 2 and shown_paused[-1]["counts"]["RUNNING"] == 0
    assert sorted(p.name for p in tmp_path.glob("started-*")) == ["started-0", "started-1"]

    panel.send({"type": "pause", "job_id": h_id, "paused": False})
    assert panel.wait("result", lambda d: d["request"] == "pause" and not d["paused"])["message"] == (
        f"resuming job {h_id}")
    for i in range(2, 6):
        (tmp_path / f"release-{i}").touch()
    ended = panel.wait_job(h_id, lambda j: j["finished"])
    assert ended["counts"]["SUCCEEDED"] == 6 and not ended["paused"] and not ended["cancelled"]
    assert k.value("h.result(60)") == list(range(6))
    assert k.value("ended.wait(60)") is True

    # The events: no item of the job started between its pause and its resume, while the
    # barrier did; the rest started after the resume.
    journal = k.value(JOURNAL)
    pauses = [i for i, e in enumerate(journal) if e[0] == "JobPaused" and e[1] == h_id]
    assert [journal[i][2] for i in pauses] == [True, False]
    paused_at, resumed_at = pauses

    def started(lo: int, hi: int) -> set[int]:
        return {i for name, job, _, state, start, count in journal[lo:hi]
                if name == "TaskStateChanged" and job == h_id and state == "RUNNING"
                for i in range(start, start + count)}

    assert started(0, paused_at) == {0, 1}
    assert started(paused_at, resumed_at) == set()
    assert any(e[0] == "TaskStateChanged" and e[1] == barrier_id and e[3] == "RUNNING"
               for e in journal[paused_at:resumed_at])
    assert started(resumed_at, len(journal)) == {2, 3, 4, 5}
    k.execute("sub.close()")
    panel.close()


def test_every_open_pool_is_shown_and_a_closed_one_drops_out(kernel: Kernel) -> None:
    k = kernel
    k.execute("orchestra.default_pool().wait_started(30)")
    k.execute(TASKS)
    # A pool of its own, with a job that ended before the panel opened.
    k.execute("early = orchestra.Pool(1, name='early')\nearly_job = early.map(slow, range(3))\n"
              "assert early_job.result(60) == [0, 1, 2]")
    default_id, early_id, early_job = k.value("[orchestra.default_pool().id, early.id, early_job.job_id]")
    panel = Panel(k)
    first = panel.wait("state", lambda d: any(j["id"] == early_job for j in d["jobs"]))
    assert [(p["name"], p["id"], p["default"]) for p in first["pools"]] == [
        ("default", default_id, True), ("early", early_id, False)]
    assert next(j for j in first["jobs"] if j["id"] == early_job)["pool"] == early_id

    # Pools created while the panel is open appear: a local one and an inline one.
    k.execute("side = orchestra.Pool(1, name='side')\nside.wait_started(60)\n"
              "side_job = side.map(forever, range(3), chunksize=1)\n"
              "dbg = orchestra.Pool(backend='inline', name='dbg')")
    side_id, side_job, dbg_id = k.value("[side.id, side_job.job_id, dbg.id]")
    state = panel.wait("state", lambda d: len(d["pools"]) == 4 and any(
        j["id"] == side_job and j["counts"]["RUNNING"] == 1 for j in d["jobs"]))
    assert [p["name"] for p in state["pools"]] == ["default", "early", "side", "dbg"]
    side = pool_named(state, "side")
    assert side["id"] == side_id and side["backend"] == "local" and side["target_workers"] == 1
    assert [w["job"] for w in side["workers"]] == [side_job]
    assert next(j for j in state["jobs"] if j["id"] == side_job)["pool"] == side_id
    assert all(w["job"] != side_job for w in default(state)["workers"])
    dbg = pool_named(state, "dbg")
    assert dbg["backend"] == "inline" and dbg["can_resize"] is False
    assert dbg["resize_reason"] == "the inline backend cannot resize"

    # Resize applies to the pool chosen, and only to it.
    panel.send({"type": "resize", "pool": side_id, "workers": 2})
    assert panel.wait("result", lambda d: d["request"] == "resize")["message"] == "side now keeps 2 worker(s)"
    panel.wait("state", lambda d: any(p["name"] == "side" and p["target_workers"] == 2
                                      and ready_workers(p) == 2 for p in d["pools"]))
    assert k.value("[side.workers, orchestra.default_pool().workers, early.workers]") == [2, 2, 1]
    panel.send({"type": "resize", "pool": dbg_id, "workers": 2})
    assert panel.wait("result", lambda d: d["request"] == "resize" and d["pool"] == dbg_id) == {
        "type": "result", "request": "resize", "ok": False, "pool": dbg_id,
        "message": "the inline backend cannot resize"}
    panel.send({"type": "resize", "pool": 999, "workers": 2})
    assert panel.wait("result", lambda d: d["request"] == "resize" and d["pool"] == 999)["message"] == (
        "pool 999 is not open")

    # Cancel and pause reach a job of another pool than the default.
    panel.send({"type": "pause", "job_id": side_job, "paused": True})
    panel.wait_job(side_job, lambda j: j["paused"])
    panel.send({"type": "cancel", "job_id": side_job})
    assert panel.wait("result", lambda d: d["request"] == "cancel")["ok"] is True
    assert panel.wait_job(side_job, lambda j: j["finished"])["cancelled"] is True

    # Closed pools drop out, with their jobs.
    k.execute("side.shutdown()\nearly.shutdown()\ndbg.shutdown()")
    last = panel.wait("state", lambda d: [p["name"] for p in d["pools"]] == ["default"])
    assert all(j["pool"] == default_id for j in last["jobs"])
    assert k.value("[p.name for p in orchestra.pools()]") == ["default"]
    panel.close()
