"""The front-end's socket: vhost-user messages and their fds in, replies out.

A `FrontEnd` reads whole messages (protocol.MessageReader does the framing)
and hands each to the device, in order, one at a time.  Whatever goes wrong
while a message is read or handled costs the front-end its connection,
never tether its life: `on_lost(reason)` is called and the device starts
over clean for the next front-end.
"""

from __future__ import annotations

import array
import logging
import os
import socket
from collections.abc import Callable, Sequence

from ...loop import READ, Loop
from ...ratelimit import limited
from . import protocol as p

log = logging.getLogger(__name__)


class FrontEnd:
    """One front-end connection, served from the loop."""

    def __init__(self, loop: Loop, sock: socket.socket,
                 on_message: Callable[[p.Message], None],
                 on_lost: Callable[[str], None]) -> None:
        self.loop = loop
        self.sock = sock
        self._on_message = on_message
        self._on_lost = on_lost
        self._reader = p.MessageReader()
        self._open = True
        self.paused = False  # see pause()
        sock.setblocking(False)
        loop.add(sock.fileno(), READ, self._on_readable)

    def _on_readable(self, events: int) -> None:
        sock = self.sock
        while self._open and not self.paused:
            try:
                data, ancdata, msg_flags, _ = sock.recvmsg(
                    self._reader.wanted(), socket.CMSG_SPACE(p.MAX_FDS * 4))
            except BlockingIOError:
                return
            except OSError as e:
                self._on_lost(f"receive failed: {e}")
                return
            try:
                fds = _fds_from(ancdata)
                if msg_flags & socket.MSG_CTRUNC:
                    for fd in fds:
                        os.close(fd)
                    raise p.ProtocolError("too many fds attached to a message")
                if not data:
                    for fd in fds:
                        os.close(fd)
                    self._on_lost("end of stream")
                    return
                message = self._reader.feed(data, fds)
                if message is not None:
                    self._on_message(message)
            except p.ProtocolError as e:
                limited(log, logging.ERROR, "vhost-user protocol error: %s", e)
                self._on_lost(f"protocol error: {e}")
                return
            except Exception as e:
                # A path the checks missed: still the front-end's doing, so it
                # costs the front-end its connection, not tether its life.
                limited(log, logging.ERROR, "vhost-user message handling failed: %r", e)
                log.debug("traceback", exc_info=True)
                self._on_lost(f"internal error: {e!r}")
                return

    def send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError as e:
            # Replies are a few bytes; a full socket buffer means QEMU is gone.
            raise p.ProtocolError(f"cannot send reply: {e}") from e

    def pause(self) -> None:
        """Read no further message until resume(): the one being handled waits
        for something else (CHECK_DEVICE_STATE for the end of a load)."""
        self.paused = True
        self.loop.remove(self.sock.fileno())

    def resume(self) -> None:
        self.paused = False
        if self._open and not self.loop.watching(self.sock.fileno()):
            self.loop.add(self.sock.fileno(), READ, self._on_readable)
            # Messages that came meanwhile are already readable: no new edge
            # is needed, but handle them from the loop, not from inside a handler.
            self.loop.call_soon(lambda: self._on_readable(READ) if self._open else None)

    def close(self) -> None:
        self._open = False
        self.loop.remove(self.sock.fileno())
        self.sock.close()
        self._reader.close()


def _fds_from(ancdata: Sequence[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(data[: len(data) - len(data) % arr.itemsize])
            fds.extend(arr)
    return fds
