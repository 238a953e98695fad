"""Wire protocol between a pool and its workers (layer 0: opens no socket, runs no loop).

Every message is one ZeroMQ multipart message, usually of a single frame::

    [signature + tag + header length + header (+ payload stream), other payload frames...]

* The first frame holds the 32-byte signature, then the *body*: one tag byte, the length of
  the header (4 bytes), the header (the pickled tuple of the message's fields) and, when it
  is small (<= :data:`INLINE_LIMIT`), the payload's pickle stream, flagged by the tag's high
  bit. The tag selects one of the closed set of :data:`MESSAGE_TYPES`; an unknown tag is
  rejected. One frame is one ZeroMQ send and one receive, each of which costs microseconds.
* The signature is a MAC, under a per-pool random key, over the body and the
  length-prefixed frames that follow it: keyed BLAKE2b (a subkey of the pool's key) when
  all that is at most :data:`SMALL_MAC_LIMIT` bytes, a third of the cost of HMAC-SHA256 on
  tiny messages, else HMAC-SHA256, which hardware SHA extensions make the faster one on
  large data. :func:`decode` checks it *before* unpickling anything, so a forged or
  corrupted message is dropped and never executed.
* Payloads are pickle protocol 5 streams. Large out-of-band buffers (numpy arrays) do not go
  through the pickle stream: medium ones travel as separate frames, large ones
  (>= :data:`SHM_THRESHOLD`) as files in the pool's private shared-memory directory (mode
  0700), whose names sit in the signed header. The receiver maps such a file and unlinks it,
  so the data is copied once, by the sender.
* Every socket refuses frames above a limit (ZeroMQ's MAXMSGSIZE, :func:`frame_limit`), so a
  stray peer cannot make a pool allocate what it likes: it is disconnected after the size
  in a frame's header. A message with a larger frame (a result or an argument held in the
  pickle stream itself: bytes, text, big lists) goes through a file of the run directory
  instead, announced by a small :class:`Spilled` message (see :func:`send_message`).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import mmap
import os
import pickle
import secrets
import struct
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Protocol, TypeAlias

__all__ = [
    "MESSAGE_TYPES",
    "SHM_THRESHOLD",
    "BadSignature",
    "Cancel",
    "Define",
    "Heartbeat",
    "Mappings",
    "Message",
    "Output",
    "Ready",
    "Release",
    "Result",
    "Run",
    "Segments",
    "Shutdown",
    "Spill",
    "Spilled",
    "Started",
    "SysPath",
    "decode",
    "decode_message",
    "encode",
    "frame_limit",
    "has_input",
    "read_buffers",
    "recv_frames",
    "send_message",
    "sign",
]

# Buffers below this go in-band in the pickle stream; between this and SHM_THRESHOLD they
# travel as their own ZeroMQ frame; above, through a shared-memory file.
INBAND_LIMIT = 64 * 1024
SHM_THRESHOLD = 2 * 1024 * 1024
# Segments placed once for a job (``_shared.Placements``), which readers map copy-on-write
# and never unlink nor release: the writer deletes them when the job ends.
PINNED_PREFIX = "buf-k-"


# _FIELD_SHADOWS: a NamedTuple field named ``count`` or ``index`` shadows the tuple method of
# that name. That is harmless here (nobody calls ``msg.count(x)`` on a message) and the names
# match the rest of the engine, so mypy's complaint about the override is silenced per field.

# --- messages: pool -> worker -------------------------------------------------------------


class Define(NamedTuple):
    """Cache a callable under ``digest`` (payload: its cloudpickle); forget older ones.

    ``buffers``: its out-of-band buffers, as in :class:`Run` (large captured arrays placed
    once for the job, see ``_shared``)."""

    digest: bytes
    forget: tuple[bytes, ...]
    buffers: tuple[str | None, ...] = ()


class Run(NamedTuple):
    """Run ``count`` items of job ``job`` starting at item ``start`` (payload: the items).

    ``star``: call ``fn(*item)``; ``call``: the single item is ``(args, kwargs)``.
    ``timeout``: per-item soft deadline in seconds, enforced by the worker.
    """

    job: int
    start: int
    count: int  # type: ignore[assignment]  # see _FIELD_SHADOWS
    digest: bytes
    star: bool
    call: bool
    timeout: float | None
    buffers: tuple[str | None, ...]


class Cancel(NamedTuple):
    """Interrupt job ``job`` on this worker: all of it (``start == -1``), or only its item
    ``start`` (a call in a batch of ``run`` calls), which is skipped if not started yet."""

    job: int
    start: int


class Shutdown(NamedTuple):
    """Finish the current chunk, then exit."""


class SysPath(NamedTuple):
    """The pool's ``sys.path`` changed (since the worker started, or since the last one):
    modules of directories added since are importable from the next message on."""

    paths: tuple[str, ...]


# --- messages: worker -> pool -------------------------------------------------------------


class Ready(NamedTuple):
    worker_id: int
    pid: int
    python: str


class Started(NamedTuple):
    """Sent only for jobs with a timeout: the item the pool must now watch the clock for."""

    job: int
    index: int  # type: ignore[assignment]  # see _FIELD_SHADOWS


class Result(NamedTuple):
    """The outcome of a ``Run`` (payload: ``(values, errors)``, see ``_serialize``)."""

    job: int
    start: int
    count: int  # type: ignore[assignment]  # see _FIELD_SHADOWS
    elapsed: float
    buffers: tuple[str | None, ...]


class Output(NamedTuple):
    job: int
    index: int  # type: ignore[assignment]  # see _FIELD_SHADOWS
    stream: str
    text: str


class Heartbeat(NamedTuple):
    worker_id: int
    busy: bool


# --- messages: both ways -------------------------------------------------------------------


class Release(NamedTuple):
    """The receiver no longer maps these shared-memory segments: the writer may reuse them."""

    names: tuple[str, ...]


class Spilled(NamedTuple):
    """A message with a frame above the receiver's frame limit: its frames (``sizes``
    bytes each, signed as usual) wait in the file ``name`` of the run directory, which the
    receiver maps, deletes and decodes (:func:`decode_message`)."""

    name: str
    sizes: tuple[int, ...]


Message: TypeAlias = (
    Define
    | Run
    | Cancel
    | Shutdown
    | Ready
    | Started
    | Result
    | Output
    | Heartbeat
    | Release
    | Spilled
    | SysPath
)

MESSAGE_TYPES: tuple[type[Any], ...] = (
    Define,
    Run,
    Cancel,
    Shutdown,
    Ready,
    Started,
    Result,
    Output,
    Heartbeat,
    Release,
    Spilled,
    SysPath,  # tags are positions: new kinds go at the end
)
_TAG_OF: dict[type[Any], int] = {cls: i + 1 for i, cls in enumerate(MESSAGE_TYPES)}
_TYPE_OF: dict[int, type[Any]] = {i + 1: cls for i, cls in enumerate(MESSAGE_TYPES)}

Frame: TypeAlias = bytes | memoryview | Any  # zmq.Frame is buffer-like


class BadSignature(Exception):
    """A message failed the signature check (or was malformed) and was dropped unread."""


def new_key() -> bytes:
    return secrets.token_bytes(32)


MAC_SIZE = 32
SMALL_MAC_LIMIT = 1024  # signed bytes up to which keyed BLAKE2b is used, HMAC-SHA256 above
INLINE_LIMIT = 64 * 1024  # a payload stream up to this size rides in the first frame
_INLINE = 0x80  # tag bit: the rest of the first frame after the header is payload[0]
_PREFIX = struct.Struct("<BI")  # tag | _INLINE, header length
_HEADER_AT = MAC_SIZE + _PREFIX.size  # where the header starts in the first frame
_LEN = struct.Struct("!Q")
_ONE_SHOT_LIMIT = 64 * 1024  # join and sign in one call below this many bytes

# Keyed BLAKE2b states, one per pool key, each keyed with a subkey derived from it (the
# same key is never used by both MACs). ``copy()`` of a keyed state skips the key set-up.
_blake_states: dict[bytes, Any] = {}


def _blake(key: bytes) -> Any:
    state = _blake_states.get(key)
    if state is None:
        if len(_blake_states) >= 16:  # a key per pool: forget old pools' keys
            _blake_states.clear()
        subkey = hmac.digest(key, b"orchestra-nb message MAC: BLAKE2b subkey", "sha256")
        state = _blake_states[key] = hashlib.blake2b(key=subkey, digest_size=MAC_SIZE)
    return state


def sign(key: bytes, body: Frame, frames: Sequence[Frame] = ()) -> bytes:
    """The MAC of a message: over ``body`` (the first frame after the signature) and the
    length-prefixed ``frames`` after it. Both ends pick the algorithm from the length."""
    size = len(body)
    if not frames:
        if size <= SMALL_MAC_LIMIT:
            mac = _blake(key).copy()
            mac.update(body)
            digest: bytes = mac.digest()
            return digest
        if size <= _ONE_SHOT_LIMIT:
            return hmac.digest(key, body, "sha256")  # one C call; hmac.new builds objects
        views = []
    else:
        views = [memoryview(frame) for frame in frames]
        size += sum(_LEN.size + v.nbytes for v in views)
    parts: list[Frame] = [body]
    for view in views:
        parts.append(_LEN.pack(view.nbytes))
        parts.append(view)
    if size <= SMALL_MAC_LIMIT:
        mac = _blake(key).copy()
        for part in parts:
            mac.update(part)
        digest = mac.digest()
        return digest
    if size <= _ONE_SHOT_LIMIT:
        return hmac.digest(key, b"".join(parts), "sha256")
    hmac_obj = hmac.new(key, digestmod=hashlib.sha256)
    for part in parts:
        hmac_obj.update(part)
    return hmac_obj.digest()


def encode(key: bytes, msg: Message, payload: Sequence[Frame] = ()) -> list[Frame]:
    """The frames of ``msg`` with ``payload`` (pickle stream first, then buffer frames)."""
    header = pickle.dumps(tuple(msg), protocol=5)
    tag = _TAG_OF[type(msg)]
    if payload:
        stream = payload[0]
        size = len(stream) if type(stream) is bytes else memoryview(stream).nbytes
        if size <= INLINE_LIMIT:
            body = b"".join((_PREFIX.pack(tag | _INLINE, len(header)), header, stream))
            rest = list(payload[1:])
            return [sign(key, body, rest) + body, *rest]
    body = _PREFIX.pack(tag, len(header)) + header
    return [sign(key, body, payload) + body, *payload]


def decode(key: bytes, frames: Sequence[Frame]) -> tuple[Message, list[Frame]]:
    """Check the signature, then rebuild the message. Raises :class:`BadSignature`.

    Returns the message and its payload frames: the pickle stream (a memoryview when it
    rode in the first frame), then the out-of-band buffer frames.
    """
    if not frames:
        raise BadSignature("truncated message")
    view = memoryview(frames[0])
    if view.nbytes < _HEADER_AT:
        raise BadSignature("truncated message")
    body = view[MAC_SIZE:]
    rest = list(frames[1:])
    if not hmac.compare_digest(view[:MAC_SIZE], sign(key, body, rest)):
        raise BadSignature("bad signature")
    flags, size = _PREFIX.unpack_from(body)
    cls = _TYPE_OF.get(flags & ~_INLINE)
    if cls is None:
        raise BadSignature(f"unknown message tag {flags & ~_INLINE:#04x}")
    end = _PREFIX.size + size
    if end > len(body) or (end < len(body) and not flags & _INLINE):
        raise BadSignature(f"malformed {cls.__name__} message: bad header length")
    try:
        msg: Message = cls(*pickle.loads(body[_PREFIX.size : end]))
    except Exception as exc:
        raise BadSignature(f"malformed {cls.__name__} header: {exc}") from None
    if flags & _INLINE:
        rest.insert(0, body[end:])
    return msg, rest


# --- the frame limit, and messages too large for it --------------------------------------

FRAME_LIMIT = 64 * 2**20  # the least frame limit: what one message from a peer may allocate
FRAME_SLACK = 2**20  # room for a result's header and error records next to the result


def frame_limit(max_result_bytes: int | None) -> int:
    """The largest frame a pool's and its workers' sockets accept (ZeroMQ MAXMSGSIZE).

    Every legitimate frame is either small (control messages, a task's output, capped at
    a MiB of text), a buffer below :data:`SHM_THRESHOLD` (larger ones go through shared
    memory), or a pickle stream: a result's or an argument's bytes, text and containers,
    of any size. Frames above the limit travel through a file (:class:`Spilled`), so the
    limit can be modest; it still lets one result of up to ``max_result_bytes`` (which the
    worker enforces, see ``_serialize.dumps_result``) travel as a frame, without a file, so
    that a full /dev/shm does not fail a result the pool's options allow.
    """
    if max_result_bytes is None:
        return FRAME_LIMIT
    return max(FRAME_LIMIT, max_result_bytes + FRAME_SLACK)


def task_range(start: int, count: int) -> str:
    """How an error names the tasks of a chunk: ``task 4`` or ``tasks 4..9``."""
    return f"task {start}" if count == 1 else f"tasks {start}..{start + count - 1}"


class Spill(NamedTuple):
    """Where a sender puts a message whose frames pass ``limit``: a file in ``directory``
    (the run directory) named after ``owner``, the worker at the other end (``"w3"``), so
    that the file is deleted with that worker if it is never read."""

    directory: str
    limit: int
    owner: str


def _frame_size(frame: Frame) -> int:
    return len(frame) if type(frame) is bytes else memoryview(frame).nbytes


def _spill(key: bytes, frames: list[Frame], spill: Spill) -> list[Frame]:
    """Write ``frames`` to a file; the frames of the :class:`Spilled` message naming it.
    Raises OSError (ENOSPC...) with no file left behind."""
    sizes = tuple(_frame_size(f) for f in frames)
    name = f"buf-{spill.owner}-spill-{secrets.token_hex(10)}"
    path = os.path.join(spill.directory, name)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.posix_fallocate(fd, 0, sum(sizes))  # ENOSPC here, not SIGBUS on a later write
        with mmap.mmap(fd, sum(sizes), flags=mmap.MAP_SHARED) as mm:
            at = 0
            for frame, size in zip(frames, sizes, strict=True):
                mm[at : at + size] = memoryview(frame).cast("B")
                at += size
    except BaseException:
        os.unlink(path)
        raise
    finally:
        os.close(fd)
    return encode(key, Spilled(name, sizes))


def decode_message(key: bytes, frames: Sequence[Frame], spill_dir: str) -> tuple[Message, list[Frame]]:
    """:func:`decode`, reading a :class:`Spilled` message's frames from its file (mapped,
    and deleted at once: the memory lives as long as the returned views)."""
    msg, payload = decode(key, frames)
    if type(msg) is not Spilled:
        return msg, payload
    try:
        mm = _map_shm(spill_dir, msg.name)  # the name was signed: it is the sender's own file
    except OSError as exc:  # deleted with its (dead) worker before it was read: dropped
        raise BadSignature(f"spilled message {msg.name} unreadable: {exc}") from None
    if len(mm) != sum(msg.sizes):
        raise BadSignature(f"spilled message {msg.name}: {len(mm)} bytes, not {sum(msg.sizes)}")
    view = memoryview(mm)
    spilled: list[Frame] = []
    at = 0
    for size in msg.sizes:
        spilled.append(view[at : at + size])
        at += size
    inner, payload = decode(key, spilled)
    if type(inner) is Spilled:
        raise BadSignature("a spilled message inside a spilled message")
    return inner, payload


_SNDMORE = 2  # zmq.SNDMORE (libzmq's ZMQ_SNDMORE): this layer imports no zmq


def send_message(
    sock: Any,
    key: bytes,
    msg: Message,
    payload: Sequence[Frame] = (),
    ident: bytes | None = None,
    spill: Spill | None = None,
) -> None:
    """``sock.send_multipart([*([ident] if ident else []), *encode(key, msg, payload)],
    copy=False)``, cheaper: a message of one frame (most are) is one ``send`` call, and
    pyzmq's multipart sugar (a Python loop with enum flag arithmetic per frame) is skipped.
    The first frame is copied (it is small); the others go zero-copy. ``ident`` is the
    receiver's identity frame, for a ROUTER socket. With ``spill``, a message with a frame
    above ``spill.limit`` goes through a file (:class:`Spilled`). Raises what ``sock.send``
    raises, and OSError if that file cannot be written."""
    frames = encode(key, msg, payload)
    if (
        spill is not None
        and (len(frames) > 1 or len(frames[0]) > spill.limit)
        and any(_frame_size(f) > spill.limit for f in frames)
    ):
        frames = _spill(key, frames, spill)
    if ident is not None:
        sock.send(ident, _SNDMORE)
    if len(frames) == 1:
        sock.send(frames[0])
        return
    sock.send(frames[0], _SNDMORE)
    last = len(frames) - 1
    for i in range(1, last):
        sock.send(frames[i], _SNDMORE, copy=False)
    sock.send(frames[last], 0, copy=False)


_EVENTS = 15  # zmq.EVENTS (ZMQ_EVENTS)
_POLLIN = 1  # zmq.POLLIN


def has_input(sock: Any) -> int:
    """Nonzero if ``sock`` has a message to read: cheaper than a recv raising ``zmq.Again``.
    (pyzmq's ``Socket.get`` is its C-level getsockopt, with no Python layer.)"""
    return sock.get(_EVENTS) & _POLLIN  # type: ignore[no-any-return]


def recv_frames(sock: Any, flags: int = 0) -> list[Frame]:
    """``sock.recv_multipart(flags)``, cheaper: each frame is received as a ``zmq.Frame``,
    which knows whether more follow, instead of asking the socket (a costly getsockopt) after
    every frame. Returns the frames as bytes, like ``recv_multipart``."""
    frame = sock.recv(flags, copy=False)
    frames: list[Frame] = [frame.bytes]
    while frame.more:
        frame = sock.recv(flags, copy=False)
        frames.append(frame.bytes)
    return frames


# --- out-of-band buffers --------------------------------------------------------------------


class Placer(Protocol):
    """Where a job's large buffers are placed once (``_shared.Placements``)."""

    def name_for(self, buf: pickle.PickleBuffer) -> str | None: ...


def pickle_payload(
    dumps: Any, obj: object, shm: Segments | str | None, placed: Placer | None = None
) -> tuple[list[Frame], tuple[str | None, ...]]:
    """Pickle ``obj`` with ``dumps`` (pickle or cloudpickle ``dumps``) into payload frames.

    Returns the frames (stream first, then one frame per out-of-band buffer) and, for each
    buffer, the name of its shared-memory file or None when it travels as a frame. With
    ``placed``, a large buffer goes to the segment its job placed it in (written the first
    time only), not into a segment of this message.
    """
    oob: list[pickle.PickleBuffer] = []

    def keep_small_inband(buf: pickle.PickleBuffer) -> bool:
        if buf.raw().nbytes < INBAND_LIMIT:
            return True
        oob.append(buf)
        return False

    stream = dumps(obj, protocol=5, buffer_callback=keep_small_inband)
    if not oob:
        return [stream], ()
    frames: list[Frame] = [stream]
    names: list[str | None] = []
    for buf in oob:
        raw = buf.raw()
        name = None
        if shm is not None and raw.nbytes >= SHM_THRESHOLD:
            try:
                if placed is not None:
                    name = placed.name_for(buf)
                if name is None:
                    name = shm.write(raw) if isinstance(shm, Segments) else _write_shm(shm, raw)
            except OSError:  # /dev/shm full (ENOSPC), a file size limit...: send it inline
                name = None
        if name is not None:
            names.append(name)
            frames.append(b"")
        else:
            # A copy: the caller may mutate its array while the frame waits in a queue.
            frames.append(bytes(raw))
            names.append(None)
    return frames, tuple(names)


def read_buffers(
    payload: Sequence[Frame],
    names: Sequence[str | None],
    shm: Mappings | str | None,
    on_release: Callable[[str], object] | None = None,
) -> list[Any]:
    """The out-of-band buffers for ``pickle.loads(payload[0], buffers=...)``, writable.

    ``shm`` is the reader's :class:`Mappings` or the shared-memory directory. With
    ``on_release``, a shared-memory segment stays on disk for its writer to reuse, and
    ``on_release(name)`` is called once the last array using it is gone; without, it is
    unlinked at once. A pinned segment (:data:`PINNED_PREFIX`, placed once for a whole
    job and read by every task of it) is neither unlinked nor released, and each message
    gets a copy-on-write mapping of its own: its pages are shared until a task writes
    one, and what a task writes stays in that message's arrays, as with a copy.
    """
    out: list[Any] = []
    for frame, name in zip(payload[1:], names, strict=True):
        if name is None:
            out.append(bytearray(memoryview(frame)))
        elif shm is None:
            raise BadSignature("shared-memory buffer without a shared-memory directory")
        elif name.startswith(PINNED_PREFIX):
            directory = shm.directory if isinstance(shm, Mappings) else shm
            out.append(_map_private(os.path.join(directory, _safe_name(name))))
        elif isinstance(shm, Mappings):
            assert on_release is not None, "a kept mapping is released by its reader"
            out.append(shm.view(name, on_release))
        else:
            out.append(_map_shm(shm, name, on_release))
    return out


def discard_buffers(names: Sequence[str | None], shm_dir: str | None) -> None:
    """Delete the shared-memory files of a message that will not be read."""
    for name in names:
        if name is not None and shm_dir is not None:
            with contextlib.suppress(OSError, BadSignature):
                os.unlink(os.path.join(shm_dir, _safe_name(name)))


def _safe_name(name: str) -> str:
    if not name.startswith("buf-") or "/" in name or "\0" in name:
        raise BadSignature(f"bad buffer name {name!r}")
    return name


def _write_shm(shm_dir: str, raw: memoryview) -> str:
    name = f"buf-{secrets.token_hex(12)}"
    path = os.path.join(shm_dir, name)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        size = raw.nbytes
        os.posix_fallocate(fd, 0, size)  # allocate every page at once: no fault per page
        with mmap.mmap(fd, size, flags=mmap.MAP_SHARED | _POPULATE) as mm:
            mm[:] = raw.cast("B")
    except BaseException:
        os.unlink(path)  # no half-made segment left holding memory
        raise
    finally:
        os.close(fd)
    return name


def _map_shm(shm_dir: str, name: str, on_release: Callable[[str], object] | None = None) -> mmap.mmap:
    path = os.path.join(shm_dir, _safe_name(name))
    try:
        mm = _map_file(path)
    finally:
        if on_release is None:
            os.unlink(path)  # the memory lives exactly as long as the arrays that use it
    if on_release is not None:
        weakref.finalize(mm, on_release, name)
    return mm


def _map_private(path: str) -> mmap.mmap:
    """A copy-on-write mapping of ``path`` (MAP_PRIVATE): writable, and writes are the
    mapping's own. Mapping costs a system call; only the pages read are faulted in."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return mmap.mmap(fd, os.fstat(fd).st_size, access=mmap.ACCESS_COPY)
    finally:
        os.close(fd)


def _map_file(path: str) -> mmap.mmap:
    fd = os.open(path, os.O_RDWR)
    try:
        # No MAP_POPULATE here: the pages are resident already, and faulting them in as they
        # are read (16 at a time) costs about what populating them all does, and nothing for
        # the parts never read.
        return mmap.mmap(fd, os.fstat(fd).st_size, flags=mmap.MAP_SHARED)
    finally:
        os.close(fd)


class Segments:
    """A writer's shared-memory segments for large buffers, reused once released.

    Memory freshly mapped costs a page fault per 4 KiB page, which makes writing 64 MB into a
    new segment several times slower than into one written before. So a segment is kept,
    mapped, after its receiver says (with :class:`Release`) that no array uses it any more,
    and the next buffer of the same size is written into it. At most ``keep_bytes`` wait for
    reuse; the rest are unlinked.
    """

    def __init__(self, directory: str, owner: str, keep_bytes: int = 512 * 2**20) -> None:
        self.directory = directory
        self.owner = owner
        self.keep_bytes = keep_bytes
        self._free: dict[int, list[tuple[str, mmap.mmap]]] = {}
        self._free_bytes = 0
        self._busy: dict[str, tuple[int, mmap.mmap]] = {}
        self._lock = threading.Lock()
        self.written_bytes = 0  # copied into segments so far

    def write(self, raw: memoryview) -> str:
        size = raw.nbytes
        with self._lock:
            stack = self._free.get(size)
            segment = stack.pop() if stack else None
            if segment is not None:
                self._free_bytes -= size
        if segment is None:
            name = f"buf-{self.owner}-{secrets.token_hex(10)}"
            path = os.path.join(self.directory, name)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.posix_fallocate(fd, 0, size)  # ENOSPC here, not SIGBUS on a later write
                mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | _POPULATE)
            except BaseException:
                os.unlink(path)
                raise
            finally:
                os.close(fd)
        else:
            name, mm = segment
        mm[:] = raw.cast("B")
        with self._lock:
            self._busy[name] = (size, mm)
            self.written_bytes += size
        return name

    def release(self, names: Sequence[str]) -> None:
        """The receiver is done with these (or they were never sent): reuse or delete them."""
        with self._lock:
            for name in names:
                segment = self._busy.pop(name, None)
                if segment is None:
                    continue
                size, mm = segment
                if self._free_bytes + size <= self.keep_bytes:
                    self._free.setdefault(size, []).append((name, mm))
                    self._free_bytes += size
                else:
                    self._delete(name, mm)

    def close(self) -> None:
        with self._lock:
            segments = [(n, mm) for stack in self._free.values() for n, mm in stack]
            segments += [(n, mm) for n, (_, mm) in self._busy.items()]
            self._free.clear()
            self._busy.clear()
            self._free_bytes = 0
        for name, mm in segments:
            self._delete(name, mm)

    def _delete(self, name: str, mm: mmap.mmap) -> None:
        mm.close()
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(self.directory, name))


class Mappings:
    """A reader's mappings of its writers' shared-memory segments, kept for reuse.

    Writers reuse their segments (:class:`Segments`), and a segment mapped afresh costs the
    reader a page fault per 4 KiB page as it reads it: about 3 ms of the 7-8 ms it took to
    sum a 64 MB array here. So each segment stays mapped, and each message gets a view of
    the mapping; once the last array using it is gone, ``on_release(name)`` is called, as
    with a fresh mapping. A name is never given to another file, so a kept
    mapping is always the right one.

    At most ``keep_bytes`` stay mapped (least recently used go first). A kept mapping would
    also keep the memory of a segment its writer deleted, so each read unmaps those.
    Used by one thread (a worker's main thread, or whoever holds the pool's engine).
    """

    def __init__(self, directory: str, keep_bytes: int = 512 * 2**20) -> None:
        self.directory = directory
        self.keep_bytes = keep_bytes
        self._maps: OrderedDict[str, mmap.mmap] = OrderedDict()
        self._bytes = 0

    def view(self, name: str, on_release: Callable[[str], object]) -> Any:
        mm = self._maps.pop(name, None)
        if mm is None:
            mm = _map_file(os.path.join(self.directory, _safe_name(name)))
            self._bytes += len(mm)
        self._maps[name] = mm  # most recently used last
        self.sweep(keep=name)
        # The view must be what an array keeps as its base, so that the finalizer tells
        # when the last array is gone: numpy keeps the object it is given if that object
        # exports the buffer itself (a ctypes array does; a memoryview passes its
        # exporter on, and would be collected at once).
        import ctypes  # here: only readers of shared memory pay for it

        view = (ctypes.c_char * len(mm)).from_buffer(mm)
        weakref.finalize(view, on_release, name)
        return view

    def sweep(self, keep: str | None = None) -> None:
        """Unmap segments whose file is gone, then the oldest beyond ``keep_bytes``."""
        for name in list(self._maps):
            if name != keep and not os.path.exists(os.path.join(self.directory, name)):
                self._forget(name)
        for name in list(self._maps):
            if self._bytes <= self.keep_bytes or name == keep:
                break
            self._forget(name)

    def close(self) -> None:
        for name in list(self._maps):
            self._forget(name)

    @property
    def mapped_bytes(self) -> int:
        return self._bytes

    @property
    def names(self) -> list[str]:
        return list(self._maps)

    def _forget(self, name: str) -> None:
        mm = self._maps.pop(name)
        self._bytes -= len(mm)
        # A view still in use keeps the mapping alive until it goes; closing it would fail.
        with contextlib.suppress(BufferError):
            mm.close()


_POPULATE = getattr(mmap, "MAP_POPULATE", 0)
