"""Device-state transfer: the I/O of SET_DEVICE_STATE_FD and CHECK_DEVICE_STATE.

vhost-user.rst "Migrating back-end state": the front-end hands the back-end
one end of a pipe, and the back-end writes its state into it (save) or reads
it from it (load) while the front-end carries on; CHECK_DEVICE_STATE then
asks how that went.  The bytes mean nothing here: they come from and go to
a `state_channel.DeviceStateHandler`.  The pipe is served from the event
loop, never with a blocking read or write, and a transfer that stalls is
ended by a timer.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable

from ...loop import READ, WRITE, Loop, Timer
from ...ratelimit import limited
from ...state_channel import DeviceStateError, DeviceStateHandler, StateSink
from . import fds as fdkind
from . import protocol as p

log = logging.getLogger(__name__)

STATE_TRANSFER_TIMEOUT = 60.0
CHECK_GRACE = 5.0  # after CHECK_DEVICE_STATE, the rest of a load must come this fast
STATE_CHUNK = 1 << 16
STATE_PASS = 1 << 20  # device-state bytes read per loop pass: other fds get their turn


class _Transfer:
    """One SET_DEVICE_STATE_FD transfer in progress."""

    def __init__(self, fd: int, direction: int, data: bytes,
                 sink: StateSink | None = None) -> None:
        self.fd = fd
        self.direction = direction
        self.data = data  # save: what is being written
        self.sink = sink  # load: where the bytes go
        self.pos = 0  # bytes written (save) or read (load)
        self.timer: Timer | None = None


class StateTransfer:
    """The transfers of one device, one at a time.

    `answer_check(result)` is called when a CHECK_DEVICE_STATE that had to
    wait for the end of a load (`check()` returned None) can be answered;
    until then the device reads no further messages.
    """

    def __init__(self, loop: Loop, handler: DeviceStateHandler | None,
                 answer_check: Callable[[int], None]) -> None:
        self.loop = loop
        self.handler = handler
        self._answer_check = answer_check
        self.current: _Transfer | None = None
        self.result = 0  # what CHECK_DEVICE_STATE reports: 0 or an errno
        self.check_waiting = False  # a CHECK_DEVICE_STATE waits for the load to end

    def reset(self) -> None:
        """Forget the last result (a new front-end); any transfer was aborted first."""
        self.current = None
        self.result = 0
        self.check_waiting = False

    def start(self, direction: int, phase: int, fd: int) -> bytes:
        """SET_DEVICE_STATE_FD with its fd (ours from here on): the reply payload."""
        if self.handler is None:
            os.close(fd)
            raise p.ProtocolError("SET_DEVICE_STATE_FD without DEVICE_STATE negotiated")
        self.abort(errno.ECANCELED)
        if direction not in (p.TRANSFER_SAVE, p.TRANSFER_LOAD) or phase != p.PHASE_STOPPED:
            os.close(fd)
            limited(log, logging.ERROR, "SET_DEVICE_STATE_FD: direction %d phase %d not supported",
                    direction, phase)
            self.result = errno.EINVAL
            return p.U64.pack(p.DEVICE_STATE_NO_FD | 1)
        saving = direction == p.TRANSFER_SAVE
        try:
            fdkind.check_state(fd, saving=saving)
        except (fdkind.FdKindError, OSError) as e:
            os.close(fd)
            limited(log, logging.ERROR, "SET_DEVICE_STATE_FD refused: %s", e)
            self.result = errno.EBADF
            return p.U64.pack(p.DEVICE_STATE_NO_FD | 1)
        data = b""
        sink: StateSink | None = None
        try:
            if saving:
                data = self.handler.save_state()
            else:
                sink = self.handler.begin_load()
        except DeviceStateError as e:
            os.close(fd)
            limited(log, logging.ERROR, "%s device state failed: %s",
                    "saving" if saving else "loading", e)
            self.result = e.errno or errno.EIO
            return p.U64.pack(p.DEVICE_STATE_NO_FD | 1)
        transfer = _Transfer(fd, direction, data, sink)
        self.current = transfer
        self.result = errno.EINPROGRESS
        # The reply goes out when the message handler returns, before the loop
        # polls again, so the pipe is only touched after QEMU has its reply.
        if saving:
            self.loop.add(fd, WRITE, self._on_writable)
        else:
            self.loop.add(fd, READ, self._on_readable)
        transfer.timer = self.loop.call_later(
            STATE_TRANSFER_TIMEOUT, lambda: self.abort(errno.ETIMEDOUT))
        limited(log, logging.INFO, "device state %s started (%d bytes)",
                "save" if saving else "load", len(data))
        return p.U64.pack(p.DEVICE_STATE_NO_FD)

    def check(self) -> bytes | None:
        """CHECK_DEVICE_STATE: the reply payload, or None if it has to wait (see class)."""
        t = self.current
        if t is not None and t.direction == p.TRANSFER_LOAD:
            # QEMU sends CHECK after closing its write end, so what is left
            # is normally in the pipe now.  If someone still holds a write
            # end, the answer waits for EOF (or CHECK_GRACE) without blocking
            # the loop; the socket is not read meanwhile, as messages are
            # handled in order.
            self._on_readable(0)
            if self.current is t:
                self.check_waiting = True
                if t.timer is not None:
                    t.timer.cancel()
                t.timer = self.loop.call_later(
                    CHECK_GRACE, lambda: self.abort(errno.ETIMEDOUT))
                return None
        elif t is not None:
            self._finish(errno.EIO)  # QEMU saw EOF before we closed: impossible
        limited(log, logging.INFO, "CHECK_DEVICE_STATE: %s",
                os.strerror(self.result) if self.result else "success")
        return p.U64.pack(self.result)

    def abort(self, code: int) -> None:
        if self.current is not None:
            limited(log, logging.ERROR, "device state transfer aborted: %s", os.strerror(code))
            self._finish(code)

    def _on_writable(self, events: int) -> None:
        t = self.current
        assert t is not None
        view = memoryview(t.data)
        try:
            while t.pos < len(t.data):
                t.pos += os.write(t.fd, view[t.pos:t.pos + STATE_CHUNK])
        except BlockingIOError:
            return
        except OSError as e:
            limited(log, logging.ERROR, "writing device state failed: %s", e)
            self._finish(e.errno or errno.EIO)
            return
        self._finish(0)

    def _on_readable(self, events: int) -> None:
        """Read what is there, at most STATE_PASS bytes a pass, into the sink.

        The sink validates as bytes arrive, so a bad stream or one over the
        size limit ends the transfer at its first bad byte, not at EOF.
        """
        t = self.current
        assert t is not None and t.sink is not None
        budget = STATE_PASS
        try:
            while budget > 0:
                chunk = os.read(t.fd, STATE_CHUNK)
                if not chunk:
                    t.sink.finish()
                    limited(log, logging.INFO, "device state loaded (%d bytes)", t.pos)
                    self._finish(0)
                    return
                t.pos += len(chunk)
                budget -= len(chunk)
                t.sink.feed(chunk)
        except BlockingIOError:
            return
        except DeviceStateError as e:
            limited(log, logging.ERROR, "loading device state failed after %d bytes: %s",
                    t.pos, e)
            self._finish(e.errno or errno.EINVAL)
        except OSError as e:
            limited(log, logging.ERROR, "reading device state failed: %s", e)
            self._finish(e.errno or errno.EIO)

    def _finish(self, result: int) -> None:
        t = self.current
        if t is None:
            return
        self.current = None
        self.loop.remove(t.fd)
        os.close(t.fd)
        if t.timer is not None:
            t.timer.cancel()
        self.result = result
        if self.check_waiting:
            # The deferred reply to CHECK_DEVICE_STATE.
            self.check_waiting = False
            limited(log, logging.INFO, "CHECK_DEVICE_STATE: %s",
                    os.strerror(result) if result else "success")
            self._answer_check(result)
