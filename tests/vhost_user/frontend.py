"""A scripted front-end and guest on synthetic memory, for unit and fuzz tests.

It plays QEMU's part (messages over a socketpair, fds by SCM_RIGHTS) and the
guest driver's part (descriptors and avail entries written into a memfd that
the device maps), to reach states a real guest never produces: hostile
descriptor tables, malformed messages.  The real thing is tested in tests/vm.
"""

from __future__ import annotations

import array
import mmap
import os
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

from tether.loop import Loop
from tether.state_channel import BufferedSink, DeviceStateError
from tether.transport.vhost_user import protocol as p
from tether.transport.vhost_user.device import VhostUserNetDevice

MEM_SIZE = 1 << 20
QVA_BASE = 0x7F00_0000_0000  # the front-end's (made-up) address of guest memory
QSIZE = 16
# Ring layout in guest memory (GPA): queue q's rings at RING_BASE + q * 0x1000.
RING_BASE = 0x1000
BUF_BASE = 0x10000
DESC = struct.Struct("<QIHH")


@dataclass
class RecordingPort:
    """A GuestPort that keeps copies of what it gets."""

    frames: list[bytes] = field(default_factory=list)
    room_calls: int = 0

    def frames_from_guest(self, frames: Sequence[memoryview]) -> None:
        self.frames.extend(bytes(f) for f in frames)

    def guest_room_available(self) -> None:
        self.room_calls += 1


@dataclass
class RecordingState:
    """A DeviceStateHandler that records calls."""

    blob: bytes = b"state"
    loaded: list[bytes] = field(default_factory=list)
    started: int = 0
    stopped: int = 0
    reject: bool = False

    def save_state(self) -> bytes:
        return self.blob

    def begin_load(self) -> BufferedSink:
        return BufferedSink(self.load_state, 1 << 20)

    def load_state(self, data: bytes) -> None:
        if self.reject:
            raise DeviceStateError(71, "rejected by test")
        self.loaded.append(data)

    def rings_started(self) -> None:
        self.started += 1

    def rings_stopped(self) -> None:
        self.stopped += 1

    def front_end_gone(self) -> None:
        pass


class Guest:
    """The guest's view: memory and the split rings of queue 0 (RX) and 1 (TX)."""

    def __init__(self, qsize: int = QSIZE, mem_size: int = MEM_SIZE,
                 memfd_flags: int = 0) -> None:
        assert qsize <= 256
        self.qsize = qsize
        self.mem_size = mem_size
        self.fd = os.memfd_create("tether-test-guest", os.MFD_CLOEXEC | memfd_flags)
        os.ftruncate(self.fd, mem_size)
        self.mem = mmap.mmap(self.fd, mem_size)
        self.avail_idx = [0, 0]
        self.used_seen = [0, 0]

    def desc_gpa(self, q: int) -> int:
        return RING_BASE + q * 0x4000

    def avail_gpa(self, q: int) -> int:
        return self.desc_gpa(q) + 16 * self.qsize

    def used_gpa(self, q: int) -> int:
        return self.desc_gpa(q) + 0x2000

    def set_desc(self, q: int, index: int, addr: int, length: int,  # noqa: PLR0917
                 flags: int, nxt: int = 0) -> None:
        DESC.pack_into(self.mem, self.desc_gpa(q) + 16 * index, addr, length, flags, nxt)

    def offer(self, q: int, head: int) -> None:
        a = self.avail_gpa(q)
        struct.pack_into("<H", self.mem, a + 4 + 2 * (self.avail_idx[q] % self.qsize), head)
        self.avail_idx[q] = (self.avail_idx[q] + 1) & 0xFFFF
        struct.pack_into("<H", self.mem, a + 2, self.avail_idx[q])

    def used_idx(self, q: int) -> int:
        return int(struct.unpack_from("<H", self.mem, self.used_gpa(q) + 2)[0])

    def kicks_wanted(self, q: int) -> bool:
        """The device's request in used->flags: False while it says NO_NOTIFY."""
        return not struct.unpack_from("<H", self.mem, self.used_gpa(q))[0] & 1

    def used(self, q: int) -> list[tuple[int, int]]:
        """New used elements since the last call."""
        out = []
        while self.used_seen[q] != self.used_idx(q):
            slot = self.used_seen[q] % self.qsize
            out.append(struct.unpack_from("<II", self.mem, self.used_gpa(q) + 4 + 8 * slot))
            self.used_seen[q] = (self.used_seen[q] + 1) & 0xFFFF
        return out

    def write(self, gpa: int, data: bytes) -> None:
        self.mem[gpa:gpa + len(data)] = data

    def read(self, gpa: int, length: int) -> bytes:
        return self.mem[gpa:gpa + length]

    def close(self) -> None:
        self.mem.close()
        os.close(self.fd)


class Frontend:
    """QEMU's side of the socket."""

    def __init__(self, loop: Loop, device: VhostUserNetDevice) -> None:
        self.loop = loop
        self.device = device
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock = ours
        self.sock.settimeout(5)
        device.attach(theirs)
        self.kick = [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(2)]
        self.call = [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(2)]

    def send(self, request: int, payload: bytes = b"", fds: Sequence[int] = (),
             flags: int = p.VERSION) -> None:
        data = p.encode_request(request, payload, flags)
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        self.sock.sendmsg([data], anc)
        self.pump()

    def pump(self) -> None:
        """Let the device handle everything pending."""
        for _ in range(4):
            self.loop.run_once(0)

    def reply(self, request: int) -> bytes:
        header = self._recv(p.HEADER_SIZE)
        req, flags, size = p.HEADER.unpack(header)
        assert req == request, f"reply to {req}, expected {request}"
        assert flags == p.REPLY_FLAGS, f"reply flags {flags:#x}"
        return self._recv(size)

    def _recv(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            assert chunk, "device closed the connection"
            data += chunk
        return data

    def call_u64(self, request: int, payload: bytes = b"", fds: Sequence[int] = (),
                 flags: int = p.VERSION) -> int:
        self.send(request, payload, fds, flags)
        return int(p.U64.unpack(self.reply(request))[0])

    def no_reply_pending(self) -> bool:
        self.sock.setblocking(False)
        try:
            return self.sock.recv(1, socket.MSG_PEEK) == b""
        except BlockingIOError:
            return True
        finally:
            self.sock.settimeout(5)

    def closed_by_device(self) -> bool:
        self.pump()
        self.sock.setblocking(False)
        try:
            while True:
                if self.sock.recv(4096) == b"":
                    return True
        except BlockingIOError:
            return False
        finally:
            self.sock.settimeout(5)

    def start(self, guest: Guest, features: int = p.OFFERED_FEATURES,
              protocol: int = p.OFFERED_PROTOCOL_FEATURES) -> None:
        """QEMU's init and start sequence (reference §5, §7.3)."""
        assert self.call_u64(p.Request.GET_FEATURES) == p.OFFERED_FEATURES
        offered = self.call_u64(p.Request.GET_PROTOCOL_FEATURES)
        self.send(p.Request.SET_PROTOCOL_FEATURES, p.U64.pack(protocol & offered))
        self.send(p.Request.SET_OWNER)
        self.send(p.Request.SET_FEATURES, p.U64.pack(features & ~(1 << p.F_LOG_ALL)))
        region = p.MEM_REGION.pack(0, guest.mem_size, QVA_BASE, 0)
        self.send(p.Request.SET_MEM_TABLE, p.MEM_TABLE_HEAD.pack(1, 0) + region,
                  [guest.fd])
        for q in range(2):
            self.send(p.Request.SET_VRING_NUM, p.VRING_STATE.pack(q, guest.qsize))
            self.send(p.Request.SET_VRING_BASE, p.VRING_STATE.pack(q, 0))
            self.set_addr(guest, q, 0)
            self.send(p.Request.SET_VRING_KICK, p.U64.pack(q), [self.kick[q]])
            self.send(p.Request.SET_VRING_CALL, p.U64.pack(q), [self.call[q]])
            self.send(p.Request.SET_VRING_ENABLE, p.VRING_STATE.pack(q, 1))

    def set_addr(self, guest: Guest, q: int, flags: int) -> None:
        self.send(p.Request.SET_VRING_ADDR, p.VRING_ADDR.pack(
            q, flags, QVA_BASE + guest.desc_gpa(q), QVA_BASE + guest.used_gpa(q),
            QVA_BASE + guest.avail_gpa(q), guest.used_gpa(q)))

    def kick_queue(self, q: int) -> None:
        os.eventfd_write(self.kick[q], 1)
        self.pump()

    def called(self, q: int) -> bool:
        try:
            os.eventfd_read(self.call[q])
            return True
        except BlockingIOError:
            return False

    def close(self) -> None:
        self.sock.close()
        for fd in self.kick + self.call:
            os.close(fd)
