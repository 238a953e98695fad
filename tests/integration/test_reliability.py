"""Nothing hangs, nothing is lost, nothing is left behind: regression tests for failures
found by adversarial use of the pool (each test failed on the code before its fix)."""

from __future__ import annotations

import collections
import glob
import os
import sys
import threading
import time
from pathlib import Path

import pytest

import orchestra_nb as orchestra
from orchestra_nb.testing import wait_for

pytestmark = pytest.mark.local_only("worker processes and their failures")

HANG_GUARD = 60.0


def gated(gate: str) -> None:
    """Return once the file ``gate`` exists (a hang guard ends the wait)."""
    deadline = time.monotonic() + HANG_GUARD
    while not os.path.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.001)


def run_dirs() -> set[str]:
    """This process's pools' run directories (in /dev/shm, or the temp directory)."""
    found: set[str] = set()
    for base in ("/dev/shm", "/tmp"):
        found.update(glob.glob(os.path.join(base, f"orchestra-{os.getpid()}-*")))
    return found


def shutdown_within(pool: orchestra.Pool, timeout: float = HANG_GUARD) -> None:
    """``pool.shutdown()``, failing the test (and killing the pool) if it hangs."""
    errors: list[BaseException] = []

    def close() -> None:
        try:
            pool.shutdown()
        except BaseException as exc:  # reported by the test thread
            errors.append(exc)

    closer = threading.Thread(target=close, name="test-shutdown")
    closer.start()
    closer.join(timeout)
    if closer.is_alive():
        pool.kill()
        closer.join(HANG_GUARD)
        pytest.fail(f"shutdown() did not return within {timeout} s")
    if errors:
        raise errors[0]


@pytest.mark.parametrize("calls", [50, 200])
def test_cancelling_one_run_of_a_burst_leaves_the_others_to_finish(calls: int, tmp_path: Path) -> None:
    gate = str(tmp_path / "gate")
    before = run_dirs()
    pool = orchestra.Pool(workers=2)
    try:
        # Known to be fast, the calls of the burst go out in chunks of several: the chunks
        # without the cancelled call come back without errors, which the pool mishandled.
        for _ in range(5):
            pool.run(gated, str(tmp_path)).result(timeout=HANG_GUARD)
        handles = [pool.run(gated, gate) for _ in range(calls)]
        handles[10].cancel()  # before any call can end: every later result sees the cancel
        Path(gate).touch()
        wait_for(lambda: all(h.done() for h in handles), HANG_GUARD, what="every handle final")
        for i, h in enumerate(handles):
            if i == 10 and h.cancelled():
                continue
            assert not h.cancelled(), f"call {i} was cancelled with call 10"
            assert h.result(timeout=0) is None
    finally:
        shutdown_within(pool)
    assert run_dirs() == before


def interrupts_at_five(x: int) -> int:
    if x == 5:
        raise KeyboardInterrupt("from the task")
    return x


def exits_at_five(x: int) -> int:
    if x == 5:
        sys.exit(3)
    return x


@pytest.mark.parametrize(
    ("fn", "name"), [(interrupts_at_five, "KeyboardInterrupt"), (exits_at_five, "SystemExit")]
)
def test_a_task_raising_keyboardinterrupt_or_systemexit_fails_only_that_task(
    pool: orchestra.Pool, fn: object, name: str
) -> None:
    handle = pool.map(fn, range(10), chunksize=10)  # one chunk: the rest must still run
    with pytest.raises(orchestra.TaskExitError, match=f"task 5 raised {name}"):
        handle.result(timeout=HANG_GUARD)
    assert not handle.cancelled()
    assert set(handle.exceptions()) == {5}
    assert type(handle.exceptions()[5].__cause__).__name__ == "RemoteTraceback"
    assert handle.partial_results(fill="-") == [0, 1, 2, 3, 4, "-", 6, 7, 8, 9]
    assert pool.map(abs, range(-3, 0)).result(timeout=HANG_GUARD) == [3, 2, 1]


def test_systemexit_of_a_run_is_not_the_callers_exit(pool: orchestra.Pool) -> None:
    with pytest.raises(orchestra.TaskExitError, match=r"SystemExit\(3\)"):
        pool.run(sys.exit, 3).result(timeout=HANG_GUARD)


def unloadable_at_seven(x: int) -> object:
    from orchestra_nb.testing import RaiseAtUnpickle

    return RaiseAtUnpickle("no such class here") if x == 7 else x


def test_a_result_that_cannot_be_unpickled_fails_only_its_task(pool: orchestra.Pool) -> None:
    handle = pool.map(unloadable_at_seven, range(20), chunksize=20)
    with pytest.raises(orchestra.SerializationError, match="result of task 7"):
        handle.result(timeout=HANG_GUARD)
    assert set(handle.exceptions()) == {7}
    assert handle.partial_results(fill="-") == [*range(7), "-", *range(8, 20)]


def big_result_past_a_file_size_limit(size: int) -> tuple[int, object]:
    import resource
    import signal

    import numpy as np

    # Shared-memory files can grow no more than 1 MiB now (EFBIG, like ENOSPC of a full
    # /dev/shm): the result must travel another way.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, resource.RLIM_INFINITY))
    return os.getpid(), np.full(size, 7, dtype=np.uint8)  # pickled out of band


def test_a_result_that_shared_memory_cannot_hold_travels_inline() -> None:
    with orchestra.Pool(workers=1) as pool:
        pid, data = pool.run(big_result_past_a_file_size_limit, 16 * 2**20).result(timeout=HANG_GUARD)
        assert data.shape == (16 * 2**20,) and int(data.min()) == int(data.max()) == 7
        assert [w.pid for w in pool.statistics().workers] == [pid]  # the worker lived on


def read_stdin() -> tuple[str, str]:
    import subprocess

    counted = subprocess.run(["wc", "-c"], capture_output=True, timeout=HANG_GUARD, check=True)
    return sys.stdin.read(), counted.stdout.decode().strip()


def test_a_tasks_stdin_is_empty(pool: orchestra.Pool) -> None:
    assert pool.run(read_stdin).result(timeout=HANG_GUARD) == ("", "0")


def start_children() -> tuple[int, int]:
    """A child, and a grandchild whose parent exits at once (an orphan)."""
    import subprocess

    child = subprocess.Popen(["sleep", "600"])
    orphan = subprocess.run(
        ["sh", "-c", "sleep 600 >/dev/null 2>&1 & echo $!"], capture_output=True, check=True, timeout=HANG_GUARD
    )
    return child.pid, int(orphan.stdout)


def forks() -> int:
    return os.fork()  # the child returns 0 into the worker's own code


def gone(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_processes_a_task_started_end_with_it(pool: orchestra.Pool) -> None:
    child, orphan = pool.run(start_children).result(timeout=HANG_GUARD)
    wait_for(lambda: gone(child) and gone(orphan), HANG_GUARD, what="the task's children gone")
    forked = pool.run(forks).result(timeout=HANG_GUARD)
    assert forked > 0  # the parent's answer: the child never sent one
    wait_for(lambda: gone(forked), HANG_GUARD, what="the task's forked child gone")
    assert pool.map(abs, range(-3, 0)).result(timeout=HANG_GUARD) == [3, 2, 1]


def test_processes_a_task_started_may_be_kept() -> None:
    with orchestra.Pool(workers=1, env={"ORCHESTRA_KEEP_TASK_CHILDREN": "1"}) as pool:
        child, orphan = pool.run(start_children).result(timeout=HANG_GUARD)
        pool.run(abs, 1).result(timeout=HANG_GUARD)  # another chunk ended: still alive
        assert not gone(child) and not gone(orphan)
        os.kill(child, 9)
        os.kill(orphan, 9)


def test_resize_after_shutdown_says_the_pool_is_closed() -> None:
    pool = orchestra.Pool(workers=1)
    pool.shutdown()
    with pytest.raises(orchestra.PoolClosedError, match="resize"):
        pool.resize(2)


def own_pid(_: int) -> int:
    return os.getpid()


def test_max_tasks_per_worker_bounds_chunks_too() -> None:
    with orchestra.Pool(workers=2, max_tasks_per_worker=50) as pool:
        pids = pool.map(own_pid, range(2000)).result(timeout=HANG_GUARD)
    per_worker = collections.Counter(pids)
    assert max(per_worker.values()) <= 50, per_worker.most_common(3)
    assert len(per_worker) >= 2000 // 50


def test_a_sigstopped_worker_is_replaced_by_default(tmp_path: Path) -> None:
    from orchestra_nb.testing import cont_pid, stop_pid

    with orchestra.Pool(workers=1, heartbeat=0.05, stall_timeout=0.5) as pool:
        pool.wait_started(timeout=HANG_GUARD)
        gate = str(tmp_path / "gate")
        handle = pool.run(gated_pid, gate)
        pid = wait_for(
            lambda: next((w.pid for w in pool.statistics().workers if w.job is not None), None),
            HANG_GUARD,
            what="the task running",
        )
        stop_pid(pid)
        try:
            Path(gate).touch()
            assert handle.result(timeout=HANG_GUARD) != pid  # re-run on a new worker
        finally:
            cont_pid(pid)  # harmless if it is gone already


def gated_pid(gate: str) -> int:
    gated(gate)
    return os.getpid()


def test_a_process_taking_the_next_workers_name_cannot_block_it() -> None:
    import signal

    import zmq

    from orchestra_nb.testing import EventRecorder, kill_pid

    before = run_dirs()
    ctx = zmq.Context()
    try:
        with orchestra.Pool(workers=1, start_timeout=5) as pool:
            pool.wait_started(timeout=HANG_GUARD)
            (run_dir,) = run_dirs() - before
            impostors = []
            for name in (b"w2", b"w3", b"w4"):  # the next workers' names, if guessable
                impostor = ctx.socket(zmq.DEALER)
                impostor.setsockopt(zmq.IDENTITY, name)
                impostor.setsockopt(zmq.LINGER, 0)
                impostor.connect(f"ipc://{run_dir}/data")
                impostor.send_multipart([b"garbage"])  # connected once this got through
                impostors.append(impostor)
            wait_for(lambda: pool.statistics().bad_messages >= 3, HANG_GUARD, what="the impostors seen")
            (old,) = [w.pid for w in pool.statistics().workers]
            with EventRecorder(pool, (orchestra.WorkerStarted,)) as rec:
                kill_pid(old, signal.SIGKILL)
                rec.wait(lambda e: e.pid != old, timeout=HANG_GUARD)
            assert pool.map(abs, range(-5, 0)).result(timeout=HANG_GUARD) == [5, 4, 3, 2, 1]
            for impostor in impostors:
                impostor.close()
    finally:
        ctx.term()


def test_a_function_from_a_module_only_the_parent_has_is_a_serializationerror(
    pool: orchestra.Pool, tmp_path: Path
) -> None:
    (tmp_path / "parent_only_mod.py").write_text("def triple(x):\n    return 3 * x\n")
    sys.path.insert(0, str(tmp_path))
    try:
        import parent_only_mod  # type: ignore[import-not-found]

        os.unlink(tmp_path / "parent_only_mod.py")  # gone before any worker can import it
        with pytest.raises(orchestra.SerializationError, match="'parent_only_mod'"):
            pool.map(parent_only_mod.triple, range(3)).result(timeout=HANG_GUARD)
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("parent_only_mod", None)


def start_nested_pool() -> str:
    import glob as glob_

    inner = orchestra.Pool(workers=1)  # left open: the worker's exit must close it
    assert inner.run(abs, -1).result(timeout=HANG_GUARD) == 1
    (run_dir,) = glob_.glob(f"/dev/shm/orchestra-{os.getpid()}-*")
    return run_dir


def test_a_pool_started_by_a_task_is_closed_with_its_worker() -> None:
    pool = orchestra.Pool(workers=1)
    try:
        run_dir = pool.run(start_nested_pool).result(timeout=HANG_GUARD)
        assert os.path.isdir(run_dir)
    finally:
        shutdown_within(pool)
    assert not os.path.exists(run_dir)


# A pool in a process of its own, so that its peak memory is its own: it prints a line of
# JSON at the start and for each "status" line read on stdin; "check" runs a map first.
POOL_SERVER = r"""
import json, os, resource, sys
import orchestra_nb as orchestra

def report(**extra):
    stats = pool.statistics()
    print(json.dumps({"peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "bad": stats.bad_messages, "pids": sorted(w.pid for w in stats.workers),
                      "run_dir": pool._backend._core.wire.run_dir, **extra}), flush=True)

with orchestra.Pool(workers=1) as pool:
    pool.wait_started(timeout=60)
    report()
    for line in sys.stdin:
        if line.strip() == "check":
            report(squares=pool.map(abs, range(-3, 0)).result(timeout=60))
        else:
            report()
"""


def refused(monitor: object) -> bool:
    """A disconnection was reported on ``monitor`` (a socket monitor)."""
    import zmq
    from zmq.utils.monitor import recv_monitor_message

    assert isinstance(monitor, zmq.Socket)
    return bool(monitor.poll(0)) and recv_monitor_message(monitor) is not None


def test_garbage_frames_from_a_stray_process_cost_the_pool_nothing() -> None:
    import json
    import subprocess

    import zmq

    server = subprocess.Popen(
        [sys.executable, "-c", POOL_SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert server.stdin is not None and server.stdout is not None

    def status(command: str = "status") -> dict[str, object]:
        assert server.stdin is not None and server.stdout is not None
        server.stdin.write(command + "\n")
        server.stdin.flush()
        reply: dict[str, object] = json.loads(server.stdout.readline())
        return reply

    ctx = zmq.Context()
    try:
        first = json.loads(server.stdout.readline())
        garbage = bytes(256 * 2**20)  # four of these raised a pool's memory by 513 MiB
        for sent, name in enumerate(["data", "ctrl", "data", "ctrl"], start=1):
            stray = ctx.socket(zmq.DEALER)
            stray.setsockopt(zmq.LINGER, 0)
            monitor = stray.get_monitor_socket(zmq.EVENT_DISCONNECTED)
            try:
                stray.connect(f"ipc://{first['run_dir']}/{name}")
                stray.send(garbage, copy=False)

                # Either the pool refused the frame (disconnecting the stray) or read it.
                wait_for(
                    lambda m=monitor, n=sent: refused(m) or status()["bad"] == n,
                    HANG_GUARD,
                    what="the garbage frame refused or read",
                )
            finally:
                stray.disable_monitor()
                monitor.close()
                stray.close()
        after = status("check")
        assert after["squares"] == [3, 2, 1]
        assert after["pids"] == first["pids"]  # the same worker serves on
        grown = float(after["peak_mib"]) - float(first["peak_mib"])  # type: ignore[arg-type]
        assert grown < 128, f"the pool's peak memory grew by {grown:.0f} MiB"
        assert after["bad"] == 0  # refused before it was read
    finally:
        ctx.term()
        server.stdin.close()
        server.wait(timeout=HANG_GUARD)
        server.stdout.close()


def length_and_head(data: bytes) -> tuple[int, bytes]:
    return len(data), data[:3]


def text_of(n: int) -> str:
    return "é" * n


def test_messages_above_the_frame_limit_travel_through_the_run_directory() -> None:
    """A 100 MiB bytes argument and result (held in the pickle stream itself, not as
    buffers) are above the sockets' frame limit: they travel through files, read once and
    deleted, and the limit stays small."""
    with orchestra.Pool(workers=1) as pool:
        pool.wait_started(timeout=HANG_GUARD)
        (run_dir,) = run_dirs()
        big = b"x" * (100 * 2**20)
        assert pool.run(length_and_head, big).result(timeout=HANG_GUARD) == (len(big), b"xxx")
        assert pool.run(text_of, 40 * 2**20).result(timeout=HANG_GUARD) == "é" * (40 * 2**20)
        assert pool.map(length_and_head, [big, b"yy"], chunksize=2).result(timeout=HANG_GUARD) == [
            (len(big), b"xxx"),
            (2, b"yy"),
        ]
        assert not glob.glob(os.path.join(run_dir, "buf-*")), "spilled messages left behind"
        assert pool.statistics().bad_messages == 0


def big_text_past_a_file_size_limit(n: int) -> str:
    import resource
    import signal

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, resource.RLIM_INFINITY))
    return "x" * n


def test_a_result_too_large_for_a_frame_and_for_a_file_fails_naming_why() -> None:
    with orchestra.Pool(workers=1) as pool:
        pool.wait_started(timeout=HANG_GUARD)
        pids = pool.worker_pids()
        with pytest.raises(orchestra.SerializationError) as info:
            pool.run(big_text_past_a_file_size_limit, 80 * 2**20).result(timeout=HANG_GUARD)
        assert "the results of task 0 take" in str(info.value)
        assert "File too large" in str(info.value)  # EFBIG, as ENOSPC of a full /dev/shm
        assert pool.worker_pids() == pids  # the worker lives on
        assert pool.run(abs, -4).result(timeout=HANG_GUARD) == 4


ARGUMENT_PAST_A_FILE_SIZE_LIMIT = r"""
import resource, signal
import orchestra_nb as orchestra

with orchestra.Pool(workers=1) as pool:
    pool.wait_started(timeout=60)
    # Files can grow no more than 1 MiB now (EFBIG, like ENOSPC of a full /dev/shm).
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, resource.RLIM_INFINITY))
    try:
        pool.run(len, b"x" * (80 * 2**20)).result(timeout=60)
    except orchestra.SerializationError as exc:
        print(exc)
    print(pool.run(abs, -5).result(timeout=60))
"""


def test_an_argument_too_large_for_a_frame_and_for_a_file_fails_naming_why() -> None:
    import subprocess

    out = subprocess.run(
        [sys.executable, "-c", ARGUMENT_PAST_A_FILE_SIZE_LIMIT],
        capture_output=True,
        text=True,
        timeout=HANG_GUARD,
        check=True,
    ).stdout
    assert "cannot send the arguments of task 0 to a worker" in out
    assert "File too large" in out
    assert out.splitlines()[-1] == "5"  # the pool serves on


LATER_MODULE = """
class Box:
    def __init__(self, value):
        self.value = value

def triple(x):
    return 3 * (x.value if isinstance(x, Box) else x)

def where():
    return __file__
"""


def test_a_directory_added_to_sys_path_after_the_pool_started_reaches_the_workers(
    pool: orchestra.Pool, tmp_path: Path
) -> None:
    assert pool.map(abs, [-1, -2]).result(timeout=HANG_GUARD) == [1, 2]  # workers started
    (tmp_path / "added_later_mod.py").write_text(LATER_MODULE)
    sys.path.append(str(tmp_path))
    try:
        import added_later_mod  # type: ignore[import-not-found]

        assert pool.map(added_later_mod.triple, range(4)).result(timeout=HANG_GUARD) == [0, 3, 6, 9]
        assert pool.run(added_later_mod.triple, added_later_mod.Box(5)).result(timeout=HANG_GUARD) == 15
        where = pool.run(added_later_mod.where).result(timeout=HANG_GUARD)
        assert where == str(tmp_path / "added_later_mod.py")
        boxes = pool.map(added_later_mod.Box, range(3)).result(timeout=HANG_GUARD)
        assert [b.value for b in boxes] == [0, 1, 2]
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("added_later_mod", None)


def path_of_worker() -> list[str]:
    return list(sys.path)


def adds_to_path(entry: str) -> None:
    sys.path.append(entry)


def test_sys_path_follows_the_pool_and_keeps_what_tasks_added(tmp_path: Path) -> None:
    with orchestra.Pool(workers=1) as pool:
        pool.run(adds_to_path, "/task/added").result(timeout=HANG_GUARD)
        sys.path.insert(0, str(tmp_path))
        try:
            seen = pool.run(path_of_worker).result(timeout=HANG_GUARD)
            assert seen[0] == str(tmp_path) and "/task/added" in seen
        finally:
            sys.path.remove(str(tmp_path))
        seen = pool.run(path_of_worker).result(timeout=HANG_GUARD)
        assert str(tmp_path) not in seen and "/task/added" in seen
