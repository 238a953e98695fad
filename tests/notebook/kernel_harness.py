"""A real ipykernel driven with jupyter_client; every iopub message recorded with a timestamp.

(Shared by tests/notebook/conftest.py and the tests.)

Tests synchronise on messages (``wait_for``), never on sleeps; timeouts are hang guards.
"""

from __future__ import annotations

import contextlib
import html
import json
import os
import queue
import re
import threading
import time
from collections.abc import Callable
from typing import Any

import psutil
from jupyter_client import KernelManager

START_TIMEOUT = 60


class Kernel:
    def __init__(self) -> None:
        env = dict(os.environ)
        env.pop("PYTEST_CURRENT_TEST", None)
        self.km = KernelManager(kernel_name="python3")
        self.km.start_kernel(env=env)
        self.kc = self.km.blocking_client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=START_TIMEOUT)
        self.msgs: list[tuple[float, dict[str, Any]]] = []
        self._lock = threading.Lock()
        self._stop = False
        self._drain_thread = threading.Thread(target=self._drain, daemon=True)
        self._drain_thread.start()

    @property
    def pid(self) -> int:
        return self.km.provisioner.process.pid  # type: ignore[union-attr]

    def _drain(self) -> None:
        while not self._stop:
            try:
                m = self.kc.get_iopub_msg(timeout=0.1)
            except queue.Empty:
                continue
            except Exception:
                return
            with self._lock:
                self.msgs.append((time.monotonic(), m))

    def snapshot(self) -> list[tuple[float, dict[str, Any]]]:
        with self._lock:
            return list(self.msgs)

    # --- executing ----------------------------------------------------------------------

    def submit(self, code: str) -> str:
        return self.kc.execute(code)

    def wait_reply(self, mid: str, timeout: float = 60) -> tuple[float, dict[str, Any]]:
        """(monotonic time of receipt, reply content)."""
        deadline = time.monotonic() + timeout
        while True:
            rep = self.kc.get_shell_msg(timeout=max(0.01, deadline - time.monotonic()))
            if rep["parent_header"].get("msg_id") == mid:
                return time.monotonic(), rep["content"]

    def wait_idle(self, mid: str, timeout: float = 60) -> None:
        self.wait_for(
            lambda m: (
                m["msg_type"] == "status"
                and m["content"]["execution_state"] == "idle"
                and m["parent_header"].get("msg_id") == mid
            ),
            timeout,
        )

    def execute(
        self, code: str, timeout: float = 60, ok: bool = True
    ) -> tuple[str, dict[str, Any]]:
        mid = self.submit(code)
        _, reply = self.wait_reply(mid, timeout)
        self.wait_idle(mid, timeout)
        if ok and reply["status"] != "ok":
            raise AssertionError(
                f"cell failed: {reply.get('ename')}: {reply.get('evalue')}\n" + self.output(mid)
            )
        return mid, reply

    def value(self, expr: str, timeout: float = 60) -> Any:
        """Evaluate ``expr`` in the kernel; it must be JSON-serialisable."""
        mid, _ = self.execute(f"import json as __j; print('@@' + __j.dumps({expr}))", timeout)
        for line in self.stream(mid).splitlines():
            if line.startswith("@@"):
                return json.loads(line[2:])
        raise AssertionError(f"no value for {expr!r}: {self.output(mid)}")

    # --- reading iopub ------------------------------------------------------------------

    def for_cell(self, mid: str) -> list[dict[str, Any]]:
        return [m for _, m in self.snapshot() if m["parent_header"].get("msg_id") == mid]

    def stream(self, mid: str, name: str | None = None) -> str:
        return "".join(
            m["content"]["text"]
            for m in self.for_cell(mid)
            if m["msg_type"] == "stream" and (name is None or m["content"]["name"] == name)
        )

    def output(self, mid: str) -> str:
        out = []
        for m in self.for_cell(mid):
            t, c = m["msg_type"], m["content"]
            if t == "stream":
                out.append(c["text"])
            elif t == "error":
                out.append("\n".join(c["traceback"]))
            elif t in ("execute_result", "display_data"):
                out.append(str(c["data"].get("text/plain", "")) + "\n")
        return "".join(out)

    def late_output(self, mid: str) -> str:
        """What cell ``mid``'s jobs printed after the cell ended: the latest text of its
        displays without a widget (each job still running at the cell's end has one, which
        later output updates by display id, whichever cell the update comes with)."""
        ids = [
            m["content"]["transient"]["display_id"]
            for m in self.for_cell(mid)
            if m["msg_type"] == "display_data"
            and "application/vnd.jupyter.widget-view+json" not in m["content"]["data"]
            and m["content"].get("transient", {}).get("display_id")
        ]
        latest = dict.fromkeys(ids, "")
        for _, m in self.snapshot():
            if m["msg_type"] in ("display_data", "update_display_data"):
                display_id = m["content"].get("transient", {}).get("display_id")
                if display_id in latest:
                    latest[display_id] = m["content"]["data"].get("text/plain", "")
        return "".join(latest.values())

    def wait_for(
        self, pred: Callable[[dict[str, Any]], bool], timeout: float = 30
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            msgs = self.snapshot()
            for _, m in msgs[seen:]:
                if pred(m):
                    return m
            seen = len(msgs)
            if time.monotonic() > deadline:
                raise TimeoutError("no matching iopub message")
            time.sleep(0.005)

    # --- widgets ------------------------------------------------------------------------

    def comms(self, mid: str | None = None, model: str | None = None) -> list[str]:
        """Comm ids of widgets opened (optionally: by cell ``mid``, of ``model``), in order."""
        out = []
        for _, m in self.snapshot():
            if m["msg_type"] != "comm_open":
                continue
            if mid is not None and m["parent_header"].get("msg_id") != mid:
                continue
            state = m["content"]["data"].get("state", {})
            if model is not None and state.get("_model_name") != model:
                continue
            out.append(m["content"]["comm_id"])
        return out

    def states(self, comm_id: str) -> list[tuple[float, dict[str, Any], dict[str, Any]]]:
        """[(time, state, message)] for the comm_open and every update of ``comm_id``."""
        out = []
        for t, m in self.snapshot():
            c = m["content"]
            if m["msg_type"] == "comm_open" and c.get("comm_id") == comm_id:
                out.append((t, c["data"].get("state", {}), m))
            elif (
                m["msg_type"] == "comm_msg"
                and c.get("comm_id") == comm_id
                and c["data"].get("method") == "update"
            ):
                out.append((t, c["data"]["state"], m))
        return out

    def state(self, comm_id: str) -> dict[str, Any]:
        merged: dict[str, Any] = {}
        for _, s, _m in self.states(comm_id):
            merged.update(s)
        return merged

    def wait_state(
        self, comm_id: str, pred: Callable[[dict[str, Any]], bool], timeout: float = 30
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            s = self.state(comm_id)
            if pred(s):
                return s
            if time.monotonic() > deadline:
                raise TimeoutError(f"widget {comm_id} never reached the state; last: {s}")
            time.sleep(0.01)

    def click(self, comm_id: str) -> None:
        """What a front end sends when a Button is clicked (ipywidgets 8)."""
        msg = self.kc.session.msg(
            "comm_msg",
            {"comm_id": comm_id, "data": {"method": "custom", "content": {"event": "click"}}},
        )
        self.kc.shell_channel.send(msg)

    def job_widgets(self, mid: str, index: int = 0, timeout: float = 30) -> dict[str, str]:
        """The comm ids of the index-th progress widget opened by cell ``mid`` (``view``:
        the HTML with the bar and its numbers, ``button``), once all of its parts are open
        (their comm_open messages arrive one by one)."""
        models = {"view": "HTMLModel", "button": "ButtonModel", "box": "HBoxModel"}
        deadline = time.monotonic() + timeout
        while True:
            found = {part: self.comms(mid, model) for part, model in models.items()}
            if all(len(ids) > index for ids in found.values()):
                return {part: ids[index] for part, ids in found.items()}
            if time.monotonic() > deadline:
                raise TimeoutError(f"widget {index} of cell {mid} not open: {found}")
            time.sleep(0.005)

    def wait_view(
        self, comm_id: str, pred: Callable[[dict[str, Any]], bool], timeout: float = 30
    ) -> dict[str, Any]:
        """Wait until the job view's numbers (``numbers()``) satisfy ``pred``."""
        state = self.wait_state(comm_id, lambda s: pred(numbers(s.get("value", ""))), timeout)
        return numbers(state["value"])

    # --- processes ----------------------------------------------------------------------

    def descendants(self) -> list[int]:
        try:
            return [p.pid for p in psutil.Process(self.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def shutdown(self, now: bool = False) -> None:
        self._stop = True
        self._drain_thread.join(2)
        with contextlib.suppress(Exception):
            self.kc.stop_channels()
        with contextlib.suppress(Exception):
            self.km.shutdown_kernel(now=now)


_DATA = re.compile(r'data-(\w+)="([^"]*)"')
_TAG = re.compile(r"<[^>]+>")


def numbers(view_html: str) -> dict[str, Any]:
    """A job view's numbers (its ``data-*`` attributes, ints where they are) and its
    ``text``: the words a user reads, tags stripped."""
    head = view_html.split('class="orchestra-bar"')[0]
    out: dict[str, Any] = {}
    for key, value in _DATA.findall(head):
        out[key] = int(value) if value.isdigit() else value
    body = view_html.split("</style>")[-1]
    out["text"] = html.unescape(_TAG.sub("", body)).strip()
    return out


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_dead(pids: list[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    left = list(pids)
    while left and time.monotonic() < deadline:
        left = [p for p in left if alive(p)]
        time.sleep(0.01)
    return [p for p in left if alive(p)]
