"""The wire protocol: signatures checked before anything is unpickled, a closed set of
message kinds, and shared-memory buffers that never outlive their reading."""

from __future__ import annotations

import gc
import hmac
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import zmq

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
    proto.Spilled("buf-w1-spill-abc", (100, 200)),
    proto.SysPath(("/a", "/b")),
]


class _Bomb:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, ...]:
        return (os.mkdir, (self.path,))


def test_samples_cover_every_message_type() -> None:
    assert {type(m) for m in SAMPLES} == set(proto.MESSAGE_TYPES)


CANCEL_TAG = proto.MESSAGE_TYPES.index(proto.Cancel) + 1  # tags are positions, from 1
INLINE_BIT = 0x80  # in the tag byte: the rest of the first frame is the payload stream


def _body(tag: int, header: bytes, rest: bytes = b"") -> bytes:
    """A first frame's body by hand: tag byte, header length, header, inline payload."""
    return struct.pack("<BI", tag, len(header)) + header + rest


def _signed(body: bytes, frames: list[bytes] | None = None, key: bytes = KEY) -> list[bytes]:
    return [proto.sign(key, body, frames or []) + body, *(frames or [])]


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip(msg: proto.Message) -> None:
    got, payload = proto.decode(KEY, proto.encode(KEY, msg))
    assert type(got) is type(msg) and got == msg and payload == []
    frames = proto.encode(KEY, msg, [b"one", memoryview(b"two"), bytearray(b"")])
    got, payload = proto.decode(KEY, frames)
    assert got == msg and [bytes(p) for p in payload] == [b"one", b"two", b""]


@pytest.mark.parametrize(
    ("payload", "inline"),
    [
        ([], False),
        ([b""], True),  # an empty stream rides in the first frame too
        ([b"s" * proto.INLINE_LIMIT], True),
        ([b"s" * (proto.INLINE_LIMIT + 1)], False),  # a large stream travels as its own frame
        ([b"stream", b"b" * 100_000, b""], True),  # out-of-band buffers always do
        ([b"s" * (proto.INLINE_LIMIT + 1), b"b" * 10], False),
    ],
    ids=["none", "empty", "inline-limit", "large", "buffers", "large-and-buffers"],
)
def test_frames(payload: list[bytes], inline: bool) -> None:
    """Signature, header and a small payload stream share one frame: one send, one receive."""
    msg = proto.Result(1, 2, 3, 0.5, (None,) * max(0, len(payload) - 1))
    frames = [bytes(f) for f in proto.encode(KEY, msg, payload)]
    assert frames[1:] == (payload[1:] if inline else payload)
    if inline:
        assert frames[0].endswith(payload[0])
    got, out = proto.decode(KEY, frames)
    assert got == msg and [bytes(p) for p in out] == payload


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_wrong_key(msg: proto.Message) -> None:
    frames = proto.encode(proto.new_key(), msg, [b"payload"])
    with pytest.raises(proto.BadSignature):
        proto.decode(KEY, frames)


@pytest.mark.parametrize(
    "payload",
    [[b"payload", b"more"], [b"p" * 2000], [b"p" * 100, b"b" * 70_000]],
    ids=["blake2b", "hmac", "hmac-streamed"],  # the MAC by signed length: see sign()
)
def test_every_byte_is_signed(payload: list[bytes]) -> None:
    frames = [bytes(f) for f in proto.encode(KEY, SAMPLES[1], payload)]
    for i, frame in enumerate(frames):
        for pos in range(0, len(frame), max(1, len(frame) // 500)):
            tampered = list(frames)
            data = bytearray(frame)
            data[pos] ^= 1
            tampered[i] = bytes(data)
            with pytest.raises(proto.BadSignature):
                proto.decode(KEY, tampered)
    with pytest.raises(proto.BadSignature):
        proto.decode(proto.new_key(), frames)
    # bytes moved across the frame boundary, frames dropped or added
    if len(frames) > 1:
        with pytest.raises(proto.BadSignature):
            proto.decode(KEY, [frames[0] + frames[1][:1], frames[1][1:], *frames[2:]])
        with pytest.raises(proto.BadSignature):
            proto.decode(KEY, frames[:-1])
    with pytest.raises(proto.BadSignature):
        proto.decode(KEY, [frames[0][:-1]])
    with pytest.raises(proto.BadSignature):
        proto.decode(KEY, [*frames, b""])


def test_inline_stream_cannot_be_moved_out() -> None:
    """The inline payload, cut from the first frame into a frame of its own (the tag's inline
    bit cleared), is a different signed text: rejected."""
    first = bytes(proto.encode(KEY, SAMPLES[1], [b"payload"])[0])
    body = first[proto.MAC_SIZE :]
    moved = bytes([body[0] & ~INLINE_BIT]) + body[1 : -len(b"payload")]
    with pytest.raises(proto.BadSignature, match="bad signature"):
        proto.decode(KEY, [first[: proto.MAC_SIZE] + moved, b"payload"])


@pytest.mark.parametrize(
    "size", [proto.SMALL_MAC_LIMIT - 1, proto.SMALL_MAC_LIMIT, proto.SMALL_MAC_LIMIT + 1, 70_000]
)
def test_mac_either_side_of_the_limit(size: int) -> None:
    """Both ends pick the MAC (keyed BLAKE2b, HMAC-SHA256) from the signed length."""
    header = pickle.dumps((1, 2), protocol=5)
    stream = b"x" * (size - 5 - len(header))
    body = _body(CANCEL_TAG | INLINE_BIT, header, stream)
    assert len(body) == size
    sig = proto.sign(KEY, body)
    assert len(sig) == proto.MAC_SIZE and sig != proto.sign(proto.new_key(), body)
    assert sig != proto.sign(KEY, body[:-1] + b"y")
    assert (sig == hmac.digest(KEY, body, "sha256")) == (size > proto.SMALL_MAC_LIMIT)
    msg, payload = proto.decode(KEY, [sig + body])
    assert msg == proto.Cancel(1, 2) and bytes(payload[0]) == stream
    # the same bytes split into body + a length-prefixed frame are a different signed text
    assert sig != proto.sign(KEY, body[:-10], [body[-10:]])


def test_truncated() -> None:
    with pytest.raises(proto.BadSignature, match="truncated"):
        proto.decode(KEY, [])
    with pytest.raises(proto.BadSignature, match="truncated"):
        proto.decode(KEY, [proto.sign(KEY, b"")])
    with pytest.raises(proto.BadSignature, match="truncated"):  # body shorter than its prefix
        proto.decode(KEY, _signed(b"\x04\0\0\0"))
    with pytest.raises(proto.BadSignature, match="truncated"):
        proto.decode(KEY, [b"x"])


def test_unknown_tag() -> None:
    header = pickle.dumps((1, 2), protocol=5)
    for tag in (0x7F, 0xFF, 0x00, INLINE_BIT, len(proto.MESSAGE_TYPES) + 1):
        with pytest.raises(proto.BadSignature, match="unknown message tag"):
            proto.decode(KEY, _signed(_body(tag, header)))


def test_malformed_header() -> None:
    tag = CANCEL_TAG
    assert bytes(proto.encode(KEY, proto.Cancel(1, 2))[0])[proto.MAC_SIZE] == tag
    for body in (b"not a pickle", pickle.dumps((1, 2, 3, 4), protocol=5)):
        with pytest.raises(proto.BadSignature, match="malformed"):
            proto.decode(KEY, _signed(_body(tag, body)))
    header = pickle.dumps((1, 2), protocol=5)
    good = _body(tag, header)
    with pytest.raises(proto.BadSignature, match="malformed"):  # header length past the end
        proto.decode(KEY, _signed(struct.pack("<BI", tag, len(header) + 1) + header))
    with pytest.raises(proto.BadSignature, match="malformed"):  # trailing bytes, no inline bit
        proto.decode(KEY, _signed(good + b"stream"))
    assert proto.decode(KEY, _signed(good))[0] == proto.Cancel(1, 2)
    assert [bytes(p) for p in proto.decode(KEY, _signed(_body(tag | INLINE_BIT, header, b"s")))[1]] == [b"s"]


def test_nothing_unpickled_before_the_check(tmp_path: Path) -> None:
    marker = tmp_path / "unpickled"
    bomb = pickle.dumps(_Bomb(str(marker)))
    for body in (_body(CANCEL_TAG, bomb), _body(CANCEL_TAG | INLINE_BIT, pickle.dumps((1, 2)), bomb)):
        with pytest.raises(proto.BadSignature):
            proto.decode(KEY, [b"\0" * 32 + body])
        with pytest.raises(proto.BadSignature):
            proto.decode(KEY, _signed(body, key=proto.new_key()))
        with pytest.raises(proto.BadSignature):  # a correct HMAC-SHA256, but not the MAC used
            proto.decode(KEY, [hmac.digest(KEY, body, "sha256") + body])
    assert not marker.exists()


def test_send_message_and_recv_frames() -> None:
    """The socket helpers: the same frames as send_multipart / recv_multipart, fewer calls."""
    assert proto._SNDMORE == zmq.SNDMORE
    ctx = zmq.Context()
    router, dealer = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    try:
        router.bind("inproc://proto-test")
        dealer.setsockopt(zmq.IDENTITY, b"w1")
        dealer.connect("inproc://proto-test")
        big = b"b" * 100_000
        cases: list[tuple[proto.Message, list[bytes]]] = [
            (proto.Heartbeat(1, True), []),
            (SAMPLES[1], [b"stream"]),
            (proto.Result(1, 0, 1, 0.1, (None, None)), [b"stream", big, b""]),
            (proto.Result(1, 0, 1, 0.1, ()), [b"s" * (proto.INLINE_LIMIT + 1)]),
        ]
        for msg, payload in cases:
            proto.send_message(dealer, KEY, msg, payload)
            assert router.poll(5000)
            frames = proto.recv_frames(router)
            assert frames[0] == b"w1"
            assert frames[1:] == [bytes(f) for f in proto.encode(KEY, msg, payload)]
            assert proto.decode(KEY, frames[1:])[0] == msg
            proto.send_message(router, KEY, msg, payload, ident=b"w1")
            assert dealer.poll(5000)
            got, out = proto.decode(KEY, proto.recv_frames(dealer))
            assert got == msg and [bytes(p) for p in out] == payload
            with pytest.raises(zmq.Again):
                proto.recv_frames(dealer, zmq.NOBLOCK)
    finally:
        router.close(linger=0)
        dealer.close(linger=0)
        ctx.term()


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


# --- a reader's kept mappings ---------------------------------------------------------------------


def _send_and_read(
    writer: proto.Segments, reader: proto.Mappings, a: np.ndarray, released: list[str]
) -> tuple[str, np.ndarray]:
    frames, names = proto.pickle_payload(_dumps, a, writer)
    (name,) = names
    assert name is not None
    return name, pickle.loads(frames[0], buffers=proto.read_buffers(frames, names, reader, released.append))


def test_a_reader_keeps_a_reused_segment_mapped(tmp_path: Path) -> None:
    writer, reader, released = proto.Segments(str(tmp_path), "p"), proto.Mappings(str(tmp_path)), []
    name, got = _send_and_read(writer, reader, np.ones(1024 * 1024), released)
    gc.collect()
    assert released == []  # the array keeps its view: the segment is not handed back early
    assert got.sum() == 1024 * 1024
    mapping = reader._maps[name]
    del got  # the last array using the segment: released, and still mapped
    assert released == [name] and reader.names == [name]
    writer.release(released)
    again, got = _send_and_read(writer, reader, np.full(1024 * 1024, 2.0), released)
    assert again == name  # the writer reused its segment ...
    assert got.sum() == 2 * 1024 * 1024  # ... with new content ...
    assert reader._maps[name] is mapping and reader.mapped_bytes == 8 * 2**20  # ... not remapped
    del got
    writer.close()
    reader.close()


def test_a_mapping_of_a_deleted_segment_is_dropped(tmp_path: Path) -> None:
    writer, reader, released = proto.Segments(str(tmp_path), "p"), proto.Mappings(str(tmp_path)), []
    name, got = _send_and_read(writer, reader, np.ones(1024 * 1024), released)
    writer.close()  # deletes the segment: only the reader's mapping holds its memory now
    assert reader.names == [name]
    reader.sweep()
    assert reader.names == [] and reader.mapped_bytes == 0
    assert got.sum() == 1024 * 1024  # an array still using it keeps its own mapping alive


def test_kept_mappings_are_bounded_oldest_first(tmp_path: Path) -> None:
    size = 8 * 2**20
    writer = proto.Segments(str(tmp_path), "p")
    reader, released = proto.Mappings(str(tmp_path), keep_bytes=2 * size), []
    names = [_send_and_read(writer, reader, np.ones(size // 8), released)[0] for _ in range(3)]
    assert len(set(names)) == 3  # each array was still alive: three segments
    assert reader.names == names[1:] and reader.mapped_bytes == 2 * size
    writer.close()
    reader.close()
    assert reader.names == []


def test_frame_limit_follows_max_result_bytes() -> None:
    assert proto.frame_limit(None) == proto.FRAME_LIMIT
    assert proto.frame_limit(10_000) == proto.FRAME_LIMIT  # a modest floor
    assert proto.frame_limit(500 * 2**20) > 500 * 2**20  # one allowed result fits a frame


def test_a_frame_above_the_limit_travels_through_a_file(tmp_path: Path) -> None:
    spill = proto.Spill(str(tmp_path), 1000, "w1")
    ctx = zmq.Context()
    router, dealer = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    try:
        router.setsockopt(zmq.MAXMSGSIZE, spill.limit)
        router.bind("inproc://spill-test")
        dealer.setsockopt(zmq.IDENTITY, b"w1")
        dealer.connect("inproc://spill-test")
        cases: list[tuple[proto.Message, list[bytes], bool]] = [
            (proto.Result(1, 0, 1, 0.1, ()), [b"s" * 500], False),  # fits: sent as it is
            (proto.Result(1, 0, 1, 0.1, ()), [b"s" * 5000], True),
            (proto.Result(1, 0, 2, 0.1, (None,)), [b"s" * 10, b"b" * 5000], True),
            (proto.Output(1, 0, "stdout", "t" * 5000), [], True),  # a large header
        ]
        for msg, payload, expect_spilled in cases:
            proto.send_message(dealer, KEY, msg, payload, spill=spill)
            assert router.poll(5000)
            frames = proto.recv_frames(router)[1:]
            assert all(len(f) <= spill.limit for f in frames)
            spilled = type(proto.decode(KEY, frames)[0]) is proto.Spilled
            assert spilled == expect_spilled
            got, out = proto.decode_message(KEY, frames, str(tmp_path))
            assert got == msg and [bytes(p) for p in out] == payload
            assert not list(tmp_path.iterdir())  # read once, deleted at once
    finally:
        router.close(linger=0)
        dealer.close(linger=0)
        ctx.term()


def test_a_spilled_file_is_signed_with_its_message(tmp_path: Path) -> None:
    spill = proto.Spill(str(tmp_path), 100, "w1")
    frames = proto._spill(KEY, proto.encode(KEY, proto.Result(1, 0, 1, 0.1, ()), [b"s" * 500]), spill)
    (path,) = tmp_path.iterdir()
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(data)
    with pytest.raises(proto.BadSignature):
        proto.decode_message(KEY, frames, str(tmp_path))
    assert not list(tmp_path.iterdir())


def test_a_spilled_file_that_cannot_be_written_leaves_nothing(tmp_path: Path) -> None:
    spill = proto.Spill(str(tmp_path / "missing"), 100, "w1")
    with pytest.raises(OSError):
        proto.send_message(None, KEY, proto.Result(1, 0, 1, 0.1, ()), [b"s" * 500], spill=spill)


def test_a_spilled_message_whose_file_is_gone_is_dropped(tmp_path: Path) -> None:
    spill = proto.Spill(str(tmp_path), 100, "w1")
    frames = proto._spill(KEY, proto.encode(KEY, proto.Result(1, 0, 1, 0.1, ()), [b"s" * 500]), spill)
    for path in tmp_path.iterdir():
        path.unlink()  # deleted with its worker
    with pytest.raises(proto.BadSignature, match="unreadable"):
        proto.decode_message(KEY, frames, str(tmp_path))
