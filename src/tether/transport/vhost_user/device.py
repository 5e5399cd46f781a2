"""The vhost-user net device: the control side, answering the front-end's requests.

`VhostUserNetDevice` is the back-end for one front-end connection at a time
(`VhostUserServer`, server.py, accepts them).  It answers the messages QEMU
10 sends (vhost-user.rst; order in shared/reference/vhost-user-migration.md
§5-7) and owns the two parts that do the work:

- `datapath.DataPath`: the two virtqueues; TX chains to the `GuestPort`,
  and `send_frame`/`has_room`/`flush`, the `frames.FrameSink` for RX, which
  the device passes through as its own methods;
- `state_transfer.StateTransfer`: the device-state pipe of
  SET_DEVICE_STATE_FD / CHECK_DEVICE_STATE.

Offloads: VERSION_1 and MRG_RXBUF, and partial checksums both ways (CSUM,
GUEST_CSUM; frames to the guest then carry NEEDS_CSUM), unless the owner
narrows `offered_features`, as `--migrate-format passt` does to passt's set
(protocol.PASST_FEATURES), which has no checksum offload.  No GSO.

Errors, by kind:
- a malformed or unknown message: `ProtocolError` -> logged, connection
  dropped, device reset to a clean state for the next connection;
- a request that is well-formed but cannot be honoured (a ring outside guest
  memory): logged, REPLY_ACK answers non-zero, connection kept;
- hostile guest data in the rings: counted in the queue, buffer dropped.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
from collections.abc import Callable
from typing import ClassVar

from ...frames import GuestPort
from ...loop import EDGE, READ, Loop
from ...ratelimit import limited
from ...state_channel import DeviceStateHandler
from ...wire import virtio_net
from . import fds as fdkind
from . import protocol as p
from .connection import FrontEnd
from .datapath import NUM_QUEUES, DataPath
from .memory import DirtyLog, GuestMemoryError, MemoryTable
from .state_transfer import StateTransfer
from .virtqueue import MAX_QUEUE_SIZE, VirtQueue

__all__ = ["VhostUserNetDevice"]

log = logging.getLogger(__name__)


class VhostUserNetDevice:
    """A virtio-net device served over vhost-user; a frames.FrameSink for RX."""

    # frames.FrameSink: the data path's own bound methods, so a frame costs no
    # call through the device (set in __init__).
    send_frame: Callable[[bytes | bytearray | memoryview], bool]
    has_room: Callable[[], bool]
    flush: Callable[[], None]

    def __init__(self, loop: Loop, port: GuestPort,
                 state: DeviceStateHandler | None = None,
                 on_rarp: Callable[[bytes], None] | None = None,
                 allow_unpinned_memory: bool = True) -> None:
        self.loop = loop
        self.allow_unpinned_memory = allow_unpinned_memory
        """Map guest memory in files that cannot be sealed against shrinking
        (QEMU's memory-backend-file): see memory.py for what that risks."""
        self.state = state
        self.on_rarp = on_rarp
        self.on_checksum_offload: Callable[[bool], bool] | None = None
        """Told whether the guest takes partial TCP/UDP checksums; answers whether the
        frames sent from now on will carry them (the stack then skips the sum)."""
        self.offered_features = p.OFFERED_FEATURES
        self.offered_protocol = p.OFFERED_PROTOCOL_FEATURES
        if state is None:
            self.offered_protocol &= ~(1 << p.PF_DEVICE_STATE)
        self.datapath = DataPath(loop, port)
        self.send_frame = self.datapath.send_frame
        self.has_room = self.datapath.has_room
        self.flush = self.datapath.flush
        self.claim = self.datapath.claim  # frames.InPlaceSink
        self.commit = self.datapath.commit
        self.transfer = StateTransfer(loop, state, self._answer_check)
        self._front_end: FrontEnd | None = None
        self.connections = 0
        self._reset()

    # -- lifecycle ------------------------------------------------------------

    def _set_partial_checksums(self, guest_takes_them: bool) -> None:
        callback = self.on_checksum_offload
        self.datapath.partial_checksums = (bool(callback(guest_takes_them)) if callback
                                           else False)

    def _reset(self) -> None:
        """Back to the state of a device no front-end has touched."""
        self.features = 0
        self.protocol_features = 0
        self.datapath.reset()
        self._set_partial_checksums(False)
        self.transfer.reset()
        self._both_started = False

    def _teardown(self) -> None:
        self.datapath.close()
        self.transfer.abort(errno.ECONNABORTED)

    @property
    def connected(self) -> bool:
        return self._front_end is not None

    def attach(self, sock: socket.socket) -> None:
        """Serve a new front-end connection, starting from a clean device."""
        if self._front_end is not None:
            raise RuntimeError("device already has a front-end")
        self._teardown()
        self._reset()
        self._front_end = FrontEnd(self.loop, sock, self._dispatch, self.disconnect)
        self.connections += 1
        limited(log, logging.INFO, "front-end connected")

    def disconnect(self, reason: str) -> None:
        front_end = self._front_end
        if front_end is None:
            return
        limited(log, logging.INFO, "front-end disconnected: %s", reason)
        self._front_end = None
        front_end.close()
        self._teardown()
        self._reset()
        if self.state is not None:
            self.state.front_end_gone()

    # -- requests ---------------------------------------------------------------

    def _send(self, data: bytes) -> None:
        assert self._front_end is not None
        self._front_end.send(data)

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
        elif self.transfer.check_waiting:
            return  # CHECK_DEVICE_STATE answers when the load ends
        elif message.need_reply and self.protocol_features & (1 << p.PF_REPLY_ACK):
            self._send(p.encode_u64_reply(message.request, 0 if ok else 1))

    # -- message handlers: each returns its own reply payload or None ------------

    def _queue(self, index: int, message: p.Message) -> VirtQueue:
        if index >= NUM_QUEUES:
            raise p.ProtocolError(f"{message.name}: queue {index} does not exist "
                                  f"(this device has {NUM_QUEUES})")
        return self.datapath.queues[index]

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
        dp = self.datapath
        version_1 = bool(features & (1 << p.F_VERSION_1))
        dp.mergeable = bool(features & (1 << p.F_NET_MRG_RXBUF))
        dp.set_hdr_len(virtio_net.HDR_LEN_NUM_BUFFERS if version_1 or dp.mergeable
                       else virtio_net.HDR_LEN)
        dp.logging = bool(features & (1 << p.F_LOG_ALL))
        self._set_partial_checksums(bool(features & (1 << p.F_NET_GUEST_CSUM)))
        if not features & (1 << p.F_PROTOCOL_FEATURES):
            # vhost-user.rst "Ring states": without PROTOCOL_FEATURES rings
            # are enabled as soon as they start.
            for vq in dp.queues:
                vq.enabled = True
        limited(log, logging.INFO, "features %#x (logging %s)", features,
                "on" if dp.logging else "off")

    def _nothing(self, m: p.Message) -> None:
        if m.payload:
            raise p.ProtocolError(f"{m.name}: unexpected {len(m.payload)}-byte payload")

    def _reset_rings(self, m: p.Message) -> None:
        self.datapath.close_queues()
        self.datapath.queues = [VirtQueue(i) for i in range(NUM_QUEUES)]
        self._both_started = False

    def _set_mem_table(self, m: p.Message) -> None:
        self.datapath.rings_changed()
        regions = p.parse_mem_table(m)
        fds, m.fds = m.fds, []
        memory = MemoryTable(regions, fds, self.allow_unpinned_memory)  # closes the fds
        limited(log, logging.INFO, "memory table: %s",
                ", ".join(f"{g:#x}+{s:#x}" for g, s in memory.regions))
        failed = self.datapath.set_memory(memory)
        if failed:
            raise _RequestFailedError("; ".join(failed))

    def _set_log_base(self, m: p.Message) -> bytes:
        size, offset = p.parse_log_params(m)
        fd = m.take_fd()
        new = DirtyLog(fd, size, offset, self.allow_unpinned_memory)  # closes fd
        self.datapath.set_dirty_log(new)
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
        self.datapath.rings_changed()
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
        memory = self.datapath.memory
        if memory is not None:
            try:
                vq.map_rings(memory)
            except GuestMemoryError as e:
                vq.broken = True
                raise _RequestFailedError(f"queue {vq.index}: {e}") from e
            vq.read_used_idx()
        return None

    def _set_vring_base(self, m: p.Message) -> None:
        self.datapath.rings_changed()
        index, num = p.parse_vring_state(m)
        vq = self._queue(index, m)
        if num > 0xFFFF:
            raise p.ProtocolError(f"SET_VRING_BASE: {num:#x} has reserved bits set")
        vq.last_avail = num

    def _get_vring_base(self, m: p.Message) -> bytes:
        self.datapath.rings_changed()
        index, _ = p.parse_vring_state(m)
        vq = self._queue(index, m)
        # Nothing is in flight between loop passes (RX and TX complete their
        # chains within one call), so stopping only needs the used index
        # published, and logged, before QEMU's final log harvest.
        self.datapath.publish(index)
        if vq.kick_fd is not None:
            self.loop.remove(vq.kick_fd)
            os.close(vq.kick_fd)
            vq.kick_fd = None
        vq.started = False
        self._both_started = False
        limited(log, logging.INFO, "queue %d stopped at avail %d, used %d", index,
                vq.last_avail, vq.used_idx, kind=f"stopped {index}")
        if self.state is not None and not any(q.started for q in self.datapath.queues):
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
            self.loop.add(fd, READ | EDGE, self.datapath.kick_handler(index))
        except OSError as e:
            os.close(fd)
            raise p.ProtocolError(f"SET_VRING_KICK: cannot watch the fd: {e}") from e
        vq.kick_fd = fd
        # Like passt and libvhost-user, the kick fd is the start signal.
        vq.started = True
        memory = self.datapath.memory
        if memory is not None and vq.addr_set:
            try:
                vq.map_rings(memory)
            except GuestMemoryError as e:
                vq.broken = True
                raise _RequestFailedError(f"queue {index}: {e}") from e
        limited(log, logging.INFO, "queue %d started at avail %d, used %d", index,
                vq.last_avail, vq.used_idx, kind=f"started {index}")
        self.datapath.queue_started(index)
        if all(q.started for q in self.datapath.queues) and not self._both_started:
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
        if vq.enabled:
            self.datapath.queue_enabled(index)

    def _send_rarp(self, m: p.Message) -> None:
        mac = p.U64.pack(p.parse_u64(m))[:6]
        limited(log, logging.INFO, "front-end asks to announce %s", mac.hex(":"))
        if self.on_rarp is not None:
            self.on_rarp(mac)

    def _net_set_mtu(self, m: p.Message) -> None:
        p.parse_u64(m)

    # -- device state (vhost-user.rst "Migrating back-end state"): state_transfer.py

    def _set_device_state_fd(self, m: p.Message) -> bytes:
        direction, phase = p.parse_transfer_params(m)
        return self.transfer.start(direction, phase, m.take_fd())

    def _check_device_state(self, m: p.Message) -> bytes | None:
        reply = self.transfer.check()
        if reply is None and self._front_end is not None:
            self._front_end.pause()  # until the load ends: _answer_check
        return reply

    def _answer_check(self, result: int) -> None:
        """The deferred reply to CHECK_DEVICE_STATE, then back to reading the socket."""
        front_end = self._front_end
        if front_end is None:
            return
        try:
            front_end.send(p.encode_u64_reply(p.Request.CHECK_DEVICE_STATE, result))
        except p.ProtocolError as e:
            reason = str(e)
            self.loop.call_soon(lambda: self.disconnect(reason))
            return
        front_end.resume()

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

    # -- introspection for tests and stats ----------------------------------------------

    @property
    def queues(self) -> list[VirtQueue]:
        return self.datapath.queues

    @property
    def memory(self) -> MemoryTable | None:
        return self.datapath.memory

    @property
    def rx_frames(self) -> int:
        return self.datapath.rx_frames

    @property
    def bad_chains(self) -> int:
        return sum(vq.bad_chains for vq in self.datapath.queues)

    def stats(self) -> dict[str, int]:
        dp = self.datapath
        return {
            "connections": self.connections, "tx_frames": dp.tx_frames,
            "rx_frames": dp.rx_frames, "rx_multi_buffer": dp.rx_multi_buffer,
            "rx_in_place": dp.rx_in_place,
            "rx_dropped": dp.rx_dropped, "bad_chains": self.bad_chains,
            "logged_pages": dp.logged_pages + (
                dp.dirty_log.marked if dp.dirty_log is not None else 0),
        }


class _RequestFailedError(Exception):
    """A well-formed request that cannot be honoured; REPLY_ACK reports it."""
