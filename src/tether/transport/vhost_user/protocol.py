"""vhost-user wire protocol: message framing, payload layouts, feature bits.

Sans-IO: `MessageReader` turns bytes and received fds into `Message`s; the
`parse_*` functions turn payloads into values; `encode_reply` builds replies.
The socket itself belongs to device.py.

Wire format (QEMU docs/interop/vhost-user.rst, "Message Specification"; all
integers native-endian, i.e. little-endian on the hosts we run on):

    header  u32 request | u32 flags | u32 size      (12 bytes)
    payload `size` bytes; file descriptors ride as SCM_RIGHTS on the header

flags: bits 0-1 version (must be 1), bit 2 reply, bit 3 need_reply.  QEMU
compares a reply's flags for equality with 0x5, so replies carry exactly that.
"""

from __future__ import annotations

import enum
import os
import struct
from dataclasses import dataclass, field

HEADER = struct.Struct("<III")
HEADER_SIZE = HEADER.size

VERSION = 0x1
VERSION_MASK = 0x3
FLAG_REPLY = 0x4
FLAG_NEED_REPLY = 0x8
REPLY_FLAGS = VERSION | FLAG_REPLY  # exactly 0x5: QEMU tests equality

# Largest payload we accept.  QEMU's own bound is sizeof(VhostUserPayload)
# (about 1 KiB); the biggest message a net back-end gets is an 8-region
# memory table (264 bytes).  Anything larger is malformed.
MAX_PAYLOAD = 4096
MAX_FDS = 8  # VHOST_MEMORY_BASELINE_NREGIONS: the most fds one message carries
MAX_REGIONS = 8


class Request(enum.IntEnum):
    """Front-end -> back-end request ids (vhost-user.rst, "Front-end message types")."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40
    GET_SHARED_OBJECT = 41
    SET_DEVICE_STATE_FD = 42
    CHECK_DEVICE_STATE = 43


def request_name(request: int) -> str:
    try:
        return Request(request).name
    except ValueError:
        return f"request {request}"


# -- feature bits (virtio spec 1.2 §6 "Reserved Feature Bits", §5.1.3; vhost-user.rst)
F_NET_CSUM = 0  # the device takes frames with a partial checksum (virtio 1.2 5.1.3)
F_NET_GUEST_CSUM = 1  # the driver takes frames with a partial checksum
F_NET_MRG_RXBUF = 15
F_LOG_ALL = 26  # VHOST_F_LOG_ALL
F_PROTOCOL_FEATURES = 30  # VHOST_USER_F_PROTOCOL_FEATURES
F_VERSION_1 = 32

# -- protocol feature bits (vhost-user.rst, "Protocol features")
PF_LOG_SHMFD = 1
PF_RARP = 2
PF_REPLY_ACK = 3
PF_DEVICE_STATE = 19

# Not offered, on purpose: EVENT_IDX (bit 29) was built and measured, and
# under TCG it saved no tether CPU while adding a ring read per frame;
# INDIRECT_DESC (bit 28) is walked correctly if a guest uses it anyway;
# segmentation offloads and MQ are not implemented.
OFFERED_FEATURES = (
    (1 << F_VERSION_1)
    | (1 << F_PROTOCOL_FEATURES)
    | (1 << F_LOG_ALL)
    | (1 << F_NET_MRG_RXBUF)
    | (1 << F_NET_CSUM)
    | (1 << F_NET_GUEST_CSUM)
)
# What passt's vhost-user device offers (reference/passt-migration.md 4.1).  QEMU
# refuses to load a VM whose negotiated virtio features its target device does
# not offer, so a VM that may move to passt must not have been given more.
PASST_FEATURES = OFFERED_FEATURES & ~((1 << F_NET_CSUM) | (1 << F_NET_GUEST_CSUM))
OFFERED_PROTOCOL_FEATURES = (
    (1 << PF_LOG_SHMFD) | (1 << PF_RARP) | (1 << PF_REPLY_ACK) | (1 << PF_DEVICE_STATE)
)

# -- payload layouts (vhost-user.rst, "Message Specification")
U64 = struct.Struct("<Q")
VRING_STATE = struct.Struct("<II")  # index, num
VRING_ADDR = struct.Struct("<IIQQQQ")  # index, flags, desc, used, avail, log (QVA, QVA, QVA, GPA)
MEM_TABLE_HEAD = struct.Struct("<II")  # nregions, padding
MEM_REGION = struct.Struct("<QQQQ")  # guest_phys_addr, memory_size, userspace_addr, mmap_offset
LOG_PARAMS = struct.Struct("<QQ")  # mmap_size, mmap_offset
TRANSFER_PARAMS = struct.Struct("<II")  # direction, phase

VRING_F_LOG = 0x1  # SET_VRING_ADDR flags: log used-ring writes
VRING_IDX_MASK = 0xFF  # SET_VRING_KICK/CALL/ERR payload: bits 0-7 index
VRING_NOFD_MASK = 0x100  # bit 8: no fd attached (polling mode)

TRANSFER_SAVE = 0  # back-end -> front-end (source)
TRANSFER_LOAD = 1  # front-end -> back-end (target)
PHASE_STOPPED = 0
DEVICE_STATE_NO_FD = 0x100  # SET_DEVICE_STATE_FD reply bit 8: "use your own fd"


class ProtocolError(Exception):
    """The front-end broke the protocol; the connection must be dropped."""


@dataclass
class Message:
    request: int
    flags: int
    payload: bytes
    fds: list[int] = field(default_factory=list)

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & FLAG_NEED_REPLY)

    @property
    def name(self) -> str:
        return request_name(self.request)

    def take_fd(self) -> int:
        """Take ownership of the single fd this message must carry."""
        if len(self.fds) != 1:
            raise ProtocolError(f"{self.name}: expected 1 fd, got {len(self.fds)}")
        return self.fds.pop()

    def close_fds(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()


class MessageReader:
    """Reassembles messages from a stream, one at a time.

    The caller reads at most `wanted()` bytes per receive call so that fds
    arriving with a header are never confused with those of the next
    message (QEMU attaches them to the sendmsg that starts a message).
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._fds: list[int] = []
        self._header: tuple[int, int, int] | None = None

    def wanted(self) -> int:
        if self._header is None:
            return HEADER_SIZE - len(self._buf)
        return self._header[2] - len(self._buf)

    def feed(self, data: bytes, fds: list[int]) -> Message | None:
        """Add received bytes and fds; return a message once one is complete.

        fds are counted as they come: a front-end that attaches fds to every
        byte of a payload would otherwise fill the fd table before the
        message ends.  Beyond MAX_FDS they are closed at once.
        """
        room = MAX_FDS - len(self._fds)
        self._fds.extend(fds[:max(room, 0)])
        if len(fds) > room:
            for fd in fds[max(room, 0):]:
                os.close(fd)
            raise ProtocolError(f"more than {MAX_FDS} fds attached to one message")
        if len(data) > self.wanted():
            raise ProtocolError("reader fed more bytes than it asked for")
        self._buf += data
        if self._header is None:
            if len(self._buf) < HEADER_SIZE:
                return None
            request, flags, size = HEADER.unpack(self._buf)
            if flags & VERSION_MASK != VERSION:
                raise ProtocolError(
                    f"{request_name(request)}: bad version in flags {flags:#x} (want 1)"
                )
            if flags & FLAG_REPLY:
                raise ProtocolError(f"{request_name(request)}: reply flag set on a request")
            if size > MAX_PAYLOAD:
                raise ProtocolError(
                    f"{request_name(request)}: payload size {size} exceeds {MAX_PAYLOAD}"
                )
            self._header = (request, flags, size)
            self._buf.clear()
        if len(self._buf) < self._header[2]:
            return None
        request, flags, _ = self._header
        message = Message(request, flags, bytes(self._buf), self._fds)
        self._header = None
        self._buf = bytearray()
        self._fds = []
        return message

    def close(self) -> None:
        """Drop a partial message, closing fds it carried."""
        for fd in self._fds:
            os.close(fd)
        self._fds = []
        self._buf.clear()
        self._header = None


def encode_reply(request: int, payload: bytes = b"") -> bytes:
    return HEADER.pack(request, REPLY_FLAGS, len(payload)) + payload


def encode_u64_reply(request: int, value: int) -> bytes:
    return encode_reply(request, U64.pack(value))


def encode_request(request: int, payload: bytes = b"", flags: int = VERSION) -> bytes:
    """A front-end message; used by tests that play QEMU's part."""
    return HEADER.pack(request, flags, len(payload)) + payload


# -- payload parsers: each checks the exact size, so a malformed message
# -- names itself and its sizes in the error.


def _exact(message: Message, layout: struct.Struct) -> tuple[int, ...]:
    if len(message.payload) != layout.size:
        raise ProtocolError(
            f"{message.name}: payload is {len(message.payload)} bytes, expected {layout.size}"
        )
    return layout.unpack(message.payload)


def parse_u64(message: Message) -> int:
    return _exact(message, U64)[0]


def parse_vring_state(message: Message) -> tuple[int, int]:
    index, num = _exact(message, VRING_STATE)
    return index, num


@dataclass(frozen=True)
class VringAddr:
    index: int
    flags: int
    desc: int  # front-end virtual address (QVA)
    used: int
    avail: int
    log: int  # guest-physical address of the used ring, for dirty logging


def parse_vring_addr(message: Message) -> VringAddr:
    return VringAddr(*_exact(message, VRING_ADDR))


@dataclass(frozen=True)
class MemRegion:
    gpa: int
    size: int
    qva: int  # the front-end's virtual address of the region
    mmap_offset: int


def parse_mem_table(message: Message) -> list[MemRegion]:
    """Regions of SET_MEM_TABLE; QEMU sends only the regions in use."""
    payload = message.payload
    if len(payload) < MEM_TABLE_HEAD.size:
        raise ProtocolError(f"{message.name}: payload of {len(payload)} bytes has no header")
    count, _ = MEM_TABLE_HEAD.unpack_from(payload)
    if not 1 <= count <= MAX_REGIONS:
        raise ProtocolError(f"{message.name}: {count} regions (allowed 1..{MAX_REGIONS})")
    # QEMU sends 8 + 32*n bytes; older front-ends send the whole 8-slot array.
    if len(payload) not in (
        MEM_TABLE_HEAD.size + count * MEM_REGION.size,
        MEM_TABLE_HEAD.size + MAX_REGIONS * MEM_REGION.size,
    ):
        raise ProtocolError(
            f"{message.name}: payload is {len(payload)} bytes for {count} regions"
        )
    if len(message.fds) != count:
        raise ProtocolError(f"{message.name}: {count} regions but {len(message.fds)} fds")
    return [
        MemRegion(*MEM_REGION.unpack_from(payload, MEM_TABLE_HEAD.size + i * MEM_REGION.size))
        for i in range(count)
    ]


def parse_log_params(message: Message) -> tuple[int, int]:
    size, offset = _exact(message, LOG_PARAMS)
    return size, offset


def parse_transfer_params(message: Message) -> tuple[int, int]:
    direction, phase = _exact(message, TRANSFER_PARAMS)
    return direction, phase


def parse_vring_fd(message: Message) -> tuple[int, int | None]:
    """SET_VRING_KICK/CALL/ERR: the ring index and the fd (None in polling mode)."""
    value = parse_u64(message)
    if value & ~(VRING_IDX_MASK | VRING_NOFD_MASK):
        raise ProtocolError(f"{message.name}: reserved bits set in {value:#x}")
    index = value & VRING_IDX_MASK
    if value & VRING_NOFD_MASK:
        if message.fds:
            raise ProtocolError(f"{message.name}: no-fd bit set but an fd is attached")
        return index, None
    return index, message.take_fd()
