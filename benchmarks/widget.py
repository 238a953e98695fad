"""Workload ``widget``: what the progress widget costs a notebook user (orchestra only).

A real ipykernel, driven with jupyter_client as a front end would, loads the extension
(``%load_ext orchestra_nb``, 2 workers) and awaits a map of tiny tasks defined in the
kernel's ``__main__``, alternately with ``%config Orchestra.progress = "widget"`` and
``"none"``. The time is taken inside the cell around the ``await`` (the widget is made,
fed and finished inside it); the ratio widget / none of each pair of runs is recorded.
"""

from __future__ import annotations

import time
from typing import Any

from benchmarks.record import Recorder
from benchmarks.workloads import REPO_ROOT, check, subprocess_env

SETUP = """\
import time
import orchestra_nb as orchestra
orchestra.configure(workers=2)
%load_ext orchestra_nb
await orchestra.default_pool().started()

def bench_inc(x):
    return x + 1
"""

TIMED = """\
%config Orchestra.progress = "{mode}"
_t0 = time.perf_counter()
_results = await orchestra.map(bench_inc, range({items}))
_dt = time.perf_counter() - _t0
assert len(_results) == {items} and _results[-1] == {items}
print("@@", _dt)
"""


class Kernel:
    """One ipykernel with a blocking client; ``run`` executes a cell and returns its stdout."""

    def __init__(self, timeout: float) -> None:
        from jupyter_client import KernelManager

        self.timeout = timeout
        self.km = KernelManager(kernel_name="python3")
        self.km.start_kernel(env=subprocess_env(), cwd=REPO_ROOT)
        self.kc = self.km.blocking_client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=timeout)

    def run(self, code: str) -> str:
        out: list[str] = []
        errors: list[str] = []

        def hook(msg: dict[str, Any]) -> None:
            kind, content = msg["msg_type"], msg["content"]
            if kind == "stream" and content.get("name") == "stdout":
                out.append(content["text"])
            elif kind == "error":
                errors.append(f"{content['ename']}: {content['evalue']}")

        reply = self.kc.execute_interactive(code, timeout=self.timeout, output_hook=hook)
        if reply["content"]["status"] != "ok" or errors:
            raise RuntimeError("cell failed in the kernel: " + ("; ".join(errors) or "no reason given"))
        return "".join(out)

    def close(self) -> None:
        self.kc.stop_channels()
        self.km.shutdown_kernel(now=False)


def timed_map(kernel: Kernel, mode: str, items: int) -> float:
    for line in kernel.run(TIMED.format(mode=mode, items=items)).splitlines():
        if line.startswith("@@ "):
            return float(line.split()[1])
    raise RuntimeError(f"the {mode} run printed no time")


def measure(rec: Recorder, items: int, repeat: int, timeout: float) -> None:
    t0 = time.perf_counter()
    kernel = Kernel(timeout)
    try:
        kernel.run(SETUP)
        rec.note(f"kernel and 2-worker pool ready in {time.perf_counter() - t0:.1f} s")
        for mode in ("widget", "none"):  # warm-up: code paths, widget classes, workers
            timed_map(kernel, mode, items)
        for i in range(repeat):

            def pair(i: int = i) -> dict[str, float]:
                order = ("widget", "none") if i % 2 == 0 else ("none", "widget")
                times = {mode: timed_map(kernel, mode, items) for mode in order}
                check(times["none"] > 0, "a map took no time")
                return {
                    "widget_s": times["widget"],
                    "none_s": times["none"],
                    "widget_ratio": times["widget"] / times["none"],
                }

            rec.measure(("widget_s", "none_s", "widget_ratio"), pair)
    finally:
        kernel.close()
