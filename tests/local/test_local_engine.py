"""The local engine's own checks that reach into it: defaults, and its sockets' security."""

from __future__ import annotations

import os
import pickle
import random
import struct
import time
from pathlib import Path

import zmq
from localkit import local_core

import orchestra_nb as orchestra
from orchestra_nb import _protocol as proto

HANG_GUARD = 30.0


def test_retry_random_defaults_to_real_jitter(make_pool) -> None:
    pool = make_pool(workers=1)
    assert local_core(pool).options.retry_random is random.random


class _Bomb:
    """Unpickling this creates a directory: proof that a payload was (or was not) unpickled."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, ...]:
        return (os.mkdir, (self.path,))


def test_pool_counts_and_drops_forged_messages(pool: orchestra.Pool, tmp_path: Path) -> None:
    """A stranger on the pool's socket (same uid, past the 0700 directory) gets nowhere."""
    run_dir = local_core(pool).wire.run_dir
    assert os.stat(run_dir).st_mode & 0o777 == 0o700
    unpickled = tmp_path / "unpickled"
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.IDENTITY, b"w99")  # (a live worker's identity would be refused)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(f"ipc://{run_dir}/data")
        bomb = pickle.dumps(_Bomb(str(unpickled)), protocol=5)
        forged = proto.encode(proto.new_key(), proto.Result(1, 0, 1, 0.0, ()), [bomb])
        sock.send_multipart(forged)
        # the bomb as the header of a Result, under a blank signature
        result_tag = bytes(forged[0])[proto.MAC_SIZE] & 0x7F
        header = struct.pack("<BI", result_tag, len(bomb)) + bomb
        sock.send_multipart([b"\0" * proto.MAC_SIZE + header])
        deadline = time.monotonic() + HANG_GUARD
        while pool.status()["bad_messages"] < 2:
            assert time.monotonic() < deadline, "the forged messages were not counted"
            time.sleep(0.01)
    finally:
        sock.close()
        ctx.term()
    assert not unpickled.exists()
    assert pool.map(abs, [-1, -2, -3]).result(HANG_GUARD) == [1, 2, 3]
