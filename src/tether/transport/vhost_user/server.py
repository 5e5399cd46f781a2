"""The listening UNIX socket QEMU connects to (-chardev socket,path=...)."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import stat
from typing import TYPE_CHECKING

from ...loop import HANGUP, READ, Loop
from ...ratelimit import limited

if TYPE_CHECKING:
    from .device import VhostUserNetDevice

log = logging.getLogger(__name__)

ACCEPT_RETRY = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
ACCEPT_BACKOFF = 0.5


class VhostUserServer:
    """Listens on a UNIX socket and hands one front-end at a time to the device."""

    def __init__(self, loop: Loop, path: str, device: VhostUserNetDevice) -> None:
        self.loop = loop
        self.path = path
        self.device = device
        try:
            if stat.S_ISSOCK(os.lstat(path).st_mode):
                os.unlink(path)  # a stale socket from an earlier run
        except FileNotFoundError:
            pass
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(path)
        self._sock.listen(1)
        self._sock.setblocking(False)
        loop.add(self._sock.fileno(), READ | HANGUP, self._accept)

    def _accept(self, events: int) -> None:
        try:
            conn, _ = self._sock.accept()
        except BlockingIOError:
            return
        except OSError as e:
            if e.errno not in ACCEPT_RETRY:
                raise
            # Out of fds or memory: stop listening for a while instead of
            # spinning on a ready socket (or dying); pending clients wait.
            limited(log, logging.ERROR, "cannot accept a front-end: %s; retrying in %.1f s",
                    e.strerror, ACCEPT_BACKOFF)
            self.loop.remove(self._sock.fileno())
            self.loop.call_later(ACCEPT_BACKOFF, self._listen_again)
            return
        if self.device.connected:
            limited(log, logging.WARNING,
                    "refusing a second front-end: one is already connected")
            conn.close()
            return
        self.device.attach(conn)

    def _listen_again(self) -> None:
        if self._sock.fileno() >= 0 and not self.loop.watching(self._sock.fileno()):
            self.loop.add(self._sock.fileno(), READ | HANGUP, self._accept)

    def close(self) -> None:
        self.loop.remove(self._sock.fileno())
        self._sock.close()
        self.device.disconnect("server closed")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
