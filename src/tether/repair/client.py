"""The back-end side of the repair helper protocol (tether.repair.protocol).

tether listens; the privileged helper (tether-repair, or passt-repair)
connects.  Every wait is bounded: an absent, dead or confused helper is a
RepairHelperError naming what happened, never a hang, and the sockets handed
over stay open and owned by the caller.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import socket
import stat
import struct
import time
from collections.abc import Iterator, Sequence

from tether.loop import READ, Loop
from tether.ratelimit import limited
from tether.repair.kernel import REPAIR_OFF_NO_WP
from tether.repair.protocol import SCM_MAX_FD, encode_command, rights
from tether.repair.tcp import BatchDone

log = logging.getLogger(__name__)

_PEERCRED = struct.Struct("=iII")
ACCEPT_BACKOFF = 0.5  # s without accepting after EMFILE and the like


class RepairHelperError(OSError):
    """The helper is absent or failed.

    `switched` counts the sockets of the failed call that the helper
    confirmed; the ones after it are in an unknown repair state.
    """

    def __init__(self, code: int, message: str, switched: int = 0) -> None:
        super().__init__(code, message)
        self.switched = switched


class RepairHelper:
    """Listening socket for the helper, and the RepairSwitch that uses it."""

    def __init__(self, path: str, *, reply_timeout: float = 2.0, prime: bool = True) -> None:
        self.path = path
        self.reply_timeout = reply_timeout
        self._prime = prime
        self._conn: socket.socket | None = None
        self._batch_max = SCM_MAX_FD
        self._capped = False
        self._listener = _listen(path)
        self._loop: Loop | None = None

    # -- connection ---------------------------------------------------------

    def fileno(self) -> int:
        return self._listener.fileno()

    @property
    def connected(self) -> bool:
        return self._conn is not None

    def attach(self, loop: Loop) -> None:
        """Accept the helper whenever it connects, from the event loop."""
        self._loop = loop
        loop.add(self._listener.fileno(), READ, lambda _mask: self.accept_pending())

    def _pause_accepting(self) -> None:
        loop = self._loop
        fd = self._listener.fileno()
        if loop is None or not loop.watching(fd):
            return
        loop.remove(fd)

        def again() -> None:
            if self._listener.fileno() == fd and not loop.watching(fd):
                loop.add(fd, READ, lambda _mask: self.accept_pending())

        loop.call_later(ACCEPT_BACKOFF, again)

    def accept_pending(self) -> None:
        """Accept what is waiting: the first helper stays, others are turned away."""
        while True:
            try:
                conn, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    raise
                # Out of fds: listen again later rather than spin on (or die of) it.
                limited(log, logging.ERROR, "cannot accept a repair helper: %s", e.strerror)
                self._pause_accepting()
                return
            pid = _peer_pid(conn)
            if self._conn is not None:
                limited(log, logging.WARNING,
                        "repair helper pid %s turned away: one is already connected", pid)
                conn.close()
                continue
            log.info("repair helper pid %s connected on %s", pid, self.path)
            conn.setblocking(False)
            self._conn = conn
            self._batch_max = SCM_MAX_FD
            self._capped = False
            if self._prime:
                self._send_priming_message()

    def wait(self, timeout: float) -> None:
        """Return once a helper is connected; RepairHelperError after timeout s."""
        deadline = time.monotonic() + timeout
        while self._conn is None:
            self.accept_pending()
            if self._conn is not None:
                return
            left = deadline - time.monotonic()
            if left <= 0:
                raise RepairHelperError(
                    errno.ETIMEDOUT,
                    f"no repair helper connected to {self.path} within {timeout:g} s "
                    f"(start tether-repair {self.path} as root)",
                )
            # poll, not select: a daemon with thousands of connections has fds
            # past select's 1024, and a migration is exactly when it waits here.
            poller = select.poll()
            poller.register(self._listener, select.POLLIN)
            poller.poll(left * 1000)

    def disconnect(self) -> None:
        """Hang up on the helper: it exits 0."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def close(self) -> None:
        self.disconnect()
        if self._loop is not None and self._loop.watching(self._listener.fileno()):
            self._loop.remove(self._listener.fileno())
        self._listener.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    # -- requests -----------------------------------------------------------

    def set_repair(self, socks: Sequence[socket.socket], command: int,
                   each_batch: BatchDone | None = None) -> None:
        """Switch TCP_REPAIR to command on every socket, 253 per message.

        each_batch(start, batch) runs as each batch is confirmed switched.
        The next batch is already with the helper by then, so the helper
        switches it while this process works on the last one: on two cores
        a restore costs the larger of the two shares, not their sum.  At
        most two requests are outstanding; the helper answers in order, and
        one that fails answers nothing more, so `done` stays exact.
        """
        byte = encode_command(command)
        fds = [s.fileno() for s in socks]
        total = len(fds)
        if each_batch is None or self._batch_max < SCM_MAX_FD:
            # Unprimed (a helper capped below the largest batch): one at a
            # time, as a batch's size may still shrink after the first reply.
            done = 0
            while done < total:
                batch = fds[done : done + self._batch_max]
                self._exchange(byte, batch, done, total)
                if each_batch is not None:
                    each_batch(done, socks[done : done + len(batch)])
                done += len(batch)
            return
        step = self._batch_max
        starts = list(range(0, total, step))
        sent = 0
        for index, start in enumerate(starts):
            while sent < len(starts) and sent <= index + 1:
                first = starts[sent]
                self._request(byte, fds[first : first + step], first, total)
                sent += 1
            self._reply(byte, len(fds[start : start + step]), start, total)
            try:
                each_batch(start, socks[start : start + step])
            except BaseException:
                # The caller gives up; the request still out must be answered
                # here, or its reply would pass for the next request's.
                if sent > index + 1:
                    nxt = starts[index + 1]
                    with contextlib.suppress(RepairHelperError):
                        self._reply(byte, len(fds[nxt : nxt + step]), nxt, total)
                raise

    def _send_priming_message(self) -> None:
        # passt-repair keeps the control-buffer length the kernel wrote back
        # for its first message, so it would truncate any later, larger one
        # (reference: passt-migration.md 3.4).  A first message of the largest
        # size, on a harmless fresh socket, makes every later batch fit (and
        # without it, batches are capped to the first message's size).
        # OFF_NO_WP on an unconnected socket changes nothing.
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as dummy:
            try:
                self._exchange(
                    encode_command(REPAIR_OFF_NO_WP), [dummy.fileno()] * SCM_MAX_FD, 0, 0
                )
            except RepairHelperError as e:
                log.warning("repair helper failed its first request: %s", e)

    def _exchange(self, byte: bytes, fds: list[int], done: int, total: int) -> None:
        self._request(byte, fds, done, total)
        self._reply(byte, len(fds), done, total)

    @staticmethod
    def _what(byte: bytes, count: int, done: int, total: int) -> str:
        what = f"TCP_REPAIR {byte[0] if byte[0] < 128 else byte[0] - 256} on {count} sockets"
        if total:
            what += f" ({done} of {total} already switched)"
        return what

    def _connection(self, done: int) -> socket.socket:
        if self._conn is None:
            raise RepairHelperError(
                errno.ENOTCONN, f"no repair helper connected to {self.path}", done
            )
        return self._conn

    @contextlib.contextmanager
    def _hanging_up_on_failure(self, what: str, done: int) -> Iterator[None]:
        """Any failure on the helper's connection ends it, as a RepairHelperError."""
        try:
            yield
        except RepairHelperError:
            self.disconnect()
            raise
        except OSError as e:
            self.disconnect()
            raise RepairHelperError(
                e.errno or errno.EIO, f"repair helper connection failed during {what}: {e}", done
            ) from e

    def _request(self, byte: bytes, fds: list[int], done: int, total: int) -> None:
        what = self._what(byte, len(fds), done, total)
        conn = self._connection(done)
        deadline = time.monotonic() + self.reply_timeout
        with self._hanging_up_on_failure(what, done):
            self._wait(conn, write=True, deadline=deadline, what=what, done=done)
            conn.sendmsg([byte], rights(fds), socket.MSG_NOSIGNAL)

    def _reply(self, byte: bytes, count: int, done: int, total: int) -> None:
        what = self._what(byte, count, done, total)
        conn = self._connection(done)
        deadline = time.monotonic() + self.reply_timeout
        with self._hanging_up_on_failure(what, done):
            self._wait(conn, write=False, deadline=deadline, what=what, done=done)
            # One byte, never more: with two requests out, the next reply may
            # already be here, and it belongs to the next batch.
            reply = conn.recv(1)
        if reply == byte:
            # passt-repair can never again receive more descriptors than in
            # the first message of a connection: cap batches to it (the first
            # only: a later, smaller batch says nothing of the helper).
            if not self._capped:
                self._batch_max = min(self._batch_max, count)
                self._capped = True
            return
        self.disconnect()
        if not reply:
            raise RepairHelperError(
                errno.ECONNRESET,
                f"repair helper hung up during {what}; see its error output",
                done,
            )
        raise RepairHelperError(
            errno.EPROTO, f"repair helper answered {reply.hex()} to {what}, expected {byte.hex()}",
            done,
        )

    def _wait(
        self, conn: socket.socket, *, write: bool, deadline: float, what: str, done: int
    ) -> None:
        poller = select.poll()
        poller.register(conn, select.POLLOUT if write else select.POLLIN)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RepairHelperError(
                    errno.ETIMEDOUT,
                    f"repair helper gave no reply within {self.reply_timeout:g} s to {what}",
                    done,
                )
            if poller.poll(left * 1000):
                return


def _listen(path: str) -> socket.socket:
    try:
        if stat.S_ISSOCK(os.stat(path).st_mode):
            _remove_stale(path)
    except FileNotFoundError:
        pass
    s = socket.socket(
        socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
    )
    try:
        s.bind(path)
        s.listen(1)
    except BaseException:
        s.close()
        raise
    return s


def _remove_stale(path: str) -> None:
    """Remove a leftover socket file, unless something still listens on it."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)
        return
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, f"{path}: another process is listening on it")


def _peer_pid(conn: socket.socket) -> int:
    try:
        raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    except OSError:
        return -1
    return int(_PEERCRED.unpack(raw)[0])
