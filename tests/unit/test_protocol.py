"""The wire protocol: signatures checked before anything is unpickled, a closed set of
message kinds, and shared-memory buffers that never outlive their reading."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from orchestra_nb import _protocol as proto

KEY = bytes(range(32))

SAMPLES = [
    proto.Define(b"d" * 16, (b"old" * 4,)),
    proto.Run(7, 100, 50, b"d" * 16, True, False, 2.5, (None, "buf-abc")),
    proto.Cancel(7, -1),
    proto.Shutdown(),
    proto.Ready(3, 12345, "3.11.7"),
    proto.Started(7, 101),
    proto.Result(7, 100, 50, 0.25, ()),
    proto.Output(7, 101, "stdout", "hello\n"),
    proto.Heartbeat(3, True),
    *([proto.Release(("buf-a", "buf-b"))] if hasattr(proto, "Release") else []),
]


class _Bomb:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, ...]:
        return (os.mkdir, (self.path,))


def test_samples_cover_every_message_type() -> None:
    assert {type(m) for m in SAMPLES} == set(proto.MESSAGE_TYPES)


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip(msg: proto.Message) -> None:
    got, payload = proto.decode(KEY, proto.encode(KEY, msg))
    assert type(got) is type(msg) and got == msg and payload == []
    frames = proto.encode(KEY, msg, [b"one", memoryview(b"two"), bytearray(b"")])
    got, payload = proto.decode(KEY, frames)
    assert got == msg and [bytes(p) for p in payload] == [b"one", b"two", b""]


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_wrong_key(msg: proto.Message) -> None:
    frames = proto.encode(proto.new_key(), msg, [b"payload"])
    with pytest.raises(proto.BadSignature):
        proto.decode(KEY, frames)


def test_every_part_is_signed() -> None:
    frames = proto.encode(KEY, SAMPLES[1], [b"payload", b"more"])
    for i in range(len(frames)):
        tampered = list(frames)
        data = bytearray(tampered[i])
        data[len(data) // 2] ^= 1
        tampered[i] = bytes(data)
        with pytest.raises(proto.BadSignature):
            proto.decode(KEY, tampered)
    # frames moved across the header/payload boundary, dropped or added
    with pytest.raises(proto.BadSignature):
        proto.decode(KEY, [frames[0], frames[1], b"payloadmore"])
    with pytest.raises(proto.BadSignature):
        proto.decode(KEY, frames[:-1])
    with pytest.raises(proto.BadSignature):
        proto.decode(KEY, [*frames, b""])


def test_truncated() -> None:
    with pytest.raises(proto.BadSignature, match="truncated"):
        proto.decode(KEY, [])
    with pytest.raises(proto.BadSignature, match="truncated"):
        proto.decode(KEY, [proto.sign(KEY, b"", [])])
    with pytest.raises(proto.BadSignature):  # empty header, correctly signed
        proto.decode(KEY, [proto.sign(KEY, b"", []), b""])


def test_unknown_tag() -> None:
    header = b"\x7f" + pickle.dumps((1, 2), protocol=5)
    with pytest.raises(proto.BadSignature, match="unknown message tag"):
        proto.decode(KEY, [proto.sign(KEY, header, []), header])
    header = b"\x00" + pickle.dumps((), protocol=5)
    with pytest.raises(proto.BadSignature, match="unknown message tag"):
        proto.decode(KEY, [proto.sign(KEY, header, []), header])


def test_malformed_header() -> None:
    tag = proto.encode(KEY, proto.Cancel(1, 2))[1][:1]
    for body in (b"not a pickle", pickle.dumps((1, 2, 3, 4), protocol=5)):
        header = tag + body
        with pytest.raises(proto.BadSignature, match="malformed"):
            proto.decode(KEY, [proto.sign(KEY, header, []), header])


def test_nothing_unpickled_before_the_check(tmp_path: Path) -> None:
    marker = tmp_path / "unpickled"
    header = proto.encode(KEY, proto.Cancel(1, 2))[1][:1] + pickle.dumps(_Bomb(str(marker)))
    with pytest.raises(proto.BadSignature):
        proto.decode(KEY, [b"\0" * 32, header])
    with pytest.raises(proto.BadSignature):
        proto.decode(KEY, [proto.sign(proto.new_key(), header, []), header])
    assert not marker.exists()


def test_keys_are_random() -> None:
    assert len(proto.new_key()) == 32
    assert proto.new_key() != proto.new_key()


# --- out-of-band buffers ------------------------------------------------------------------------


def _dumps(obj: object, protocol: int = 5, buffer_callback: object = None) -> bytes:
    return pickle.dumps(obj, protocol=protocol, buffer_callback=buffer_callback)


def test_small_buffers_stay_in_band(tmp_path: Path) -> None:
    a = np.arange(100, dtype=np.int64)
    frames, names = proto.pickle_payload(_dumps, a, str(tmp_path))
    assert len(frames) == 1 and names == ()
    assert np.array_equal(pickle.loads(frames[0]), a)


def test_medium_buffers_travel_as_frames(tmp_path: Path) -> None:
    a = np.arange(64 * 1024, dtype=np.int64)  # 512 KiB: out of band, below the shm threshold
    frames, names = proto.pickle_payload(_dumps, a, str(tmp_path))
    assert names == (None,) and len(frames) == 2
    assert os.listdir(tmp_path) == []
    a[0] = -1  # the frame is a copy: later changes do not leak into the message
    bufs = proto.read_buffers(frames, names, str(tmp_path))
    b = pickle.loads(frames[0], buffers=bufs)
    assert b[0] == 0 and np.array_equal(b[1:], a[1:]) and b.flags.writeable


def test_shared_memory_buffers_are_unlinked_after_reading(tmp_path: Path) -> None:
    a = np.arange(1024 * 1024, dtype=np.float64)  # 8 MiB: through a shared-memory file
    frames, names = proto.pickle_payload(_dumps, {"a": a, "b": a[::2].copy()}, str(tmp_path))
    assert len(names) == 2 and all(n is not None and n.startswith("buf-") for n in names)
    assert sorted(os.listdir(tmp_path)) == sorted(names)
    assert all((tmp_path / n).stat().st_mode & 0o777 == 0o600 for n in names)
    assert all(len(f) == 0 for f in frames[1:])  # the data is not in the message
    bufs = proto.read_buffers(frames, names, str(tmp_path))
    assert os.listdir(tmp_path) == []  # mapped, then unlinked
    got = pickle.loads(frames[0], buffers=bufs)
    assert np.array_equal(got["a"], a) and np.array_equal(got["b"], a[::2])
    assert got["a"].flags.writeable
    got["a"][0] = 42.0
    assert got["a"][0] == 42.0


def test_discard_buffers(tmp_path: Path) -> None:
    a = np.ones(1024 * 1024)
    _, names = proto.pickle_payload(_dumps, a, str(tmp_path))
    assert os.listdir(tmp_path)
    proto.discard_buffers(names, str(tmp_path))
    assert os.listdir(tmp_path) == []
    proto.discard_buffers(names, str(tmp_path))  # twice: no error
    proto.discard_buffers(["../../etc/passwd"], str(tmp_path))  # a bad name: ignored


def test_buffer_names_are_confined(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.write_bytes(b"x" * 16)
    shm = tmp_path / "shm"
    shm.mkdir()
    for name in ("../outside", "buf-../../outside", "outside", "buf-a\0b"):
        with pytest.raises(proto.BadSignature):
            proto.read_buffers([b"", b""], [name], str(shm))
    assert outside.exists()
    with pytest.raises(proto.BadSignature):
        proto.read_buffers([b"", b""], ["buf-x"], None)  # shm name without a shm directory
