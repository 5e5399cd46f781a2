"""QEMU's `-netdev stream` (and passt's --socket): frames over a UNIX stream socket.

Each frame is preceded by its length as a 4-byte big-endian integer (QEMU
net/stream.c, the same framing as passt's "qemu" mode).  One client at a time:
when QEMU disconnects, tether waits for the next one.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import struct
from collections.abc import Callable
from typing import Final

from tether import loop as evloop
from tether.frames import GuestPort
from tether.ratelimit import limited

log = logging.getLogger(__name__)

ACCEPT_BACKOFF: Final = 0.5  # s without accepting after EMFILE and the like

FRAME_MAX: Final = 65536 + 14
_LEN: Final = struct.Struct("!I")
_SNDBUF: Final = 8 << 20


class StreamTransport:
    """Implements frames.FrameSink; feeds a GuestPort."""

    def __init__(self, loop: evloop.Loop, path: str | None, port: GuestPort,
                 conn: socket.socket | None = None) -> None:
        """Listen on path, or (path None) serve conn, an inherited connected socket."""
        self.loop = loop
        self.port = port
        self.path = path
        self.conn: socket.socket | None = None
        self._inbuf = bytearray()
        self._outbuf = bytearray()
        self.bad_lengths = 0
        self.on_client_gone: Callable[[], None] | None = None
        """Called once the client's connection is closed (passt's --one-off)."""
        self.listener: socket.socket | None = None
        if path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.listener.bind(path)
            self.listener.listen(1)
            self.listener.setblocking(False)
            loop.add(self.listener.fileno(), evloop.READ, self._accept)
        if conn is not None:
            self._adopt(conn)

    def _accept(self, _events: int) -> None:
        assert self.listener is not None
        try:
            conn, _ = self.listener.accept()
        except BlockingIOError:
            return
        except OSError as exc:
            if exc.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                raise
            # Out of fds: stop listening for a while rather than spin or exit.
            limited(log, logging.ERROR, "cannot accept a stream client: %s", exc.strerror)
            fd = self.listener.fileno()
            self.loop.remove(fd)
            self.loop.call_later(ACCEPT_BACKOFF, lambda: self._listen_again(fd))
            return
        if self.conn is not None:
            conn.close()  # one guest per tether, as passt
            return
        self._adopt(conn)

    def _adopt(self, conn: socket.socket) -> None:
        conn.setblocking(False)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SNDBUF)
        self.conn = conn
        self._inbuf.clear()
        self._outbuf.clear()
        self.loop.add(conn.fileno(), evloop.READ | evloop.HANGUP, self._on_event)

    def _listen_again(self, fd: int) -> None:
        if self.listener is not None and self.listener.fileno() == fd \
                and not self.loop.watching(fd):
            self.loop.add(fd, evloop.READ, self._accept)

    def _drop_client(self) -> None:
        if self.conn is not None:
            self.loop.remove(self.conn.fileno())
            self.conn.close()
            self.conn = None
            if self.on_client_gone is not None:
                self.on_client_gone()

    def _on_event(self, events: int) -> None:
        if self.conn is None:
            return
        if events & evloop.WRITE:
            self._write_out()
            if not self._outbuf:
                self.loop.modify(self.conn.fileno(), evloop.READ | evloop.HANGUP)
                self.port.guest_room_available()
        if events & (evloop.READ | evloop.HANGUP):
            self._read()

    def _read(self) -> None:
        assert self.conn is not None
        try:
            data = self.conn.recv(1 << 20)
        except BlockingIOError:
            return
        except OSError as exc:
            limited(log, logging.INFO, "stream client: %s", exc)
            self._drop_client()
            return
        if not data:
            limited(log, logging.INFO, "stream client disconnected")
            self._drop_client()
            return
        buf = self._inbuf
        buf += data
        frames: list[memoryview] = []
        view = memoryview(bytes(buf))
        pos = 0
        while len(view) - pos >= 4:
            (length,) = _LEN.unpack_from(view, pos)
            if length == 0 or length > FRAME_MAX:
                # The framing is lost: nothing after this can be trusted.
                self.bad_lengths += 1
                limited(log, logging.WARNING,
                        "stream client sent a frame length of %d: disconnecting", length)
                self.port.frames_from_guest(frames)
                self._drop_client()
                return
            if len(view) - pos - 4 < length:
                break
            frames.append(view[pos + 4:pos + 4 + length])
            pos += 4 + length
        del buf[:pos]
        if frames:
            self.port.frames_from_guest(frames)

    # -- frames.FrameSink ------------------------------------------------

    def send_frame(self, frame: bytes | bytearray | memoryview) -> bool:
        if self.conn is None or not self.has_room():
            return False
        self._outbuf += _LEN.pack(len(frame))
        self._outbuf += frame
        return True

    def has_room(self) -> bool:
        return self.conn is not None and len(self._outbuf) < (4 << 20)

    def flush(self) -> None:
        if self.conn is not None and self._outbuf:
            self._write_out()
            if self._outbuf and self.conn is not None:
                self.loop.modify(self.conn.fileno(), evloop.READ | evloop.WRITE | evloop.HANGUP)

    def _write_out(self) -> None:
        assert self.conn is not None
        try:
            sent = self.conn.send(self._outbuf)
        except BlockingIOError:
            return
        except OSError as exc:
            limited(log, logging.INFO, "stream client: %s", exc)
            self._drop_client()
            return
        del self._outbuf[:sent]

    def close(self) -> None:
        self.on_client_gone = None
        self._drop_client()
        if self.listener is not None:
            self.loop.remove(self.listener.fileno())
            self.listener.close()
            self.listener = None
        if self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
