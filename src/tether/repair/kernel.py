"""Linux TCP repair interface: option numbers, layouts and thin wrappers.

Values from include/uapi/linux/tcp.h, include/net/tcp_states.h and
include/uapi/linux/sockios.h; Python's socket module does not export them.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import socket
import struct
from enum import IntEnum

SOL_TCP = socket.IPPROTO_TCP

# setsockopt/getsockopt names (uapi/linux/tcp.h)
TCP_MAXSEG = 2
TCP_INFO = 11
TCP_REPAIR = 19
TCP_REPAIR_QUEUE = 20
TCP_QUEUE_SEQ = 21
TCP_REPAIR_OPTIONS = 22
TCP_TIMESTAMP = 24
TCP_REPAIR_WINDOW = 29

# TCP_REPAIR values; also the helper protocol's command byte.
REPAIR_ON = 1
REPAIR_OFF = 0
REPAIR_OFF_NO_WP = -1

# TCP_REPAIR_QUEUE values
TCP_NO_QUEUE = 0
TCP_RECV_QUEUE = 1
TCP_SEND_QUEUE = 2

# TCP_REPAIR_OPTIONS codes (the TCP option kinds, RFC 9293 / 7323 / 2018)
TCPOPT_MAXSEG = 2
TCPOPT_WINDOW = 3
TCPOPT_SACK_PERM = 4
TCPOPT_TIMESTAMP = 8

# tcp_info.tcpi_options bits
TCPI_OPT_TIMESTAMPS = 1
TCPI_OPT_SACK = 2
TCPI_OPT_WSCALE = 4

# ioctls (uapi/asm-generic/ioctls.h, uapi/linux/sockios.h)
SIOCINQ = 0x541B
SIOCOUTQ = 0x5411
SIOCOUTQNSD = 0x894B

SO_PEEK_OFF = 42
SO_ATTACH_FILTER = 26
SO_DETACH_FILTER = 27

WSCALE_MAX = 14  # RFC 7323 section 2.3
USER_MSS_MAX = 32767  # MAX_TCP_WINDOW, the TCP_MAXSEG setsockopt limit


class TcpState(IntEnum):
    """Linux enum from include/net/tcp_states.h (tcp_info.tcpi_state)."""

    ESTABLISHED = 1
    SYN_SENT = 2
    SYN_RECV = 3
    FIN_WAIT1 = 4
    FIN_WAIT2 = 5
    TIME_WAIT = 6
    CLOSE = 7
    CLOSE_WAIT = 8
    LAST_ACK = 9
    LISTEN = 10
    CLOSING = 11


MIGRATABLE = frozenset(
    {
        TcpState.ESTABLISHED,
        TcpState.FIN_WAIT1,
        TcpState.FIN_WAIT2,
        TcpState.CLOSE_WAIT,
        TcpState.LAST_ACK,
        TcpState.CLOSING,
    }
)
# Our FIN occupies one sequence number in the send space.
FIN_SENT = frozenset({TcpState.FIN_WAIT1, TcpState.FIN_WAIT2, TcpState.CLOSING, TcpState.LAST_ACK})
# ...and is still unacknowledged, so SIOCOUTQ counts it.
FIN_UNACKED = frozenset({TcpState.FIN_WAIT1, TcpState.CLOSING, TcpState.LAST_ACK})
# The peer's FIN occupies one sequence number in the receive space.
FIN_RECEIVED = frozenset({TcpState.CLOSE_WAIT, TcpState.LAST_ACK, TcpState.CLOSING})

# struct tcp_repair_window: five host-order u32 (uapi/linux/tcp.h)
REPAIR_WINDOW = struct.Struct("=5I")
# struct tcp_repair_opt: {u32 opt_code; u32 opt_val}
REPAIR_OPT = struct.Struct("=II")

# struct tcp_info prefix: state, ca_state, retransmits, probes, backoff,
# options, snd_wscale:4|rcv_wscale:4 (little-endian bitfield), one flag byte,
# then rto, ato, snd_mss, rcv_mss.
TCP_INFO_PREFIX = struct.Struct("=8B4I")
TCP_INFO_LEN = TCP_INFO_PREFIX.size


def tcp_info(sock: socket.socket) -> tuple[int, int, int, int, int]:
    """(state, options, snd_wscale, rcv_wscale, snd_mss) from TCP_INFO."""
    raw = sock.getsockopt(SOL_TCP, TCP_INFO, TCP_INFO_LEN)
    fields = TCP_INFO_PREFIX.unpack_from(raw)
    wscale = fields[6]
    return fields[0], fields[5], wscale & 0x0F, wscale >> 4, fields[10]


_INT = struct.Struct("=i")
_INT_ZERO = bytes(4)


def ioctl_int(sock: socket.socket, request: int) -> int:
    return int(_INT.unpack(fcntl.ioctl(sock.fileno(), request, _INT_ZERO))[0])


# A one-instruction classic BPF program, "ret #0": every incoming segment is
# dropped before TCP sees it (tcp_v4_rcv/tcp_v6_rcv run the socket filter
# first), so the socket neither queues nor acknowledges nor resets.  Unlike
# TCP_REPAIR, which leaves the receive path running, this truly freezes the
# connection, and it needs no privilege.
_DROP_ALL = (ctypes.c_uint8 * 8).from_buffer_copy(struct.pack("=HBBI", 0x06, 0, 0, 0))
_DROP_ALL_PROG = struct.pack("=HxxxxxxQ", 1, ctypes.addressof(_DROP_ALL))


def silence(sock: socket.socket) -> None:
    """Make the socket drop every incoming segment silently."""
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, _DROP_ALL_PROG)


def silenced(sock: socket.socket) -> bool:
    """Whether a filter is attached (SO_GET_FILTER: its length, 0 for none)."""
    return bool(sock.getsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER))


def unsilence(sock: socket.socket) -> None:
    """Undo silence(); harmless if no filter is attached."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_DETACH_FILTER, 0)
    except OSError as e:
        if e.errno != errno.ENOENT:
            raise
