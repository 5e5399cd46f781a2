"""The TCP connection state record and its binary encoding (sans-IO).

The encoding is specified byte by byte in docs/migration-format.md 6.4; the
layout below is the only place that declares it.  Everything is network byte
order.  Addresses travel as 16 bytes, IPv4 as IPv4-mapped IPv6
(::ffff:a.b.c.d), like passt's `union inany_addr`, so a record converts to
passt's per-flow records without loss.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from dataclasses import dataclass

from tether.repair.kernel import MIGRATABLE, WSCALE_MAX, TcpState
from tether.wire import inany

FORMAT_VERSION = 1

# docs/migration-format.md 6.4, "Fixed part".
_FIXED = struct.Struct(
    "!"
    "B"  # 0  version
    "B"  # 1  family: 4 or 6
    "B"  # 2  tcp_state (Linux tcpi_state)
    "B"  # 3  options: bit 0 timestamps, bit 1 SACK, bit 2 window scaling
    "B"  # 4  snd_wscale
    "B"  # 5  rcv_wscale
    "H"  # 6  mss (MSS clamp)
    "H"  # 8  local port
    "H"  # 10 remote port
    "16s"  # 12 local address
    "16s"  # 28 remote address
    "I"  # 44 snd_seq: sequence number of the first unacknowledged byte
    "I"  # 48 rcv_seq: sequence number of the first unread byte
    "I"  # 52 sent_len: sent, not yet acknowledged
    "I"  # 56 unsent_len: queued, never sent
    "I"  # 60 rcvq_len: received, acknowledged, not read
    "I"  # 64 timestamp (TCP_TIMESTAMP value, usec flag in bit 0)
    "I"  # 68 snd_wl1
    "I"  # 72 snd_wnd
    "I"  # 76 max_window
    "I"  # 80 rcv_wnd
    "I"  # 84 rcv_wup
)
FIXED_SIZE = _FIXED.size  # 88

OPT_TIMESTAMPS = 0x01
OPT_SACK = 0x02
OPT_WSCALE = 0x04
_OPT_KNOWN = OPT_TIMESTAMPS | OPT_SACK | OPT_WSCALE

# Each queue is bounded so a hostile or corrupt record cannot make a target
# allocate without limit; the kernel's own tcp_wmem/tcp_rmem maxima are far
# below this.
QUEUE_MAX = 64 << 20

_V4_ANY = bytes(4)
_V4_BROADCAST_RAW = b"\xff" * 4
_V6_ANY = bytes(16)
_STATES = {int(state): state for state in TcpState}


class RecordError(ValueError):
    """A TCP state record that cannot be decoded; says where and why."""

    def __init__(self, offset: int, message: str) -> None:
        super().__init__(f"TCP state record, offset {offset}: {message}")
        self.offset = offset


# Not frozen, though used as a value (copy with dataclasses.replace, never
# assign): a frozen dataclass's __init__ sets each field through
# object.__setattr__, ten times slower, and a migration builds this for
# every connection inside the VM's downtime.
@dataclass(slots=True)
class TcpConnState:
    """Everything needed to re-create one connection with TCP_REPAIR.

    Sequence numbers describe data only: a FIN is implied by `state`.
    """

    family: int  # socket.AF_INET or socket.AF_INET6
    local: tuple[str, int]
    remote: tuple[str, int]
    state: TcpState
    options: int  # OPT_* bits
    snd_wscale: int
    rcv_wscale: int
    mss: int
    timestamp: int
    snd_seq: int
    rcv_seq: int
    snd_wl1: int
    snd_wnd: int
    max_window: int
    rcv_wnd: int
    rcv_wup: int
    send_queue: bytes  # sent-unacknowledged bytes, then never-sent bytes
    unsent_len: int  # how many of send_queue's last bytes were never sent
    recv_queue: bytes

    @property
    def sent_len(self) -> int:
        return len(self.send_queue) - self.unsent_len

    def encoded_size(self) -> int:
        return FIXED_SIZE + len(self.send_queue) + len(self.recv_queue)

    def encode(self) -> bytes:
        out = bytearray(self.encoded_size())
        self.encode_into(out, 0)
        return bytes(out)

    def encode_into(self, buf: bytearray | memoryview, offset: int) -> int:
        """Write the record at offset; return the offset just past it."""
        _FIXED.pack_into(
            buf,
            offset,
            FORMAT_VERSION,
            4 if self.family == socket.AF_INET else 6,
            int(self.state),
            self.options,
            self.snd_wscale,
            self.rcv_wscale,
            self.mss,
            self.local[1],
            self.remote[1],
            _addr_bytes(self.family, self.local[0]),
            _addr_bytes(self.family, self.remote[0]),
            self.snd_seq,
            self.rcv_seq,
            self.sent_len,
            self.unsent_len,
            len(self.recv_queue),
            self.timestamp,
            self.snd_wl1,
            self.snd_wnd,
            self.max_window,
            self.rcv_wnd,
            self.rcv_wup,
        )
        pos = offset + FIXED_SIZE
        buf[pos : pos + len(self.send_queue)] = self.send_queue
        pos += len(self.send_queue)
        buf[pos : pos + len(self.recv_queue)] = self.recv_queue
        return pos + len(self.recv_queue)


def _addr_bytes(family: int, text: str) -> bytes:
    if family == socket.AF_INET:
        return inany.V4_MAPPED_PREFIX + socket.inet_pton(socket.AF_INET, text)
    return socket.inet_pton(socket.AF_INET6, text)


def decode(buf: bytes | bytearray | memoryview, offset: int = 0) -> tuple[TcpConnState, int]:
    """Parse one record at offset; return it and the offset just past it.

    Raises RecordError for anything malformed, truncated or out of range;
    nothing else escapes.
    """
    view = memoryview(buf)
    if len(view) - offset < FIXED_SIZE:
        raise RecordError(offset, f"truncated: {len(view) - offset} bytes, need {FIXED_SIZE}")
    (
        version,
        fam,
        state,
        options,
        snd_ws,
        rcv_ws,
        mss,
        lport,
        rport,
        laddr,
        raddr,
        snd_seq,
        rcv_seq,
        sent_len,
        unsent_len,
        rcvq_len,
        timestamp,
        snd_wl1,
        snd_wnd,
        max_window,
        rcv_wnd,
        rcv_wup,
    ) = _FIXED.unpack_from(view, offset)
    if version != FORMAT_VERSION:
        raise RecordError(offset, f"version {version}, this reader knows {FORMAT_VERSION}")
    if fam not in (4, 6):
        raise RecordError(offset + 1, f"family {fam}, expected 4 or 6")
    if state not in MIGRATABLE:
        raise RecordError(offset + 2, f"TCP state {state} cannot be restored")
    if options & ~_OPT_KNOWN:
        raise RecordError(offset + 3, f"unknown option bits 0x{options & ~_OPT_KNOWN:02x}")
    if snd_ws > WSCALE_MAX or rcv_ws > WSCALE_MAX:
        raise RecordError(offset + 4, f"window scale {snd_ws}/{rcv_ws} above {WSCALE_MAX}")
    if not options & OPT_WSCALE and (snd_ws or rcv_ws):
        raise RecordError(offset + 4, "window scales set without the window scaling option")
    if mss == 0:
        raise RecordError(offset + 6, "MSS 0")
    family = socket.AF_INET if fam == 4 else socket.AF_INET6
    local = _addr_text(family, laddr, offset + 12)
    remote = _addr_text(family, raddr, offset + 28)
    if sent_len > QUEUE_MAX or unsent_len > QUEUE_MAX - sent_len:
        raise RecordError(offset + 52, f"send queue {sent_len}+{unsent_len} above {QUEUE_MAX}")
    if rcvq_len > QUEUE_MAX:
        raise RecordError(offset + 60, f"receive queue {rcvq_len} above {QUEUE_MAX}")
    if max_window < snd_wnd:
        raise RecordError(offset + 76, f"max_window {max_window} below snd_wnd {snd_wnd}")
    pos = offset + FIXED_SIZE
    sndq_len = sent_len + unsent_len
    end = pos + sndq_len + rcvq_len
    if end > len(view):
        raise RecordError(pos, f"truncated queues: need {sndq_len + rcvq_len} bytes, "
                          f"have {len(view) - pos}")
    record = TcpConnState(
        family=family,
        local=(local, lport),
        remote=(remote, rport),
        state=_STATES[state],
        options=options,
        snd_wscale=snd_ws,
        rcv_wscale=rcv_ws,
        mss=mss,
        timestamp=timestamp,
        snd_seq=snd_seq,
        rcv_seq=rcv_seq,
        snd_wl1=snd_wl1,
        snd_wnd=snd_wnd,
        max_window=max_window,
        rcv_wnd=rcv_wnd,
        rcv_wup=rcv_wup,
        send_queue=bytes(view[pos : pos + sndq_len]),
        unsent_len=unsent_len,
        recv_queue=bytes(view[pos + sndq_len : end]),
    )
    return record, end


def _addr_text(family: int, raw: bytes, offset: int) -> str:
    # Byte tests and inet_ntop rather than ipaddress objects: a target decodes
    # every connection's two addresses inside the VM's downtime, and
    # ipaddress made this a third of the whole decode.
    mapped = raw[:12] == inany.V4_MAPPED_PREFIX
    if family == socket.AF_INET:
        if not mapped:
            raise RecordError(offset, "IPv4 record with an address that is not IPv4-mapped")
        v4 = raw[12:]
        if v4 in (_V4_ANY, _V4_BROADCAST_RAW) or 224 <= v4[0] <= 239:
            raise RecordError(offset, f"address {socket.inet_ntop(socket.AF_INET, v4)} cannot "
                              "be a connection endpoint")
        return socket.inet_ntop(socket.AF_INET, v4)
    if mapped:
        raise RecordError(offset, "IPv6 record with an IPv4-mapped address")
    if raw == _V6_ANY or raw[0] == 0xFF:
        raise RecordError(offset, f"address {ipaddress.IPv6Address(raw)} cannot be a "
                          "connection endpoint")
    if raw[:12] == _V6_ANY[:12]:
        # inet_ntop writes these (::a.b.c.d) in a dotted form of its own
        return str(ipaddress.IPv6Address(raw))
    return socket.inet_ntop(socket.AF_INET6, raw)
