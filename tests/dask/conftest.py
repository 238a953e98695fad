"""A real Dask cluster for the Dask backend's tests: ``dask scheduler`` and ``dask worker``
started as separate processes over TCP on loopback, once per session.

The scheduler allows one failure per task (``allowed-failures=1``), so that a task that
kills its workers is given up after two deaths instead of four. The workers' nannies
replace a worker that dies or is restarted; such replacements are the cluster's own
processes, so the per-test leak check here leaves the cluster's process trees alone and
checks everything else (a LocalCluster a test starts, a probe script). At the end of the
session the cluster is stopped by pid and no process of it may be left.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

import orchestra_nb as orchestra

pytest.importorskip("distributed")

import distributed  # (only after the skip above)

WORKTREE = Path(__file__).resolve().parents[2]
DASK = str(Path(sys.executable).with_name("dask"))
HANG_GUARD = 60.0


def cluster_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    # The workers import orchestra_nb from this tree and, by reference, the helpers of
    # these test modules (as a notebook's workers would import the user's modules).
    env["PYTHONPATH"] = os.pathsep.join([str(WORKTREE), str(Path(__file__).parent),
                                         str(WORKTREE / "tests" / "integration")])
    env["DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES"] = "1"
    env["DASK_DISTRIBUTED__WORKER__DAEMON"] = "True"
    env.update(extra)
    return env


def tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (alive)."""
    try:
        root = psutil.Process(pid)
        return [pid, *(p.pid for p in root.children(recursive=True))]
    except psutil.NoSuchProcess:
        return []


def stop_tree(pid: int, timeout: float = 20.0) -> list[int]:
    """SIGTERM ``pid``'s tree, SIGKILL what is left after ``timeout``; pids still alive."""
    pids = tree(pid)
    for p in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGTERM)
    alive = wait_gone(pids, timeout)
    for p in alive:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)
    return wait_gone(alive, 5.0)


def wait_gone(pids: list[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if _alive(p)]
        if alive:
            time.sleep(0.02)
    return alive


def _alive(pid: int) -> bool:
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
            return False
        return True
    except psutil.NoSuchProcess:
        return False


class Cluster:
    """A scheduler and worker processes (each ``dask worker`` command with its nannies)."""

    def __init__(self, directory: Path, env: dict[str, str]) -> None:
        self.directory = directory
        self.env = env
        self.procs: list[subprocess.Popen[bytes]] = []
        scheduler_file = directory / "scheduler.json"
        self._start([DASK, "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                     "--scheduler-file", str(scheduler_file)], "scheduler")
        deadline = time.monotonic() + HANG_GUARD
        while not scheduler_file.exists() or not scheduler_file.read_text().strip():
            if time.monotonic() > deadline or self.procs[0].poll() is not None:
                raise RuntimeError("the dask scheduler did not start:\n" + self.log("scheduler"))
            time.sleep(0.05)
        self.address: str = json.loads(scheduler_file.read_text())["address"]

    def _start(self, argv: list[str], name: str) -> subprocess.Popen[bytes]:
        log = open(self.directory / f"{name}.log", "ab")  # noqa: SIM115  (closed at stop)
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                cwd=self.directory, start_new_session=True)
        log.close()
        self.procs.append(proc)
        return proc

    def log(self, name: str) -> str:
        return (self.directory / f"{name}.log").read_text(errors="replace")[-5000:]

    def add_workers(self, n: int, name: str = "workers") -> subprocess.Popen[bytes]:
        return self._start([DASK, "worker", self.address, "--nworkers", str(n), "--nthreads", "1",
                            "--host", "127.0.0.1", "--no-dashboard", "--death-timeout", "30",
                            "--local-directory", str(self.directory / name)], name)

    def pids(self) -> set[int]:
        return {p for proc in self.procs for p in tree(proc.pid)}

    def stop(self, proc: subprocess.Popen[bytes]) -> list[int]:
        left = stop_tree(proc.pid)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)
        self.procs.remove(proc)
        return left

    def wait_for_workers(self, n: int) -> None:
        with distributed.Client(self.address, timeout=HANG_GUARD) as client:
            client.wait_for_workers(n, timeout=HANG_GUARD)


@pytest.fixture(scope="session")
def dask_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    cluster = Cluster(tmp_path_factory.mktemp("dask-cluster"), cluster_env())
    try:
        cluster.add_workers(2)
        cluster.wait_for_workers(2)
        yield cluster
    finally:
        left = []
        for proc in reversed(list(cluster.procs)):
            left += cluster.stop(proc)
        assert not left, f"the dask cluster left processes alive: {left}"


@pytest.fixture(autouse=True)
def no_leaked_processes(request: pytest.FixtureRequest) -> Iterator[None]:
    """The leak check of tests/conftest.py, except for the session cluster's own processes
    (nannies replace workers that die: those new workers belong to the cluster)."""
    cluster: Cluster | None = (request.getfixturevalue("dask_cluster")
                               if "dask_cluster" in request.fixturenames else None)

    def children() -> set[int]:
        mine = {p.pid for p in psutil.Process().children(recursive=True) if not _resource_tracker(p)}
        return mine - (cluster.pids() if cluster is not None else set())

    before = children()
    threads_before = set(_package_threads())
    yield
    orchestra.shutdown()
    new = [pid for pid in children() if pid not in before]
    leaked = wait_gone(new, 10.0)
    for pid in leaked:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert not leaked, f"test left processes alive: {leaked}"
    for thread in set(_package_threads()) - threads_before:
        thread.join(10.0)
    stray = [t.name for t in set(_package_threads()) - threads_before if t.is_alive()]
    assert not stray, f"test left threads of the package running: {stray}"


def _package_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("orchestra")]


def _resource_tracker(proc: psutil.Process) -> bool:
    """multiprocessing's resource tracker: one per interpreter, started by the first spawned
    process (a LocalCluster's worker) and ending with this interpreter, by design."""
    try:
        return "multiprocessing.resource_tracker" in " ".join(proc.cmdline())
    except psutil.Error:
        return False


@pytest.fixture
def dpool(dask_cluster: Cluster, request: pytest.FixtureRequest) -> Iterator[orchestra.Pool]:
    """A Pool on the session cluster (its own client), with both workers up."""
    dask_cluster.wait_for_workers(2)
    marker = request.node.get_closest_marker("pool_options")
    options: dict[str, Any] = dict(marker.kwargs) if marker else {}
    pool = orchestra.Pool(backend="dask", address=dask_cluster.address, **options)
    pool.wait_started(timeout=HANG_GUARD)
    try:
        yield pool
    finally:
        pool.shutdown(cancel_pending=True)


@pytest.fixture
def pool(dpool: orchestra.Pool) -> orchestra.Pool:
    """The local pool's API tests, run here on the Dask backend (test_api_on_dask.py)."""
    return dpool


@pytest.fixture
async def apool(dpool: orchestra.Pool) -> orchestra.Pool:
    return dpool
