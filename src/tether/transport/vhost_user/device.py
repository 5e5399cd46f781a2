"""The vhost-user net device: QEMU's socket, two virtqueues, a frames.GuestPort.

`VhostUserNetDevice` is the back-end for one front-end connection at a time
(`VhostUserServer` accepts them).  It answers the messages QEMU 10 sends
(vhost-user.rst; order in shared/reference/vhost-user-migration.md §5-7),
moves TX chains to the `GuestPort` and implements `frames.FrameSink` for RX.

Errors, by kind:
- a malformed or unknown message: `ProtocolError` -> logged, connection
  dropped, device reset to a clean state for the next connection;
- a request that is well-formed but cannot be honoured (a ring outside guest
  memory): logged, REPLY_ACK answers non-zero, connection kept;
- hostile guest data in the rings: counted in the queue, buffer dropped.
"""

from __future__ import annotations

import array
import contextlib
import errno
import logging
import os
import socket
import stat
from collections.abc import Callable, Sequence
from typing import ClassVar

from ...frames import GuestPort
from ...loop import EDGE, HANGUP, READ, WRITE, Loop, Timer
from ...ratelimit import limited
from ...state_channel import DeviceStateError, DeviceStateHandler, StateSink
from ...wire import virtio_net
from . import fds as fdkind
from . import protocol as p
from .memory import DirtyLog, GuestMemoryError, MemoryTable
from .virtqueue import MAX_QUEUE_SIZE, ChainError, Segment, VirtQueue

log = logging.getLogger(__name__)

RX, TX = 0, 1  # virtio-net queue pair 0 (virtio spec §5.1.2)
NUM_QUEUES = 2
_ZERO_HDR = bytes(virtio_net.HDR_LEN_NUM_BUFFERS)
MAX_FRAME = 65535 + 14  # largest Ethernet frame (MTU 65520 + header, with room)
TX_BATCH = 64  # chains per pass before yielding to other fds
# TX mitigation, as QEMU's own virtio-net "tx=timer": after a batch with bulk
# data in it, kicks stay off and the ring is looked at again after TX_POLL.
# A guest streaming at 1.5 Gbit/s adds a frame every ~0.4 ms, so this takes
# two or three per wake-up instead of one, with no kick (a vCPU exit) for
# any of them; measured side by side, tether's CPU per GB uploaded fell to
# 0.69x (1.06 vs 1.54 CPU-s/GB) and the TCG guest's rate rose.  Small
# frames (ACKs, requests) go back to kicks at once: no added latency for
# them.  1 ms is epoll's granularity.
TX_POLL = 0.001
TX_POLL_BYTES = 32 << 10  # data in a batch that makes it bulk
TX_SLOT = MAX_FRAME + 12  # a gathered frame with its virtio-net header
TX_ARENA_FRAMES = 16  # gathered frames per pass that need no allocation
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


class VhostUserNetDevice:
    """A virtio-net device served over vhost-user; a frames.FrameSink for RX."""

    def __init__(self, loop: Loop, port: GuestPort,
                 state: DeviceStateHandler | None = None,
                 on_rarp: Callable[[bytes], None] | None = None,
                 allow_unpinned_memory: bool = True) -> None:
        self.loop = loop
        self.allow_unpinned_memory = allow_unpinned_memory
        """Map guest memory in files that cannot be sealed against shrinking
        (QEMU's memory-backend-file): see memory.py for what that risks."""
        self.port = port
        self.state = state
        self.on_rarp = on_rarp
        self.on_checksum_offload: Callable[[bool], bool] | None = None
        """Told whether the guest takes partial TCP/UDP checksums; answers whether the
        frames sent from now on will carry them (the stack then skips the sum)."""
        self.partial_checksums = False
        self.offered_features = p.OFFERED_FEATURES
        self.offered_protocol = p.OFFERED_PROTOCOL_FEATURES
        if state is None:
            self.offered_protocol &= ~(1 << p.PF_DEVICE_STATE)
        self._sock: socket.socket | None = None
        self._reader = p.MessageReader()
        self._rx_segs: list[Segment] = []
        self._rx_heads: list[tuple[int, int]] = []  # (head, end index in _rx_segs)
        self._tx_segs: list[Segment] = []
        self._tx_arena = memoryview(bytearray(TX_ARENA_FRAMES * TX_SLOT))
        self._hdr = bytearray(12)
        self._tx_scheduled = False
        self.rx_dropped = 0  # frames for the guest dropped (no buffers / not running)
        self.rx_frames = 0
        self.rx_multi_buffer = 0  # frames spread over several buffers (MRG_RXBUF)
        self.tx_frames = 0
        self.logged_pages = 0  # dirty-log marks of closed logs (see stats())
        self.connections = 0
        self._reset()

    # -- lifecycle ------------------------------------------------------------

    def _set_partial_checksums(self, guest_takes_them: bool) -> None:
        callback = getattr(self, "on_checksum_offload", None)
        self.partial_checksums = bool(callback(guest_takes_them)) if callback else False

    def _reset(self) -> None:
        """Back to the state of a device no front-end has touched."""
        self.features = 0
        self._set_partial_checksums(False)
        self.protocol_features = 0
        self.hdr_len = 12
        self.mergeable = False
        self.logging = False
        self.memory: MemoryTable | None = None
        self.dirty_log: DirtyLog | None = None
        self.queues = [VirtQueue(i) for i in range(NUM_QUEUES)]
        self._want_room = False
        self._rx_buf_size = 0
        self._scan_valid = False  # see _measure_room
        self._scan_pos = 0
        self._scan_room = 0
        self._transfer: _Transfer | None = None
        self._transfer_result = 0
        self._check_waiting = False  # a CHECK_DEVICE_STATE waits for the load to end
        self._both_started = False

    def _teardown(self) -> None:
        for vq in getattr(self, "queues", []):
            if vq.kick_fd is not None:
                self.loop.remove(vq.kick_fd)
            vq.unmap_rings()
            vq.close_fds()
        self._abort_transfer(errno.ECONNABORTED)
        if self.memory is not None:
            self.memory.close()
        if self.dirty_log is not None:
            self.logged_pages += self.dirty_log.marked
            self.dirty_log.close()

    @property
    def connected(self) -> bool:
        return self._sock is not None

    def attach(self, sock: socket.socket) -> None:
        """Serve a new front-end connection, starting from a clean device."""
        if self._sock is not None:
            raise RuntimeError("device already has a front-end")
        self._teardown()
        self._reset()
        sock.setblocking(False)
        self._sock = sock
        self._reader = p.MessageReader()
        self.connections += 1
        self.loop.add(sock.fileno(), READ, self._on_socket)
        limited(log, logging.INFO, "front-end connected")

    def disconnect(self, reason: str) -> None:
        if self._sock is None:
            return
        limited(log, logging.INFO, "front-end disconnected: %s", reason)
        self.loop.remove(self._sock.fileno())
        self._sock.close()
        self._sock = None
        self._reader.close()
        self._teardown()
        self._reset()
        if self.state is not None:
            self.state.front_end_gone()

    # -- the socket -------------------------------------------------------------

    def _on_socket(self, events: int) -> None:
        sock = self._sock
        while sock is not None and self._sock is sock and not self._check_waiting:
            try:
                data, ancdata, msg_flags, _ = sock.recvmsg(
                    self._reader.wanted(), socket.CMSG_SPACE(p.MAX_FDS * 4))
            except BlockingIOError:
                return
            except OSError as e:
                self.disconnect(f"receive failed: {e}")
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
                    self.disconnect("end of stream")
                    return
                message = self._reader.feed(data, fds)
                if message is not None:
                    self._dispatch(message)
            except p.ProtocolError as e:
                limited(log, logging.ERROR, "vhost-user protocol error: %s", e)
                self.disconnect(f"protocol error: {e}")
                return
            except Exception as e:
                # A path the checks above missed: still the front-end's doing,
                # so it costs the front-end its connection, not tether its life.
                limited(log, logging.ERROR, "vhost-user message handling failed: %r", e)
                log.debug("traceback", exc_info=True)
                self.disconnect(f"internal error: {e!r}")
                return

    def _send(self, data: bytes) -> None:
        assert self._sock is not None
        try:
            self._sock.sendall(data)
        except OSError as e:
            # Replies are a few bytes; a full socket buffer means QEMU is gone.
            raise p.ProtocolError(f"cannot send reply: {e}") from e

    def _dispatch(self, message: p.Message) -> None:
        handler = self._handlers.get(message.request)
        if handler is None:
            message.close_fds()
            raise p.ProtocolError(f"unsupported request {message.name} "
                                  f"(flags {message.flags:#x}, size {len(message.payload)})")
        log.debug("%s flags=%#x size=%d fds=%d", message.name, message.flags,
                  len(message.payload), len(message.fds))
        try:
            reply = handler(self, message)
        except p.ProtocolError:
            message.close_fds()
            raise
        except (OSError, fdkind.FdKindError) as e:
            # An fd that is not what its message says (or fails on first use):
            # the front-end broke the protocol, not the daemon.
            message.close_fds()
            raise p.ProtocolError(f"{message.name}: {e}") from e
        except _RequestFailedError as e:
            limited(log, logging.ERROR, "%s failed: %s", message.name, e)
            message.close_fds()
            reply = None
            ok = False
        else:
            ok = True
        if message.fds:
            message.close_fds()
            raise p.ProtocolError(f"{message.name}: unexpected fds attached")
        if reply is not None:
            self._send(p.encode_reply(message.request, reply))
        elif self._check_waiting:
            return  # CHECK_DEVICE_STATE answers when the load ends
        elif message.need_reply and self.protocol_features & (1 << p.PF_REPLY_ACK):
            self._send(p.encode_u64_reply(message.request, 0 if ok else 1))

    # -- message handlers: each returns its own reply payload or None ------------

    def _queue(self, index: int, message: p.Message) -> VirtQueue:
        if index >= NUM_QUEUES:
            raise p.ProtocolError(f"{message.name}: queue {index} does not exist "
                                  f"(this device has {NUM_QUEUES})")
        return self.queues[index]

    def _vring_fd(self, m: p.Message,
                  check: Callable[[int], None]) -> tuple[VirtQueue, int | None]:
        """The queue and fd of SET_VRING_KICK/CALL/ERR; the fd is ours from here on.

        `check` makes sure the fd is of a kind its role can use (fds.py) and
        non-blocking; any other fd is closed and the message refused.
        """
        index, fd = p.parse_vring_fd(m)
        if fd is not None:
            try:
                if index >= NUM_QUEUES:
                    raise p.ProtocolError(f"{m.name}: queue {index} does not exist "
                                          f"(this device has {NUM_QUEUES})")
                check(fd)
            except (fdkind.FdKindError, OSError) as e:
                os.close(fd)
                raise p.ProtocolError(f"{m.name}: {e}") from e
            except BaseException:
                os.close(fd)
                raise
        return self._queue(index, m), fd

    def _get_features(self, m: p.Message) -> bytes:
        return p.U64.pack(self.offered_features)

    def _set_features(self, m: p.Message) -> None:
        features = p.parse_u64(m)
        if features & ~self.offered_features:
            raise p.ProtocolError(f"SET_FEATURES {features:#x} has bits never offered "
                                  f"({features & ~self.offered_features:#x})")
        self.features = features
        version_1 = bool(features & (1 << p.F_VERSION_1))
        self.mergeable = bool(features & (1 << p.F_NET_MRG_RXBUF))
        self.hdr_len = 12 if version_1 or self.mergeable else 10
        self.logging = bool(features & (1 << p.F_LOG_ALL))
        self._set_partial_checksums(bool(features & (1 << p.F_NET_GUEST_CSUM)))
        if not features & (1 << p.F_PROTOCOL_FEATURES):
            # vhost-user.rst "Ring states": without PROTOCOL_FEATURES rings
            # are enabled as soon as they start.
            for vq in self.queues:
                vq.enabled = True
        limited(log, logging.INFO, "features %#x (logging %s)", features,
                "on" if self.logging else "off")

    def _nothing(self, m: p.Message) -> None:
        if m.payload:
            raise p.ProtocolError(f"{m.name}: unexpected {len(m.payload)}-byte payload")

    def _reset_rings(self, m: p.Message) -> None:
        for vq in self.queues:
            if vq.kick_fd is not None:
                self.loop.remove(vq.kick_fd)
            vq.unmap_rings()
            vq.close_fds()
        self.queues = [VirtQueue(i) for i in range(NUM_QUEUES)]
        self._both_started = False

    def _set_mem_table(self, m: p.Message) -> None:
        self._scan_valid = False  # ring positions or buffers may change
        regions = p.parse_mem_table(m)
        fds, m.fds = m.fds, []
        memory = MemoryTable(regions, fds, self.allow_unpinned_memory)  # closes the fds
        if self.memory is not None:
            for vq in self.queues:
                vq.unmap_rings()
            self.memory.close()
        self.memory = memory
        self._rx_buf_size = 0
        limited(log, logging.INFO, "memory table: %s",
                ", ".join(f"{g:#x}+{s:#x}" for g, s in memory.regions))
        failed = []
        for vq in self.queues:
            try:
                vq.map_rings(memory)
            except GuestMemoryError as e:
                # A stopped ring's old addresses may not fit the new table:
                # QEMU sends fresh ones (SET_VRING_ADDR) before starting it.
                if vq.started:
                    vq.broken = True
                    failed.append(f"queue {vq.index}: {e}")
        if failed:
            raise _RequestFailedError("; ".join(failed))

    def _set_log_base(self, m: p.Message) -> bytes:
        size, offset = p.parse_log_params(m)
        fd = m.take_fd()
        new = DirtyLog(fd, size, offset, self.allow_unpinned_memory)  # closes fd
        if self.dirty_log is not None:
            self.logged_pages += self.dirty_log.marked
            self.dirty_log.close()
        self.dirty_log = new
        limited(log, logging.INFO, "dirty log: %d pages", new.pages)
        # With LOG_SHMFD QEMU always reads a reply; u64 0 as libvhost-user.
        return p.U64.pack(0)

    def _set_log_fd(self, m: p.Message) -> None:
        m.close_fds()  # an optional "log updated" eventfd we never need

    def _set_vring_num(self, m: p.Message) -> None:
        index, num = p.parse_vring_state(m)
        vq = self._queue(index, m)
        if not 0 < num <= MAX_QUEUE_SIZE or num & (num - 1):
            raise p.ProtocolError(f"SET_VRING_NUM: size {num} is not a power of 2 "
                                  f"up to {MAX_QUEUE_SIZE}")
        if num != vq.num:
            # The mapped ranges were checked for the old size: map again
            # (SET_VRING_ADDR or SET_VRING_KICK) before touching the ring.
            vq.unmap_rings()
        vq.num = num

    def _set_vring_addr(self, m: p.Message) -> None:
        self._scan_valid = False  # ring positions or buffers may change
        addr = p.parse_vring_addr(m)
        vq = self._queue(addr.index, m)
        if addr.flags & ~p.VRING_F_LOG:
            raise p.ProtocolError(f"SET_VRING_ADDR: unknown flags {addr.flags:#x}")
        was_mapped = vq.addr_set and (vq.desc_qva, vq.avail_qva, vq.used_qva) == (
            addr.desc, addr.avail, addr.used)
        vq.desc_qva, vq.avail_qva, vq.used_qva = addr.desc, addr.avail, addr.used
        vq.log_gpa = addr.log
        vq.log_used = bool(addr.flags & p.VRING_F_LOG)
        vq.addr_set = True
        if was_mapped and vq.ready:
            return None  # only the log flag changed (migration starting/ending)
        if self.memory is not None:
            try:
                vq.map_rings(self.memory)
            except GuestMemoryError as e:
                vq.broken = True
                raise _RequestFailedError(f"queue {vq.index}: {e}") from e
            vq.read_used_idx()
        return None

    def _set_vring_base(self, m: p.Message) -> None:
        self._scan_valid = False  # ring positions or buffers may change
        index, num = p.parse_vring_state(m)
        vq = self._queue(index, m)
        if num > 0xFFFF:
            raise p.ProtocolError(f"SET_VRING_BASE: {num:#x} has reserved bits set")
        vq.last_avail = num

    def _get_vring_base(self, m: p.Message) -> bytes:
        self._scan_valid = False  # ring positions or buffers may change
        index, _ = p.parse_vring_state(m)
        vq = self._queue(index, m)
        # Nothing is in flight between loop passes (RX and TX complete their
        # chains within one call), so stopping only needs the used index
        # published, and logged, before QEMU's final log harvest.
        if vq.ready:
            vq.publish_and_notify(self._log())
        if vq.kick_fd is not None:
            self.loop.remove(vq.kick_fd)
            os.close(vq.kick_fd)
            vq.kick_fd = None
        vq.started = False
        self._both_started = False
        limited(log, logging.INFO, "queue %d stopped at avail %d, used %d", index,
                vq.last_avail, vq.used_idx, kind=f"stopped {index}")
        if self.state is not None and not any(q.started for q in self.queues):
            self.state.rings_stopped()
        return p.VRING_STATE.pack(index, vq.last_avail)

    def _set_vring_kick(self, m: p.Message) -> None:
        vq, fd = self._vring_fd(m, fdkind.check_kick)
        index = vq.index
        if fd is None:
            raise p.ProtocolError("SET_VRING_KICK: polling mode (no fd) is not supported")
        if vq.kick_fd is not None:
            self.loop.remove(vq.kick_fd)
            os.close(vq.kick_fd)
            vq.kick_fd = None
        # Edge-triggered, and never read: every kick (an eventfd write) is an
        # event of its own, and a read per kick would be a system call per frame.
        # The counter cannot overflow: 2**64 - 1 kicks.
        try:
            self.loop.add(fd, READ | EDGE, self._rx_kick if index == RX else self._tx_kick)
        except OSError as e:
            os.close(fd)
            raise p.ProtocolError(f"SET_VRING_KICK: cannot watch the fd: {e}") from e
        vq.kick_fd = fd
        # Like passt and libvhost-user, the kick fd is the start signal.
        vq.started = True
        if self.memory is not None and vq.addr_set:
            try:
                vq.map_rings(self.memory)
            except GuestMemoryError as e:
                vq.broken = True
                raise _RequestFailedError(f"queue {index}: {e}") from e
        limited(log, logging.INFO, "queue %d started at avail %d, used %d", index,
                vq.last_avail, vq.used_idx, kind=f"started {index}")
        if index == TX:
            self._schedule_tx()
        else:
            self.loop.call_soon(self._room_check)
        if all(q.started for q in self.queues) and not self._both_started:
            self._both_started = True
            if self.state is not None:
                self.state.rings_started()

    def _set_vring_call(self, m: p.Message) -> None:
        vq, fd = self._vring_fd(m, fdkind.check_call)
        if vq.call_fd is not None:
            os.close(vq.call_fd)
        vq.call_fd = fd

    def _set_vring_err(self, m: p.Message) -> None:
        _, fd = self._vring_fd(m, lambda fd: fdkind.check_call(fd, "err"))
        if fd is not None:
            os.close(fd)  # we never report ring errors this way

    def _get_protocol_features(self, m: p.Message) -> bytes:
        return p.U64.pack(self.offered_protocol)

    def _set_protocol_features(self, m: p.Message) -> None:
        features = p.parse_u64(m)
        if features & ~self.offered_protocol:
            raise p.ProtocolError(f"SET_PROTOCOL_FEATURES {features:#x} has bits never "
                                  f"offered ({features & ~self.offered_protocol:#x})")
        self.protocol_features = features

    def _get_queue_num(self, m: p.Message) -> bytes:
        return p.U64.pack(1)

    def _set_vring_enable(self, m: p.Message) -> None:
        index, num = p.parse_vring_state(m)
        vq = self._queue(index, m)
        if num > 1:
            raise p.ProtocolError(f"SET_VRING_ENABLE: value {num} is not 0 or 1")
        vq.enabled = bool(num)
        if vq.enabled and index == RX:
            self.loop.call_soon(self._room_check)

    def _send_rarp(self, m: p.Message) -> None:
        mac = p.U64.pack(p.parse_u64(m))[:6]
        limited(log, logging.INFO, "front-end asks to announce %s", mac.hex(":"))
        if self.on_rarp is not None:
            self.on_rarp(mac)

    def _net_set_mtu(self, m: p.Message) -> None:
        p.parse_u64(m)

    # -- device state (vhost-user.rst "Migrating back-end state") ------------------

    def _set_device_state_fd(self, m: p.Message) -> bytes:
        direction, phase = p.parse_transfer_params(m)
        fd = m.take_fd()
        if self.state is None:
            os.close(fd)
            raise p.ProtocolError("SET_DEVICE_STATE_FD without DEVICE_STATE negotiated")
        self._abort_transfer(errno.ECANCELED)
        if direction not in (p.TRANSFER_SAVE, p.TRANSFER_LOAD) or phase != p.PHASE_STOPPED:
            os.close(fd)
            limited(log, logging.ERROR, "SET_DEVICE_STATE_FD: direction %d phase %d not supported",
                      direction, phase)
            self._transfer_result = errno.EINVAL
            return p.U64.pack(p.DEVICE_STATE_NO_FD | 1)
        saving = direction == p.TRANSFER_SAVE
        try:
            fdkind.check_state(fd, saving=saving)
        except (fdkind.FdKindError, OSError) as e:
            os.close(fd)
            limited(log, logging.ERROR, "SET_DEVICE_STATE_FD refused: %s", e)
            self._transfer_result = errno.EBADF
            return p.U64.pack(p.DEVICE_STATE_NO_FD | 1)
        data = b""
        sink: StateSink | None = None
        try:
            if saving:
                data = self.state.save_state()
            else:
                sink = self.state.begin_load()
        except DeviceStateError as e:
            os.close(fd)
            limited(log, logging.ERROR, "%s device state failed: %s",
                    "saving" if saving else "loading", e)
            self._transfer_result = e.errno or errno.EIO
            return p.U64.pack(p.DEVICE_STATE_NO_FD | 1)
        transfer = _Transfer(fd, direction, data, sink)
        self._transfer = transfer
        self._transfer_result = errno.EINPROGRESS
        # The reply goes out when this handler returns, before the loop polls
        # again, so the pipe is only touched after QEMU has its reply.
        if saving:
            self.loop.add(fd, WRITE, self._on_state_writable)
        else:
            self.loop.add(fd, READ, self._on_state_readable)
        transfer.timer = self.loop.call_later(
            STATE_TRANSFER_TIMEOUT, lambda: self._abort_transfer(errno.ETIMEDOUT))
        limited(log, logging.INFO, "device state %s started (%d bytes)",
                 "save" if saving else "load", len(data))
        return p.U64.pack(p.DEVICE_STATE_NO_FD)

    def _on_state_writable(self, events: int) -> None:
        t = self._transfer
        assert t is not None
        view = memoryview(t.data)
        try:
            while t.pos < len(t.data):
                t.pos += os.write(t.fd, view[t.pos:t.pos + STATE_CHUNK])
        except BlockingIOError:
            return
        except OSError as e:
            limited(log, logging.ERROR, "writing device state failed: %s", e)
            self._finish_transfer(e.errno or errno.EIO)
            return
        self._finish_transfer(0)

    def _on_state_readable(self, events: int) -> None:
        """Read what is there, at most STATE_PASS bytes a pass, into the sink.

        The sink validates as bytes arrive, so a bad stream or one over the
        size limit ends the transfer at its first bad byte, not at EOF.
        """
        t = self._transfer
        assert t is not None and t.sink is not None
        budget = STATE_PASS
        try:
            while budget > 0:
                chunk = os.read(t.fd, STATE_CHUNK)
                if not chunk:
                    t.sink.finish()
                    limited(log, logging.INFO, "device state loaded (%d bytes)", t.pos)
                    self._finish_transfer(0)
                    return
                t.pos += len(chunk)
                budget -= len(chunk)
                t.sink.feed(chunk)
        except BlockingIOError:
            return
        except DeviceStateError as e:
            limited(log, logging.ERROR, "loading device state failed after %d bytes: %s",
                    t.pos, e)
            self._finish_transfer(e.errno or errno.EINVAL)
        except OSError as e:
            limited(log, logging.ERROR, "reading device state failed: %s", e)
            self._finish_transfer(e.errno or errno.EIO)

    def _finish_transfer(self, result: int) -> None:
        t = self._transfer
        if t is None:
            return
        self._transfer = None
        self.loop.remove(t.fd)
        os.close(t.fd)
        if t.timer is not None:
            t.timer.cancel()
        self._transfer_result = result
        if self._check_waiting:
            self._answer_check()

    def _abort_transfer(self, code: int) -> None:
        if getattr(self, "_transfer", None) is not None:
            limited(log, logging.ERROR, "device state transfer aborted: %s", os.strerror(code))
            self._finish_transfer(code)

    def _check_device_state(self, m: p.Message) -> bytes | None:
        t = self._transfer
        if t is not None and t.direction == p.TRANSFER_LOAD:
            # QEMU sends CHECK after closing its write end, so what is left
            # is normally in the pipe now.  If someone still holds a write
            # end, the answer waits for EOF (or CHECK_GRACE) without blocking
            # the loop; the socket is not read meanwhile, as messages are
            # handled in order.
            self._on_state_readable(0)
            if self._transfer is t:
                self._check_waiting = True
                self._pause_socket()
                if t.timer is not None:
                    t.timer.cancel()
                t.timer = self.loop.call_later(
                    CHECK_GRACE, lambda: self._abort_transfer(errno.ETIMEDOUT))
                return None
        elif t is not None:
            self._finish_transfer(errno.EIO)  # QEMU saw EOF before we closed: impossible
        result = self._transfer_result
        limited(log, logging.INFO, "CHECK_DEVICE_STATE: %s",
                os.strerror(result) if result else "success")
        return p.U64.pack(result)

    def _answer_check(self) -> None:
        """The deferred reply to CHECK_DEVICE_STATE, then back to reading the socket."""
        self._check_waiting = False
        result = self._transfer_result
        limited(log, logging.INFO, "CHECK_DEVICE_STATE: %s",
                os.strerror(result) if result else "success")
        if self._sock is None:
            return
        try:
            self._send(p.encode_u64_reply(p.Request.CHECK_DEVICE_STATE, result))
        except p.ProtocolError as e:
            reason = str(e)
            self.loop.call_soon(lambda: self.disconnect(reason))
            return
        self._resume_socket()

    def _pause_socket(self) -> None:
        if self._sock is not None:
            self.loop.remove(self._sock.fileno())

    def _resume_socket(self) -> None:
        sock = self._sock
        if sock is not None and not self.loop.watching(sock.fileno()):
            self.loop.add(sock.fileno(), READ, self._on_socket)
            # Messages that came meanwhile are already readable: no new edge
            # is needed, but handle them from the loop, not from inside a handler.
            self.loop.call_soon(lambda: self._on_socket(READ) if self._sock is sock else None)

    _handlers: ClassVar[dict[int, Callable[[VhostUserNetDevice, p.Message], bytes | None]]] = {
        p.Request.GET_FEATURES: _get_features,
        p.Request.SET_FEATURES: _set_features,
        p.Request.SET_OWNER: _nothing,
        p.Request.RESET_OWNER: _reset_rings,
        p.Request.RESET_DEVICE: _reset_rings,
        p.Request.SET_MEM_TABLE: _set_mem_table,
        p.Request.SET_LOG_BASE: _set_log_base,
        p.Request.SET_LOG_FD: _set_log_fd,
        p.Request.SET_VRING_NUM: _set_vring_num,
        p.Request.SET_VRING_ADDR: _set_vring_addr,
        p.Request.SET_VRING_BASE: _set_vring_base,
        p.Request.GET_VRING_BASE: _get_vring_base,
        p.Request.SET_VRING_KICK: _set_vring_kick,
        p.Request.SET_VRING_CALL: _set_vring_call,
        p.Request.SET_VRING_ERR: _set_vring_err,
        p.Request.GET_PROTOCOL_FEATURES: _get_protocol_features,
        p.Request.SET_PROTOCOL_FEATURES: _set_protocol_features,
        p.Request.GET_QUEUE_NUM: _get_queue_num,
        p.Request.SET_VRING_ENABLE: _set_vring_enable,
        p.Request.SEND_RARP: _send_rarp,
        p.Request.NET_SET_MTU: _net_set_mtu,
        p.Request.SET_DEVICE_STATE_FD: _set_device_state_fd,
        p.Request.CHECK_DEVICE_STATE: _check_device_state,
    }

    # -- TX: guest -> port -----------------------------------------------------------

    def _log(self) -> DirtyLog | None:
        return self.dirty_log if self.logging else None

    def _tx_kick(self, events: int) -> None:
        self._process_tx()

    def _schedule_tx(self, delay: float = 0.0) -> None:
        if not self._tx_scheduled:
            self._tx_scheduled = True
            # A timer, not call_soon: the loop drains deferred work before it
            # polls again, so a busy guest would starve every other fd.
            self.loop.call_later(delay, self._process_tx)

    def _process_tx(self) -> None:
        self._tx_scheduled = False
        vq = self.queues[TX]
        memory = self.memory
        if memory is None or not vq.ready:
            return
        count = min(vq.available(), TX_BATCH)
        dirty = self._log()
        if count == 0:
            if vq.want_kicks(dirty):
                self._schedule_tx()
            return
        vq.quiet_kicks(dirty)  # we come back until the ring is empty
        hdr_len = self.hdr_len
        segs = self._tx_segs
        frames: list[memoryview] = []
        heads: list[int] = []
        batch_bytes = 0
        for _ in range(count):
            head = vq.pop()
            segs.clear()
            try:
                total = vq.walk(head, memory, segs, writable=False)
                if not hdr_len < total <= hdr_len + MAX_FRAME:
                    raise ChainError(f"chain {head}: {total} bytes is no frame")
            except (ChainError, GuestMemoryError) as e:
                vq.bad_chains += 1
                limited(log, logging.WARNING, "queue %d: dropped chain: %s", vq.index, e)
                vq.push_used(head, 0, dirty)
                continue
            heads.append(head)
            batch_bytes += total
            if len(segs) == 1:
                view, off, length, _ = segs[0]
                frames.append(view[off + hdr_len:off + length])
            else:
                # Gathered into a slot of the arena (Linux sends big frames
                # as a header descriptor plus one per page): no allocation,
                # no zeroing of 64 KiB per frame.
                if len(heads) <= TX_ARENA_FRAMES:
                    start = (len(heads) - 1) * TX_SLOT
                    buf = self._tx_arena[start:start + total]
                else:
                    buf = memoryview(bytearray(total))
                pos = 0
                for view, off, length, _ in segs:
                    buf[pos:pos + length] = view[off:off + length]
                    pos += length
                frames.append(buf[hdr_len:])
        if frames and vq.enabled:
            self.tx_frames += len(frames)
            try:
                self.port.frames_from_guest(frames)
            except Exception:
                log.exception("guest port failed on %d frames", len(frames))
        for frame in frames:
            try:
                frame.release()
            except BufferError:
                limited(log, logging.ERROR, "guest port kept a frame view beyond the call")
        for head in heads:
            vq.push_used(head, 0, dirty)
        vq.publish_and_notify(dirty)
        if vq.available():
            self._schedule_tx()
        elif batch_bytes >= TX_POLL_BYTES:
            self._schedule_tx(TX_POLL)
        elif vq.want_kicks(dirty):
            self._schedule_tx()

    # -- RX: port -> guest (frames.FrameSink) ----------------------------------------

    def _rx_kick(self, events: int) -> None:
        self._room_check()

    def _room_check(self) -> None:
        if not self._want_room:
            return
        if self._room():
            self._want_room = False
            self.queues[RX].quiet_kicks(self._log())
            self.port.guest_room_available()
        else:
            self._wait_for_room()  # the ring may have just started

    def has_room(self) -> bool:
        """Whether a full-sized frame fits; if not, guest_room_available() follows."""
        if self._room():
            return True
        self._wait_for_room()
        return False

    def _wait_for_room(self) -> None:
        """Ask the guest to kick us when it adds receive buffers.

        Only now: while there is room, its refills need not wake us.
        """
        self._want_room = True
        vq = self.queues[RX]
        if vq.ready and vq.want_kicks(self._log()):
            self.loop.call_soon(self._room_check)

    def _room(self) -> bool:
        vq = self.queues[RX]
        if not vq.enabled or self.memory is None:
            return False
        count = vq.available()
        if count == 0:
            return False
        if not self.mergeable:
            return True
        # Fast path: estimated from the largest buffer seen (Linux posts
        # mergeable buffers of similar sizes); an overestimate only costs a
        # dropped frame, after which room is signalled again.
        need = MAX_FRAME + self.hdr_len
        if count * self._rx_buf_size >= need:
            return True
        return self._measure_room(vq, count, need)

    def _measure_room(self, vq: VirtQueue, count: int, need: int) -> bool:
        """The tight case: add up the available buffers' sizes.

        Incremental: `_scan_room` is the capacity of the heads from
        last_avail up to `_scan_pos`; send_frame subtracts what it consumes,
        so each head is walked here once however often the stack asks.
        """
        assert self.memory is not None
        scanned = (self._scan_pos - vq.last_avail) & 0xFFFF
        if not self._scan_valid or scanned > count or self._scan_room < 0:
            self._scan_pos, self._scan_room, scanned = vq.last_avail, 0, 0
            self._scan_valid = True
        segs: list[Segment] = []
        while self._scan_room < need and scanned < count:
            segs.clear()
            try:
                size = vq.walk(vq.head_at(self._scan_pos), self.memory, segs, writable=True)
            except (ChainError, GuestMemoryError):
                self._scan_valid = False
                return True  # send_frame will meet, drop and count the bad chain
            self._rx_buf_size = max(self._rx_buf_size, size)
            self._scan_room += size
            self._scan_pos = (self._scan_pos + 1) & 0xFFFF
            scanned += 1
        return self._scan_room >= need

    def _rx_collect(self, need: int) -> int:
        """Pop receive buffers until `need` bytes fit: their total size, or 0.

        Fills `_rx_segs` and `_rx_heads`.  On 0 nothing is consumed, except a
        malformed chain, which is given back with everything taken before it.
        """
        vq = self.queues[RX]
        memory = self.memory
        if memory is None or not vq.ready or not vq.enabled:
            return 0
        segs = self._rx_segs
        heads = self._rx_heads
        segs.clear()
        heads.clear()
        avail = vq.available()
        room = 0
        while room < need:
            if avail == 0 or (heads and not self.mergeable):
                # Not enough buffers now: keep them for a frame that fits.
                vq.unpop(len(heads))
                self._wait_for_room()
                return 0
            head = vq.pop()
            avail -= 1
            try:
                size = vq.walk(head, memory, segs, writable=True)
            except (ChainError, GuestMemoryError) as e:
                vq.bad_chains += 1
                limited(log, logging.WARNING, "queue %d: dropped chain: %s", vq.index, e)
                # Return everything taken so far unused, so no head is used twice.
                dirty = self._log()
                for taken, _ in heads:
                    vq.push_used(taken, 0, dirty)
                vq.push_used(head, 0, dirty)
                self._scan_valid = False
                return 0
            self._rx_buf_size = max(self._rx_buf_size, size)
            room += size
            heads.append((head, len(segs)))
        return room

    def _rx_consumed(self, capacity: int) -> None:
        """Keep _measure_room's running total right after buffers were used."""
        if self._scan_valid:
            # The consumed heads were the first ones of the scanned range, or
            # the scan is behind and must restart.
            vq = self.queues[RX]
            if (self._scan_pos - vq.last_avail) & 0xFFFF <= vq.num:
                self._scan_room -= capacity
            else:
                self._scan_valid = False

    def send_frame(self, frame: bytes | bytearray | memoryview) -> bool:
        vq = self.queues[RX]
        if self.memory is None or not vq.ready or not vq.enabled:
            self.rx_dropped += 1
            return False
        hdr_len = self.hdr_len
        hdr = self._hdr
        if self.partial_checksums:
            virtio_net.pack_offload_into(hdr, frame)
        dirty = self._log()
        taken = vq.scatter(self.memory, hdr[:hdr_len], memoryview(frame),
                           MAX_QUEUE_SIZE if self.mergeable else 1, dirty)
        hdr[:] = _ZERO_HDR
        if taken < 0:
            return self._send_frame_chains(frame)  # chains, or a bad descriptor
        if not taken:
            self._wait_for_room()
            self.rx_dropped += 1
            return False
        assert vq.scattered is not None
        view, off, gpa, n, capacity, largest = vq.scattered
        if hdr_len == 12:
            virtio_net.NUM_BUFFERS.pack_into(view, off + virtio_net.NUM_BUFFERS_OFFSET, taken)
        if dirty is not None:
            dirty.mark(gpa, n)  # after the header's last write
        self._rx_consumed(capacity)
        self._rx_buf_size = max(self._rx_buf_size, largest)
        self.rx_frames += 1
        if taken > 1:
            self.rx_multi_buffer += 1
        return True

    def _send_frame_chains(self, frame: bytes | bytearray | memoryview) -> bool:
        """send_frame for receive buffers that are descriptor chains (or malformed
        ones, which are dropped and counted here)."""
        hdr_len = self.hdr_len
        need = hdr_len + len(frame)
        room = self._rx_collect(need)
        if not room:
            self.rx_dropped += 1
            return False
        self._rx_consumed(room)
        vq = self.queues[RX]
        segs = self._rx_segs
        heads = self._rx_heads
        dirty = self._log()
        hdr = self._hdr
        if self.partial_checksums:
            virtio_net.pack_offload_into(hdr, frame)
        if len(segs) == 1:
            # The common case (one buffer, one descriptor): two slice copies.
            view, off, _, gpa = segs[0]
            if hdr_len == 12:
                hdr[10] = 1  # num_buffers
            view[off:off + hdr_len] = hdr[:hdr_len]
            view[off + hdr_len:off + need] = frame
            hdr[:] = _ZERO_HDR
            if dirty is not None:
                dirty.mark(gpa, need)
            vq.push_used(heads[0][0], need, dirty)
            self.rx_frames += 1
            return True
        virtio_net.NUM_BUFFERS.pack_into(hdr, virtio_net.NUM_BUFFERS_OFFSET,
                                         len(heads) if hdr_len == 12 else 0)
        source = memoryview(frame)
        pos = 0  # position in header + frame
        first = 0
        for head, end in heads:
            written = 0
            for i in range(first, end):
                if pos >= need:
                    break
                view, off, length, gpa = segs[i]
                n = min(length, need - pos)
                stop = pos + n
                if pos < hdr_len:
                    k = min(hdr_len, stop) - pos
                    view[off:off + k] = hdr[pos:pos + k]
                    if stop > hdr_len:
                        view[off + k:off + n] = source[0:stop - hdr_len]
                else:
                    view[off:off + n] = source[pos - hdr_len:stop - hdr_len]
                if dirty is not None:
                    dirty.mark(gpa, n)
                pos = stop
                written += n
            first = end
            vq.push_used(head, written, dirty)
        hdr[:] = _ZERO_HDR
        self.rx_frames += 1
        if len(heads) > 1:
            self.rx_multi_buffer += 1
        return True

    def flush(self) -> None:
        vq = self.queues[RX]
        if vq.ready:
            vq.publish_and_notify(self._log())

    # -- introspection for tests and stats ----------------------------------------------

    @property
    def bad_chains(self) -> int:
        return sum(vq.bad_chains for vq in self.queues)

    def stats(self) -> dict[str, int]:
        return {
            "connections": self.connections, "tx_frames": self.tx_frames,
            "rx_frames": self.rx_frames, "rx_multi_buffer": self.rx_multi_buffer,
            "rx_dropped": self.rx_dropped, "bad_chains": self.bad_chains,
            "logged_pages": self.logged_pages + (
                self.dirty_log.marked if self.dirty_log is not None else 0),
        }


class _RequestFailedError(Exception):
    """A well-formed request that cannot be honoured; REPLY_ACK reports it."""


def _fds_from(ancdata: Sequence[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(data[: len(data) - len(data) % arr.itemsize])
            fds.extend(arr)
    return fds


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
