"""The machine's raw limits, measured in the same run as the systems (workload ``raw``).

* A raw ZeroMQ ``ipc://`` ping-pong between two processes (PAIR sockets, blocking
  ``recv``, one byte each way): what one round trip costs here with no pool, no pickling,
  no event loop. orchestra's await round trip is reported against it.
* A 64 MB ``numpy.copyto``: the speed of one memory copy, against which a 64 MB transfer
  (at least one copy) can be read.

Both figures move with the machine's load, like everything else in the run: compare ratios
within one run.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.record import Recorder

MB = 2**20
WARM_UP = 200

ECHO = """\
import sys
import zmq

ctx = zmq.Context()
sock = ctx.socket(zmq.PAIR)
sock.connect(sys.argv[1])
while True:
    message = sock.recv()
    if message == b"stop":
        break
    sock.send(message)
sock.close(linger=0)
ctx.term()
"""


def zmq_round_trips(count: int, timeout: float) -> list[float]:
    """``count`` round trips (microseconds) with an echo process over ipc."""
    import zmq

    with tempfile.TemporaryDirectory(prefix="orchestra-raw-") as tmp:
        address = f"ipc://{Path(tmp) / 'echo'}"
        ctx = zmq.Context()
        sock = ctx.socket(zmq.PAIR)
        sock.setsockopt(zmq.RCVTIMEO, int(timeout * 1000))  # a dead echo must not hang us
        sock.bind(address)
        echo = subprocess.Popen([sys.executable, "-c", ECHO, address])
        try:
            out = []
            for i in range(WARM_UP + count):
                t0 = time.perf_counter_ns()
                sock.send(b"x")
                sock.recv()
                if i >= WARM_UP:
                    out.append((time.perf_counter_ns() - t0) / 1000)
            sock.send(b"stop")
            echo.wait(timeout)
            return out
        finally:
            if echo.poll() is None:
                echo.kill()
                echo.wait()
            sock.close(linger=0)
            ctx.term()


def memcpy_mb_s(size_mb: int, repeat: int = 10) -> float:
    """Median speed of ``numpy.copyto`` between two ``size_mb`` arrays (both touched first)."""
    import numpy as np

    src = np.ones(size_mb * MB // 8)
    dst = np.zeros_like(src)
    np.copyto(dst, src)  # both arrays' pages exist before the clock runs
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - t0)
    return size_mb / statistics.median(times)


def measure(rec: Recorder, round_trips: int, copy_mb: int, repeat: int, timeout: float) -> None:
    from benchmarks.workloads import percentile

    for _ in range(repeat):

        def ping_pong() -> dict[str, Any]:
            us = zmq_round_trips(round_trips, timeout)
            return {"zmq_rtt_med_us": statistics.median(us), "zmq_rtt_p99_us": percentile(us, 99)}

        rec.measure(("zmq_rtt_med_us", "zmq_rtt_p99_us"), ping_pong)
        rec.measure(("memcpy_mb_s",), lambda: {"memcpy_mb_s": memcpy_mb_s(copy_mb)})
