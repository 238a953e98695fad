"""The local pool's wire to its workers (layer 2): the run directory and the two sockets.

:class:`Wire` owns what carries a message between the pool and its workers: the private run
directory (``_procs.RunDir``), the signing key and the frame limit (see ``_protocol``), the
ZeroMQ context with its two ROUTER sockets (``data``: definitions, chunks, results;
``ctrl``: cancels), and the shared-memory segments of arguments going out (``segments``) and
results coming in (``mappings``). It sends; what arrives is read by the core
(``PoolCore._drain``), which the wire calls when a socket may have input.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import zmq

from . import _protocol as proto
from ._procs import RunDir, WorkerProc, unregister_run_dir

if TYPE_CHECKING:
    from ._ioloop import EngineLoop

__all__ = ["Wire"]


class Wire:
    def __init__(self, loop: EngineLoop, max_result_bytes: int | None,
                 on_input: Callable[[zmq.Socket[Any]], None]) -> None:
        self.loop = loop
        self.key = proto.new_key()
        self.frame_limit = proto.frame_limit(max_result_bytes)  # see _protocol
        self._on_input = on_input  # reads a socket (PoolCore._drain)
        self.run_dir = ""
        self.shm_dir: str | None = None
        self.segments: proto.Segments | None = None
        self.mappings: proto.Mappings | None = None
        self.data_fd = -1
        # A drain of the data socket is due after the current callback (a read that starts
        # clears it: it covers that check).
        self.data_drain_due = False
        self._ctrl_sent = False

    def open(self) -> None:
        """Make the run directory, bind the sockets and watch them; on failure (out of
        descriptors), nothing of it stays behind."""
        self.owner = RunDir()
        self.run_dir, self.shm_dir = self.owner.path, self.owner.shm_dir
        try:
            self.segments = proto.Segments(self.run_dir, "p") if self.shm_dir else None
            self.mappings = proto.Mappings(self.shm_dir) if self.shm_dir else None  # results'
            self.ctx = zmq.Context(io_threads=1)
            self.data = self._router(f"ipc://{self.run_dir}/data")
            self.ctrl = self._router(f"ipc://{self.run_dir}/ctrl")
            self.data_fd = self.data.FD
            self.loop.add_reader(self.data_fd, self._on_input, self.data)
            self.loop.add_reader(self.ctrl.FD, self._on_input, self.ctrl)
        except BaseException:
            self._undo_open()
            raise

    def _undo_open(self) -> None:
        for name in ("data", "ctrl"):
            sock = getattr(self, name, None)
            if sock is not None:
                with contextlib.suppress(Exception):
                    self.loop.remove_reader(sock.FD)
                sock.close(linger=0)
        ctx = getattr(self, "ctx", None)
        if ctx is not None:
            ctx.term()
        for part in (self.segments, self.mappings):
            if part is not None:
                part.close()
        self.owner.remove()

    def close(self) -> None:
        for fd, sock in ((self.data_fd, self.data), (self.ctrl.FD, self.ctrl)):
            with contextlib.suppress(Exception):
                self.loop.remove_reader(fd)
            sock.close(linger=0)
        self.ctx.term()
        if self.segments is not None:
            self.segments.close()
        if self.mappings is not None:
            self.mappings.close()
        unregister_run_dir(self.run_dir)
        self.owner.remove()

    def _router(self, addr: str) -> zmq.Socket[Any]:
        sock = self.ctx.socket(zmq.ROUTER)
        try:
            sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
            sock.setsockopt(zmq.SNDHWM, 0)
            sock.setsockopt(zmq.RCVHWM, 0)
            sock.setsockopt(zmq.LINGER, 0)
            # A peer sending a larger frame is disconnected before anything is allocated.
            sock.setsockopt(zmq.MAXMSGSIZE, self.frame_limit)
            sock.bind(addr)
        except BaseException:
            sock.close(linger=0)
            raise
        return sock

    def ensure_run_dir(self) -> None:
        """Something deleted the run directory: make it again and bind the sockets anew
        (connected workers keep their connections; new ones need the socket files)."""
        if os.path.isdir(self.run_dir):
            return
        os.mkdir(self.run_dir, 0o700)
        self.owner.lock()
        for sock, name in ((self.data, "data"), (self.ctrl, "ctrl")):
            addr = f"ipc://{self.run_dir}/{name}"
            with contextlib.suppress(zmq.ZMQError):
                sock.unbind(addr)
            sock.bind(addr)

    def send(self, sock: zmq.Socket[Any], w: WorkerProc, msg: proto.Message,
             payload: list[Any] | None = None) -> bool:
        """Send ``msg`` to ``w``; False if ``w`` cannot be reached. An ``OSError`` means the
        message's spill file could not be written."""
        if payload and w.spill is None:
            w.spill = proto.Spill(self.run_dir, self.frame_limit, f"w{w.id}")  # deleted with w
        try:
            proto.send_message(sock, self.key, msg, payload or (), w.ident, w.spill if payload else None)
        except zmq.ZMQError:  # EHOSTUNREACH: gone; its exit will be seen through its pidfd
            return False
        # Sending can leave inbound messages on the same socket unsignalled on its
        # edge-triggered FD: read them after the current callback.
        if sock is self.data:
            if not self.data_drain_due:
                self.data_drain_due = True
                self.loop.defer(self._after_send)  # after the current callback
        elif not self._ctrl_sent:
            self._ctrl_sent = True
            self.loop.defer(self._after_send)  # after the current callback
        return True

    def _after_send(self) -> None:
        if self.data_drain_due:
            self.data_drain_due = False
            self._on_input(self.data)
        if self._ctrl_sent:
            self._ctrl_sent = False
            self._on_input(self.ctrl)

    def discard(self, names: tuple[str | None, ...]) -> None:
        """Segments of a message that was not sent: back to the pool's free segments."""
        if self.segments is not None:
            self.segments.release([n for n in names if n is not None])
