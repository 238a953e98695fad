"""Worker life cycle: no orphans when the parent dies (SIGKILL included), and no message
without a good signature is ever unpickled or executed."""

from __future__ import annotations

import glob
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import cloudpickle
import psutil
import pytest
import zmq

import orchestra_nb as orchestra
from orchestra_nb import _protocol as proto

HANG_GUARD = 30.0


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def still_alive_after(pids: list[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    alive = [p for p in pids if _alive(p)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.01)
        alive = [p for p in alive if _alive(p)]
    return alive


PARENT_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import orchestra_nb as orchestra

    pool = orchestra.Pool(workers=2)
    pool.wait_started(60)
    pids = pool.worker_pids()
    assert set(pool.map(lambda _: os.getpid(), range(20)).result(60)) <= set(pids)
    print(json.dumps(pids), flush=True)
    mode = sys.argv[1]
    if mode == "wait":
        sys.stdin.read()      # blocks until the test kills us
    elif mode == "os_exit":
        os._exit(0)           # no atexit handlers, no shutdown
    # mode == "exit": a normal interpreter exit, without calling shutdown
    """
)


def start_parent(tmp_path: Path, mode: str) -> tuple[subprocess.Popen[str], list[int]]:
    script = tmp_path / "parent.py"
    script.write_text(PARENT_SCRIPT)
    proc = subprocess.Popen(
        [sys.executable, str(script), mode],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        proc.kill()
        _, err = proc.communicate()
        pytest.fail(f"parent script failed: {err}")
    pids = json.loads(line)
    assert len(pids) == 2
    return proc, pids


def assert_run_dirs_swept(parent_pid: int) -> None:
    """A dead pool's run directory (sockets, shared memory) goes at the next pool start."""
    base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()
    pattern = os.path.join(base, f"orchestra-{parent_pid}-*")
    with orchestra.Pool(workers=1) as pool:
        pool.wait_started(HANG_GUARD)
    assert glob.glob(pattern) == [], f"run dirs of dead pool {parent_pid} left behind"


@pytest.mark.timeout(60)
def test_workers_die_with_sigkilled_parent(tmp_path: Path) -> None:
    proc, pids = start_parent(tmp_path, "wait")
    assert all(_alive(p) for p in pids)  # the parent blocks: its workers are up
    # the workers run in their own session: the parent's process-group signals skip them
    assert all(os.getsid(p) == p for p in pids)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=HANG_GUARD)
    proc.stdin.close()  # type: ignore[union-attr]
    proc.stdout.close()  # type: ignore[union-attr]
    proc.stderr.close()  # type: ignore[union-attr]
    assert still_alive_after(pids, 2.0) == []
    assert_run_dirs_swept(proc.pid)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", ["exit", "os_exit"])
def test_workers_die_when_parent_exits_without_shutdown(tmp_path: Path, mode: str) -> None:
    proc, pids = start_parent(tmp_path, mode)
    _, err = proc.communicate(timeout=HANG_GUARD)
    assert proc.returncode == 0, err
    assert still_alive_after(pids, 2.0) == []
    assert_run_dirs_swept(proc.pid)


# --- signatures -----------------------------------------------------------------------------------


class _Bomb:
    """Unpickling this creates a directory: proof that a payload was (or was not) unpickled."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, ...]:
        return (os.mkdir, (self.path,))


class RawWorker:
    """``python -m orchestra_nb._worker`` driven by hand through our own ROUTER sockets."""

    def __init__(self, key: bytes) -> None:
        self.key = key
        self.dir = tempfile.mkdtemp(prefix="orch-test-")
        os.chmod(self.dir, 0o700)
        self.ctx = zmq.Context()
        self.data = self.ctx.socket(zmq.ROUTER)
        self.data.bind(f"ipc://{self.dir}/data")
        self.ctrl = self.ctx.socket(zmq.ROUTER)
        self.ctrl.bind(f"ipc://{self.dir}/ctrl")
        config = {
            "worker_id": 1,
            "key": key.hex(),
            "data_addr": f"ipc://{self.dir}/data",
            "ctrl_addr": f"ipc://{self.dir}/ctrl",
            "run_dir": self.dir,
            "parent_pid": os.getpid(),
            "sys_path": sys.path,
            "cwd": os.getcwd(),
            "shm_dir": None,
            "heartbeat": 0.5,
            "max_result_bytes": None,
        }
        env = dict(os.environ)
        root = str(Path(orchestra.__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
        self.log = open(os.path.join(self.dir, "worker.log"), "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "orchestra_nb._worker"],
            stdin=subprocess.PIPE,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(config).encode() + b"\n")
        self.proc.stdin.flush()
        self.ident = b""

    def recv(self) -> tuple[proto.Message, list[bytes]]:
        """The next data message that passes the signature check."""
        if not self.data.poll(HANG_GUARD * 1000):
            raise AssertionError("no message from the worker")
        frames = self.data.recv_multipart()
        self.ident = frames[0]
        return proto.decode(self.key, frames[1:])

    def send(self, frames: list[bytes]) -> None:
        self.data.send_multipart([self.ident, *frames])

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                # as the pool does: Shutdown, and EOF on stdin
                self.send(proto.encode(self.key, proto.Shutdown()))
                assert self.proc.stdin is not None
                self.proc.stdin.close()
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    os.kill(self.proc.pid, signal.SIGKILL)
                    self.proc.wait()
        finally:
            if self.proc.stdin is not None:
                self.proc.stdin.close()
            self.data.close(linger=0)
            self.ctrl.close(linger=0)
            self.ctx.term()
            self.log.close()
            shutil.rmtree(self.dir, ignore_errors=True)


def _run_msg(job: int, digest: bytes, key: bytes, items: list[object]) -> list[bytes]:
    run = proto.Run(job, 0, len(items), digest, False, False, None, ())
    return proto.encode(key, run, [pickle.dumps(items, protocol=5)])


@pytest.mark.timeout(60)
def test_worker_drops_badly_signed_messages(tmp_path: Path) -> None:
    key, wrong = proto.new_key(), proto.new_key()
    marker = tmp_path / "executed"
    unpickled = tmp_path / "unpickled"

    def evil(x: int) -> int:
        Path(marker).touch()
        return x

    def harmless(x: int) -> int:
        return x + 1

    evil_payload = cloudpickle.dumps(evil, protocol=5)
    bomb_payload = pickle.dumps(_Bomb(str(unpickled)), protocol=5)
    evil_digest, bomb_digest, good_digest = b"e" * 16, b"b" * 16, b"g" * 16

    w = RawWorker(key)

    def forge(frames: list[bytes]) -> None:
        with pytest.raises(proto.BadSignature):  # (checked here, then sent to the worker)
            proto.decode(key, frames)
        w.send(frames)

    try:
        ready, _ = w.recv()
        assert isinstance(ready, proto.Ready) and ready.pid == w.proc.pid
        # 1. a Define + Run signed with the wrong key
        forge(proto.encode(wrong, proto.Define(evil_digest, ()), [evil_payload]))
        forge(_run_msg(1, evil_digest, wrong, [1]))
        # 2. a payload swapped under a good signature (the payload is signed too): in the
        # first frame, where a small one rides, or moved out into a frame of its own
        first = bytes(proto.encode(key, proto.Define(bomb_digest, ()), [b"harmless"])[0])
        assert first.endswith(b"harmless")
        forge([first[: -len(b"harmless")] + bomb_payload])
        untagged = bytes([first[proto.MAC_SIZE] & 0x7F])  # the inline bit cleared
        forge(
            [first[: proto.MAC_SIZE] + untagged + first[proto.MAC_SIZE + 1 : -len(b"harmless")], bomb_payload]
        )
        # 3. a header changed after signing: its tag (to an unknown one), or a byte of it
        first = bytes(proto.encode(key, proto.Define(bomb_digest, ()), [bomb_payload])[0])
        tag = first[proto.MAC_SIZE]
        forge([first[: proto.MAC_SIZE] + bytes([0x7F | (tag & 0x80)]) + first[proto.MAC_SIZE + 1 :]])
        at = proto.MAC_SIZE + 8
        forge([first[:at] + bytes([first[at] ^ 1]) + first[at + 1 :]])
        # 4. garbage, truncated messages, and a well-formed one with a blank signature
        forge([b"not a signature", b"\x01garbage"])
        forge([b"x"])
        forge([b"\0" * proto.MAC_SIZE + first[proto.MAC_SIZE :]])
        # 5. then a correctly signed Define + Run of something harmless: it runs
        w.send(proto.encode(key, proto.Define(good_digest, ()), [cloudpickle.dumps(harmless)]))
        w.send(_run_msg(2, good_digest, key, [1, 2, 3]))
        result, payload = w.recv()
        assert isinstance(result, proto.Result) and result.job == 2
        values, errors = pickle.loads(payload[0])
        assert values == [2, 3, 4] and not errors
        # 6. a correctly signed Run of the functions the forged Defines named: never defined
        for job, digest in ((3, evil_digest), (4, bomb_digest)):
            w.send(_run_msg(job, digest, key, [1]))
            result, payload = w.recv()
            assert isinstance(result, proto.Result) and result.job == job
            _, errors = pickle.loads(payload[0])
            assert errors[0].evalue == "function not defined"
    finally:
        w.close()
    assert w.proc.returncode == 0
    assert not marker.exists(), "a badly signed Run was executed"
    assert not unpickled.exists(), "a badly signed payload was unpickled"
